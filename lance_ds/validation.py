"""Losses per task (training and validation) and the validation run.

Validation evaluates a fixed held-out set: the ValLoader gives batch j of the set to rank j % world_size, and the
noise and timesteps of batch j come from a generator seeded by j alone, so the per-task losses are the same for any
number of ranks. Every rank runs the same number of forward passes (placeholders where a rank runs out, agreed on
batch by batch), and every rank takes part in generating the samples (ZeRO-3 gathers parameters collectively), for
the same prompts (checked when they are read), which rank 0 writes to TensorBoard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config.data import GEN_TASKS, TASKS
from .data.batch import PackedBatch
from .distributed import every_rank, sum_over_ranks, until_every_rank_is_done
from .metrics import summed_over_ranks
from .objectives import TokenLosses, token_losses

if TYPE_CHECKING:
    from .config.data import DatasetConfig
    from .trainer import Trainer

CE_SUM, CE_COUNT, MSE_SUM, MSE_COUNT = range(4)


class TaskLosses:
    """Sums of per-token CE and MSE (and their weights) per task, reduced over ranks when read."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(TASKS), 4, device=device, dtype=torch.float64)

    @torch.no_grad()
    def add(self, batch: PackedBatch, tokens: TokenLosses) -> None:
        """A batch's per-token losses (objectives.token_losses, or Losses.per_token), credited to their tasks."""
        task_of_sample = torch.tensor([TASKS.index(t) if t in TASKS else -1 for t in batch.tasks],
                                      device=self.sums.device)
        if batch.ce_indexes.numel():
            self._scatter(task_of_sample[batch.sample_ids[batch.ce_indexes]], tokens.ce, tokens.ce_weights, CE_SUM)
        if batch.vae_indexes.numel():
            self._scatter(task_of_sample[batch.sample_ids[batch.vae_indexes]], tokens.mse, tokens.mse_weights, MSE_SUM)

    def _scatter(self, task: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, column: int) -> None:
        real = task >= 0  # placeholders (-1) add 0: selected by where, not by a boolean index (a device sync)
        w = torch.where(real, weights.double(), 0.0)
        task = task.clamp(min=0)
        self.sums[:, column].index_add_(0, task, torch.where(real, values.double() * w, 0.0))
        self.sums[:, column + 1].index_add_(0, task, w)

    def merge(self, other: "TaskLosses") -> None:
        self.sums += other.sums

    def scalars(self, prefix: str) -> dict[str, float]:
        """Per-task means over all ranks since the last call (collective: every rank must call it); then reset."""
        sums = sum_over_ranks(self.sums)
        self.sums.zero_()
        out = {}
        for i, task in enumerate(TASKS):
            if sums[i, CE_COUNT] > 0:
                out[f"{prefix}/ce/{task}"] = float(sums[i, CE_SUM] / sums[i, CE_COUNT])
            if sums[i, MSE_COUNT] > 0:
                out[f"{prefix}/mse/{task}"] = float(sums[i, MSE_SUM] / sums[i, MSE_COUNT])
        total = sums.sum(0)
        if total[CE_COUNT] > 0:
            out[f"{prefix}/ce"] = float(total[CE_SUM] / total[CE_COUNT])
        if total[MSE_COUNT] > 0:
            out[f"{prefix}/mse"] = float(total[MSE_SUM] / total[MSE_COUNT])
        return out


def total_loss(scalars: dict[str, float], prefix: str, objective) -> float:
    """The weighted total of the global CE and MSE means, as the objective defines it."""
    return objective.ce_weight * scalars.get(f"{prefix}/ce", 0.0) + objective.mse_weight * scalars.get(f"{prefix}/mse", 0.0)


def refuse_other_prompts(mine: list[tuple[str, str]]) -> None:
    """Every rank must generate for the same prompts (each generation step gathers parameters with every rank):
    a rank that read others (a shard it could not read, after retries) would hang the run at its first validation;
    it ends it now instead, naming what differs. A collective."""
    from .data.stream import DataError

    every = every_rank(mine)
    differing = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
    if differing:
        raise DataError(f"the validation prompts differ between ranks (rank 0 read {len(every[0])}: {every[0][:4]}...; "
                        f"rank {differing[0]} read {len(every[differing[0]])}: {every[differing[0]][:4]}...): a "
                        "validation shard was readable on some ranks only (see their warnings); check that every "
                        "node sees the validation data alike, or set validation.num_generations=0")


