"""Model geometries by name (`debug`, `tiny`, `100m`, `3b`) and from local checkpoint directories.

A `ModelSpec` is everything needed to build the three parts: the decoder geometry, the ViT geometry, the codec,
and the latent position range. It comes from `model.size`, or from `model.path`:
  Lance dir      model.safetensors + llm_config.json (the Qwen2 fields, rope_scaling.mrope_section, vision_config)
  Qwen2.5-VL dir config.json (text fields at the top or under text_config, and vision_config) + *.safetensors
The codec comes from the size (or model.vae / model.vae_path); a checkpoint's ViT geometry from its weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path


from lance_ds.config.model import MODEL_SIZES, ModelConfig

from .llm import LLMConfig
from .vae import VaeConfig
from .vision import VitConfig, vit_prefix
from .weights import (LANCE_LLM_CONFIG, LANCE_POS_TABLE, LANCE_WEIGHTS, is_lance_dir, open_safetensors, read_json,
                      safetensors_index)


@dataclass(frozen=True)
class ModelSpec:
    """One model's geometry."""

    llm: LLMConfig
    vit: VitConfig
    vae: VaeConfig
    max_latent_size: int  # S of the sin-cos table
    max_num_frames: int  # pixel frames; latent frames = max_num_frames // 4 + 1


def _tiny_wan(z: int) -> dict:
    """A tiny Wan2.2-shaped AutoencoderKLWan (residual blocks, patch 2): 16x spatial, 4x temporal, ~70k params."""
    return dict(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                is_residual=True, patch_size=2, in_channels=12, out_channels=12, latents_mean=[0.0] * z,
                latents_std=[1.0] * z, scale_factor_spatial=16, scale_factor_temporal=4)


SIZES: dict[str, ModelSpec] = {
    # 2-rank CPU runs (the README's main job): ~2.3 M decoder parameters and a 1.7 M-parameter ViT 192 wide (64 read
    # shapes and motion far worse); the exactly invertible patch codec, 4x4 pixels x 4 frames per token: 192 channels,
    # as wide as the hidden size (the debug recipe predicts data, not velocity). The main job swaps in the example
    # world's frame VAE and its pretrained, frozen ViT (tools/train_example_{vae,vit}.py).
    "debug": ModelSpec(
        llm=LLMConfig(vocab_size=2048, hidden_size=192, intermediate_size=384, num_layers=2, num_heads=4,
                      num_kv_heads=2, mrope_section=(6, 9, 9)),
        vit=VitConfig(depth=2, hidden_size=192, num_heads=2, intermediate_size=384, out_hidden_size=192,
                      fullatt_block_indexes=(1,)),
        vae=VaeConfig(kind="patch", latent_channels=3 * 4 * 4 * 4, spatial_factor=4, temporal_factor=4),
        max_latent_size=32, max_num_frames=33),
    # the geometry of reference/lance_tiny (vocab raised to fit the debug tokenizer) with a tiny Wan-shaped VAE
    "tiny": ModelSpec(
        llm=LLMConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, mrope_section=(2, 3, 3)),
        vit=VitConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                      fullatt_block_indexes=(1,)),
        vae=VaeConfig(kind="wan", latent_channels=16, spatial_factor=16, temporal_factor=4,
                      diffusers_config=_tiny_wan(16)),
        max_latent_size=16, max_num_frames=33),
    # ~110 M trainable parameters (both experts): the CPU benchmark's "real-ish" point
    "100m": ModelSpec(
        llm=LLMConfig(vocab_size=2048, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12,
                      num_kv_heads=4, mrope_section=(8, 12, 12)),
        vit=VitConfig(depth=4, hidden_size=256, num_heads=4, intermediate_size=512, out_hidden_size=768,
                      fullatt_block_indexes=(3,)),
        vae=VaeConfig(kind="patch", latent_channels=3 * 4 * 8 * 8, spatial_factor=8, temporal_factor=4),
        max_latent_size=32, max_num_frames=33),
    # Lance_3B: Qwen2.5-VL-3B's LLM with the MoT gen expert, its ViT, and Wan2.2's VAE (needs model.vae_path)
    "3b": ModelSpec(
        llm=LLMConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                      num_kv_heads=2, mrope_section=(16, 24, 24)),
        vit=VitConfig(),
        vae=VaeConfig(kind="wan", latent_channels=48, spatial_factor=16, temporal_factor=4),
        max_latent_size=64, max_num_frames=121),
}
assert tuple(SIZES) == MODEL_SIZES, "lance_ds.config.model.MODEL_SIZES must list the registry's sizes"


# ----------------------------------------------------------------------------------------------------------------
# from checkpoint directories


