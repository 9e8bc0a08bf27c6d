#!/usr/bin/env python
"""Trainer overhead: lance_ds's training step path against a bare `deepspeed.initialize` loop, side by side.

    python bench/bench_trainer.py [--ranks 1,2] [--rounds 16] [--steps 5] [--dataset_config FILE]

Both loops train the debug model (configs/debug.yaml: ZeRO-3, fp32) on the SAME pre-collated PackedBatches, in the
same processes. The data loader is EXCLUDED from both: each rank pulls its batches from the real loader over the
example data before any timing, then closes it; both loops then cycle through that in-memory list.
  lance_ds     the real Trainer: `Trainer.train_step` (step RNG, frozen ViT/VAE, flow noising, engine forward /
               backward / step, per-task loss bookkeeping, meters, grad norm) plus the rest of `Trainer.train()`'s
               loop body (step counter, progress bar, `Trainer.log` every log.every steps: memory, loader stats,
               per-task losses reduced over ranks, TensorBoard). Only saving is left out (save_every is beyond the run).
  bare         its own engine from `deepspeed.initialize` on a model built from the same config and seed; each
               micro-step: frozen ViT/VAE encode, prepare_flow, engine forward, compute_losses, backward, step.
  engine only  (for reading, not in the goal) the bare loop with the frozen encoders' outputs and the noised latents
               computed before timing: how much of a step is the frozen encoders and the noising.
  bare, LOCAL_SIZE unset  (for reading) the bare loop as torchrun or a plain `python` run sees DeepSpeed's CPU
               accelerator (see WithoutLocalSize).
The loops take turns step by step (the first one rotates), in rounds of --steps steps (one log.every period).
Per round, ratio = lance_ds steps/s / bare steps/s, by wall time and by CPU time summed over ranks (less stretched
by other jobs on a shared machine; it includes time spent spinning in collectives); the medians are reported.
Goal: overhead (1 / ratio - 1) <= 10%.

Each rank is a process of its own (RANK / WORLD_SIZE / LOCAL_SIZE / MASTER_* set here, as the deepspeed launcher
sets them), OMP_NUM_THREADS=1 by default. bench_memory.py imports the helpers below (trainer construction, batches);
bench/common.py has the rest.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

from common import REPO, example_dataset, machine_line, print_result, spawn_ranks, work_dir  # (puts REPO on the path)


# ---------------------------------------------------------------------------------------------------------------
# helpers shared with bench_memory.py


def build_trainer(dataset_config: str, output_dir: str, overrides: list[str]):
    """The real Trainer of configs/debug.yaml on `dataset_config`: no validation, no saving during the run."""
    from lance_ds.config import load_and_check
    from lance_ds.train import quiet_libraries
    from lance_ds.trainer import Trainer

    quiet_libraries()
    overrides = [f"dataset_config={dataset_config}", f"output_dir={output_dir}", "validation.every=0",
                 "checkpoint.save_every=1000000", *overrides]
    run, ds_config = load_and_check(str(REPO / "configs/debug.yaml"), overrides, str(REPO / "ds_configs/zero3.json"),
                                    int(os.environ.get("WORLD_SIZE", "1")))
    return Trainer(run, ds_config, resume="none")


def collect_batches(trainer, num_batches: int) -> list:
    """This rank's next `num_batches` PackedBatches from the real loader; the loader's workers are then stopped."""
    source = iter(trainer.loader)
    batches = [next(source) for _ in range(num_batches)]
    trainer.loader.close()
    return batches


def cycle_from(batches: list, start: int):
    """The batch list as an endless iterator starting at index `start` (every loop sees the same sequence)."""
    return itertools.islice(itertools.cycle(batches), start % len(batches), None)


class LanceLoop:
    """`Trainer.train()`'s loop body (lance_ds/trainer.py), calling the Trainer's own methods."""

    def __init__(self, trainer):
        from lance_ds.metrics import Meter, Throughput
        from lance_ds.trainer import TaskLosses  # whatever the trainer uses, wherever it lives

        from lance_ds.stopping import StopRequests

        self.trainer = trainer
        trainer.meter, trainer.speed = Meter(), Throughput()
        trainer.task_losses = TaskLosses(trainer.dist.device)
        self.progress = trainer._progress_bar()
        self.requests = StopRequests()

    def run(self, batches, num_steps: int) -> None:
        t = self.trainer
        for _ in range(num_steps):
            t.train_step(batches)
            t.step += 1
            self.progress.update(1)
            stopped = self.requests.agreed(t.dist.device)  # the ranks agree on a SIGTERM every step
            if t.step % t.cfg.log.every == 0 or stopped:
                t.log(self.progress)
            t.validate_if_due()  # validation.every=0: a check, as in train()
            if t._save_due() or stopped:
                t.save()


class BareLoop:
    """What a DeepSpeed user writes by hand for the same model: no meters, no logging, no bookkeeping."""

    def __init__(self, cfg, ds_config: dict, num_text_classes: int, device):
        import deepspeed

        from lance_ds.engine import seed_everything
        from lance_ds.model import build_model

        seed_everything(cfg.train.seed)  # the same initial weights as the Trainer's model
        self.parts = build_model(cfg.model, num_text_classes, ds_config, device=device)
        params = [p for p in self.parts.model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=self.parts.model, model_parameters=params, config=ds_config)
        self.cfg, self.device = cfg, device

    def inputs(self, batch, seed: int):
        """(batch on the device, ViT embeddings or None, FlowInputs or None): the frozen encoders and the noising."""
        import torch

        from lance_ds.model import encode_vit
        from lance_ds.objectives import prepare_flow
        from lance_ds.trainer import encode_latents

        gen = torch.Generator(device=self.device).manual_seed(seed)
        batch = batch.to(self.device)
        with torch.no_grad():
            vit = encode_vit(self.parts.vit, batch.vit_patches, batch.vit_grid_thw) if self.parts.vit else None
            clean = encode_latents(self.parts.vae, batch.vae_pixels, gen) if self.parts.vae else None
        objective, flow = self.cfg.objective, None
        if clean is not None:
            flow = prepare_flow(clean, batch, objective, gen)
        return batch, vit, flow

    def train_micro(self, batch, vit, flow) -> None:
        from lance_ds.objectives import compute_losses

        pred = self.engine(batch, vit, flow.noisy, flow.timesteps) if flow is not None else self.engine(batch, vit)
        loss = compute_losses(pred.logits, pred.velocity, batch, flow, self.cfg.objective).total
        self.engine.backward(loss)
        self.engine.step()

    def run(self, batches, num_steps: int) -> None:
        for step in range(num_steps):
            for micro in range(self.cfg.train.grad_accum):
                self.train_micro(*self.inputs(next(batches), seed=step * 1000 + micro))


class WithoutLocalSize:
    """A loop run with LOCAL_SIZE unset, as under torchrun or a plain `python lance_ds/train.py`: DeepSpeed's CPU
    accelerator then answers device_count() by running `numactl --hardware` (absent here: a failed exec), and ZeRO-3
    asks once per gradient bucket reduced. The deepspeed launcher sets LOCAL_SIZE, as spawn_ranks does."""

    def __init__(self, loop):
        self.loop = loop

    def run(self, batches, num_steps: int) -> None:
        saved = os.environ.pop("LOCAL_SIZE", None)
        try:
            self.loop.run(batches, num_steps)
        finally:
            if saved is not None:
                os.environ["LOCAL_SIZE"] = saved


class EngineOnlyLoop:
    """The bare loop on inputs prepared before timing (frozen encoders and noising excluded)."""

    def __init__(self, bare: BareLoop, batches: list):
        self.bare = bare
        self.prepared = {id(b): bare.inputs(b, seed=i) for i, b in enumerate(batches)}  # keyed by the raw batch

    def run(self, batches, num_steps: int) -> None:
        for _ in range(num_steps * self.bare.cfg.train.grad_accum):
            self.bare.train_micro(*self.prepared[id(next(batches))])


# ---------------------------------------------------------------------------------------------------------------
# one rank


def timed(loop, batches, num_steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds summed over ranks) for `num_steps` optimizer steps of `loop`, all ranks started
    and finished together. CPU time (every thread of each rank process) is what the loop itself burned: other jobs on
    the machine stretch the wall time much more than they stretch it."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    loop.run(batches, num_steps)
    cpu = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
    dist.barrier()
    wall = time.perf_counter() - start
    dist.all_reduce(cpu)
    return wall, float(cpu)


def interleaved_rounds(loops: dict, batches: list, rounds: int, steps: int) -> dict[str, list[tuple[float, float]]]:
    """Per loop, (wall, CPU) seconds of each round of `steps` optimizer steps. The loops take turns STEP BY STEP
    (who goes first rotates), so a burst of load from other jobs falls on all of them alike; each loop walks the
    same batch sequence with its own cursor."""
    names = list(loops)
    cursors = {name: cycle_from(batches, 0) for name in names}
    seconds = {name: [] for name in names}
    for r in range(rounds):
        spent = {name: [0.0, 0.0] for name in names}
        for i in range(steps):
            turn = r * steps + i
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                wall, cpu = timed(loops[name], cursors[name], 1)
                spent[name][0] += wall
                spent[name][1] += cpu
        for name in names:
            seconds[name].append(tuple(spent[name]))
    return seconds


def worker(args) -> None:
    import torch

    trainer = build_trainer(args.dataset_config, args.output_dir, [f"log.every={args.log_every}"])
    batches = collect_batches(trainer, args.batches)
    bare = BareLoop(trainer.cfg, trainer.ds_config, len(trainer.tokenizer), trainer.dist.device)
    loops = {"lance_ds": LanceLoop(trainer), "bare": bare, "engine_only": EngineOnlyLoop(bare, batches),
             "bare_no_local_size": WithoutLocalSize(bare)}
    for loop in loops.values():  # warm-up: allocator, ZeRO-3 parameter trace, the first optimizer states
        timed(loop, cycle_from(batches, 0), args.warmup)
    seconds = interleaved_rounds(loops, batches, args.rounds, args.steps)
    if trainer.dist.is_first:
        grad_accum = trainer.cfg.train.grad_accum
        tokens = [b.num_real_tokens for b in batches]
        print_result({"seconds": seconds, "steps": args.steps, "world_size": trainer.dist.world_size,
                      "threads": torch.get_num_threads(), "grad_accum": grad_accum,
                      "mean_real_tokens_per_micro_batch": statistics.mean(tokens),
                      "params_m": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                      for p in trainer.engine.module.parameters()) / 1e6})
    trainer.close()


# ---------------------------------------------------------------------------------------------------------------
# the report


def per_round(res: dict, a: str, b: str, which: int) -> list[float]:
    """steps/s of loop a over loop b in each round (which: 0 wall time, 1 CPU time)."""
    return [tb[which] / ta[which] for ta, tb in zip(res["seconds"][a], res["seconds"][b])]


def report(ranks: int, res: dict) -> dict:
    """Print one world size's figures; returns the median ratios (wall, cpu) of lance_ds over bare steps/s."""
    s, steps = res["seconds"], res["steps"]
    print(f"   {ranks} rank(s), {res['threads']} thread(s) each, {res['params_m']:.2f} M params, "
          f"~{res['mean_real_tokens_per_micro_batch']:.0f} real tokens per micro-batch per rank, "
          f"{len(s['bare'])} rounds of {steps} steps")
    rates = ", ".join(f"{name} {steps / statistics.median(t[0] for t in times):.2f}" for name, times in s.items())
    print(f"     steps/s (wall, median round): {rates}")
    out = {}
    for which, clock in ((0, "wall"), (1, "CPU ")):
        ratios = per_round(res, "lance_ds", "bare", which)
        out[clock.strip()] = ratio = statistics.median(ratios)
        overhead = 1 / ratio - 1
        print(f"     lance_ds / bare steps/s by {clock} time: median {ratio:.3f} (rounds "
              f"{min(ratios):.3f}..{max(ratios):.3f}) -> overhead {100 * overhead:+.1f}% "
              f"(goal <= 10%: {'met' if overhead <= 0.10 else 'NOT met'})")
    encoders = 1 - statistics.median(per_round(res, "bare", "engine_only", 1))
    no_local = 1 / statistics.median(per_round(res, "bare_no_local_size", "bare", 1)) - 1
    print(f"     for reading (CPU time, median): frozen encoders + noising are {100 * encoders:.0f}% of a bare step; "
          f"without LOCAL_SIZE (torchrun, plain python) a bare step costs {100 * no_local:+.0f}%")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="world sizes to measure, comma-separated")
    p.add_argument("--rounds", type=int, default=16, help="timed rounds per loop (median reported)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round (a multiple of --log_every)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per loop before the rounds")
    p.add_argument("--batches", type=int, default=20, help="pre-collated batches per rank (cycled)")
    p.add_argument("--log_every", type=int, default=5, help="log.every of the lance_ds loop (configs/debug.yaml: 5)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--dataset_config", help="dataset YAML (default: a small example dataset made in a temp dir)")
    p.add_argument("--work_dir", help="keep data, logs and trainer outputs here (default: a temp dir, removed)")
    p.add_argument("--output_dir", help="trainer output dir (worker)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.steps % args.log_every:
        p.error("--steps must be a multiple of --log_every so each round logs the same number of times")
    print(f"lance_ds trainer overhead: {machine_line()}")
    with work_dir(args.work_dir, "bench_trainer_") as tmp:
        dataset = args.dataset_config or example_dataset(tmp / "data")
        print(f"   data: {dataset}; batches pre-collated from the real loader (loader time excluded from both)")
        for n in [int(x) for x in args.ranks.split(",")]:
            argv = ["--dataset_config", dataset, "--output_dir", str(tmp / f"run{n}"), "--rounds", str(args.rounds),
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--batches", str(args.batches),
                    "--log_every", str(args.log_every)]
            report(n, spawn_ranks(__file__, argv, n, args.threads, tmp / f"logs{n}"))
    print(f"   done: {machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
