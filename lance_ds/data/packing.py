"""Sequence plans -> packed micro-batches: a token-budget packer and the collate to `PackedBatch`.

A micro-batch is `micro_batch_size` packed sequences of at most `packing_length` tokens each, concatenated (the model
sees one sequence; `sample_ids` keep samples apart), then the zero-weight placeholder when a trainable branch has no
real input in it (DESIGN rule 3), then one padding sample up to micro_batch_size * packing_length tokens. The
placeholder is at most a dozen tokens; it takes padding room when there is some, otherwise the batch is that much
longer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import PAD_TASK, AttnMode, PackedBatch
from .sequence import SequencePlan, SequencePlanner


@dataclass(frozen=True)
class Branches:
    """The trainable branches every micro-batch must exercise on every rank (ZeRO-3; DESIGN rule 3).

    The trainer sets them from the model: vit = the ViT path is built (model.visual_und), vae_target = the
    generation path is built (model.visual_gen), ce = the lm_head is trained (model.visual_und).
    """

    vit: bool = True  # at least one ViT block
    vae_target: bool = True  # at least one noised VAE target block
    ce: bool = True  # at least one CE position

    def missing(self, plans: list[SequencePlan]) -> dict[str, bool]:
        """Which branches `plans` leave without input: keyword arguments of SequencePlanner.placeholder."""
        return {
            "vit": self.vit and not any(p.vit for p in plans),
            "vae": self.vae_target and not any(p.has_vae_target for p in plans),
            "ce": self.ce and not any(p.ce_targets.numel() for p in plans),
        }


class OverlongSampleError(ValueError):
    """A sample longer than packing_length with data.filter_overlong false."""


def check_length(plan: SequencePlan, packing_length: int, filter_overlong: bool) -> bool:
    """True when the plan fits a packed sequence - with its caption, dropped or not: a sample trains in every epoch
    or none -; False (drop and count it) or an error when it does not."""
    length = plan.tokens_with_caption or plan.num_tokens
    if length <= packing_length:
        return True
    if filter_overlong:
        return False
    raise OverlongSampleError(
        f"sample {plan.key!r} of group {plan.group!r} ({plan.task}) has {length} tokens, more than "
        f"data.packing_length={packing_length}. Raise data.packing_length, lower the group's image.resolution / "
        f"video.max_frames, or set data.filter_overlong=true to drop (and count) such samples.")


class TokenBudgetPacker:
    """Fills sequences of `packing_length` tokens from a buffer of plans.

    first_fit: a sequence starts with the oldest buffered plan (no plan waits forever), then takes every other
    buffered plan, oldest first, that still fits. next_fit: plans in arrival order until the next one does not fit.
    The buffer is the packer's only state: the stream saves the addresses of the plans in it to resume exactly.
    It is full at `buffer_size` plans, or sooner when its plans' undecoded samples (`plan.raw`) hold `max_bytes`.
    """

    def __init__(self, packing_length: int, buffer_size: int = 64, strategy: str = "first_fit",
                 max_bytes: float = float("inf")):
        if strategy not in ("first_fit", "next_fit"):
            raise ValueError(f"packing strategy must be first_fit or next_fit, got {strategy!r}")
        self.packing_length = packing_length
        self.buffer_size = buffer_size
        self.strategy = strategy
        self.max_bytes = max_bytes
        self.buffer: list[SequencePlan] = []

    def add(self, plan: SequencePlan) -> None:
        if plan.num_tokens > self.packing_length:
            raise OverlongSampleError(f"plan {plan.key!r} ({plan.num_tokens} tokens) exceeds packing_length "
                                      f"{self.packing_length}; filter it with check_length first")
        self.buffer.append(plan)

    def ready(self) -> bool:
        """Enough plans buffered to pack well (pop_sequence also works before, e.g. to drain at the end)."""
        return len(self.buffer) >= self.buffer_size or self.held_bytes() >= self.max_bytes

    def held_bytes(self) -> int:
        """The encoded bytes the buffered plans hold until they are decoded."""
        return sum(plan.raw.nbytes for plan in self.buffer if plan.raw is not None)

    def pop_sequence(self) -> list[SequencePlan]:
        """The plans of one packed sequence, removed from the buffer (empty when the buffer is)."""
        if not self.buffer:
            return []
        taken = [0]
        room = self.packing_length - self.buffer[0].num_tokens
        for i in range(1, len(self.buffer)):
            n = self.buffer[i].num_tokens
            if n <= room:
                taken.append(i)
                room -= n
            elif self.strategy == "next_fit":
                break
            if room == 0:
                break
        chosen = [self.buffer[i] for i in taken]
        keep = set(taken)
        self.buffer = [p for i, p in enumerate(self.buffer) if i not in keep]
        return chosen


def collate(plans: list[SequencePlan], *, pad_to: int | None = None, pad_id: int = 0) -> PackedBatch:
    """Concatenate plans into one PackedBatch; a padding sample (causal, task "pad") fills up to `pad_to` tokens.
    The vision blocks' pixels are cut from the plans' media here."""
    ids, pos, sample_ids, split_ids, modes = [], [], [], [], []
    ce_idx, ce_tgt, ce_w = [], [], []
    vit_patches, vit_grid, vit_idx = [], [], []
    vae_pixels, vae_grid, vae_idx, vae_coords, vae_target, vae_w = [], [], [], [], [], []
    tasks: list[str] = []
    offset = split = 0
    num_real = pairs = 0
    for sample_id, plan in enumerate(plans):
        n = plan.num_tokens
        ids.append(plan.input_ids)
        pos.append(plan.position_ids)
        sample_ids.append(torch.full((n,), sample_id, dtype=torch.long))
        lens = torch.tensor(plan.split_lens, dtype=torch.long)
        split_ids.append(torch.repeat_interleave(torch.arange(split, split + len(lens)), lens))
        modes.append(torch.repeat_interleave(torch.tensor([int(m) for m in plan.split_modes]), lens))
        split += len(lens)
        ce_idx.append(plan.ce_positions + offset)
        ce_tgt.append(plan.ce_targets)
        ce_w.append(torch.full((plan.ce_targets.numel(),), float(plan.ce_weight)))
        if plan.needs_media:
            raise ValueError(f"plan {plan.key!r} was made from its media's sizes alone; decode its media first")
        for block in plan.vit:
            vit_patches.append(block.patches(plan.media))
            vit_grid.append(block.grid_thw)
            vit_idx.append(block.positions + offset)
        for block in plan.vae:
            vae_pixels.append(block.pixels(plan.media))
            vae_grid.append(block.grid_thw)
            vae_idx.append(block.positions + offset)
            vae_coords.append(block.coords)
            vae_target.append(block.is_target)
            vae_w.append(block.weight)
        tasks.append(plan.task)
        num_real += n if plan.is_real else 0
        pairs += n * n if plan.is_real else 0
        offset += n
    if pad_to is not None and pad_to > offset:
        n = pad_to - offset
        ids.append(torch.full((n,), pad_id, dtype=torch.long))
        pos.append(torch.arange(n).expand(3, -1))
        sample_ids.append(torch.full((n,), len(tasks), dtype=torch.long))
        split_ids.append(torch.full((n,), split, dtype=torch.long))
        modes.append(torch.full((n,), int(AttnMode.CAUSAL), dtype=torch.long))
        tasks.append(PAD_TASK)
    patch_dim = vit_patches[0].shape[1] if vit_patches else 0
    return PackedBatch(
        input_ids=torch.cat(ids),
        position_ids=torch.cat(pos, dim=1),
        sample_ids=torch.cat(sample_ids),
        split_ids=torch.cat(split_ids),
        attn_modes=torch.cat(modes),
        ce_indexes=_cat_long(ce_idx),
        ce_targets=_cat_long(ce_tgt),
        ce_weights=torch.cat(ce_w) if ce_w else torch.zeros(0),
        vit_patches=torch.cat(vit_patches) if vit_patches else torch.zeros(0, patch_dim, dtype=torch.uint8),
        vit_grid_thw=torch.tensor(vit_grid, dtype=torch.long).reshape(-1, 3),
        vit_indexes=_cat_long(vit_idx),
        vae_pixels=vae_pixels,
        vae_grid_thw=torch.tensor(vae_grid, dtype=torch.long).reshape(-1, 3),
        vae_indexes=_cat_long(vae_idx),
        vae_coords=torch.cat(vae_coords) if vae_coords else torch.zeros(0, 3, dtype=torch.long),
        vae_is_target=torch.tensor(vae_target, dtype=torch.bool),
        vae_weights=torch.tensor(vae_w, dtype=torch.float32),
        tasks=tasks,
        num_real_tokens=num_real,
        attended_pairs=pairs,
    )


def _cat_long(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def build_micro_batch(sequences: list[list[SequencePlan]], planner: SequencePlanner, branches: Branches,
                      packing_length: int) -> PackedBatch:
    """`micro_batch_size` packed sequences -> one PackedBatch with placeholders for missing branches, padded to
    len(sequences) * packing_length tokens."""
    plans = [p for seq in sequences for p in seq]
    missing = branches.missing(plans)
    if any(missing.values()):
        plans = plans + [planner.placeholder(**missing)]
    return collate(plans, pad_to=len(sequences) * packing_length, pad_id=planner.special.pad)