class Validator:
    """Held-out losses per task and generated samples, on every rank together."""

    def __init__(self, trainer: "Trainer", dataset: "DatasetConfig"):
        from .data.held_out import build_val_loader
        from .evaluate import load_prompts

        self.trainer = trainer
        cfg = trainer.cfg
        self.loader = build_val_loader(dataset, cfg.data, trainer.planner, rank=trainer.dist.rank,
                                       world_size=trainer.dist.world_size, branches=trainer.branches,
                                       max_samples=cfg.validation.max_samples)
        # the same fixed prompts on every rank (generation runs on all ranks together under ZeRO-3), each with the
        # group it is cut with (its resolutions and frame sampling, as in training)
        self.prompts = load_prompts(dataset, cfg.validation.num_generations, trainer.planner,
                                    cfg.data.packing_length) if cfg.validation.num_generations else []
        if cfg.validation.num_generations:
            refuse_other_prompts([(p.group.name, p.sample.key) for p in self.prompts])

    @torch.no_grad()
    def run(self, step: int) -> dict[str, float]:
        tr = self.trainer
        if tr.cfg.validation.weights == "ema":
            with tr.ema.applied(tr.engine.optimizer):
                return self._run(step)
        return self._run(step)

    def _run(self, step: int) -> dict[str, float]:
        tr = self.trainer
        was_training = tr.engine.module.training
        tr.engine.module.eval()
        losses = TaskLosses(tr.dist.device)
        batches = until_every_rank_is_done(iter(self.loader), self.loader.placeholder, tr.dist.device)
        for k, batch in enumerate(batches):
            batch = batch.to(tr.dist.device)
            global_index = k * tr.dist.world_size + tr.dist.rank  # the loader's batch j lives on rank j % world
            gen = torch.Generator(device=tr.dist.device)
            gen.manual_seed(hash((tr.cfg.train.seed, -1, global_index)) % 2**63)
            pred, flow = tr.forward(batch, gen)
            losses.add(batch, token_losses(pred.logits, pred.velocity, batch, flow, tr.cfg.objective))
        scalars = losses.scalars("val")
        scalars["val/loss"] = total_loss(scalars, "val", tr.cfg.objective)
        skipped = self.loader.stats_scalars()  # this rank's counts: the run's are their sums
        scalars.update(summed_over_ranks(skipped, tr.dist.device))
        tr.tb.scalars(step, scalars)
        self.samples(step)
        tr.tb.flush()
        if was_training:
            tr.engine.module.train()
        return scalars

    def samples(self, step: int) -> None:
        """Generated images / videos for fixed prompts and answers to fixed questions, to TensorBoard (rank 0)."""
        from .evaluate import by_group_and_task, judged_pixels, side_by_side
        from .generate import Generator

        tr = self.trainer
        cfg = tr.cfg.validation
        generator = Generator(tr.engine, tr.parts.vit, tr.parts.vae, tr.planner, tr.tokenizer, tr.cfg.objective)
        seen: dict[str, int] = {}
        rows = ["| task | question | reference | answer |", "|---|---|---|---|"]
        for prompts in by_group_and_task(self.prompts):
            group, samples = prompts[0].group, [p.sample for p in prompts]
            if samples[0].task in GEN_TASKS:
                outputs = generator.generate(samples, num_steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                                             seed=tr.cfg.train.seed, group=group)
                for sample, frames in zip(samples, outputs):
                    k = seen[sample.task] = seen.get(sample.task, -1) + 1
                    source, _ = judged_pixels(sample, frames)  # an edit's source, cut as the model saw it
                    clip = side_by_side(source, frames)  # edits: source | output
                    tr.tb.video_frames(f"samples/{sample.task}/{k}", step, clip)
                    tr.tb.text(f"samples/{sample.task}/{k}/prompt", step, sample.texts.get("caption", ""))
            else:
                answers = generator.answer(samples, max_new_tokens=cfg.max_new_tokens, group=group)
                rows += [f"| {s.task} | {s.texts.get('caption_q', '')} | {s.texts.get('caption_a', '')} | {a} |"
                         for s, a in zip(samples, answers)]
        if len(rows) > 2:
            tr.tb.text("samples/answers", step, "\n".join(rows))
