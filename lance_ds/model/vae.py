"""The frozen generation codec behind one interface: pixels <-> normalised latents.

Shape legend:
  B  clips;  T  pixel frames;  H, W  pixels;  z  latent channels;  t, h, w  latent grid
  t = (T - 1) // temporal_factor + 1  (Wan's causal rule: the first frame alone, then groups of temporal_factor)
  h = H / spatial_factor,  w = W / spatial_factor

Four codecs:
  wan    diffusers AutoencoderKLWan (Wan2.2: z 48, 16x, 4x) from a local directory, or a tiny one from a config.
         Latent = (mean - latents_mean) / latents_std, plus eps * exp(logvar / 2) when sampling (as Lance: the
         posterior noise is added after the per-channel normalisation).
  kl     diffusers AutoencoderKL (2-D; frames are encoded one by one, temporal_factor 1) for tiny configs.
         Latent = (mean - shift_factor) * scaling_factor (+ the same posterior noise when sampling).
  patch  an exactly invertible space-to-depth codec with a fixed normalisation, for the debug model: a later check
         judges generated pixels, and a random-weight VAE would not decode faithfully.
  frame  a small per-frame VAE (MLPs; each frame of one fixed size <-> one latent token) trained for a narrow world
         by tools/train_example_vae.py: the README's main job's codec (a whole frame in z numbers is what lets a
         ~4 M-parameter model learn to draw in minutes). Latent = (mean - latents_mean) / latents_std, plus the
         posterior noise when sampling, normalised as the mean is (unlike wan's).
All are frozen, built outside zero.Init and outside the engine, and never checkpointed (DESIGN rule 5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from lance_ds.config.model import VAE_KINDS

from .weights import load_safetensors, save_safetensors

KINDS = tuple(k for k in VAE_KINDS if k != "auto")


def unit_range(pixels: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1], what the codecs encode."""
    return pixels.float() / 127.5 - 1.0


def to_uint8_frames(pixels: Tensor) -> Tensor:
    """A decoded clip [3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3] on the CPU (unit_range's inverse)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().contiguous()


def _posterior_sample(latents: Tensor, logvar: Tensor, generator: torch.Generator | None,
                      scale: Tensor | float = 1.0) -> Tensor:
    """latents + eps * exp(logvar / 2) / scale, eps drawn from `generator` on the latents' device."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    return latents + noise * torch.exp(0.5 * logvar.float()) / scale


@dataclass(frozen=True)
class VaeConfig:
    """Which codec and, for codecs built from a config (tests, debug), its geometry."""

    kind: str = "patch"
    latent_channels: int = 48  # patch: must equal 3 * temporal_factor * spatial_factor**2
    spatial_factor: int = 16
    temporal_factor: int = 4
    diffusers_config: dict = field(default_factory=dict, hash=False)  # kwargs of the diffusers class (tiny ones)

    @property
    def frame_size(self) -> int | None:
        """The one frame side the codec takes (a frame VAE's), as FrozenVAE.frame_size."""
        return self.spatial_factor if self.kind == "frame" else None


class FrozenVAE(nn.Module):
    """encode(pixels [B, 3, T, H, W] in [-1, 1]) -> latents [B, z, t, h, w]; decode is the inverse map."""

    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    frame_size: int | None = None  # the one frame side a codec takes, if it takes only one

    def check_pixels(self, pixels: Tensor) -> None:
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"VAE input must be [B, 3, T, H, W], got {tuple(pixels.shape)}")
        _, _, frames, height, width = pixels.shape
        sf, tf = self.spatial_factor, self.temporal_factor
        if height % sf or width % sf or (frames - 1) % tf:
            raise ValueError(f"VAE input {frames}x{height}x{width} (TxHxW) must have H and W divisible by {sf} and "
                             f"T = {tf}k + 1 frames; the data side's resize/frame sampling must follow the VAE")

    def __init__(self):
        super().__init__()
        # follows .to(device / dtype): a codec without weights (patch) still knows where it was put, so that its
        # latents come out on the training device (not on the CPU, away from the step's CUDA generator)
        self.register_buffer("_placement", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters(), self._placement).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters(), self._placement).dtype

    @torch.no_grad()
    def encode_blocks(self, clips: list[Tensor], sample: bool = False,
                      generator: torch.Generator | None = None) -> list[Tensor]:
        """Latent tokens [t*h*w, z] (fp32, (t, h, w) raster order) of each clip [3, T, H, W] (a packed batch's VAE
        blocks: uint8 pixels, scaled to [-1, 1] here, on the device; or floats in [-1, 1]); clips of one shape are
        encoded together, one call per shape."""
        out: list = [None] * len(clips)
        by_shape: dict[tuple, list[int]] = {}
        for i, clip in enumerate(clips):
            by_shape.setdefault(tuple(clip.shape), []).append(i)
        for indexes in by_shape.values():
            batch = torch.stack([clips[i] for i in indexes]).to(self.device)
            batch = (unit_range(batch) if batch.dtype == torch.uint8 else batch).to(self.dtype)
            for i, latents in zip(indexes, self.encode(batch, sample=sample, generator=generator)):  # [z, t, h, w]
                out[i] = latents.flatten(1).T.float()
        return out


