"""The two data contracts: a decoded `Sample` (what the loader hands to the sequence planner) and the
`PackedBatch` (what the packer hands to the model). Everything upstream produces these; everything downstream
consumes only these.

Shape legend (PackedBatch):
  L  packed tokens of one micro-batch (all samples plus padding)
  C  positions scored by the text loss (CE)
  I  ViT blocks (images or clips for understanding); P their patches; M = P / merge**2 merged ViT tokens
  G  VAE blocks (images or clips to generate or condition on); N their latent tokens (t * h * w per block)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum

import torch
from torch import Tensor


PAD_TASK = "pad"  # PackedBatch.tasks entry of the padding sample


class AttnMode(IntEnum):
    """How the tokens of one split attend (reference/LANCE_FACTS.md, "Attention mask over a packed sequence")."""

    CAUSAL = 0  # text: attends to earlier tokens of its sample
    FULL = 1  # ViT tokens, clean condition latents: bidirectional inside the split
    NOISE = 2  # noised target latents: bidirectional inside the split, invisible to every other split


@dataclass
class Sample:
    """One decoded example, before tokenisation.

    media: column name without `_bytes` (image, video, input_image, output_image, ...) -> uint8 [T, H, W, 3]
    frames (an image has T = 1), already frame-sampled but not yet resized for the model.
    """

    task: str  # t2i, t2v, i2i, v2v, i2t, v2t
    texts: dict[str, str]  # caption, or caption_i / caption_q / caption_a
    media: dict[str, Tensor]
    key: str = ""  # shard member key, for messages
    group: str = ""  # dataset group it came from
    epoch: int = 0  # the epoch of its group it was read in (caption dropout is drawn per epoch)


@dataclass
class PackedBatch:
    """One packed micro-batch of one rank. Index tensors are positions into the packed sequence."""

    # the sequence
    input_ids: Tensor  # [L] long; text ids, <|video_pad|> in vision slots
    position_ids: Tensor  # [3, L] long; multimodal RoPE ids (temporal, height, width)
    sample_ids: Tensor  # [L] long; index into `tasks` (padding is a sample of its own)
    split_ids: Tensor  # [L] long; attention split, unique across the batch
    attn_modes: Tensor  # [L] long; AttnMode of the token's split
    # text targets
    ce_indexes: Tensor  # [C] long; positions whose next-token logits are scored
    ce_targets: Tensor  # [C] long; the target token ids
    ce_weights: Tensor  # [C] float; 1 for real targets, 0 for a placeholder that keeps lm_head in the graph
    # understanding vision (frozen ViT)
    vit_patches: Tensor  # [P, 3 * temporal_patch * patch * patch] uint8 pixels, Qwen2.5-VL patch order
    vit_grid_thw: Tensor  # [I, 3] long; patch grid (T / temporal_patch, H / patch, W / patch)
    vit_indexes: Tensor  # [M] long; positions of the merged ViT tokens, block after block
    # generation vision (frozen VAE)
    vae_pixels: list[Tensor]  # G x [3, T, H, W] uint8; scaled and encoded on the device by the frozen VAE
    vae_grid_thw: Tensor  # [G, 3] long; latent grid (t, h, w) of each block
    vae_indexes: Tensor  # [N] long; positions of the latent tokens, block after block, (t, h, w) raster
    vae_coords: Tensor  # [N, 3] long; (t, h, w) latent coordinates for the sin-cos / LAPE position tables
    vae_is_target: Tensor  # [G] bool; noised target (flow matching) or clean condition (t = 0)
    vae_weights: Tensor  # [G] float; MSE weight: 1 for a target, 0 for a condition or a placeholder
    # bookkeeping (not model inputs)
    tasks: list[str] = field(default_factory=list)  # per sample id; PAD_TASK for padding
    num_real_tokens: int = 0  # tokens of real samples (not padding, not placeholders)
    attended_pairs: int = 0  # n x n summed over the real samples of n tokens (the attention's FLOPs count them)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """Move every tensor (floats keep their dtype; the trainer casts where the model needs it)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """Every tensor in page-locked memory (DataLoader(pin_memory=True) calls this): the copy to the GPU then
        runs asynchronously, at full bus speed."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn) -> "PackedBatch":
        def apply(v):
            if isinstance(v, Tensor):
                return fn(v)
            if isinstance(v, list):
                return [apply(x) for x in v]
            return v

        return dataclasses.replace(self, **{f.name: apply(getattr(self, f.name)) for f in dataclasses.fields(self)})
