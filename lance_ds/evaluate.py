"""Held-out evaluation of the example tasks: what the model does, scored by programs that can say no.

For each group of a dataset YAML of converter shards (configs/datasets/example_val.yaml: scenes that never occur in
training), its first `num_per_task` samples become prompts for a Generator (lance_ds.generate):
  i2t / v2t   greedy answers to the sample's question; right when every attribute the reference answer names
              (colour, shape, direction) is named, the same (lance_ds.data.example.judge_answer)
  t2i / t2v   pixels generated from the caption; right when a program reading them finds the caption's colour,
              shape and, for videos, direction of motion (judge_generation: dominant hue, mask geometry, centroid)
  i2i / v2v   pixels generated from the source and the instruction; right when the edit is applied and the rest
              (the other attribute, the place, the motion) is kept
Two reference points stand beside each score: chance (a uniformly random colour / shape / direction for every
attribute that is judged) and, for generation, the same judge on the held-out target itself at the generated size
(it shows what a perfect model would score, i.e. that the judge passes real pixels).

Library (one process, or every rank of a running ZeRO-3 engine together: prompts are split evenly over the ranks,
every rank runs the same number of forwards, and the counts are summed):
    prompts = load_prompts(dataset, num_per_task=32)
    result = evaluate(Generator(engine, vit, vae, planner, tokenizer, objective), prompts, EvalSettings())
    print(format_table({"step 0": untrained, "step 400": result})); log_to_tensorboard(tb, step, result)

CLI (a training checkpoint: run, checkpoints or step dir; or an export dir):
    python -m lance_ds.evaluate --checkpoint runs/main --dataset_config configs/datasets/example_val.yaml --untrained
prints the table (with --untrained, the same model freshly initialised from train.seed - the weights training
starts from - side by side with the trained one) and a line of what the judges found wrong, writes the scores and
every sample judged wrong, with why, to RUN_DIR/eval/step_XXXXXXXX.json (one file per evaluated step, which
evaluating that step again replaces; --json for an export's) and `eval/<task>` scalars (the
untrained model at step 0), generated samples (frame strips: source | output | reference) and answers to the run's
TensorBoard.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .checkpoint import CHECKPOINTS, step_name
from .config.data import EDIT_TASKS, GEN_TASKS, TASKS, UND_TASKS, DatasetConfig, GroupConfig
from .data.batch import Sample
from .data.example import COLOURS, DIRECTIONS, SHAPES, judge_answer, judge_generation, parse_answer
from .data.sequence import SOURCE_MEDIA, TARGET_MEDIA, resize_crop
from . import distributed

# What each task's score measures (the table's second column).
MEASURES = {
    "t2i": "generated image shows the caption's colour and shape",
    "t2v": "generated video: caption's colour, shape and motion direction",
    "i2i": "edit applied (colour or shape), rest kept, same place",
    "v2v": "edit applied (colour), shape and motion kept",
    "i2t": "answer names the right colour / shape",
    "v2t": "answer names the right colour / shape / direction",
}
GOALS = {"t2i": 0.8, "t2v": 0.8, "i2i": 0.8, "v2v": 0.8, "i2t": 0.9, "v2t": 0.9}  # issue 6: the main job's goals
_CHOICES = {"colour": len(COLOURS), "shape": len(SHAPES), "direction": len(DIRECTIONS)}


@dataclass
class EvalSettings:
    """How prompts are run. Sampling defaults are the debug model's (measured: see README, "Main job")."""

    num_steps: int = 20  # Euler steps per generated sample
    cfg_scale: float = 4.0  # classifier-free guidance (1: none)
    seed: int = 0  # noise seed of generation
    max_new_tokens: int = 16  # answer length limit (the example answers take <= 8 tokens)
    batch_size: int = 16  # prompts per Generator call on each rank (all packed into one forward when they fit)
    num_logged: int = 3  # samples per task kept for TensorBoard (rank 0's first ones)


