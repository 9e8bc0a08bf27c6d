"""Attention over one packed sequence: the causal / full / noise split rule, and three backends that compute it.

Shape legend:
  L  packed tokens (every sample of the micro-batch, back to back, padding included)
  nh query heads, kv key/value heads (nh % kv == 0), d head dim
  S  query segments of the varlen (flash) plan; Lk their concatenated key lists

The rule (reference/LANCE_FACTS.md, "Attention mask over a packed sequence"): token q may attend to token k when
  both are in the same sample, and
  (q >= k, or q and k are in the same full/noise split), and
  k is not in a *different* noise split (a noised target is invisible to everything outside itself).

Backends (`model.attention`):
  sdpa   PyTorch scaled_dot_product_attention with a dense boolean mask per sample (works everywhere; CPU default)
  flex   torch flex_attention with a BlockMask built from the same rule as a mask_mod (compiled on CUDA); the
         block map is built a chunk of query blocks at a time, so its memory does not grow with L x L
  flash  flash_attn_varlen_func over a segment plan: every split sees "the visible prefix of its sample, then
         itself" (causally for text, fully for vision), so two varlen calls (causal, bidirectional) cover the rule
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lance_ds.config.model import ATTENTION_BACKENDS
from lance_ds.data.batch import AttnMode

# plain ints: flex's eager path mis-evaluates tensor comparisons against IntEnum members
CAUSAL, NOISE = int(AttnMode.CAUSAL), int(AttnMode.NOISE)


# ----------------------------------------------------------------------------------------------------------------
# the rule


def allowed(q_sample: Tensor, k_sample: Tensor, q_split: Tensor, k_split: Tensor, q_mode: Tensor, k_mode: Tensor,
            q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """The attention rule on broadcastable index tensors; shared by the dense mask and the flex mask_mod."""
    same_split = q_split == k_split
    bidirectional = same_split & (q_mode != CAUSAL)
    hidden_noise = (k_mode == NOISE) & ~same_split
    return (q_sample == k_sample) & ((q_pos >= k_pos) | bidirectional) & ~hidden_noise


def dense_mask(sample_ids: Tensor, split_ids: Tensor, attn_modes: Tensor) -> Tensor:
    """[L, L] bool, True where query row may attend key column."""
    pos = torch.arange(sample_ids.numel(), device=sample_ids.device)
    return allowed(sample_ids[:, None], sample_ids[None, :], split_ids[:, None], split_ids[None, :],
                   attn_modes[:, None], attn_modes[None, :], pos[:, None], pos[None, :])


@dataclass
class PackedLayout:
    """Per-token attention metadata of one packed sequence; built once per forward, shared by all layers."""

    sample_ids: Tensor  # [L] long
    split_ids: Tensor  # [L] long
    attn_modes: Tensor  # [L] long, AttnMode

    @property
    def num_tokens(self) -> int:
        return int(self.sample_ids.numel())

    def sample_runs(self) -> list[tuple[int, int]] | None:
        """(start, end) of each sample when every sample is one contiguous run (the packer's layout), else None."""
        ids, counts = torch.unique_consecutive(self.sample_ids, return_counts=True)
        if ids.numel() != torch.unique(ids).numel():
            return None
        ends = torch.cumsum(counts, 0).tolist()
        return list(zip([0] + ends[:-1], ends))


# ----------------------------------------------------------------------------------------------------------------
# backends: each is built once per forward from the layout, then called per layer as attend(q, k, v, layer) -> out
# q [L, nh, d], k / v [L, kv, d] -> [L, nh, d]; `layer` (the decoder layer's index) matters only to the KV cache


class SdpaAttention:
    """Dense boolean masks, one per sample (block-diagonal packing needs no cross-sample L x L mask); an all-causal
    sample (text, padding) takes SDPA's built-in causal path with no mask at all.

    Correct on any device, but a long bidirectional sample costs its length squared in mask memory: use flex on GPUs.
    """

    def __init__(self, layout: PackedLayout):
        runs = layout.sample_runs()
        interleaved = runs is None
        if interleaved:  # samples interleave: fall back to one mask over the whole sequence
            runs = [(0, layout.num_tokens)]
        self.blocks = []
        for start, end in runs:
            sl = slice(start, end)
            modes = layout.attn_modes[sl]
            if not interleaved and bool((modes == CAUSAL).all()):
                self.blocks.append((sl, None))
            else:
                self.blocks.append((sl, dense_mask(layout.sample_ids[sl], layout.split_ids[sl], modes)))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layer: int = 0) -> Tensor:
        outs = [_sdpa(q[sl], k[sl], v[sl], mask, is_causal=mask is None) for sl, mask in self.blocks]
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
          repeat_kv: bool | None = None) -> Tensor:
    """[l, nh, d] x [l', kv, d] -> [l, nh, d] with grouped-query heads.

    repeat_kv (default: on CUDA with a mask) gives every query head its own copy of its key/value head instead of
    SDPA's enable_gqa: with a mask, CUDA has no fused kernel for grouped heads and would fall back to the math one
    (fp32 scores of [nh, l, l] in memory); repeated heads take the memory-efficient kernel.
    """
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, l, d]
    if repeat_kv is None:
        repeat_kv = mask is not None and q.is_cuda
    group = q.shape[1] // k.shape[1]
    if repeat_kv and group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # head i reads kv head i // group
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None)


