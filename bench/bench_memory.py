#!/usr/bin/env python
"""ZeRO-3 memory, measured side by side in one run: what one rank holds with 2 ranks against 1 rank, and the peak
host memory of the README's main job.

    python bench/bench_memory.py [--sizes debug] [--steps 3] [--main_job | --no_main_job] [--dataset_config FILE]

1. Per-rank training state of the same model (configs/debug.yaml, ZeRO-3, fp32) with 1 and with 2 ranks, counted from
   the engine and optimizer objects after a few real Trainer steps (at rest between steps):
     parameters        each parameter's partition (`ds_tensor`, views into one flat buffer) and any full copy it
                       keeps (persistent parameters below stage3_param_persistence_threshold stay gathered)
     master weights    the optimizer's fp32 partitions (`fp32_partitioned_groups_flat`): a copy of the parameter
                       partition even in fp32 training (DeepSpeed 0.19.8 reuses the partition only when its device
                       equals the optimizer's device name, a torch.device never equals the string 'cpu'); a storage
                       shared with the parameters would be counted once, under parameters
     gradients         the gradient partitions (`grad_partitions_flat_buffer`) and any .grad still set
     optimizer states  Adam's exp_avg / exp_avg_sq (and step) per fp32 partition
     buckets           the reduce-scatter bucket (reduce_bucket_size elements), a constant per rank
   Bytes are those of distinct storages (a view counts its whole buffer once). Goal: parameters + gradients +
   optimizer states per rank with 2 ranks <= 0.55x of 1 rank. The frozen ViT and VAE live outside the engine, whole
   on every rank (DESIGN rule 5); they are listed, not part of the goal.
2. Peak host memory of the main job's training command (scripts/main_job.sh step 3: deepspeed launcher, 2 ranks,
   configs/debug.yaml, validation and checkpoints as configured) on the example data: this script polls /proc every
   0.25 s for each process of the launcher's tree: VmHWM (the kernel's own peak RSS) per rank and per data-loader
   worker, and the peak of the tree's summed PSS (shared pages split between processes, so it adds up).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import LanceLoop, build_trainer, collect_batches, cycle_from  # noqa: E402
from common import REPO, example_dataset, free_port, machine_line, print_result, spawn_ranks, work_dir  # noqa: E402

MIB = 2**20
GOAL_CATEGORIES = ("parameters", "master_weights", "gradients", "optimizer_states")


# ---------------------------------------------------------------------------------------------------------------
# 1. what a rank holds


class StorageCounter:
    """Bytes of distinct tensor storages; a storage counted under one category is not counted again."""

    def __init__(self):
        self.seen: set[int] = set()

    def bytes_of(self, tensors) -> int:
        import torch

        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in self.seen:
                continue
            self.seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total


def zero3_held_bytes(engine) -> dict[str, int]:
    """What this rank's ZeRO-3 engine holds, by category (see the module docstring)."""
    opt = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    params = list(engine.module.parameters())
    count = StorageCounter()
    masters = list(opt.fp32_partitioned_groups_flat)
    return {
        "parameters": count.bytes_of([getattr(p, "ds_tensor", None) for p in params] + [p.data for p in params]),
        "master_weights": count.bytes_of(masters),
        "gradients": count.bytes_of([opt.grad_partitions_flat_buffer] + [m.grad for m in masters] +
                                    [p.grad for p in params]),
        "optimizer_states": count.bytes_of(t for state in opt.optimizer.state.values() for t in state.values()),
        "buckets": count.bytes_of(b.buffer for b in getattr(opt, "ipg_buckets", {}).values()),
    }


def frozen_bytes(module) -> int:
    return StorageCounter().bytes_of(list(module.parameters()) + list(module.buffers())) if module is not None else 0


