"""Held-out data: the validation loader (finite, each sample once across ranks, the same number of batches on every
rank) and the fixed prompts that validation samples and the evaluation generate from. Read from the same shard
sources as training (lance_ds.data.stream), in a fixed order, with caption dropout off."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from typing import Callable, Iterator

from ..config.data import DataConfig, DatasetConfig, GroupConfig
from .batch import PackedBatch, Sample
from .packing import Branches, check_length, collate
from .sequence import PlanError, SequencePlan, SequencePlanner
from .stream import (ResolvedGroup, SkipCounter, SkipSample, decode_planned, decode_sample, read_shard,
                     resolve_group, skip_scalars)
from .tar import RawSample, ShardError

logger = logging.getLogger(__name__)


class ValLoader:
    """A held-out set in a fixed order (groups as listed, shards as listed, samples in tar order).

    Sample i (counting the first max_samples raw samples of every group, groups in order) belongs to batch
    i // samples_per_batch, and batch j to rank j % world_size: every sample is evaluated once across ranks and the batches do not depend on the number of
    ranks. Each rank reads every shard (only its own samples are decoded); ranks with fewer batches go on with
    placeholder-only ones (`placeholder()`) until every rank is done (lance_ds.validation), so every rank runs the
    same number of forward passes. Caption dropout is off.
    Samples longer than packing_length, which training never sees, are skipped and counted (val/skipped/overlong),
    also under data.filter_overlong=false: an error there would end the run in its middle.
    Each iteration starts from the beginning.
    """

    def __init__(self, groups: list[ResolvedGroup], planner: SequencePlanner, *, rank: int, world_size: int,
                 samples_per_batch: int, branches: Branches, packing_length: int, max_samples: int | None = None):
        self.groups = [replace(g, config=replace(g.config, caption_dropout=0.0)) for g in groups]
        self.packing_length = packing_length
        self.planner, self.rank, self.world_size = planner, rank, world_size
        self.samples_per_batch, self.branches, self.max_samples = samples_per_batch, branches, max_samples
        self.skips = SkipCounter(f" validation rank {rank}")

    def _raw_samples(self) -> Iterator[tuple[ResolvedGroup, RawSample]]:
        for group in self.groups:
            yield from itertools.islice(self._group_samples(group), self.max_samples)

    def _group_samples(self, group: ResolvedGroup) -> Iterator[tuple[ResolvedGroup, RawSample]]:
        for shard in group.shards:
            try:
                for raw in read_shard(shard.url):
                    yield group, raw
            except ShardError as e:
                if self.rank == 0:  # every rank reads the same shards; one counts (the others say it)
                    self.skips.add(e.reason, str(e))
                else:
                    logger.warning("data%s: %s", self.skips.where, e)

    def _plan(self, group: ResolvedGroup, raw: RawSample) -> SequencePlan | None:
        """The sample's plan, or None (counted). Planned from its media's sizes first, as for training: a sample too
        long to evaluate is dropped without being decoded; then its media decoded as training decodes them
        (planned again where they are not the size KEY.json gave)."""
        def planned(sample: Sample) -> SequencePlan:
            return self.planner.plan(sample, group.config)

        try:
            plan = planned(decode_sample(raw, group, sizes_only=True))
            if not self._fits(plan):
                return None
            if plan.needs_media:
                plan = decode_planned(plan, raw, group, 0, planned)
            return plan if self._fits(plan) else None
        except SkipSample as e:
            self.skips.add(e.reason, str(e))
        except PlanError as e:
            self.skips.add("bad_sample", str(e))
        return None

    def _fits(self, plan: SequencePlan) -> bool:
        """False (counted) for a sample longer than a packed sequence."""
        if check_length(plan, self.packing_length, True):
            return True
        self.skips.add("overlong", f"{plan.key} ({plan.group}, {plan.task}): {plan.num_tokens} tokens > "
                                   f"packing_length {self.packing_length}")
        return False

    def _batch(self, plans: list[SequencePlan]) -> PackedBatch:
        missing = self.branches.missing(plans)
        if any(missing.values()) or not plans:
            plans = plans + [self.planner.placeholder(**missing)]
        return collate(plans, pad_id=self.planner.special.pad)

    def placeholder(self) -> PackedBatch:
        """A batch of placeholders only (every branch, no loss): a forward pass for a rank with no batch left."""
        return self._batch([])

    def __iter__(self) -> Iterator[PackedBatch]:
        for plans in self.iter_plans():
            yield self._batch(plans)

    def iter_plans(self) -> Iterator[list[SequencePlan]]:
        """This rank's batches as plan lists (an empty list: its samples were all skipped)."""
        k, world = self.samples_per_batch, self.world_size
        self.skips = SkipCounter(f" validation rank {self.rank}")  # counts of this pass
        plans: list[SequencePlan] = []
        num_raw = 0
        current = None  # the batch index being collected (one of ours)
        for group, raw in self._raw_samples():
            batch_index = num_raw // k
            num_raw += 1
            if batch_index % world != self.rank:
                continue
            if current is not None and batch_index != current:
                yield plans
                plans = []
            current = batch_index
            plan = self._plan(group, raw)
            if plan is not None:
                plans.append(plan)
        if current is not None:
            yield plans

    def stats_scalars(self) -> dict[str, float]:
        return skip_scalars("val", self.skips.counts)