@dataclass
class Prompt:
    """One held-out sample and the group options (resolutions, frame sampling) it is cut with."""

    sample: Sample
    group: GroupConfig


@dataclass
class TaskScore:
    """Counts of one task over all ranks."""

    task: str
    correct: int
    total: int
    chance: float  # expected accuracy of uniformly random attributes
    reference: float | None = None  # generation: the judge's accuracy on the held-out targets themselves

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan


@dataclass
class Example:
    """One judged prompt, for TensorBoard: the prompt text, the output (pixels or answer) and the verdict."""

    task: str
    prompt: str
    ok: bool
    found: str  # what the judge read (generation) or the answer (understanding)
    expected: str
    frames: Tensor | None = None  # uint8 [T, H, W, 3]: source | output | reference, side by side


@dataclass
class Miss:
    """One prompt judged wrong, and why: what makes a low score explainable (sample keys name shard members)."""

    task: str
    key: str
    reason: str  # the judge's ("travel: motion off by 14.2% (tolerance 10%)"), or the answer against the reference


@dataclass
class Evaluation:
    scores: dict[str, TaskScore]  # task -> score, in TASKS order
    examples: list[Example] = field(default_factory=list)  # rank 0's first few per task
    seconds: float = 0.0
    misses: list[Miss] = field(default_factory=list)  # every rank's, in prompt order

    def miss_counts(self) -> dict[str, Counter]:
        """task -> how often each judged attribute ("colour", "travel", "answer", ...) was wrong."""
        counts: dict[str, Counter] = {}
        for miss in self.misses:
            counts.setdefault(miss.task, Counter()).update(part.split(":")[0] for part in miss.reason.split("; "))
        return counts


# ----------------------------------------------------------------------------------------------------------------
# prompts


def load_prompts(dataset: DatasetConfig, num_per_task: int, planner=None,
                 max_tokens: int | None = None) -> list[Prompt]:
    """The first `num_per_task` decodable samples of every group, in shard order (every rank reads the same); with
    a planner, those of at most `max_tokens` tokens."""
    from .data.held_out import first_samples, within

    fits = within(planner, max_tokens) if planner is not None and max_tokens else None
    return [Prompt(sample, group) for group, sample in first_samples(dataset, num_per_task, fits)]


def by_group_and_task(prompts: list[Prompt]) -> list[list[Prompt]]:
    """The prompts of each (group, task), in first-seen order: one Generator call cuts its prompts with one group's
    options and runs one task."""
    batches: dict[tuple[str, str], list[Prompt]] = {}
    for p in prompts:
        batches.setdefault((p.group.name, p.sample.task), []).append(p)
    return list(batches.values())


EXPORT_PROMPT_TOKENS = 32768  # an export records no packing length: the decoder's position range (Qwen2.5's)


def prompt_token_limit(checkpoint: str | Path) -> int:
    """The longest held-out sample evaluated: the run's data.packing_length (training never saw a longer one)."""
    from .export import find_checkpoint, is_export_dir, read_run_config

    if is_export_dir(checkpoint):
        return EXPORT_PROMPT_TOKENS
    return read_run_config(find_checkpoint(checkpoint)).data.packing_length


# ----------------------------------------------------------------------------------------------------------------
# judging


def chance_of(named: dict) -> float:
    """Probability that uniformly random values of the named attributes (colour 1/4, shape 1/3, direction 1/4) all
    match."""
    return math.prod(1.0 / _CHOICES[k] for k in named)


def judge_understanding(sample: Sample, answer: str) -> tuple[bool, float]:
    """(right, chance) of one answer against the sample's reference answer."""
    reference = sample.texts["caption_a"]
    named = {k: v for k, v in parse_answer(reference).items() if v is not None}
    return judge_answer(answer, reference), chance_of(named)


