"""Synthetic packed batches that follow the PackedBatch contract, for model tests and benchmarks.

Real batches come from lance_ds.data (tokenizer, chat template, packer); these only need to be *valid*: splits,
RoPE ids (Qwen2.5-VL rule: a vision block after position p gets p + 1 + (t * tokens_per_second, h, w) over its
merged grid, the next token max + 1), CE targets, ViT patches and latent coordinates.

A sample is a list of parts:
  Text(n, scored=False)                  n causal text tokens; scored: CE on each of them (predicted from the left)
  Vit(t, h, w)                           a ViT block with a (t, h, w) *patch* grid (h, w multiples of the merge)
  Vae(t, h, w, target=True, weight=1.0)  a VAE block with a (t, h, w) *latent* grid; noise split when a target,
                                         full (clean condition, t = 0) otherwise
Vision blocks are wrapped in vision_start / vision_end text tokens inside their split, as Lance does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lance_ds.data.batch import AttnMode, PackedBatch


@dataclass(frozen=True)
class Text:
    n: int
    scored: bool = False


@dataclass(frozen=True)
class Vit:
    t: int
    h: int
    w: int


@dataclass(frozen=True)
class Vae:
    t: int
    h: int
    w: int
    target: bool = True
    weight: float = 1.0


VISION_START, VISION_END, VISION_PAD = 3, 4, 5  # any ids below num_text_classes serve a synthetic batch


class _Builder:
    def __init__(self, num_text_classes: int, merge: int, patch_dim: int, tokens_per_second: int, generator):
        self.num_text_classes, self.merge, self.patch_dim, self.tps = num_text_classes, merge, patch_dim, tokens_per_second
        self.g = generator
        self.ids, self.pos, self.sample, self.split, self.mode = [], [], [], [], []
        self.ce_idx, self.ce_tgt = [], []
        self.patches, self.vit_grid, self.vit_idx = [], [], []
        self.vae_grid, self.vae_idx, self.vae_coords, self.vae_target, self.vae_weight = [], [], [], [], []
        self.split_id = -1

    def add_token(self, token: int, pos: tuple[int, int, int], sample: int, mode: AttnMode) -> int:
        self.ids.append(token)
        self.pos.append(pos)
        self.sample.append(sample)
        self.split.append(self.split_id)
        self.mode.append(int(mode))
        return len(self.ids) - 1

    def next_pos(self, sample_start: int) -> int:
        return max(max(p) for p in self.pos[sample_start:]) + 1 if len(self.pos) > sample_start else 0

    def text(self, part: Text, sample: int, start: int) -> None:
        self.split_id += 1
        for _ in range(part.n):
            token = int(torch.randint(6, self.num_text_classes, (1,), generator=self.g))
            p = self.next_pos(start)
            i = self.add_token(token, (p, p, p), sample, AttnMode.CAUSAL)
            if part.scored and i > start:
                self.ce_idx.append(i - 1)
                self.ce_tgt.append(token)

    def vision(self, grid: tuple[int, int, int], sample: int, start: int, mode: AttnMode, temporal_step: int) -> list[int]:
        """vision_start, t*h*w slots over `grid` (already merged), vision_end; returns the slots' positions."""
        self.split_id += 1
        p = self.next_pos(start)
        self.add_token(VISION_START, (p, p, p), sample, mode)
        slots = []
        t, h, w = grid
        for ti in range(t):
            for hi in range(h):
                for wi in range(w):
                    slots.append(self.add_token(VISION_PAD, (p + 1 + ti * temporal_step, p + 1 + hi, p + 1 + wi),
                                                sample, mode))
        end = self.next_pos(start)
        self.add_token(VISION_END, (end, end, end), sample, mode)
        return slots

    def vit(self, part: Vit, sample: int, start: int) -> None:
        m = self.merge
        if part.h % m or part.w % m:
            raise ValueError(f"ViT grid {part} needs h and w divisible by the merge size {m}")
        slots = self.vision((part.t, part.h // m, part.w // m), sample, start, AttnMode.FULL, self.tps)
        self.vit_idx += slots
        self.vit_grid.append((part.t, part.h, part.w))
        self.patches.append(torch.randn(part.t * part.h * part.w, self.patch_dim, generator=self.g))

    def vae(self, part: Vae, sample: int, start: int) -> None:
        mode = AttnMode.NOISE if part.target else AttnMode.FULL
        slots = self.vision((part.t, part.h, part.w), sample, start, mode, 1)
        self.vae_idx += slots
        self.vae_grid.append((part.t, part.h, part.w))
        self.vae_coords += [(t, h, w) for t in range(part.t) for h in range(part.h) for w in range(part.w)]
        self.vae_target.append(part.target)
        self.vae_weight.append(part.weight if part.target else 0.0)


def synthetic_batch(samples: list[list], num_text_classes: int, merge: int = 2, patch_dim: int = 1176,
                    tokens_per_second: int = 2, seed: int = 0, tasks: list[str] | None = None) -> PackedBatch:
    """A valid PackedBatch of `samples` (lists of Text / Vit / Vae parts), packed back to back."""
    b = _Builder(num_text_classes, merge, patch_dim, tokens_per_second, torch.Generator().manual_seed(seed))
    for s, parts in enumerate(samples):
        start = len(b.ids)
        for part in parts:
            {Text: b.text, Vit: b.vit, Vae: b.vae}[type(part)](part, s, start)

    def long(x, shape=(0,)) -> Tensor:
        return torch.tensor(x, dtype=torch.long) if x else torch.zeros(shape, dtype=torch.long)

    return PackedBatch(
        input_ids=long(b.ids), position_ids=long(b.pos).T.contiguous(), sample_ids=long(b.sample),
        split_ids=long(b.split), attn_modes=long(b.mode),
        ce_indexes=long(b.ce_idx), ce_targets=long(b.ce_tgt), ce_weights=torch.ones(len(b.ce_idx)),
        vit_patches=torch.cat(b.patches) if b.patches else torch.zeros(0, patch_dim),
        vit_grid_thw=long(b.vit_grid, (0, 3)), vit_indexes=long(b.vit_idx),
        vae_pixels=[], vae_grid_thw=long(b.vae_grid, (0, 3)), vae_indexes=long(b.vae_idx),
        vae_coords=long(b.vae_coords, (0, 3)), vae_is_target=torch.tensor(b.vae_target, dtype=torch.bool),
        vae_weights=torch.tensor(b.vae_weight, dtype=torch.float32),
        tasks=tasks or ["synthetic"] * len(samples), num_real_tokens=len(b.ids))


def random_latents(batch: PackedBatch, channels: int, seed: int = 0) -> Tensor:
    """[N, z] clean latents for the batch's VAE tokens (stand-ins for VAE output)."""
    return torch.randn(batch.vae_indexes.numel(), channels, generator=torch.Generator().manual_seed(seed))