def first_samples(dataset: DatasetConfig, per_group: int,
                  fits: Callable[[GroupConfig, Sample], bool] | None = None) -> list[tuple[GroupConfig, Sample]]:
    """The first `per_group` decodable samples of every group with the group they come from, in shard order: fixed
    prompts for validation samples and evaluation (every rank reads the same ones). Undecodable samples are passed
    over, and so is the rest of a damaged shard (as the training loader does); so are samples `fits` refuses (too
    long: a caption of millions of characters would make a prompt no attention fits in memory)."""
    out: list[tuple[GroupConfig, Sample]] = []
    for i, config in enumerate(dataset.groups):
        group = resolve_group(config, f"groups[{i}] ({config.name})")
        found = 0
        for shard in group.shards:
            try:
                for raw in read_shard(shard.url):
                    if found == per_group:
                        break
                    try:
                        sample = decode_sample(raw, group)
                    except SkipSample:
                        continue
                    if fits is not None and not fits(config, sample):
                        logger.warning("passing over %s of group %s: longer than a packed sequence", sample.key,
                                       config.name)
                        continue
                    out.append((config, sample))
                    found += 1
            except ShardError as e:
                logger.warning("passing over the rest of a damaged shard: %s", e)
            if found == per_group:
                break
    return out


def within(planner: SequencePlanner, max_tokens: int) -> Callable[[GroupConfig, Sample], bool]:
    """first_samples' `fits`: the sample, planned as its group cuts it but with its caption (prompts keep theirs),
    has at most `max_tokens` tokens."""
    def fits(group: GroupConfig, sample: Sample) -> bool:
        try:
            return planner.plan(sample, replace(group, caption_dropout=0.0)).num_tokens <= max_tokens
        except PlanError:
            return True  # (not a length problem: generating from it reports it)

    return fits


def build_val_loader(dataset: DatasetConfig, data: DataConfig, planner: SequencePlanner, *, rank: int,
                     world_size: int, branches: Branches | None = None,
                     max_samples: int | None = None) -> ValLoader:
    """The validation loader of one rank (finite; see ValLoader)."""
    groups = [resolve_group(g, f"validation groups[{i}] ({g.name})") for i, g in enumerate(dataset.groups)]
    return ValLoader(groups, planner, rank=rank, world_size=world_size, samples_per_batch=data.val_samples_per_batch,
                     branches=branches or Branches(), max_samples=max_samples, packing_length=data.packing_length)