def llm_config_from_hf(data: dict, where: str) -> LLMConfig:
    """LLMConfig from Qwen2 / Qwen2.5-VL config fields (Lance's llm_config.json, or a Qwen2.5-VL config.json)."""
    text = data.get("text_config") or data
    rope = text.get("rope_scaling") or text.get("rope_parameters") or data.get("rope_scaling") or {}
    try:
        return LLMConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"], num_kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            rope_theta=float(text.get("rope_theta", rope.get("rope_theta", 1e6))),
            mrope_section=tuple(rope.get("mrope_section") or default_mrope_section(
                text["hidden_size"] // text["num_attention_heads"])),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)))
    except KeyError as e:
        raise ValueError(f"{where} lacks the Qwen2 field {e}; it must be a Lance llm_config.json or a Qwen2.5-VL "
                         "config.json") from e


def default_mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Qwen2.5-VL's split of the head_dim / 2 frequencies (t, h, w = 1/4, 3/8, 3/8: [16, 24, 24] for 128), for
    text-only Qwen2 checkpoints that carry none (for text tokens every split is plain RoPE)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return t, h, half - t - h


def checkpoint_config_file(path: str | Path) -> Path:
    """The file describing a checkpoint dir: a Lance llm_config.json, or a Qwen2.5-VL config.json."""
    path = Path(path)
    if is_lance_dir(path):
        return path / LANCE_LLM_CONFIG
    if (path / "config.json").is_file():
        return path / "config.json"
    raise FileNotFoundError(f"model.path {path} is neither a Lance checkpoint (model.safetensors + "
                            f"{LANCE_LLM_CONFIG}) nor a Qwen2.5-VL directory (config.json + *.safetensors)")


def spec_from_dir(path: str | Path, base: ModelSpec) -> ModelSpec:
    """A Lance or Qwen2.5-VL checkpoint dir's decoder geometry (and, for Lance, the position range its stored
    sin-cos table covers); the codec stays `base`'s."""
    path = Path(path)
    where = checkpoint_config_file(path)
    spec = replace(base, llm=llm_config_from_hf(read_json(where), str(where)))
    if is_lance_dir(path):
        spec = replace(spec, **position_range_of(path))
    return spec


def position_range_of(path: Path) -> dict:
    """max_latent_size / max_num_frames of a Lance checkpoint: written in llm_config.json by lance_ds, else read
    from the shape of its stored table (Lf * S^2 rows): the largest power-of-two S <= 64 whose square divides the
    row count (Lance uses 64), then any S. Empty when neither is there."""
    data = read_json(path / LANCE_LLM_CONFIG)
    if "max_latent_size" in data and "max_num_frames" in data:
        return {"max_latent_size": int(data["max_latent_size"]), "max_num_frames": int(data["max_num_frames"])}
    index = safetensors_index(path / LANCE_WEIGHTS)
    if LANCE_POS_TABLE not in index:
        return {}
    with open_safetensors(index[LANCE_POS_TABLE]) as f:
        rows = f.get_slice(LANCE_POS_TABLE).get_shape()[0]
    candidates = [64, 32, 16, 8, 4, 2, 1] + list(range(63, 0, -1))
    size = next(s for s in candidates if rows % (s * s) == 0)
    return {"max_latent_size": size, "max_num_frames": (rows // (size * size) - 1) * 4 + 1}


def vit_config_for(cfg: ModelConfig, base: VitConfig, llm_hidden: int) -> VitConfig:
    """The ViT geometry: the size's, or, when a checkpoint holds a ViT (model.vit_path, else model.path), read from
    its weights' shapes with any config.json vision_config fields on top."""
    fields: dict = {}
    source = cfg.vit_path or cfg.path
    if source is not None:
        fields.update(vit_fields_from_weights(Path(source)))
        for d in {cfg.path, cfg.vit_path} - {None}:
            for name in ("config.json", LANCE_LLM_CONFIG):
                if (Path(d) / name).is_file():
                    vision = read_json(Path(d) / name).get("vision_config") or {}
                    fields.update({k: v for k, v in vision.items() if k in VitConfig.__dataclass_fields__})
    start = dataclasses.asdict(VitConfig() if fields else base)
    return VitConfig.from_dict({**start, **fields, "out_hidden_size": llm_hidden})


def vit_fields_from_weights(path: Path) -> dict:
    """depth / widths / patch sizes from a ViT checkpoint's tensor shapes. Head count and full-attention blocks are
    not in the shapes: Qwen2.5-VL's rule (head dim 80, every 8th block full) applies unless a config says otherwise."""
    try:
        index = safetensors_index(path)
        prefix = vit_prefix(index, path)
    except FileNotFoundError:
        return {}

    def shape(name):
        with open_safetensors(index[prefix + name]) as f:
            return f.get_slice(prefix + name).get_shape()

    hidden, channels, temporal, patch, _ = shape("patch_embed.proj.weight")
    depth = len({k[len(prefix):].split(".")[1] for k in index if k.startswith(prefix + "blocks.")})
    merged = shape("merger.mlp.0.weight")[1]
    return {"hidden_size": hidden, "in_channels": channels, "temporal_patch_size": temporal, "patch_size": patch,
            "depth": depth, "intermediate_size": shape("blocks.0.mlp.gate_proj.weight")[0],
            "spatial_merge_size": int(round((merged / hidden) ** 0.5)), "num_heads": max(hidden // 80, 1),
            "fullatt_block_indexes": tuple(i for i in range(depth) if (i + 1) % 8 == 0) or (depth - 1,)}


def resolve_spec(cfg: ModelConfig) -> ModelSpec:
    """The geometry `cfg` asks for: the named size, replaced by model.path's geometry when set, then the ViT from
    its checkpoint and the position-range overrides."""
    if cfg.size not in SIZES:
        raise ValueError(f"model.size must be one of {list(SIZES)}, got {cfg.size!r}")
    spec = SIZES[cfg.size]
    if cfg.path:
        spec = spec_from_dir(cfg.path, spec)
    spec = replace(spec, vit=vit_config_for(cfg, spec.vit, spec.llm.hidden_size))
    if cfg.max_latent_size is not None:
        spec = replace(spec, max_latent_size=cfg.max_latent_size)
    if cfg.max_num_frames is not None:
        spec = replace(spec, max_num_frames=cfg.max_num_frames)
    return spec


def hidden_size_of(cfg: ModelConfig) -> int:
    """The LLM hidden size without building anything (DeepSpeed's "auto" bucket sizes need it)."""
    if cfg.path:
        return spec_from_dir(cfg.path, SIZES.get(cfg.size, SIZES["debug"])).llm.hidden_size
    return SIZES[cfg.size].llm.hidden_size if cfg.size in SIZES else SIZES["debug"].llm.hidden_size