class FlexAttention:
    """flex_attention with a BlockMask from the rule; fully masked 128x128 blocks are skipped.

    On CUDA the kernel is torch.compile'd once per process; on CPU flex runs its eager reference (it materialises
    the scores, so it is a correctness path for tests, not a fast one).
    """

    BLOCK = 128

    def __init__(self, layout: PackedLayout):
        self.on_cuda = layout.sample_ids.is_cuda
        self.block_mask = rule_block_mask(layout, self.BLOCK)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layer: int = 0) -> Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        if not self.on_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError("model.attention=flex has no backward on CPU in this torch; train with "
                               "model.attention=sdpa on CPU (flex is for CUDA, or CPU inference)")
        args = tuple(x.transpose(0, 1)[None] for x in (q, k, v))
        if self.on_cuda:
            out = _compiled_flex()(*args, block_mask=self.block_mask, enable_gqa=True)
        else:
            with warnings.catch_warnings():  # "called without torch.compile": intended on CPU, see the class doc
                warnings.simplefilter("ignore", UserWarning)
                out = flex_attention(*args, block_mask=self.block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)


_MASK_CHUNK = 1 << 23  # mask elements evaluated at once by rule_block_mask (~8 MiB per bool intermediate)


def rule_block_mask(layout: PackedLayout, block: int):
    """flex's BlockMask of the rule: which block x block tiles of the L x L mask are empty, full or partial (its
    mask_mod then runs in the partial ones only). torch's create_block_mask, uncompiled, evaluates the whole mask at
    once (several L x L tensors: ~0.7 GiB at 8k tokens, ~11 GiB at 32k); this walks the query blocks a chunk at a
    time, so its memory stays ~_MASK_CHUNK elements at any length. The tiles equal create_block_mask's (tested)."""
    from torch.nn.attention.flex_attention import BlockMask

    n = layout.num_tokens
    pos = torch.arange(n, device=layout.sample_ids.device)
    keys = (layout.sample_ids[None], layout.split_ids[None], layout.attn_modes[None], pos[None])
    padded = n + -n % block  # past n the mask is False (create_block_mask pads so too)
    rows = max(1, _MASK_CHUNK // (block * padded)) * block
    counts = []  # per chunk: [query blocks, kv blocks] allowed pairs in each tile
    for start in range(0, n, rows):
        q = slice(start, min(start + rows, n))
        mask = allowed(layout.sample_ids[q, None], keys[0], layout.split_ids[q, None], keys[1],
                       layout.attn_modes[q, None], keys[2], pos[q, None], keys[3])
        mask = F.pad(mask, (0, padded - n, 0, -mask.shape[0] % block))
        counts.append(mask.view(-1, block, padded // block, block).sum(dim=(1, 3)))
    counts = torch.cat(counts)[None, None]  # [1, 1, Q blocks, KV blocks]
    full = counts == block * block
    partial = (counts > 0) & ~full
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=(block, block),
                                    mask_mod=rule_mask_mod(layout, block), seq_lengths=(n, n))


def rule_mask_mod(layout: PackedLayout, block: int):
    """The rule as flex's mask_mod(b, h, q_idx, kv_idx). flex evaluates it on indices up to the next multiple of
    the block size: the captured per-token tensors are padded so those reads stay in bounds (padding is a sample of
    its own, seen by nobody)."""
    pad = -layout.num_tokens % block
    sample, split, mode = (F.pad(x, (0, pad), value=-1) for x in
                           (layout.sample_ids, layout.split_ids, layout.attn_modes))

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(sample[q_idx], sample[kv_idx], split[q_idx], split[kv_idx], mode[q_idx], mode[kv_idx],
                       q_idx, kv_idx)

    return mask_mod


def _ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """A [.., rows, cols] bool tile map as flex stores it: per row, the count of True tiles and the column indices
    with those tiles first (in column order)."""
    tiles = tiles.to(torch.int32)
    return tiles.sum(-1, dtype=torch.int32), torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)


@dataclass
class VarlenGroup:
    """Query segments that share a causal flag: queries[q_index], keys[k_index], split by cu_seqlens."""

    q_index: Tensor  # [sum of segment lengths] long
    k_index: Tensor  # [Lk] long
    cu_q: Tensor  # [S + 1] int32
    cu_k: Tensor  # [S + 1] int32
    max_q: int
    max_k: int


def varlen_plan(layout: PackedLayout) -> tuple[VarlenGroup | None, VarlenGroup | None]:
    """Decompose the rule into (causal, bidirectional) query segments with their key lists.

    Every split sees the non-noise tokens of its sample that come before it, then itself: causally (bottom-right
    aligned, as flash-attn >= 2.1 does when seqlen_k > seqlen_q) for text, fully for full/noise splits.
    Consecutive causal splits merge into one segment. Needs each sample and split to be a contiguous run.
    """
    runs = layout.sample_runs()
    if runs is None:
        raise ValueError("attention 'flash' needs every sample to be one contiguous run of the packed sequence; "
                         "use model.attention=flex or sdpa for interleaved layouts")
    splits = layout.split_ids.tolist()
    modes = layout.attn_modes.tolist()
    groups: dict[bool, list[tuple[list[int], list[int]]]] = {True: [], False: []}
    for start, end in runs:
        visible: list[int] = []  # non-noise tokens of this sample before the current segment
        i = start
        while i < end:
            j = i
            causal = modes[i] == CAUSAL
            # one segment: a run of causal splits, or a single full/noise split
            while j < end and (splits[j] == splits[i] or (causal and modes[j] == CAUSAL)):
                j += 1
            own = list(range(i, j))
            groups[causal].append((own, visible + own))
            if modes[i] != NOISE:
                visible = visible + own
            i = j
    return _pack_group(groups[True], layout), _pack_group(groups[False], layout)


def _pack_group(segments: list[tuple[list[int], list[int]]], layout: PackedLayout) -> VarlenGroup | None:
    if not segments:
        return None
    device = layout.sample_ids.device
    q_lens = [len(q) for q, _ in segments]
    k_lens = [len(k) for _, k in segments]

    def cu(lens):
        return torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)

    return VarlenGroup(
        q_index=torch.tensor([i for q, _ in segments for i in q], device=device),
        k_index=torch.tensor([i for _, k in segments for i in k], device=device),
        cu_q=cu(q_lens), cu_k=cu(k_lens), max_q=max(q_lens), max_k=max(k_lens))


