#!/usr/bin/env python
"""Write the synthetic example dataset (coloured shapes; see lance_ds/data/example.py) for all six Lance tasks.

  python tools/make_example_dataset.py --out example/datasets/                    # train split
  python tools/make_example_dataset.py --out example/datasets_val/ --split val   # held-out scenes, never in train

OUT gets {text2image,text2video,image2image,video2video,image2text,video2text}/{split}-00000.parquet.
The same flags always give the same files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from lance_ds.config.core import output_problem
from lance_ds.config.data import TASKS
from lance_ds.data.example import ExampleConfig, write_example_dataset

FIELDS = {f.name for f in dataclasses.fields(ExampleConfig)}  # each one a flag of this tool


def as_flags(problems: str) -> list[str]:
    """ExampleConfig's problems, named by the flags the user typed: 'num_per_task must ...' -> '--num-per-task must'."""
    named = []
    for problem in problems.split("; "):
        field = problem.split(" ", 1)[0]
        named.append(f"--{field.replace('_', '-')}{problem[len(field):]}" if field in FIELDS else problem)
    return named


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-per-task", type=int, default=256, help="rows per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "val"], help="val: scenes disjoint from train")
    p.add_argument("--size", type=int, default=64, help="image / video side in pixels")
    p.add_argument("--frames", type=int, default=9, help="frames per video")
    p.add_argument("--fps", type=float, default=12.0, help="video frame rate")
    p.add_argument("--rows-per-group", type=int, default=64, help="parquet row-group size")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="subset of the six tasks")
    args = p.parse_args(argv)
    problems = [problem] if (problem := output_problem("--out", args.out, directory=True)) else []
    try:
        cfg = ExampleConfig(num_per_task=args.num_per_task, seed=args.seed, size=args.size, frames=args.frames,
                            fps=args.fps, split=args.split, rows_per_group=args.rows_per_group, tasks=tuple(args.tasks))
    except ValueError as e:  # every problem of the settings
        problems += as_flags(str(e))
    if problems:
        print("make_example_dataset: " + "; ".join(problems), file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        written = write_example_dataset(args.out, cfg)
    except ValueError as e:  # what is already in --out (e.g. the other split)
        print(f"make_example_dataset: {e}", file=sys.stderr)
        return 2
    for task, path in written.items():
        print(f"{task}: {path}")
    print(f"wrote {len(written)} tasks x {cfg.num_per_task} rows ({cfg.split}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