# ----------------------------------------------------------------------------------------------------------------


class PatchCodec(FrozenVAE):
    """Space-to-depth: each latent voxel holds the tf x sf x sf pixels it covers (3 * tf * sf^2 channels).

    The first frame forms a group alone (Wan's rule); it is repeated tf times so every group has the same width.
    Decoding keeps the first copy, so decode(encode(x)) == x exactly. Normalisation: latent = pixels / 0.5 (natural
    images in [-1, 1] have a standard deviation near 0.5, so latents have roughly unit scale, like the noise).
    """

    SCALE = 0.5

    def __init__(self, spatial_factor: int = 8, temporal_factor: int = 4):
        super().__init__()
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = 3 * temporal_factor * spatial_factor ** 2

    @torch.no_grad()
    def encode(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        self.check_pixels(pixels)
        sf, tf = self.spatial_factor, self.temporal_factor
        first = pixels[:, :, :1].expand(-1, -1, tf, -1, -1)
        x = torch.cat([first, pixels[:, :, 1:]], dim=2).float()  # [B, 3, t * tf, H, W]
        b, c, frames, height, width = x.shape
        t, h, w = frames // tf, height // sf, width // sf
        x = x.view(b, c, t, tf, h, sf, w, sf).permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, 3, tf, sf, sf, t, h, w]
        return x.reshape(b, c * tf * sf * sf, t, h, w) / self.SCALE

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        sf, tf = self.spatial_factor, self.temporal_factor
        b, z, t, h, w = latents.shape
        if z != self.latent_channels:
            raise ValueError(f"patch codec latents need {self.latent_channels} channels, got {z}")
        x = (latents.float() * self.SCALE).view(b, 3, tf, sf, sf, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, 3, t * tf, h * sf, w * sf)
        return torch.cat([x[:, :, :1], x[:, :, tf:]], dim=2)  # drop the repeats of the first frame