FLASH_MIN_VERSION = (2, 1)  # causal masks aligned bottom-right: varlen_plan's causal segments have more keys than queries


def import_flash_varlen():
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("model.attention=flash needs the flash_attn package (pip install flash-attn, CUDA only), "
                           f"which does not import here ({e}); use model.attention=flex or sdpa") from e
    version = tuple(int(p) for p in re.findall(r"\d+", flash_attn.__version__)[:2])
    if version < FLASH_MIN_VERSION:  # earlier versions align causal masks top-left: wrong attention, silently
        raise RuntimeError(f"model.attention=flash needs flash_attn >= 2.1, found {flash_attn.__version__} (before "
                           "2.1 its causal masks align top-left, which packed segments here do not match); upgrade "
                           "it, or use model.attention=flex or sdpa")
    return flash_attn_varlen_func


class VarlenAttention:
    """Two varlen calls over the segment plan; `kernel` is flash_attn_varlen_func (or a reference, in tests)."""

    def __init__(self, layout: PackedLayout, kernel=None):
        self.kernel = kernel or import_flash_varlen()
        self.groups = [(g, causal) for g, causal in zip(varlen_plan(layout), (True, False)) if g is not None]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layer: int = 0) -> Tensor:
        out = torch.empty_like(q)
        for g, causal in self.groups:
            o = self.kernel(q[g.q_index], k[g.k_index], v[g.k_index], g.cu_q, g.cu_k, g.max_q, g.max_k,
                            causal=causal)
            out = out.index_copy(0, g.q_index, o.to(q.dtype))
        return out


