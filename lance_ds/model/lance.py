"""LanceModel: token embeddings, ViT and VAE token inputs, expert routing, and the two heads.

Shape legend:
  L  packed tokens;  H  hidden size;  z  latent channels
  C  positions scored by CE (PackedBatch.ce_indexes);  V' = num_text_classes (len(tokenizer)) <= vocab_size
  M  merged ViT tokens (PackedBatch.vit_indexes);  N  VAE latent tokens (PackedBatch.vae_indexes)

The network returns predictions only (DESIGN rule 1): the noise, timesteps and targets come in from objectives/,
the losses are computed there. VAE-token input = vae2llm(x_t) + time_embedder(t) + sin-cos position (+ LAPE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from lance_ds.data.batch import AttnMode, PackedBatch

from .attention import CachedAttention, KVCache, PackedLayout, RecordingAttention, build_attention
from .llm import LLMConfig, MoTForCausalLM, Routing
from .positions import LatentPositions, LearnablePositions, TimestepEmbedder
from .vision import encode_vit


@dataclass(frozen=True)
class LanceConfig:
    """What LanceModel builds: the decoder geometry, the branches, the latent geometry and the attention backend."""

    llm: LLMConfig
    num_text_classes: int  # len(tokenizer): CE logits are sliced to this many classes
    latent_channels: int = 48  # z of the VAE (48 for Wan2.2)
    max_latent_size: int = 64  # S: latent rows/columns of the sin-cos table
    max_num_frames: int = 121  # pixel frames; the table holds max_num_frames // 4 + 1 latent frames (as Lance)
    visual_und: bool = True
    visual_gen: bool = True
    attention: str = "sdpa"
    lape_spatial: int = 0  # LAPE table rows (0: LAPE off)
    lape_temporal: int = 0

    @property
    def max_latent_frames(self) -> int:
        return self.max_num_frames // 4 + 1

    def check(self) -> None:
        if self.num_text_classes > self.llm.vocab_size:
            raise ValueError(f"the tokenizer has {self.num_text_classes} tokens but the model's vocabulary only "
                             f"{self.llm.vocab_size}; use a tokenizer that fits or a model with a larger vocab_size")
        if self.num_text_classes <= 0:
            raise ValueError(f"num_text_classes must be positive (len(tokenizer)), got {self.num_text_classes}")


class Predictions(NamedTuple):
    """What the network predicts for one packed batch. A NamedTuple so that ZeRO-3's module hooks see the tensors."""

    logits: Tensor  # [C, V'] next-token logits at batch.ce_indexes
    velocity: Tensor  # [N, z] flow velocity at every latent token (conditions included; objectives weight them)
    hidden: Tensor | None = None  # [L, H] final normed hidden states (return_hidden=True)
    inputs_embeds: Tensor | None = None  # [L, H] the decoder's input sequence (return_hidden=True)


