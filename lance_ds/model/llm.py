"""Qwen2 decoder with a Mixture-of-Transformers generation expert, run over one packed sequence.

Shape legend:
  L  packed tokens (every sample of the micro-batch back to back);  U understanding tokens;  G generation tokens
  H  hidden size;  nh query heads;  kv key/value heads;  d head dim (nh * d == H for Qwen2);  I MLP width

Every layer holds two experts with identical shapes: the original ("und") weights for text and ViT tokens and a
copy with the suffix `_moe_gen` for VAE latent tokens. Norms, projections and MLPs are per expert; attention is
one joint attention over all L tokens. Module names reproduce Lance's checkpoint keys under `language_model.`
(reference/LANCE_FACTS.md, "Checkpoint layout"), so its `model.safetensors` loads key for key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .positions import apply_rope, rope_cos_sin

GEN_SUFFIX = "_moe_gen"


@dataclass(frozen=True)
class LLMConfig:
    """Geometry of the Qwen2 MoT decoder (the Qwen2 fields of Lance's llm_config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    rms_norm_eps: float = 1e-6
    mot: bool = True  # build the generation expert (false when the model has no generation branch)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"LLM geometry: hidden {self.hidden_size} must divide into {self.num_heads} heads and "
                             f"{self.num_heads} heads into {self.num_kv_heads} KV heads")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"LLM geometry: rope mrope_section {list(self.mrope_section)} must sum to head_dim / 2 "
                             f"= {self.head_dim // 2}")

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count (both experts when mot) from the geometry alone: bench_model's active-parameter column
        and the tests' check of a built model's size (training FLOPs come from metrics.DecoderFlops)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2 + (self.num_heads + 2 * self.num_kv_heads) * d
        layer = attn + 3 * h * i + 2 * h + 2 * d
        experts = 2 if self.mot else 1
        total = experts * (self.num_layers * layer + h)
        if include_embeddings:
            total += 2 * self.vocab_size * h
        return total


# ----------------------------------------------------------------------------------------------------------------
# expert routing


@dataclass
class Routing:
    """Which packed positions go through which expert. The two index sets partition range(L)."""

    und: Tensor  # [U] long
    gen: Tensor  # [G] long
    restore: Tensor = field(repr=False)  # [L] long: cat([und, gen])[restore] is the identity

    @classmethod
    def build(cls, num_tokens: int, gen_indexes: Tensor) -> "Routing":
        device = gen_indexes.device
        is_gen = torch.zeros(num_tokens, dtype=torch.bool, device=device)
        is_gen[gen_indexes] = True
        und = torch.nonzero(~is_gen).flatten()
        gen = torch.nonzero(is_gen).flatten()  # sorted, so expert outputs keep sequence order
        if gen.numel() != gen_indexes.numel():
            raise ValueError("PackedBatch.vae_indexes holds a position twice; every latent token needs its own slot")
        restore = torch.argsort(torch.cat([und, gen]))
        return cls(und, gen, restore)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.index_select(0, self.und), x.index_select(0, self.gen)

    def merge(self, x_und: Tensor, x_gen: Tensor) -> Tensor:
        return torch.cat([x_und, x_gen], dim=0).index_select(0, self.restore)


def expert(und: nn.Module, gen: nn.Module | None, x: Tensor, routing: Routing) -> Tensor:
    """Apply the und module to und tokens and the gen module to gen tokens.

    Both experts always run, on zero rows if need be: under ZeRO-3 a module skipped on one rank and run on another
    desynchronises the parameter gathers (DESIGN rule 3), so routing never branches on the data.
    """
    if gen is None:
        return und(x)
    x_und, x_gen = routing.split(x)
    return routing.merge(und(x_und), gen(x_gen))


