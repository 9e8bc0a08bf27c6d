#!/usr/bin/env python
"""Print what a run learned, read back from its TensorBoard event files: each loss's first and last values.

  python tools/summarize_run.py runs/main
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def is_loss(tag: str) -> bool:
    """train/loss, val/ce, train/mse/t2i ... (not train/ce_tokens, a count)."""
    split, _, name = tag.partition("/")
    return split in ("train", "val") and name.split("/")[0] in ("loss", "ce", "mse")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    if not (args.run_dir / "tensorboard").is_dir():
        print(f"{args.run_dir} is not a run directory (it has no tensorboard/); give the run's output_dir, e.g. "
              "runs/main", file=sys.stderr)
        return 2
    scalars = read_scalars(args.run_dir)
    losses = sorted(t for t in scalars if is_loss(t))
    if not losses:
        print(f"no loss scalars under {args.run_dir / 'tensorboard'}", file=sys.stderr)
        return 1
    print(f"{'scalar':32s} {'first (step)':>18s} {'last (step)':>18s}")
    for tag in losses:
        (s0, v0), (s1, v1) = scalars[tag][0], scalars[tag][-1]
        print(f"{tag:32s} {v0:11.4f} ({s0:4d}) {v1:11.4f} ({s1:4d})")
    latest = args.run_dir / "checkpoints" / "latest"
    if latest.is_file():
        print(f"checkpoint: {latest.parent / latest.read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