def judged_pixels(sample: Sample, output: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(source, reference target) of a generation sample cut to the output's frames and size, as the planner cuts
    the condition block; None where the sample has none."""
    frames, height, width = output.shape[:3]

    def cut(key: str | None) -> Tensor | None:
        media = sample.media.get(key) if key else None
        return None if media is None else resize_crop(media[:frames], height, width)

    return cut(SOURCE_MEDIA.get(sample.task)), cut(TARGET_MEDIA.get(sample.task))


def judge_output(sample: Sample, output: Tensor):
    """(verdict on the output, verdict on the held-out target or None, source pixels or None, target pixels or None)
    of one generated sample."""
    source, target = judged_pixels(sample, output)
    caption = sample.texts["caption"]
    verdict = judge_generation(sample.task, caption, output, source)
    reference = judge_generation(sample.task, caption, target, source) if target is not None else None
    return verdict, reference, source, target


def side_by_side(*clips: Tensor | None) -> Tensor:
    """uint8 [T, H, W, 3] clips next to each other (a 2-pixel white gap); shorter clips hold their last frame."""
    clips = [c for c in clips if c is not None]
    frames, height = max(c.shape[0] for c in clips), max(c.shape[1] for c in clips)
    parts = []
    for c in clips:
        if c.shape[0] < frames:
            c = torch.cat([c, c[-1:].expand(frames - c.shape[0], -1, -1, -1)])
        c = torch.nn.functional.pad(c, (0, 0, 0, 2, 0, height - c.shape[1]), value=255)
        parts.append(c)
    return torch.cat(parts, dim=2)


# ----------------------------------------------------------------------------------------------------------------
# running


def refuse_unjudgeable(sample: Sample) -> None:
    """The judges read the example world (colours, shapes, motions): a caption, edit instruction or reference answer
    naming none of them cannot be judged (a t2i caption would score 100% at a chance of 100%, "goals met" about
    nothing; an answer 'grey' failed with 'names no colour'). ValueError, pointing at validation instead."""
    column = "caption_a" if sample.task in UND_TASKS else "caption"
    text = sample.texts.get(column, "")
    # a still image or an edit is judged on colour and shape; a direction is a video's or an answer's
    judged = ("colour", "shape") if sample.task in ("t2i", *EDIT_TASKS) else ("colour", "shape", "direction")
    found = parse_answer(text)
    if not any(found[k] for k in judged):
        what = {"caption_a": "reference answer", "caption": "instruction" if sample.task in EDIT_TASKS else "caption"}
        raise ValueError(f"{sample.task} sample {sample.key!r}: its {what[column]} {text[:80]!r} names no "
                         f"{', '.join(judged[:-1])} or {judged[-1]} of the example world "
                         "(tools/make_example_dataset.py), which is all lance_ds.evaluate judges; for your own data "
                         "watch validation (validation.every, val/* and samples/* in TensorBoard)")


def share(items: list, rank: int, world: int) -> tuple[int, list[tuple[object, bool]]]:
    """This rank's contiguous share of `items`: the index of its first item in `items`, and (item, counted) pairs.
    Every rank gets ceil(n / world) items, the short ones padded with repeats of the first item that are run (so all
    ranks run the same forwards) but not counted."""
    per_rank = math.ceil(len(items) / world)
    mine = [(item, True) for item in items[rank * per_rank:(rank + 1) * per_rank]]
    return rank * per_rank, mine + [(items[0], False)] * (per_rank - len(mine))


@torch.no_grad()
def evaluate(generator, prompts: list[Prompt], settings: EvalSettings | None = None) -> Evaluation:
    """Run and judge every prompt; collective when a process group is up (call it on every rank with the same
    prompts). Scores are summed over ranks; examples are rank 0's."""
    settings = settings or EvalSettings()
    start = time.perf_counter()
    rank, world = distributed.rank(), distributed.world_size()
    device = getattr(generator, "device", torch.device("cpu"))
    counts = torch.zeros(len(TASKS), 4, dtype=torch.float64)  # correct, total, chance sum, reference correct
    examples: list[Example] = []
    misses: list[tuple[int, int, Miss]] = []  # (group, index in the group, miss): prompt order, whatever the ranks
    for p in prompts:
        refuse_unjudgeable(p.sample)
    for group, group_prompts in enumerate(by_group_and_task(prompts)):
        offset, mine = share(group_prompts, rank, world)
        for first in range(0, len(mine), settings.batch_size):
            batch = mine[first:first + settings.batch_size]
            task = batch[0][0].sample.task
            run = _answered if task in UND_TASKS else _generated
            judged_batch = run(generator, [p for p, _ in batch], settings, offset + first)
            for index, ((_, counted), judged) in enumerate(zip(batch, judged_batch), start=offset + first):
                if counted:  # (a rank's share is padded with repeats, uncounted)
                    counts[TASKS.index(task)] += torch.tensor(judged.counts, dtype=torch.float64)
                    if judged.miss is not None:
                        misses.append((group, index, judged.miss))
                    if sum(e.task == task for e in examples) < settings.num_logged:
                        examples.append(judged.example())
    counts = distributed.sum_over_ranks(counts.to(device)).cpu()
    misses = sorted((m for rank_misses in distributed.every_rank(misses) for m in rank_misses), key=lambda m: m[:2])
    scores = {}
    for i, task in enumerate(TASKS):
        correct, total, chance, reference = counts[i].tolist()
        if total:
            scores[task] = TaskScore(task, int(correct), int(total), chance / total,
                                     reference / total if task in GEN_TASKS else None)
    return Evaluation(scores, examples if rank == 0 else [], time.perf_counter() - start, [m for *_, m in misses])


@dataclass
class _Judged:
    counts: tuple[float, float, float, float]  # correct, 1, chance, reference correct (as `evaluate` sums them)
    example: Callable[[], Example]  # built only for the prompts that are logged (side by side frames cost)
    miss: Miss | None  # None when judged right


def _answered(generator, prompts: list[Prompt], settings: EvalSettings, first_index: int) -> list[_Judged]:
    samples = [p.sample for p in prompts]
    answers = generator.answer(samples, max_new_tokens=settings.max_new_tokens, group=prompts[0].group)
    judged = []
    for sample, answer in zip(samples, answers):
        ok, chance = judge_understanding(sample, answer)
        reference = sample.texts["caption_a"]
        miss = None if ok else Miss(sample.task, sample.key, f"answer: {answer!r}, expected {reference!r}")
        judged.append(_Judged((float(ok), 1.0, chance, 0.0), functools.partial(
            Example, sample.task, _question(sample), ok, answer, reference), miss))
    return judged


def _generated(generator, prompts: list[Prompt], settings: EvalSettings, first_index: int) -> list[_Judged]:
    samples = [p.sample for p in prompts]
    outputs = generator.generate(samples, num_steps=settings.num_steps, cfg_scale=settings.cfg_scale,
                                 seed=settings.seed, group=prompts[0].group, first_index=first_index)
    judged = []
    for sample, output in zip(samples, outputs):
        verdict, reference, source, target = judge_output(sample, output)

        def example(sample=sample, verdict=verdict, source=source, output=output, target=target) -> Example:
            return Example(sample.task, sample.texts["caption"], verdict.ok, _reading(verdict.found),
                           _reading(verdict.expected), side_by_side(source, output, target))

        miss = None if verdict.ok else Miss(sample.task, sample.key, verdict.reason)
        judged.append(_Judged((float(verdict.ok), 1.0, chance_of(verdict.expected), float(bool(reference))),
                              example, miss))
    return judged


def _question(sample: Sample) -> str:
    return sample.texts.get("caption_q") or "(no question)"


def _reading(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())


# ----------------------------------------------------------------------------------------------------------------
# reporting


def format_table(results: dict[str, Evaluation]) -> str:
    """A Markdown table: one row per task, one score column per result (e.g. {"step 0": ..., "step 400": ...})."""
    names = list(results)
    tasks = [t for t in TASKS if any(t in r.scores for r in results.values())]
    totals = {t: next(r.scores[t].total for r in results.values() if t in r.scores) for t in tasks}
    header = ["task", "measured (held-out samples)", "n", "chance", *names, "goal", "judge on targets"]
    rows = []
    for t in tasks:
        first = next(r.scores[t] for r in results.values() if t in r.scores)
        cells = [f"{r.scores[t].accuracy:.0%}" if t in r.scores else "-" for r in results.values()]
        reference = "-" if first.reference is None else f"{first.reference:.0%}"
        rows.append([t, MEASURES[t], str(totals[t]), f"{first.chance:.0%}", *cells, f">= {GOALS[t]:.0%}", reference])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


TRUSTED_JUDGE = 0.9  # the least share of held-out targets the judges must recognise for a task's score to count


def goals_met(result: Evaluation) -> dict[str, bool]:
    return {t: s.accuracy >= GOALS[t] for t, s in result.scores.items()}


def log_to_tensorboard(tb, step: int, result: Evaluation, prefix: str = "eval") -> None:
    """`eval/<task>` accuracy scalars at `step`, sample strips (source | output | reference) and answers.

    tb: a lance_ds.metrics.TensorBoard (writes on rank 0 only)."""
    tb.scalars(step, {f"{prefix}/{t}": s.accuracy for t, s in result.scores.items()})
    answers = ["| task | question | reference | answer | right |", "|---|---|---|---|---|"]
    seen: dict[str, int] = {}
    for e in result.examples:
        k = seen[e.task] = seen.get(e.task, -1) + 1
        if e.frames is not None:
            tb.video_frames(f"{prefix}/samples/{e.task}/{k}", step, e.frames)
            tb.text(f"{prefix}/samples/{e.task}/{k}/prompt", step,
                    f"{e.prompt} -> judged {'right' if e.ok else 'wrong'}: found {e.found or 'nothing'}; "
                    f"expected {e.expected} (strip: source | output | held-out target)")
        else:
            answers.append(f"| {e.task} | {e.prompt} | {e.expected} | {e.found} | {'yes' if e.ok else 'no'} |")
    if len(answers) > 2:
        tb.text(f"{prefix}/answers", step, "\n".join(answers))
    tb.flush()


def to_json(result: Evaluation) -> dict:
    misses: dict[str, list] = {}
    for miss in result.misses:
        misses.setdefault(miss.task, []).append({"key": miss.key, "reason": miss.reason})
    return {"seconds": round(result.seconds, 1),
            "scores": {t: {**dataclasses.asdict(s), "accuracy": s.accuracy} for t, s in result.scores.items()},
            "misses": misses}


def format_misses(result: Evaluation) -> str:
    """One line: what the judges found wrong, by task and attribute ("v2v: travel 3, colour 1")."""
    counts = result.miss_counts()
    return "; ".join(f"{t}: " + ", ".join(f"{what} {n}" for what, n in counts[t].most_common())
                     for t in TASKS if t in counts)


# ----------------------------------------------------------------------------------------------------------------
# command line


def untrained_generator(checkpoint: str | Path, trained, dtype: str = "fp32", moved: dict[str, str] | None = None):
    """The checkpoint's model as training starts: built from its config.yaml with train.seed and no weights loaded
    (the frozen ViT / codec come out the same as the trained model's, as in export.build_from_trained)."""
    from .export import build_untrained, find_checkpoint, is_export_dir, relocated_run_config
    from .generate import Generator

    if is_export_dir(checkpoint):
        raise ValueError(f"{checkpoint} is an export; --untrained needs the training checkpoint (its config.yaml "
                         "and seed say what the model looked like at step 0)")
    config = relocated_run_config(find_checkpoint(checkpoint), moved)
    bundle, _ = build_untrained(config, dtype, trained.device, len(trained.tokenizer))
    bundle.model.to(trained.device).eval()
    return Generator(bundle.model, bundle.vit, bundle.vae, trained.planner, trained.tokenizer, config.objective)


EVAL_DIR = "eval"  # RUN_DIR/eval/step_XXXXXXXX.json: the scores of each evaluated step


def checkpoint_step(checkpoint: str | Path) -> tuple[int, Path | None]:
    """(step, run dir) of a training checkpoint; (-1, None) for an export."""
    from .export import checked_trainer_state, find_checkpoint, is_export_dir

    if is_export_dir(checkpoint):
        return -1, None
    step_dir = find_checkpoint(checkpoint)
    step = checked_trainer_state(step_dir)["step"]
    run_dir = step_dir.parent.parent if step_dir.parent.name == CHECKPOINTS else None
    return step, run_dir


def parse_args(argv: list[str] | None = None):
    import argparse

    from .export import add_model_dir_flags

    p = argparse.ArgumentParser(prog="python -m lance_ds.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (run, checkpoints or step dir) or export")
    p.add_argument("--dataset_config", "--dataset-config", required=True,
                   help="dataset YAML of the held-out shards (e.g. configs/datasets/example_val.yaml)")
    p.add_argument("--untrained", action="store_true", help="also evaluate the model as training starts (step 0)")
    p.add_argument("--num-per-task", type=int, default=32, help="held-out samples per group")
    p.add_argument("--steps", type=int, default=EvalSettings.num_steps, help="Euler steps per generated sample")
    p.add_argument("--cfg", type=float, default=EvalSettings.cfg_scale, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=EvalSettings.seed, help="generation noise seed")
    p.add_argument("--ema", action="store_true", help="a training checkpoint's EMA weights")
    p.add_argument("--tensorboard", help="TensorBoard dir to write to (default: the run's tensorboard/; 'none': off)")
    p.add_argument("--json", help="write the scores here (default: RUN_DIR/eval/step_XXXXXXXX[.ema].json, the "
                                  "evaluated step's; an export's are written only here)")
    p.add_argument("--require-goals", action="store_true", help="exit with status 1 when a task misses its goal")
    add_model_dir_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .export import ExportError, moved_dirs
    from .generate import Generator, GenerateError

    args = parse_args(argv)
    try:
        dataset = checked_arguments(args)
    except ConfigError as e:
        print(f"lance_ds.evaluate: {e}", file=sys.stderr)
        return 2
    settings = EvalSettings(num_steps=args.steps, cfg_scale=args.cfg, seed=args.seed)
    try:
        step, run_dir = checkpoint_step(args.checkpoint)
        trained = Generator.from_checkpoint(args.checkpoint, ema=args.ema, moved=moved_dirs(args))
        prompts = load_prompts(dataset, args.num_per_task, trained.planner, prompt_token_limit(args.checkpoint))
        print(f"lance_ds.evaluate: {len(prompts)} held-out prompts from {args.dataset_config}; {trained.source}",
              file=sys.stderr)
        results = {}
        if args.untrained:
            results["step 0"] = evaluate(untrained_generator(args.checkpoint, trained, moved=moved_dirs(args)),
                                         prompts, settings)
        results[f"step {step}" if step >= 0 else "trained"] = evaluate(trained, prompts, settings)
    except (ExportError, GenerateError, ValueError, FileNotFoundError) as e:
        print(f"lance_ds.evaluate: {e}", file=sys.stderr)
        return 2
    missed = report(args, settings, results, step, run_dir)
    return 1 if args.require_goals and missed else 0


def checked_arguments(args) -> DatasetConfig:
    """The held-out dataset; a ConfigError naming every problem with the flags at once."""
    from .config.core import Problems, output_problem
    from .config.run import load_dataset
    from .generate import sampling_problems

    problems = Problems()
    if args.num_per_task < 1:
        problems.add("--num-per-task", f"must be >= 1, got {args.num_per_task}")
    for problem in sampling_problems(args.steps, args.cfg):
        problems.add("", problem)
    # the outputs are written after the whole evaluation: one that cannot be written would throw it away
    tensorboard = None if args.tensorboard == "none" else args.tensorboard
    for flag, path, directory in (("--json", args.json, False), ("--tensorboard", tensorboard, True)):
        if path and (problem := output_problem(flag, path, directory)):
            problems.add("", problem)
    dataset = load_dataset(args.dataset_config, problems, "--dataset_config")
    problems.raise_if_any()
    return dataset


def report(args, settings: EvalSettings, results: dict[str, Evaluation], step: int, run_dir: Path | None) -> list[str]:
    """The table on stdout, TensorBoard scalars and samples, the JSON file; returns the tasks that missed a goal."""
    from .metrics import TensorBoard

    print(f"Held-out evaluation ({args.steps} Euler steps, CFG {args.cfg}; "
          + ", ".join(f"{name}: {r.seconds:.0f} s" for name, r in results.items()) + ")")
    print(format_table(results))
    last = list(results.values())[-1]
    # the judges fail on the held-out targets themselves: data of another world than the example's, whose scores
    # (and goals) say nothing about the model
    blind = [t for t, s in last.scores.items() if s.reference is not None and s.reference < TRUSTED_JUDGE]
    missed = [t for t, ok in goals_met(last).items() if not ok and t not in blind]
    print("goals: " + ("all met" if not missed else f"missed by {', '.join(missed)}")
          + (f" (not judged: {', '.join(blind)})" if blind else ""))
    judged = dataclasses.replace(last, misses=[m for m in last.misses if m.task not in blind])
    if judged.misses:
        print(f"wrong, by what the judges found (each sample in the JSON's misses): {format_misses(judged)}")
    for t in blind:
        print(f"warning: {t}: the judges recognise {last.scores[t].reference:.0%} of its held-out targets (the example "
              "world's colours, shapes and motions): its score says nothing about the model; on your own data, "
              "validation's losses and samples measure it (validation.dataset_config)")
    tb_dir = args.tensorboard or (str(run_dir / "tensorboard") if run_dir else None)
    if tb_dir and tb_dir != "none":
        for name, result in results.items():
            at = 0 if name == "step 0" else max(step, 0)
            ema = args.ema and name != "step 0"  # EMA weights get curves of their own, beside the trained ones
            # the points of one evaluated step in a file of their own, which an evaluation of that step again
            # replaces: TensorBoard would show both (its curves zigzag between points at one step)
            suffix = f".eval_step{at}" + (".ema" if ema else "")
            for earlier in Path(tb_dir).glob(f"events.out.tfevents.*{suffix}"):
                earlier.unlink()
            tb = TensorBoard(tb_dir, enabled=True, filename_suffix=suffix)
            log_to_tensorboard(tb, at, result, prefix="eval_ema" if ema else "eval")
            tb.close()
        prefix = "eval_ema" if args.ema else "eval"
        print(f"TensorBoard: {prefix}/<task> scalars and {prefix}/samples/* in {tb_dir}")
    weights = "ema" if args.ema else "trained"  # (each has a file of its own: one evaluation does not replace the other)
    default = run_dir / EVAL_DIR / f"{step_name(step)}{'.ema' if args.ema else ''}.json" if run_dir else None
    json_path = Path(args.json) if args.json else default
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"settings": dataclasses.asdict(settings), "weights": weights,
                                         "num_per_task": args.num_per_task,
                                         "dataset_config": str(args.dataset_config),
                                         "results": {k: to_json(v) for k, v in results.items()}}, indent=2))
        print(f"scores: {json_path}")
    else:
        print("scores: not saved (an export has no run directory to keep them in); --json FILE saves them")
    return missed


if __name__ == "__main__":
    sys.exit(main())
