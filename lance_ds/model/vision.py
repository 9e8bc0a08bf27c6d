"""The understanding encoder: transformers' Qwen2.5-VL vision tower (frozen by default).

Shape legend:
  P  ViT patches of the micro-batch (Qwen2.5-VL patch order: merge windows of 2x2 patches, row-major), each a
     vector of 3 * temporal_patch * patch * patch values (1176 for 14 x 14 x 2)
  I  ViT blocks (images repeated to 2 frames, or clips);  grid_thw [I, 3] = (T / 2, H / 14, W / 14)
  M  merged tokens = P / merge**2;  H  LLM hidden size (the merger's output width)

Weights load from a local directory: a Qwen2.5-VL checkpoint (keys `visual.*` or `model.visual.*`), a Lance
checkpoint (`vit_model.*` inside model.safetensors) or Lance's `vit.safetensors` (the same keys, no prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lance_ds.config.core import to_dict

from .weights import read_tensors, safetensors_index, strip_prefix

# Key prefixes a ViT can have in the checkpoints we load, most specific first.
VIT_PREFIXES = ("model.visual.", "visual.", "vit_model.", "")
# Qwen2.5-VL image processor normalisation (OpenAI CLIP statistics), applied to pixels scaled to [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_TOP_MODULES = ("patch_embed", "blocks", "merger")


@dataclass(frozen=True)
class VitConfig:
    """Geometry of the Qwen2.5-VL vision tower (Qwen2_5_VLVisionConfig's fields we set)."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048  # = LLM hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    in_channels: int = 3
    hidden_act: str = "silu"

    def to_hf(self):
        """transformers' Qwen2_5_VLVisionConfig (imported here: transformers is slow to import for config checks)."""
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

        return Qwen2_5_VLVisionConfig(**to_dict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "VitConfig":
        """From a Qwen2_5_VLVisionConfig-like mapping (unknown keys ignored, missing keys default)."""
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in names}
        if "fullatt_block_indexes" in kwargs:
            kwargs["fullatt_block_indexes"] = tuple(kwargs["fullatt_block_indexes"])
        if "out_hidden_size" not in kwargs and "hidden_size" in data and "embed_dim" in data:
            kwargs["out_hidden_size"] = data["hidden_size"]  # Qwen2-VL style: embed_dim is the ViT width
            kwargs["hidden_size"] = data["embed_dim"]
        return cls(**kwargs)


def normalise_patches(patches: Tensor) -> Tensor:
    """uint8 patches [P, 3 * tp * p * p] (channel-major vectors) -> float32, as Qwen2.5-VL's processor normalises."""
    mean = torch.tensor(CLIP_MEAN, device=patches.device).view(1, 3, 1)
    std = torch.tensor(CLIP_STD, device=patches.device).view(1, 3, 1)
    x = patches.view(patches.shape[0], 3, -1).float() / 255.0
    return ((x - mean) / std).view(patches.shape)


def encode_vit(tower: torch.nn.Module, patches: Tensor, grid_thw: Tensor) -> Tensor:
    """patches [P, 3 * tp * p * p] (the loader's uint8 pixels, or floats already normalised), grid_thw [I, 3] ->
    merged tokens [M, H] in the tower's dtype.

    Runs without autograd when the tower is frozen (no activations kept for a backward that never comes). An empty
    batch gives [0, H] without running the tower: use it for a frozen tower (a trainable one inside LanceModel
    gets a zero-weighted pass instead, see LanceModel._idle_vit_pass).
    """
    dtype = tower.patch_embed.proj.weight.dtype
    if patches.shape[0] == 0:  # no ViT block in this batch (transformers' tower cannot take an empty grid)
        return torch.zeros(0, tower.config.out_hidden_size, dtype=dtype, device=patches.device)
    if patches.dtype == torch.uint8:
        patches = normalise_patches(patches)
    trainable = any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        return tower(patches.to(dtype), grid_thw=grid_thw).pooler_output


def build_vision_tower(cfg: VitConfig, dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """transformers' Qwen2_5_VisionTransformerPretrainedModel, randomly initialised (HF's init), in `dtype` (None:
    as built, e.g. by zero.Init in the DeepSpeed config's dtype).

    Its parameter names are Lance's `vit_model.*` without the prefix. Under an active HfDeepSpeedConfig (ZeRO-3),
    `_from_config` builds it inside zero.Init by itself.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg.to_hf(), attn_implementation="sdpa")
    return tower if dtype is None else fp32_rope(tower.to(dtype))


def fp32_rope(module: torch.nn.Module) -> torch.nn.Module:
    """Put back the ViT's 2-D RoPE frequencies in fp32 after a cast of `module` (tower.to(bf16), or an engine's
    .bfloat16() of a model holding a trainable ViT): they are buffers the checkpoint does not restore, and rounded to
    bf16 they are off by up to 0.35%, turning patch positions by up to 0.12 rad across an 896 px image."""
    for m in module.modules():
        if hasattr(m, "compute_axial_rope_parameters") and hasattr(m, "inv_freq"):
            inv_freq = m.compute_axial_rope_parameters(m.config)[0].to(m.inv_freq.device)
            m.inv_freq, m.original_inv_freq = inv_freq, inv_freq.clone()
    return module


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


def vit_prefix(index: dict, path: str | Path) -> str:
    """The key prefix of the ViT weights in a checkpoint's safetensors index; FileNotFoundError when it has none."""
    prefix = next((p for p in VIT_PREFIXES if p + "patch_embed.proj.weight" in index), None)
    if prefix is None:
        raise FileNotFoundError(f"no ViT weights in {path}: expected a key 'visual.patch_embed.proj.weight' "
                                "(Qwen2.5-VL), 'vit_model.patch_embed.proj.weight' (Lance model.safetensors) or "
                                "'patch_embed.proj.weight' (Lance vit.safetensors); set model.vit_path to such a dir")
    return prefix


def load_vision_weights(tower: torch.nn.Module, path: str | Path) -> None:
    """Load the tower from a local checkpoint directory (any of the layouts in the module doc), strictly."""
    index = safetensors_index(path)
    prefix = vit_prefix(index, path)
    names = [k for k in index if k.startswith(prefix) and k[len(prefix):].split(".")[0] in VIT_TOP_MODULES]
    state = strip_prefix(read_tensors(index, names), prefix)
    own = tower.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"ViT weights in {path} (prefix '{prefix}') do not match the tower geometry: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; the vision config must match "
                         "the checkpoint (put its config.json next to the weights)")
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise ValueError(f"ViT weight {name} in {path} has shape {tuple(value.shape)}, the tower expects "
                             f"{tuple(own[name].shape)}; the vision config does not match the checkpoint")
    tower.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