# ----------------------------------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU MLP without biases (`gate_proj`, `up_proj`, `down_proj`)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """Grouped-query attention with QK-RMSNorm (per head, before RoPE); q/k/v/o and q/k norms per expert."""

    def __init__(self, cfg: LLMConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # tells a KV cache which layer's keys it is given
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        experts = ("", GEN_SUFFIX) if cfg.mot else ("",)
        for sfx in experts:
            setattr(self, f"q_proj{sfx}", nn.Linear(h, self.num_heads * d, bias=True))
            setattr(self, f"k_proj{sfx}", nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, f"v_proj{sfx}", nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, f"o_proj{sfx}", nn.Linear(self.num_heads * d, h, bias=False))
            setattr(self, f"q_norm{sfx}", RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, f"k_norm{sfx}", RMSNorm(d, cfg.rms_norm_eps))
        self.mot = cfg.mot

    def _gen(self, name: str) -> nn.Module | None:
        return getattr(self, name + GEN_SUFFIX) if self.mot else None

    def _project(self, name: str, norm: str | None, x_und: Tensor, x_gen: Tensor, heads: int, routing: Routing) -> Tensor:
        """Projection (and per-head norm) per expert on already split inputs -> merged [L, heads, d]."""
        def run(proj: nn.Module, norm_mod: nn.Module | None, x: Tensor) -> Tensor:
            y = proj(x).view(x.shape[0], heads, self.head_dim)
            return norm_mod(y) if norm_mod is not None else y

        und = run(getattr(self, name), getattr(self, norm) if norm else None, x_und)
        if not self.mot:
            return und
        gen = run(self._gen(name), self._gen(norm) if norm else None, x_gen)
        return routing.merge(und, gen)

    def forward(self, h_und: Tensor, h_gen: Tensor, routing: Routing, rope: tuple[Tensor, Tensor], attend) -> Tensor:
        """Normed hidden states per expert [U, H] / [G, H] -> attention output [L, H] (after o_proj)."""
        cos, sin = rope
        q = apply_rope(self._project("q_proj", "q_norm", h_und, h_gen, self.num_heads, routing), cos, sin)
        k = apply_rope(self._project("k_proj", "k_norm", h_und, h_gen, self.num_kv_heads, routing), cos, sin)
        v = self._project("v_proj", None, h_und, h_gen, self.num_kv_heads, routing)
        out = attend(q, k, v, self.layer_idx)  # [L, nh, d]
        return expert(self.o_proj, self._gen("o_proj"), out.reshape(out.shape[0], -1), routing)


class MoTDecoderLayer(nn.Module):
    """Pre-norm residual block; `input_layernorm`, `post_attention_layernorm`, `mlp` per expert."""

    def __init__(self, cfg: LLMConfig, layer_idx: int = 0):
        super().__init__()
        self.mot = cfg.mot
        self.self_attn = MoTAttention(cfg, layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        if cfg.mot:
            self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, routing: Routing, rope: tuple[Tensor, Tensor], attend) -> Tensor:
        x_und, x_gen = routing.split(x) if self.mot else (x, x[:0])
        h_und = self.input_layernorm(x_und)
        h_gen = self.input_layernorm_moe_gen(x_gen) if self.mot else x_gen
        x = x + self.self_attn(h_und, h_gen, routing, rope, attend)
        if not self.mot:
            return x + self.mlp(self.post_attention_layernorm(x))
        x_und, x_gen = routing.split(x)
        y_und = self.mlp(self.post_attention_layernorm(x_und))
        y_gen = self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x_gen))
        return x + routing.merge(y_und, y_gen)


class MoTDecoder(nn.Module):
    """`language_model.model`: embeddings, layers and the final norms (`norm`, `norm_moe_gen`)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.mot:
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, routing: Routing, attend) -> Tensor:
        """inputs_embeds [L, H], position_ids [3, L] -> final normed hidden states [L, H]."""
        rope = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section)
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # recompute the layer in backward instead of keeping its activations (non-reentrant: works with
                # ZeRO-3's parameter hooks and with inputs that do not require grad)
                x = checkpoint(layer, x, routing, rope, attend, use_reentrant=False)
            else:
                x = layer(x, routing, rope, attend)
        return expert(self.norm, getattr(self, "norm_moe_gen", None), x, routing)


class MoTForCausalLM(nn.Module):
    """`language_model`: the decoder plus an untied `lm_head`."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = MoTDecoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


def gen_to_und_name(name: str) -> str | None:
    """`layers.0.mlp_moe_gen.up_proj.weight` -> `layers.0.mlp.up_proj.weight`; None for und parameters."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.endswith(GEN_SUFFIX):
            parts[i] = part[: -len(GEN_SUFFIX)]
            return ".".join(parts)
    return None


@torch.no_grad()
def copy_und_to_gen(module: nn.Module) -> int:
    """Copy every `*_moe_gen*` parameter from its und twin; returns how many were copied."""
    params = dict(module.named_parameters())
    copied = 0
    for name, p in params.items():
        src = gen_to_und_name(name)
        if src is not None:
            p.copy_(params[src])
            copied += 1
    return copied