class LanceModel(nn.Module):
    """The trainable part of Lance. The frozen ViT and VAE live outside (DESIGN rule 5) unless `vit_model` is set,
    which holds a trainable ViT (module name `vit_model`, as in Lance's checkpoint)."""

    def __init__(self, cfg: LanceConfig, vit_model: nn.Module | None = None):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        hidden = cfg.llm.hidden_size
        self.language_model = MoTForCausalLM(cfg.llm)
        if cfg.visual_gen:
            self.time_embedder = TimestepEmbedder(hidden)
            self.vae2llm = nn.Linear(cfg.latent_channels, hidden)
            self.llm2vae = nn.Linear(hidden, cfg.latent_channels)
            self.latent_pos_embed = LatentPositions(hidden, cfg.max_latent_size, cfg.max_latent_frames)
            if cfg.lape_spatial:
                self.lape = LearnablePositions(hidden, cfg.lape_spatial, cfg.lape_temporal)
        if vit_model is not None:
            if not cfg.visual_und:
                raise ValueError("a trainable ViT was given but model.visual_und is false")
            self.vit_model = vit_model

    # -------------------------------------------------------------------------------------------------------------

    def embed_latents(self, noisy_latents: Tensor, timesteps: Tensor, coords: Tensor) -> Tensor:
        """x_t [N, z], t [N], coords [N, 3] -> VAE token inputs [N, H]."""
        x = self.vae2llm(noisy_latents.to(self.vae2llm.weight.dtype))
        x = x + self.time_embedder(timesteps) + self.latent_pos_embed(coords).to(x.dtype)
        if hasattr(self, "lape"):
            x = x + self.lape(coords).to(x.dtype)
        return x

    def forward(self, batch: PackedBatch, vit_embeds: Tensor | None = None, noisy_latents: Tensor | None = None,
                timesteps: Tensor | None = None, return_hidden: bool = False) -> Predictions:
        """Predict next-token logits at `batch.ce_indexes` and velocities at `batch.vae_indexes`.

        vit_embeds [M, H]: the frozen ViT's merged tokens for batch.vit_patches (None when the ViT is trainable and
        held here, or when visual_und is off). noisy_latents [N, z] and timesteps [N]: x_t and t per latent token
        from objectives.flow (conditions: x_0 and t = 0).
        """
        return self._forward(batch, vit_embeds, noisy_latents, timesteps, return_hidden)

    def _forward(self, batch: PackedBatch, vit_embeds, noisy_latents, timesteps, return_hidden: bool = False,
                 cache: KVCache | None = None) -> Predictions:
        cfg = self.cfg
        self._check_inputs(batch, vit_embeds, noisy_latents, timesteps)
        x = self.input_sequence(batch, vit_embeds, noisy_latents, timesteps)
        gen_indexes = batch.vae_indexes if cfg.visual_gen else batch.vae_indexes[:0]
        routing = Routing.build(batch.num_tokens, gen_indexes)
        attend = build_attention(cfg.attention, PackedLayout(batch.sample_ids, batch.split_ids, batch.attn_modes))
        if cache is not None:
            attend = RecordingAttention(attend, cache)
        hidden = self.language_model.model(x, batch.position_ids, routing, attend)
        logits = self.language_model.lm_head(hidden.index_select(0, batch.ce_indexes))[:, : cfg.num_text_classes]
        if cfg.visual_gen:
            velocity = self.llm2vae(hidden.index_select(0, batch.vae_indexes))
        else:
            velocity = hidden.new_zeros(0, cfg.latent_channels)
        return Predictions(logits, velocity, hidden if return_hidden else None, x if return_hidden else None)

    # -- decoding with a KV cache ------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: PackedBatch, vit_embeds: Tensor | None = None, noisy_latents: Tensor | None = None,
                timesteps: Tensor | None = None) -> tuple[Predictions, KVCache]:
        """Run packed prompts and keep their keys/values: `extend` then decodes text after each of them.

        New text may see every token of its sample except noise splits (the attention rule for a trailing causal
        split).
        """
        cache = KVCache(self.cfg.llm.num_layers, prompts.sample_ids, prompts.attn_modes != int(AttnMode.NOISE))
        return self._forward(prompts, vit_embeds, noisy_latents, timesteps, cache=cache), cache

    @torch.no_grad()
    def extend(self, token_ids: Tensor, position_ids: Tensor, sample_ids: Tensor, cache: KVCache) -> Tensor:
        """Append n text tokens [n] at RoPE ids [3, n], each after the cached tokens of its sample [n] -> their
        next-token logits [n, V']."""
        decoder = self.language_model.model
        x = decoder.embed_tokens(token_ids)
        routing = Routing.build(token_ids.numel(), token_ids[:0])
        hidden = decoder(x, position_ids, routing, CachedAttention(cache, sample_ids))
        cache.grow(sample_ids)
        return self.language_model.lm_head(hidden)[:, : self.cfg.num_text_classes]

    def input_sequence(self, batch: PackedBatch, vit_embeds: Tensor | None, noisy_latents: Tensor | None,
                       timesteps: Tensor | None) -> Tensor:
        """[L, H]: token embeddings, with ViT tokens and VAE tokens written over their slots."""
        x = self.language_model.model.embed_tokens(batch.input_ids)
        if hasattr(self, "vit_model"):
            if batch.vit_indexes.numel() == 0:
                x = x + 0.0 * self._idle_vit_pass().sum().to(x.dtype)
            else:
                vit_embeds = encode_vit(self.vit_model, batch.vit_patches, batch.vit_grid_thw)
        if self.cfg.visual_und and vit_embeds is not None:  # None: no ViT block (a frozen ViT has no params here)
            x = x.index_copy(0, batch.vit_indexes, vit_embeds.to(x.dtype))
        if self.cfg.visual_gen:
            x = x.index_copy(0, batch.vae_indexes, self.embed_latents(noisy_latents, timesteps, batch.vae_coords))
        return x

    def _idle_vit_pass(self) -> Tensor:
        """The trainable ViT on one blank merge window: a batch without ViT blocks still runs the tower (zero-weighted,
        in the graph), so ZeRO-3 ranks never disagree on which modules ran (DESIGN rule 3)."""
        embed = self.vit_model.patch_embed
        merge = self.vit_model.spatial_merge_size
        dim = embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2
        device = embed.proj.weight.device
        patches = torch.zeros(merge * merge, dim, device=device)
        return encode_vit(self.vit_model, patches, torch.tensor([[1, merge, merge]], device=device))

    def _check_inputs(self, batch: PackedBatch, vit_embeds, noisy_latents, timesteps) -> None:
        cfg = self.cfg
        num_vit, num_vae = batch.vit_indexes.numel(), batch.vae_indexes.numel()
        if not cfg.visual_und and num_vit:
            raise ValueError(f"the batch has {num_vit} ViT tokens but the model was built with model.visual_und=false")
        if not cfg.visual_gen and num_vae:
            raise ValueError(f"the batch has {num_vae} VAE tokens but the model was built with model.visual_gen=false")
        if cfg.visual_und and not hasattr(self, "vit_model") and (vit_embeds is not None or num_vit):
            if vit_embeds is None or vit_embeds.shape[0] != num_vit:
                got = None if vit_embeds is None else tuple(vit_embeds.shape)
                raise ValueError(f"vit_embeds must be [{num_vit}, {cfg.llm.hidden_size}] (one row per "
                                 f"batch.vit_indexes), got {got}; run the frozen ViT on batch.vit_patches first")
        if cfg.visual_gen:
            for name, value, shape in (("noisy_latents", noisy_latents, (num_vae, cfg.latent_channels)),
                                       ("timesteps", timesteps, (num_vae,))):
                if value is None or tuple(value.shape) != shape:
                    got = None if value is None else tuple(value.shape)
                    raise ValueError(f"{name} must have shape {list(shape)} (one row per batch.vae_indexes), got "
                                     f"{got}; build them with lance_ds.objectives.flow")

    # -------------------------------------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.language_model.model.gradient_checkpointing = enabled