class WanVAE(FrozenVAE):
    """diffusers AutoencoderKLWan with Wan's per-channel latent normalisation."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        cfg = vae.config
        self.vae = vae
        self.latent_channels, self.spatial_factor, self.temporal_factor = wan_shape(cfg)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(f"the Wan VAE config has {mean.numel()} latents_mean / {std.numel()} latents_std values "
                             f"for z_dim {self.latent_channels}; fix its config.json")
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    @torch.no_grad()
    def encode(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        self.check_pixels(pixels)
        dist = self.vae.encode(pixels.to(self.dtype)).latent_dist
        latents = (dist.mean.float() - self.latents_mean) / self.latents_std
        if sample:
            latents = _posterior_sample(latents, dist.logvar, generator)
        return latents

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)


class KLVAE(FrozenVAE):
    """diffusers AutoencoderKL (2-D): frames are folded into the batch; temporal_factor is 1."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        cfg = vae.config
        self.vae = vae
        self.latent_channels, self.spatial_factor, self.temporal_factor = kl_shape(cfg)
        self.shift = float(cfg.shift_factor or 0.0)
        self.scale = float(cfg.scaling_factor)

    @torch.no_grad()
    def encode(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        self.check_pixels(pixels)
        b, c, t, h, w = pixels.shape
        frames = pixels.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        dist = self.vae.encode(frames.to(self.dtype)).latent_dist
        latents = (dist.mean.float() - self.shift) * self.scale
        if sample:
            latents = _posterior_sample(latents, dist.logvar, generator)
        return latents.view(b, t, *latents.shape[1:]).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        b, z, t, h, w = latents.shape
        frames = latents.permute(0, 2, 1, 3, 4).reshape(b * t, z, h, w).float() / self.scale + self.shift
        out = self.vae.decode(frames.to(self.dtype)).sample.float().clamp(-1, 1)
        return out.view(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)


class FrameAutoencoder(nn.Module):
    """The trainable network of the frame codec: one frame [N, 3, R, R] <-> a Gaussian over z numbers."""

    CONFIG_NAME = "FrameVAE"  # config.json `_class_name`

    def __init__(self, resolution: int, latent_channels: int, hidden_size: int):
        super().__init__()
        self.resolution, self.latent_channels, self.hidden_size = resolution, latent_channels, hidden_size
        pixels = 3 * resolution * resolution
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size),
                                     nn.GELU(), nn.Linear(hidden_size, 2 * latent_channels))
        self.decoder = nn.Sequential(nn.Linear(latent_channels, hidden_size), nn.GELU(),
                                     nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, pixels))

    def posterior(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """frames [N, 3, R, R] in [-1, 1] -> (mean, logvar), each [N, z]."""
        mean, logvar = self.encoder(frames.flatten(1)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def reconstruct(self, z: Tensor) -> Tensor:
        """[N, z] -> frames [N, 3, R, R] (unclamped)."""
        return self.decoder(z).view(-1, 3, self.resolution, self.resolution)

    def save(self, directory: str | Path, latents_mean: list[float], latents_std: list[float]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": self.CONFIG_NAME, "resolution": self.resolution,
                  "latent_channels": self.latent_channels, "hidden_size": self.hidden_size,
                  "latents_mean": latents_mean, "latents_std": latents_std}
        save_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(config, indent=2))


class FrameVAE(FrozenVAE):
    """A FrameAutoencoder with per-channel latent normalisation; every frame is its own latent frame (t = T) of one
    token (h = w = 1), so it takes only frames of the size it was trained at."""

    def __init__(self, net: FrameAutoencoder, latents_mean: list[float], latents_std: list[float]):
        super().__init__()
        self.net = net
        self.latent_channels = net.latent_channels
        self.spatial_factor = self.frame_size = net.resolution
        self.temporal_factor = 1
        if len(latents_mean) != net.latent_channels or len(latents_std) != net.latent_channels:
            raise ValueError(f"a frame VAE of {net.latent_channels} channels needs as many latents_mean / latents_std "
                             f"values, got {len(latents_mean)} / {len(latents_std)}")
        self.register_buffer("latents_mean", torch.tensor(latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(latents_std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> "FrameVAE":
        cfg = json.loads((Path(directory) / "config.json").read_text())
        net = FrameAutoencoder(cfg["resolution"], cfg["latent_channels"], cfg["hidden_size"])
        net.load_state_dict(load_safetensors(Path(directory) / "model.safetensors"))
        return cls(net, cfg["latents_mean"], cfg["latents_std"]).to(dtype)

    def check_pixels(self, pixels: Tensor) -> None:
        super().check_pixels(pixels)
        if pixels.shape[-2:] != (self.spatial_factor, self.spatial_factor):
            side = self.spatial_factor
            raise ValueError(f"this frame VAE was trained on {side}x{side} frames, got {pixels.shape[-2]}x"
                             f"{pixels.shape[-1]}; set the generation groups' resolution to {side}")

    @torch.no_grad()
    def encode(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        self.check_pixels(pixels)
        b, c, t, h, w = pixels.shape
        mean, logvar = self.net.posterior(pixels.transpose(1, 2).reshape(b * t, c, h, w).to(self.dtype))
        latents = (mean.float() - self.latents_mean) / self.latents_std
        if sample:
            latents = _posterior_sample(latents, logvar, generator, self.latents_std)
        return latents.view(b, t, -1).transpose(1, 2)[..., None, None]  # [B, z, t, 1, 1]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        b, z, t, h, w = latents.shape
        if h != 1 or w != 1:
            raise ValueError(f"frame VAE latents are one token per frame (h = w = 1), got {h}x{w}")
        mean = latents.float().transpose(1, 2).reshape(b * t, z) * self.latents_std + self.latents_mean
        frames = self.net.reconstruct(mean.to(self.dtype)).float().clamp(-1, 1)
        return frames.view(b, t, *frames.shape[1:]).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------


def detect_kind(path: str | Path) -> str:
    """wan, kl or frame from a VAE directory's config.json `_class_name`."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model.vae_path {path} has no config.json; it must be a diffusers VAE directory "
                                "(save_pretrained output, e.g. Wan2.2's vae/ folder)")
    name = json.loads(cfg_file.read_text()).get("_class_name", "")
    if name == "AutoencoderKLWan":
        return "wan"
    if name == "AutoencoderKL":
        return "kl"
    if name == FrameAutoencoder.CONFIG_NAME:
        return "frame"
    raise ValueError(f"{cfg_file}: _class_name {name!r} is not a supported VAE (AutoencoderKLWan, AutoencoderKL or "
                     f"{FrameAutoencoder.CONFIG_NAME})")


# (latent channels, spatial factor, temporal factor) of each codec from its config (a diffusers config or the
# config.json of a saved directory): the codec classes take theirs from here, and the config check plans with them
def wan_shape(cfg: Mapping) -> tuple[int, int, int]:
    return (cfg["z_dim"], 2 ** (len(cfg["dim_mult"]) - 1) * (cfg.get("patch_size") or 1),
            2 ** sum(bool(d) for d in cfg["temperal_downsample"]))


def kl_shape(cfg: Mapping) -> tuple[int, int, int]:
    return cfg["latent_channels"], 2 ** (len(cfg["block_out_channels"]) - 1), 1


def frame_shape(cfg: Mapping) -> tuple[int, int, int]:
    return cfg["latent_channels"], cfg["resolution"], 1  # one token per frame of the one size it takes


def codec_shape(cfg: VaeConfig, path: str | Path | None = None) -> VaeConfig:
    """The latent channels and factors of the codec build_vae(cfg, path) builds, from config files alone (no
    weights, no diffusers import)."""
    if not path:
        return cfg
    kind = detect_kind(path)
    saved = json.loads((Path(path) / "config.json").read_text())
    try:
        channels, spatial, temporal = {"wan": wan_shape, "kl": kl_shape, "frame": frame_shape}[kind](saved)
    except KeyError as e:
        raise ValueError(f"{Path(path) / 'config.json'} lacks {e}, which a {kind} VAE's config has") from None
    return VaeConfig(kind=kind, latent_channels=channels, spatial_factor=spatial, temporal_factor=temporal)


def build_vae(cfg: VaeConfig, path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> FrozenVAE:
    """The frozen codec: loaded from `path` (a diffusers directory) when given, else built from `cfg`."""
    kind = detect_kind(path) if path else cfg.kind
    if kind == "patch":  # (weights never say patch: it has none)
        vae: FrozenVAE = PatchCodec(cfg.spatial_factor, cfg.temporal_factor)
    elif kind == "frame":
        if not path:
            raise ValueError("the frame VAE needs weights: set model.vae_path to a tools/train_example_vae.py output")
        vae = FrameVAE.from_pretrained(path, dtype)
    elif kind in ("wan", "kl"):
        from diffusers import AutoencoderKL, AutoencoderKLWan  # ~2.5 s of imports: only for the codecs that need it

        cls = AutoencoderKLWan if kind == "wan" else AutoencoderKL
        if path:
            inner = cls.from_pretrained(str(path), torch_dtype=dtype)
        else:
            inner = cls(**cfg.diffusers_config)
            inner = inner if dtype == torch.float32 else inner.to(dtype)
        vae = (WanVAE if kind == "wan" else KLVAE)(inner)
    else:
        raise ValueError(f"model.vae must be one of {list(KINDS)}, got {kind!r}")
    vae.requires_grad_(False)
    return vae.eval()