def reference_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                     causal: bool = False) -> Tensor:
    """flash_attn_varlen_func's contract in plain SDPA (bottom-right causal), to test the plan on CPU."""
    outs = []
    for i in range(cu_q.numel() - 1):
        qs = q[int(cu_q[i]):int(cu_q[i + 1])]
        ks, vs = k[int(cu_k[i]):int(cu_k[i + 1])], v[int(cu_k[i]):int(cu_k[i + 1])]
        mask = None
        if causal:
            offset = ks.shape[0] - qs.shape[0]
            mask = torch.arange(ks.shape[0], device=q.device)[None, :] <= \
                torch.arange(qs.shape[0], device=q.device)[:, None] + offset
        outs.append(_sdpa(qs, ks, vs, mask))
    return torch.cat(outs, dim=0)


# ----------------------------------------------------------------------------------------------------------------
# KV cache for decoding text after a prompt


class KVCache:
    """Keys and values of packed prompts and of the tokens decoded after them, per layer: each cached token's sample,
    and whether new text may attend to it (every token of its sample but noise splits, by the rule above)."""

    def __init__(self, num_layers: int, sample_ids: Tensor, visible: Tensor):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.sample_ids = sample_ids  # [T] long
        self.visible = visible  # [T] bool

    def grow(self, sample_ids: Tensor) -> None:
        """New text tokens of these samples [n] are cached (visible to later text of their sample)."""
        self.sample_ids = torch.cat([self.sample_ids, sample_ids])
        self.visible = torch.cat([self.visible, torch.ones_like(sample_ids, dtype=torch.bool)])

    @property
    def num_tokens(self) -> int:
        return int(self.visible.numel())


class RecordingAttention:
    """A backend's attention over the prompt that also fills the cache."""

    def __init__(self, inner, cache: KVCache):
        self.inner, self.cache = inner, cache

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layer: int = 0) -> Tensor:
        self.cache.keys[layer], self.cache.values[layer] = k, v
        return self.inner(q, k, v, layer)


class CachedAttention:
    """n new causal text tokens (of the samples `sample_ids` [n]): each sees its sample's visible cached tokens, then
    the new tokens of its sample up to itself."""

    def __init__(self, cache: KVCache, sample_ids: Tensor):
        self.cache = cache
        n = sample_ids.numel()
        same = sample_ids[:, None] == sample_ids[None, :]
        causal = torch.ones(n, n, dtype=torch.bool, device=sample_ids.device).tril()
        cached = (sample_ids[:, None] == cache.sample_ids[None, :]) & cache.visible[None, :]
        self.mask = torch.cat([cached, same & causal], dim=1)  # [n, T + n]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layer: int = 0) -> Tensor:
        cache = self.cache
        k = torch.cat([cache.keys[layer], k])
        v = torch.cat([cache.values[layer], v])
        cache.keys[layer], cache.values[layer] = k, v
        return _sdpa(q, k, v, self.mask)


def build_attention(backend: str, layout: PackedLayout):
    """The per-forward attention callable for `model.attention`."""
    if backend == "sdpa":
        return SdpaAttention(layout)
    if backend == "flex":
        return FlexAttention(layout)
    if backend == "flash":
        return VarlenAttention(layout)
    raise ValueError(f"model.attention must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
