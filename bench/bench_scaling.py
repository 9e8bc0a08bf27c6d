#!/usr/bin/env python
"""1 -> 2 rank throughput scaling on CPU with the real launcher, measured side by side in one run.

    python bench/bench_scaling.py [--rounds 3] [--steps 40] [--size debug] [--dataset_config FILE]

Three set-ups of the same training command (configs/debug.yaml on the six-task example data, ZeRO-3, fp32,
validation off, data loader included as in a real run: data.num_workers=1 loader process per rank):
    deepspeed --num_gpus 1 ...   OMP_NUM_THREADS=1   one rank, one thread
    deepspeed --num_gpus 2 ...   OMP_NUM_THREADS=1   two ranks, one thread each (the main job's set-up)
    deepspeed --num_gpus 1 ...   OMP_NUM_THREADS=2   one rank using both cores through threads instead
Each round runs the three once, in rotating order; ratios are taken within a round and the median over rounds is
reported. Throughput comes from the run's own TensorBoard: `train/tokens_per_s` (real tokens of all ranks per
second, per log window) and the wall time between log windows, the first window (start-up, first steps) dropped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, example_dataset, free_port, machine_line, work_dir  # noqa: E402

SETUPS = (("1 rank x 1 thread", 1, 1), ("2 ranks x 1 thread", 2, 1), ("1 rank x 2 threads", 1, 2))


def launch(num_ranks: int, dataset: str, out: Path, steps: int, log_every: int, size: str) -> list[str]:
    """The training command of one set-up (what the BENCHMARKS.md line quotes)."""
    return ["deepspeed", "--num_gpus", str(num_ranks), "--master_port", str(free_port()), "lance_ds/train.py",
            "--config", "configs/debug.yaml", "--dataset_config", dataset, "--output_dir", str(out), "--resume", "none",
            "validation.every=0", f"train.max_steps={steps}", f"log.every={log_every}",
            "checkpoint.save_every=1000000", "log.progress_bar=false", f"model.size={size}"]


def run_one(num_ranks: int, threads: int, dataset: str, out: Path, steps: int, log_every: int, size: str) -> dict:
    """Train once; returns tokens/s and steps/s medians over the log windows after the first."""
    cmd = launch(num_ranks, dataset, out, steps, log_every, size)
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    tokens_per_s, window_wall = read_windows(out / "tensorboard")
    return {"tokens_per_s": statistics.median(tokens_per_s[1:]),
            "steps_per_s": statistics.median(log_every / w for w in window_wall[1:]),
            "total_s": time.perf_counter() - start, "command": f"OMP_NUM_THREADS={threads} {' '.join(cmd)}"}


def read_windows(log_dir: Path) -> tuple[list[float], list[float]]:
    """Per log window: train/tokens_per_s, and the wall seconds since the previous window (the first window's
    from the run's first event, which rank 0 writes before the loop)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    events = sorted(acc.Scalars("train/tokens_per_s"), key=lambda e: e.step)
    if len(events) < 3:
        raise RuntimeError(f"{log_dir}: {len(events)} log windows; raise --steps")
    walls = [b.wall_time - a.wall_time for a, b in zip(events, events[1:])]
    return [e.value for e in events], [float("nan")] + walls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="train.max_steps of each run")
    p.add_argument("--log_every", type=int, default=5, help="log.every (one throughput window)")
    p.add_argument("--size", default="debug", help="model.size (debug: the main job's model; 100m: compute-bound)")
    p.add_argument("--dataset_config", help="dataset YAML (default: example data made in a temp dir)")
    p.add_argument("--work_dir", help="keep data, logs and runs here (default: a temp dir, removed)")
    args = p.parse_args()
    print(f"lance_ds 1 -> 2 rank scaling on CPU, model {args.size}: {machine_line()}")
    results: dict[str, list[dict]] = {name: [] for name, _, _ in SETUPS}
    with work_dir(args.work_dir, "bench_scaling_") as tmp:
        dataset = args.dataset_config or example_dataset(tmp / "data", num_per_task=64)
        for r in range(args.rounds):
            for name, ranks, threads in SETUPS[r % 3:] + SETUPS[:r % 3]:
                res = run_one(ranks, threads, dataset, tmp / f"r{r}_{ranks}x{threads}", args.steps, args.log_every,
                              args.size)
                results[name].append(res)
                print(f"   round {r}: {name:<19} {res['tokens_per_s']:7.0f} tokens/s, {res['steps_per_s']:5.2f} "
                      f"steps/s ({res['total_s']:.0f} s with start-up; load {os.getloadavg()[0]:.1f})", flush=True)
        report(results)
        for name, _, _ in SETUPS:
            print(f"   command ({name}): {results[name][0]['command']}")
    print(f"   done: {machine_line()}")
    return 0


def report(results: dict[str, list[dict]]) -> None:
    one, two, threads = (results[name] for name, _, _ in SETUPS)

    def median_ratio(a: list[dict], b: list[dict]) -> tuple[float, list[float]]:
        ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, b)]
        return statistics.median(ratios), ratios

    print("   tokens/s, median over rounds: " + ", ".join(
        f"{name} {statistics.median(r['tokens_per_s'] for r in results[name]):.0f}" for name, _, _ in SETUPS))
    for label, (ratio, ratios) in (("2 ranks x 1 thread / 1 rank x 1 thread", median_ratio(two, one)),
                                   ("1 rank x 2 threads / 1 rank x 1 thread", median_ratio(threads, one)),
                                   ("2 ranks x 1 thread / 1 rank x 2 threads", median_ratio(two, threads))):
        print(f"   {label}: {ratio:.2f}x (rounds " + ", ".join(f"{x:.2f}" for x in ratios) + ")")
    ratio, _ = median_ratio(two, one)
    print(f"   scaling efficiency 1 -> 2 ranks: {100 * ratio / 2:.0f}% (tokens/s per rank, 2 ranks against 1)")


if __name__ == "__main__":
    sys.exit(main())