def memory_worker(args) -> None:
    """One rank: the real Trainer, a few steps on real batches, then count; rank 0 prints every rank's counts."""
    import torch.distributed as dist

    trainer = build_trainer(args.dataset_config, args.output_dir, [f"model.size={args.size}", "log.progress_bar=false"])
    batches = collect_batches(trainer, args.steps)
    LanceLoop(trainer).run(cycle_from(batches, 0), args.steps)
    held = zero3_held_bytes(trainer.engine)
    held["frozen_vit"] = frozen_bytes(trainer.parts.vit)
    held["frozen_vae"] = frozen_bytes(trainer.parts.vae)
    held["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    everyone = [None] * trainer.dist.world_size
    dist.all_gather_object(everyone, held)
    if trainer.dist.is_first:
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
        persistent = sum(p.ds_numel for p in trainer.engine.module.parameters() if getattr(p, "ds_persist", False))
        print_result({"ranks": everyone, "numel": numel, "persistent_numel": persistent,
                      "threshold": trainer.ds_config["zero_optimization"].get("stage3_param_persistence_threshold")})
    trainer.close()


def report_zero3(size: str, one: dict, two: dict) -> float:
    """Print the table for one model; returns the goal ratio (2-rank max over ranks / 1 rank)."""
    print(f"   model {size}: {one['numel'] / 1e6:.2f} M trainable elements, {one['persistent_numel']:,} of them in "
          f"persistent parameters (stage3_param_persistence_threshold {one['threshold']}), fp32")
    print(f"     {'MiB per rank':<18}{'1 rank':>10}{'2 ranks (r0, r1)':>22}{'2 / 1':>8}")
    worst = {k: max(r[k] for r in two["ranks"]) for k in two["ranks"][0]}
    for key in (*GOAL_CATEGORIES, "buckets", "frozen_vit", "frozen_vae"):
        a = one["ranks"][0][key]
        pair = ", ".join(f"{r[key] / MIB:.3f}" for r in two["ranks"])
        ratio = f"{worst[key] / a:8.3f}" if a else f"{'-':>8}"
        print(f"     {key:<18}{a / MIB:>10.3f}{pair:>22}{ratio}")
    goal_one = sum(one["ranks"][0][k] for k in GOAL_CATEGORIES)
    goal_two = sum(worst[k] for k in GOAL_CATEGORIES)
    ratio = goal_two / goal_one
    print(f"     params + grads + optimizer (+ masters): {goal_one / MIB:.3f} MiB -> {goal_two / MIB:.3f} MiB per rank "
          f"(the larger rank): {ratio:.3f}x (goal <= 0.55x: {'met' if ratio <= 0.55 else 'NOT met'})")
    with_buckets = (goal_two + worst["buckets"]) / (goal_one + one["ranks"][0]["buckets"])
    print(f"     with the reduce bucket: {with_buckets:.3f}x")
    rss = [r["process_peak_rss"] / MIB for r in (one["ranks"][0], *two["ranks"])]
    print(f"     whole rank process, peak RSS (libraries, activations, frozen parts, allocator included): 1 rank "
          f"{rss[0]:.0f} MiB; 2 ranks {rss[1]:.0f}, {rss[2]:.0f} MiB ({max(rss[1:]) / rss[0]:.2f}x)")
    return ratio


# ---------------------------------------------------------------------------------------------------------------
# 2. peak host memory of the main job


def proc_children() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces: split after ")"
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of every process under root."""
    children, out, todo = proc_children(), [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append((child, pid))
            todo.append(child)
    return out


def read_kib(path: str, field: str) -> int:
    """A 'Field:   123 kB' line of /proc/PID/status or smaps_rollup, in KiB (0 once the process is gone)."""
    try:
        with open(path) as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else 0
    except OSError:
        return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreeMemory:
    """Peaks of a process tree, polled: per process VmHWM (KiB), and the tree's summed PSS (KiB)."""

    def __init__(self, root: int):
        self.root = root
        self.hwm: dict[int, int] = {}
        self.parent: dict[int, int] = {}
        self.cmd: dict[int, str] = {}
        self.peak_pss = 0

    def poll(self) -> None:
        pss = 0
        for pid, ppid in descendants(self.root):
            self.parent[pid] = ppid
            if pid not in self.cmd:
                self.cmd[pid] = cmdline(pid)
            self.hwm[pid] = max(self.hwm.get(pid, 0), read_kib(f"/proc/{pid}/status", "VmHWM"))
            pss += read_kib(f"/proc/{pid}/smaps_rollup", "Pss")
        self.peak_pss = max(self.peak_pss, pss)

    def ranks(self) -> dict[int, int]:
        """local rank -> pid: the processes given --local_rank=K whose parent runs another command (a forked
        data-loader worker has its rank's command line)."""
        out = {}
        for pid, cmd in self.cmd.items():
            match = re.search(r"--local_rank[= ](\d+)", cmd)
            if match and self.cmd.get(self.parent[pid]) != cmd:
                out[int(match.group(1))] = pid
        return out


def main_job(dataset: str, val: str, overrides: list[str], tmp: Path) -> None:
    out = tmp / "main_job"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "lance_ds/train.py",
           "--ds_config", "ds_configs/zero3.json", "--config", "configs/debug.yaml", "--output_dir", str(out),
           "--resume", "none", "--dataset_config", dataset, f"validation.dataset_config={val}", *overrides]
    print(f"   command: OMP_NUM_THREADS=1 {' '.join(cmd)}")
    start = time.perf_counter()
    with open(tmp / "main_job.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        tree = TreeMemory(proc.pid)
        while proc.poll() is None:
            tree.poll()
            time.sleep(0.25)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the main job failed ({proc.returncode}):\n{(tmp / 'main_job.log').read_text()[-3000:]}")
    ranks = tree.ranks()
    for rank, pid in sorted(ranks.items()):
        # children: the data-loader worker(s); one caught before it had any memory (a short-lived helper) is skipped
        workers = [tree.hwm[p] for p, parent in tree.parent.items() if parent == pid and tree.hwm[p] > 0]
        print(f"     rank {rank}: peak RSS {tree.hwm[pid] / 1024:.0f} MiB; its child process(es) (data-loader "
              f"workers): " + ", ".join(f"{w / 1024:.0f} MiB" for w in workers))
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    print(f"     ran train.max_steps {cfg['train']['max_steps']}, validation.every {cfg['validation']['every']}, "
          f"checkpoint.save_every {cfg['checkpoint']['save_every']}, data.num_workers {cfg['data']['num_workers']}")
    print(f"     whole tree (launcher, ranks, workers): peak summed PSS {tree.peak_pss / 1024:.0f} MiB; "
          f"{elapsed:.0f} s wall")
    tb = tensorboard_max(out / "tensorboard", "memory/host_peak_rss_gb")
    if tb is not None:
        print(f"     cross-check: rank 0's logged memory/host_peak_rss_gb reached {tb * 1024:.0f} MiB")


def tensorboard_max(log_dir: Path, tag: str) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return max(e.value for e in acc.Scalars(tag)) if tag in acc.Tags()["scalars"] else None


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="debug,100m", help="model sizes for part 1, comma-separated (debug, tiny, ...)")
    p.add_argument("--steps", type=int, default=3, help="Trainer steps before counting (optimizer states exist)")
    p.add_argument("--no_main_job", action="store_true", help="skip part 2 (the main job's peak host memory)")
    p.add_argument("--dataset_config", help="dataset YAML (default: example data made in a temp dir)")
    p.add_argument("--val_dataset_config", help="held-out dataset YAML for the main job's validation")
    p.add_argument("--work_dir", help="keep data, logs and outputs here (default: a temp dir, removed)")
    p.add_argument("--size", default="debug", help=argparse.SUPPRESS)
    p.add_argument("--output_dir", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for the main job's training command")
    args = p.parse_args()
    if args.worker:
        memory_worker(args)
        return 0
    print(f"lance_ds ZeRO-3 memory: {machine_line()}")
    with work_dir(args.work_dir, "bench_memory_") as tmp:
        dataset = args.dataset_config or example_dataset(tmp / "data", num_per_task=64)
        print("1. per-rank training state, 2 ranks against 1 (counted from the engine and optimizer)")
        for size in args.sizes.split(","):
            counts = {}
            for n in (1, 2):
                argv = ["--dataset_config", dataset, "--output_dir", str(tmp / f"{size}_{n}"), "--size", size,
                        "--steps", str(args.steps)]
                counts[n] = spawn_ranks(__file__, argv, n, 1, tmp / f"logs_{size}_{n}")
            report_zero3(size, counts[1], counts[2])
        if not args.no_main_job:
            print("\n2. peak host memory of the main job's training command (2 ranks)")
            val = args.val_dataset_config or example_dataset(tmp / "data_val", num_per_task=16, split="val")
            main_job(dataset, val, args.overrides, tmp)
    print(f"   done: {machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
