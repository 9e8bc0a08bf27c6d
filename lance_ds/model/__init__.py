"""The Lance unified model: Qwen2 Mixture-of-Transformers decoder, Qwen2.5-VL vision tower, frozen VAE.

The trainer calls `build_model(cfg.model, len(tokenizer), ds_config)` and gets a `ModelBundle`:
  bundle.model     trainable LanceModel (ZeRO-3: partitioned under zero.Init) -> deepspeed.initialize
  bundle.vit       frozen ViT outside the engine: vit_embeds = encode_vit(bundle.vit, batch.vit_patches, batch.vit_grid_thw)
  bundle.vae       frozen codec outside the engine: latents = bundle.vae.encode_blocks(clips [3, T, H, W] each)
  bundle.geometry  what the data side needs (VAE factors, latent channels, ViT patch/merge, RoPE tokens_per_second)
`model(batch, vit_embeds, noisy_latents, timesteps)` returns `Predictions(logits [C, V'], velocity [N, z])`;
`model.prefill(prompts, ...)` / `model.extend(ids, position_ids, sample_ids, cache)` decode text after packed prompts
with a KV cache (objectives.decode_text).
Checkpoints: Lance directories load through model.path; `save_lance_dir` writes one; LoRA adapters in peft's format
via `save_lora` (`lora.save_adapters` for adapter tensors) / `load_lora`.
"""

from .build import DTYPES, Geometry, ModelBundle, build_model, freeze_by_patterns, init_weights
from .lance import LanceConfig, LanceModel, Predictions
from .llm import LLMConfig
from .lora import add_lora, load_lora, lora_state_dict, save_lora
from .registry import SIZES, ModelSpec, hidden_size_of, resolve_spec
from .vae import FrozenVAE, KLVAE, PatchCodec, VaeConfig, WanVAE, build_vae
from .vision import VitConfig, build_vision_tower, encode_vit
from .weights import save_lance_dir

__all__ = [
    "DTYPES", "FrozenVAE", "Geometry", "KLVAE", "LLMConfig", "LanceConfig", "LanceModel", "ModelBundle", "ModelSpec",
    "PatchCodec", "Predictions", "SIZES", "VaeConfig", "VitConfig", "WanVAE", "add_lora", "build_model",
    "build_vae", "build_vision_tower", "encode_vit", "freeze_by_patterns", "hidden_size_of", "init_weights",
    "load_lora", "lora_state_dict", "resolve_spec", "save_lance_dir", "save_lora",
]
