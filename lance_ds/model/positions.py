"""Where tokens are: multimodal RoPE (applied here; the ids come from the data side), the fixed 3D sin-cos latent
positions, LAPE (learnable spatial/temporal tables), and the timestep embedder.

Shape legend:
  L  packed tokens;  N  VAE latent tokens;  H  hidden size;  d  head dim
  position_ids [3, L]  (temporal, height, width) RoPE ids from PackedBatch.position_ids
  coords [N, 3]        (t, h, w) latent coordinates from PackedBatch.vae_coords

Nothing here is a buffer: RoPE frequencies and sin-cos tables are recomputed in fp32 each forward (they are tiny),
so a bf16 engine cast cannot degrade them and ZeRO-3 has nothing to partition or checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------------
# multimodal RoPE (Qwen2.5-VL): the d/2 frequencies are split into sections [t, h, w]; each section rotates by
# its own axis' position id. Text tokens carry the same id on all three axes, so for them this is plain 1-D RoPE.


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, mrope_section: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """cos, sin [L, d] (fp32) for RoPE ids [3, L]; mrope_section sums to d / 2 (LLMConfig.check)."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float64) / head_dim
    inv_freq = (1.0 / theta ** exponent).float()  # [d/2]
    freqs = position_ids.float()[..., None] * inv_freq  # [3, L, d/2]
    chunks = freqs.split(list(mrope_section), dim=-1)
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # [L, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [L, heads, d] rotated by cos/sin [L, d] (rotate-half convention), computed in fp32."""
    dtype = x.dtype
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# fixed 3D sin-cos latent positions


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """[n] -> [n, dim]: sin of the first dim/2 frequencies, then cos (MAE / DiT convention), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_axis_dims(hidden_size: int) -> tuple[int, int, int]:
    """Channels of the t, h, w parts: t and h get a third each rounded down to even, w the rest (2048 -> 682/682/684)."""
    third = (hidden_size // 3) // 2 * 2
    return third, third, hidden_size - 2 * third


class LatentPositions(nn.Module):
    """The fixed 3D sin-cos table of Lance (`latent_pos_embed.pos_embed`, Lf * S^2 rows of H), looked up by coords.

    Row t * S^2 + h * S + w equals concat(sincos_t(t), sincos_h(h), sincos_w(w)); computing that concat directly
    gives the same values without holding the (31 * 64 * 64, 2048) table. Coordinates past the table are refused,
    never wrapped: Lance aliased wide images past 64 columns.
    """

    def __init__(self, hidden_size: int, max_latent_size: int, max_latent_frames: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.max_latent_size = max_latent_size
        self.max_latent_frames = max_latent_frames

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, frames={self.max_latent_frames}, size={self.max_latent_size}"

    def forward(self, coords: Tensor) -> Tensor:
        """coords [N, 3] long -> [N, H] fp32."""
        check_coords(coords, self.max_latent_frames, self.max_latent_size, "the sin-cos latent table",
                     "model.max_num_frames / model.max_latent_size")
        dims = sincos_axis_dims(self.hidden_size)
        sizes = (self.max_latent_frames, self.max_latent_size, self.max_latent_size)
        # per axis a table of every position (<= 64 rows, computed in float64 as Lance's table was), then a lookup:
        # the same values as computing each token's angles, at a fraction of the cost for long videos
        parts = [sincos_1d(torch.arange(size, device=coords.device), dim).float()[coords[:, axis]]
                 for axis, (dim, size) in enumerate(zip(dims, sizes))]
        return torch.cat(parts, dim=-1)

    def table(self) -> Tensor:
        """The whole table in Lance's row order (for export and for checking a loaded checkpoint's copy)."""
        t, h, w = torch.meshgrid(torch.arange(self.max_latent_frames), torch.arange(self.max_latent_size),
                                 torch.arange(self.max_latent_size), indexing="ij")
        return self.forward(torch.stack([t.flatten(), h.flatten(), w.flatten()], dim=-1))


def check_coords(coords: Tensor, max_frames: int, max_size: int, what: str, keys: str) -> None:
    if coords.numel() == 0:
        return
    if coords.min() < 0:
        raise ValueError(f"negative latent coordinates reached {what}; PackedBatch.vae_coords must be >= 0")
    top = coords.max(dim=0).values.tolist()
    if top[0] >= max_frames or top[1] >= max_size or top[2] >= max_size:
        raise ValueError(
            f"latent coordinates up to (t={top[0]}, h={top[1]}, w={top[2]}) do not fit {what} of {max_frames} frames "
            f"x {max_size} x {max_size}; use smaller images/clips or raise {keys}")


# ----------------------------------------------------------------------------------------------------------------
# LAPE: learnable absolute position embeddings for VAE tokens


class LearnablePositions(nn.Module):
    """A temporal table indexed by t, and a spatial table whose first H/2 channels are indexed by the latent row
    and last H/2 by the column (one table, two axes, no h/w symmetry). Zero-initialised, so enabling LAPE on a
    pretrained model starts from exactly the pretrained function.
    """

    def __init__(self, hidden_size: int, num_spatial_tokens: int, num_temporal_tokens: int):
        super().__init__()
        for name, value in (("num_spatial_tokens", num_spatial_tokens), ("num_temporal_tokens", num_temporal_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.lape.{name} must be a positive integer, got {value!r}")
        self.num_spatial_tokens = num_spatial_tokens
        self.num_temporal_tokens = num_temporal_tokens
        self.spatial = nn.Parameter(torch.zeros(num_spatial_tokens, hidden_size))
        self.temporal = nn.Parameter(torch.zeros(num_temporal_tokens, hidden_size))

    def forward(self, coords: Tensor) -> Tensor:
        """coords [N, 3] -> [N, H] in the tables' dtype."""
        check_coords(coords, self.num_temporal_tokens, self.num_spatial_tokens, "the LAPE tables",
                     "model.lape.num_temporal_tokens / num_spatial_tokens")
        half = self.spatial.shape[1] // 2
        rows = self.spatial[coords[:, 1], :half]
        cols = self.spatial[coords[:, 2], half:]
        return self.temporal[coords[:, 0]] + torch.cat([rows, cols], dim=-1)


def lape_cost(hidden_size: int, num_spatial_tokens: int, num_temporal_tokens: int, param_bytes: int = 2) -> dict:
    """Extra parameters of LAPE and their training memory: weights at `param_bytes` each, plus fp32 master weights
    and two Adam moments (12 bytes per parameter), summed over all ranks (ZeRO-3 splits it across them)."""
    num_params = (num_spatial_tokens + num_temporal_tokens) * hidden_size
    return {"num_params": num_params, "weight_bytes": num_params * param_bytes,
            "train_bytes": num_params * (param_bytes + 12)}


# ----------------------------------------------------------------------------------------------------------------
# timestep embedder


def timestep_sinusoid(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """t [N] in [0, 1] (used as is, not x1000) -> [N, dim] fp32: cos of dim/2 geometric frequencies, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Lance's `time_embedder`: 256-dim sinusoid -> Linear -> SiLU -> Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_sinusoid(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)
