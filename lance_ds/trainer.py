"""The training loop. `train()` reads like pseudocode; each part of a step is a small method below it.

One optimizer step = `train.grad_accum` micro-steps; each micro-step takes one PackedBatch from this rank's loader,
encodes its pixels with the frozen VAE/ViT, noises the latents (objectives.flow), runs the engine, and backpropagates
the named losses (objectives). Every rank runs every trainable branch each micro-step (the packer adds zero-weight
placeholders), so ZeRO-3's collectives always match.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from .checkpoint import (EMA_WEIGHTS, LATEST, RUN_CONFIG, Checkpointer, agree_on_resume, check_output_dir_shared,
                         checkpoints_dir, claim_output_dir, data_order_changes, data_order_differs, engine_setup,
                         latest_name, read_config)
from .config.core import ConfigError, to_dict
from .config.data import TASKS, TEXT_TO_MEDIA_TASKS, UND_TASKS, VIDEO_TASKS
from .config.deepspeed import zero_stage
from .config.model import MODEL_DIRS
from .config.run import Run
from .data.manifest import system_prompt_counts
from .data.packing import Branches
from .data.sequence import DEFAULT_SYSTEM_PROMPTS, SequencePlanner
from .data.stream import build_train_loader, data_groups
from .data.tokenizer import load_tokenizer
from . import distributed
from .ema import ShardedEMA
from .engine import (STARTUP_TIMEOUT_S, build_engine, follow_run_schedule, init_distributed, limit_collective_waits,
                     seed_everything, seed_micro_step)
from .faults import armed, seconds_if_armed, terminate_if_armed
from .metrics import DecoderFlops, Meter, TensorBoard, Throughput, memory_scalars, peak_tflops, summed_over_ranks
from .model import build_model, encode_vit
from .model.build import model_shapes
from .objectives import compute_losses, prepare_flow, step_weights
from .processes import said_if_slow
from .stopping import StopRequests
from .validation import TaskLosses, Validator, total_loss


class Trainer:
    def __init__(self, run: Run, ds_config: dict, resume: str = "latest"):
        self.run, self.cfg, self.ds_config = run, run.config, ds_config
        self.dist = init_distributed()
        refuse_disagreeing_ranks(run, ds_config)
        seed_everything(self.cfg.train.seed)
        self.out = Path(self.cfg.output_dir)
        check_output_dir_shared(self.out, self.dist.device)
        self.output_lock = claim_output_dir(self.out, self.dist.device)  # held until close() or this process exits
        self.tokenizer = load_tokenizer(self.cfg.model.tokenizer_path)
        self.parts = build_model(self.cfg.model, len(self.tokenizer), ds_config, device=self.dist.device)
        self.planner = SequencePlanner(self.tokenizer, self.parts.geometry, seed=self.cfg.train.seed)
        self.checkpointer = Checkpointer(checkpoints_dir(self.out), self.cfg.checkpoint.keep_last,
                                         self.dist.rank, self.dist.world_size)
        resume_from = self._checkpoint_to_resume(resume)
        if resume_from is not None and self.checkpointer.saved_world(resume_from) != self.dist.world_size:
            self.checkpointer.make_universal(resume_from, self.dist.device)
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        self.engine = build_engine(self.parts.model, ds_config, self.cfg.train)
        self.ema = ShardedEMA(self.engine.module, self.cfg.train.ema_decay) if self.cfg.train.ema_decay > 0 else None
        self.branches = Branches(vit=self.cfg.model.visual_und, vae_target=self.cfg.model.visual_gen,
                                 ce=self.cfg.model.visual_und)
        self.cuts = training_cuts(run.dataset)  # (read once: a manifest removed mid-run must not fail a save)
        self.loader = build_train_loader(run.dataset, self.cfg.data, self.planner, rank=self.dist.rank,
                                         world_size=self.dist.world_size, seed=self.cfg.train.seed,
                                         micro_batch_size=self.cfg.train.micro_batch_size, branches=self.branches,
                                         slow_batch_s=self.cfg.train.stall_timeout_s / 2)
        self.validator = Validator(self, run.val_dataset) if run.val_dataset is not None else None
        self.step = 0
        self.saved_step: int | None = None  # the step of this run's newest checkpoint
        self.skipped_steps = 0
        self.started = time.time()
        self.tokens_seen = 0  # real tokens of every rank, through the last logged point
        self.saved_tokens_seen = 0  # ... through the last save
        self.last_losses: dict[str, float] = {}
        self.last_lr = float("nan")
        self.validated_step: int | None = None  # the last step validation ran at (saved: a stop may skip it)
        # the logging window: its per-task losses, averages (grad norm, scored tokens) and throughput counts
        self.task_losses, self.meter, self.speed = TaskLosses(self.dist.device), Meter(), Throughput()
        self.flops = DecoderFlops.of(self.parts.spec.llm)
        self.peak_tflops = peak_tflops(self.dist.device, self.cfg.train.precision, self.cfg.log.peak_tflops)
        resumed = self._resume(resume_from)
        self.resumed_from = resume_from if resumed else None
        self.first_step = self.step  # 0, or the step this run resumed at (its summary counts the steps it trained)
        # the timeline restarts here: points an earlier run logged after this step (or any, from scratch) are dropped
        self.tb = TensorBoard(self.out / "tensorboard", enabled=self.dist.is_first,
                              purge_step=self.step + 1 if resumed else 0)
        if self.dist.is_first:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_CONFIG).write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    # ------------------------------------------------------------------------------------------------------------

    def train(self) -> int | None:
        """Train to train.max_steps; returns the signal that stopped the run earlier (see lance_ds.stopping), or
        None."""
        cfg = self.cfg
        self.print_banner()
        batches = iter(self.loader)
        if self.validated_step != self.step:  # step 0, or a resume from a stop that skipped its validation
            self.validate_if_due()
        speed = self.speed
        speed.restart_clock()
        progress = self._progress_bar()
        requests, stopped = StopRequests(), None
        patience = STARTUP_TIMEOUT_S  # start-up and the first step, with its loader warm-up
        try:
            while self.step < cfg.train.max_steps and stopped is None:
                with self._said_if_slow(f"step {self.step + 1}", patience):
                    self.train_step(batches)
                self.step += 1
                if patience != cfg.train.stall_timeout_s:
                    patience = cfg.train.stall_timeout_s
                    limit_collective_waits(patience)
                progress.update(1)
                stopped = requests.agreed(self.dist.device)
                save = self._save_due() or stopped is not None
                # (a save carries the open window, _open_window: a run resumed from it logs the uninterrupted points)
                if self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps:
                    self.log(progress)
                with speed.paused():
                    if stopped is None:  # (stopping: the save first, within the launcher's grace period)
                        self.validate_if_due()
                    if save:
                        with self._said_if_slow(f"the save of step {self.step}", patience):
                            if stopped is not None:  # crash tests: a stop's save longer than DeepSpeed's 30 s grace
                                time.sleep(seconds_if_armed("slow_stop_save"))
                            self.save()
            if self.saved_step != self.step:  # (not read from the files: every rank must decide alike)
                self.save()  # (a SIGTERM now waits for it, as for any save)
        finally:
            requests.restore()
        if self.step >= cfg.train.max_steps:
            stopped = None  # a stop asked for in the last step: the run is complete all the same
        progress.close()
        self.print_summary(stopped)
        return stopped

    @staticmethod
    def _said_if_slow(what: str, patience: float):
        """Half-way to the collective timeout, a rank still in `what` says where it is: the rank that holds the others
        up (only it is slow outside a collective) tells why, before the timeout ends the run."""
        return said_if_slow(what, patience / 2, "half the time a collective may wait: train.stall_timeout_s after the "
                            "first step")

    def train_step(self, batches) -> None:
        """One optimizer step over `grad_accum` micro-batches."""
        meter, speed = self.meter, self.speed
        skipped_before = self.engine.skipped_steps
        self.last_lr = self.engine.get_lr()[0]  # the rate this step applies
        micro_steps = self.cfg.train.grad_accum
        t0 = time.perf_counter()
        micro_batches = [next(batches) for _ in range(micro_steps)]
        speed.counts["data_wait"] += time.perf_counter() - t0
        # every token of the step weighs the same, whichever micro-batch holds it: the loss of each micro-step is
        # divided by the weights of the whole step (a per-micro-step mean would weigh a micro-batch's 3 CE tokens
        # like another's 3000)
        weights = step_weights(micro_batches, self.cfg.objective, self.dist.device)
        meter.add("train/ce_tokens", float(weights[2]))
        meter.add("train/mse_tokens", float(weights[3]))
        step_losses = TaskLosses(self.dist.device)
        for micro, batch in enumerate(micro_batches):
            gen = seed_micro_step(self.cfg.train.seed, self.step, micro, self.dist.rank, self.dist.device)
            batch = batch.to(self.dist.device, non_blocking=True)  # from pinned memory (GPU): asynchronous
            pred, flow = self.forward(batch, gen)
            losses = compute_losses(pred.logits, pred.velocity, batch, flow, self.cfg.objective, step=weights,
                                    micro_steps=micro_steps)
            del pred  # the logits [C, V'] need not outlive the losses (backward keeps what it needs)
            if self.dist.rank == self.dist.world_size - 1:
                self._inject_faults(losses)
            self.engine.backward(losses.total)
            self.engine.step()
            self._account(batch)
            step_losses.add(batch, losses.per_token)
        skipped = self.engine.skipped_steps - skipped_before
        self.skipped_steps += skipped
        if skipped:  # the window's losses and norm average the steps applied: one step's NaN would blank it
            return
        self.task_losses.merge(step_losses)
        if self.ema is not None:
            self.ema.update()
        norm = self.engine.get_global_grad_norm()
        if norm is not None and math.isfinite(norm):
            meter.add("train/grad_norm", float(norm))

    def _inject_faults(self, losses) -> None:
        """Crash tests (LANCE_DS_FAULT, lance_ds.faults), on the last rank."""
        if armed("nan_loss", self.step + 1):  # its loss goes non-finite, per token too
            nan = float("nan")
            losses.total, losses.per_token.ce, losses.per_token.mse = (
                losses.total * nan, losses.per_token.ce * nan, losses.per_token.mse * nan)
        terminate_if_armed("sigterm", self.step + 1)  # a scheduler's stop arriving during this step
        if armed("raise", self.step + 1):
            raise RuntimeError(f"injected failure on rank {self.dist.rank} at step {self.step + 1}")
        if armed("stall", self.step + 1):
            # a rank stuck (a hung file system, a wedged GPU), alive but silent, where no signal handler runs (so
            # the launcher's SIGTERM ends it, without its 30 s wait for a SIGKILL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)

    def forward(self, batch, generator: torch.Generator):
        """Frozen encoders (no grad) -> noised latents -> the engine's predictions, for one batch on the device."""
        with torch.no_grad():
            vit_embeds = None
            if self.parts.vit is not None:
                vit_embeds = encode_vit(self.parts.vit, batch.vit_patches, batch.vit_grid_thw)
            clean = encode_latents(self.parts.vae, batch.vae_pixels, generator) if self.parts.vae is not None else None
        flow = None
        if clean is not None:
            flow = prepare_flow(clean, batch, self.cfg.objective, generator)
            pred = self.engine(batch, vit_embeds, flow.noisy, flow.timesteps)
        else:
            pred = self.engine(batch, vit_embeds)
        return pred, flow

    def _account(self, batch) -> None:
        counts = self.speed.counts
        counts["real_tokens"] += batch.num_real_tokens
        counts["packed_tokens"] += batch.num_tokens
        counts["samples"] += sum(t in TASKS for t in batch.tasks)  # not padding or placeholders
        counts["attended_pairs"] += batch.attended_pairs

    # -- logging ---------------------------------------------------------------------------------------------------

    def log(self, progress) -> None:
        meter, speed = self.meter, self.speed
        scalars = meter.means()
        scalars["train/lr"] = self.last_lr  # the rate of the window's last step (a mean would match no step)
        scalars.update(memory_scalars())
        scalars["train/skipped_steps"] = self.skipped_steps
        # this rank's counts; the run's are their sums (one all-reduce for all of them)
        data, stats = self.loader.stats_scalars(), self.loader.stats()
        mine = {**{k: v for k, v in data.items() if k.startswith(("data/skipped", "data/samples"))}, **speed.counts,
                "real_tokens_total": stats["real_tokens"], "packed_tokens_total": stats["total_tokens"]}
        run = summed_over_ranks(mine, self.dist.device)
        scalars.update({k: run.get(k, v) for k, v in data.items()})
        scalars.update(speed.scalars(run, self.dist.world_size, self.flops, self.peak_tflops))
        scalars["data/packing_efficiency_total"] = run["real_tokens_total"] / max(run["packed_tokens_total"], 1)
        self.tokens_seen += int(run["real_tokens"])
        scalars.update(self.task_losses.scalars("train"))  # token-weighted means over all ranks
        if "train/ce" in scalars or "train/mse" in scalars:  # none in a window of skipped steps alone
            scalars["train/loss"] = total_loss(scalars, "train", self.cfg.objective)
            self.last_losses = {k: v for k, v in scalars.items() if k in ("train/loss", "train/ce", "train/mse")}
        self.tb.scalars(self.step, scalars)
        progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in self.last_losses.items()})
        meter.reset()
        speed.reset()

    def _progress_bar(self):
        from tqdm import tqdm

        enabled = self.dist.is_first and self.cfg.log.progress_bar
        return tqdm(total=self.cfg.train.max_steps, initial=self.step, disable=not enabled, desc="train",
                    dynamic_ncols=True)

    def _samples_of(self, group: str) -> str:
        count = self.loader.num_samples(group)
        return "? samples (no manifest)" if count is None else f"{count} samples"

    def print_banner(self) -> None:
        if not self.dist.is_first:
            return
        cfg, parts = self.cfg, self.parts
        lines = [
            "lance_ds: training",
            f"  model        {parts.describe()}",
            f"  weights      {describe_weights(cfg.model, self.resumed_from)}",
            f"  switches     visual_und={cfg.model.visual_und} visual_gen={cfg.model.visual_gen} "
            f"lape={cfg.model.lape.enabled} training_type={cfg.model.training_type}",
            "  data         " + "; ".join(f"{g.name} ({g.task}, weight {g.weight}, "
                                          f"{self._samples_of(g.name)}, {describe_cut(g)})"
                                          for g in self.run.dataset.groups),
            f"  world        {self.dist.world_size} rank(s) on {self.dist.device.type}, ZeRO stage "
            f"{zero_stage(self.ds_config)}, precision {cfg.train.precision}",
            f"  batch        {cfg.train.micro_batch_size} x {cfg.data.packing_length} tokens per micro-step, "
            f"grad_accum {cfg.train.grad_accum}, {self._tokens_per_step()} tokens per step",
            f"  steps        {self.step} -> {cfg.train.max_steps}, lr {cfg.train.lr} ({cfg.train.lr_schedule}, "
            f"warmup {cfg.train.warmup_steps}), save every {cfg.checkpoint.save_every}",
            f"  validation   {self._validation_plan()}",
            f"  output       {self.out}",
            *(f"  note         {note}" for note in self.loader.under_sharded()),
        ]
        print("\n".join(lines), flush=True)

    def _validation_plan(self) -> str:
        val = self.cfg.validation
        if val.every and self.validator is not None:
            return (f"every {val.every} steps on {val.dataset_config} ({val.max_samples} samples per group, "
                    f"{val.num_generations} generation(s) per task)")
        unused = f" (validation.every=N would validate on {val.dataset_config})" if val.dataset_config else ""
        return "off" + unused

    def _tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * self.cfg.data.packing_length * t.grad_accum * self.dist.world_size

    def print_summary(self, stopped: int | None = None) -> None:
        if stopped is None and self.last_losses:  # one record per run that trained to its end (not per stop)
            self.tb.hparams(flat_hparams(to_dict(self.cfg)), {f"hparam/{k}": v for k, v in self.last_losses.items()})
        if not self.dist.is_first:
            return
        elapsed = time.time() - self.started
        losses = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in self.last_losses.items())
        ended = (f"stopped by {signal.Signals(stopped).name} at step {self.step} of {self.cfg.train.max_steps} "
                 "(saved; the same command resumes it)" if stopped else "done")
        first = self.first_step
        steps = (f"{self.step} steps" if first == 0 else f"no step left to train (resumed at {first})"
                 if self.step == first else f"steps {first + 1}-{self.step} (resumed at {first})")
        print(f"lance_ds: {ended}: {steps} in {elapsed:.0f} s, {self.saved_tokens_seen:,} tokens in all, "
              f"skipped steps {self.skipped_steps}; final {losses}\n"
              f"  checkpoint  {self.checkpointer.root / LATEST} -> {latest_name(self.checkpointer.root) or '(none)'}\n"
              f"  tensorboard {self.out / 'tensorboard'}", flush=True)

    # -- validation ------------------------------------------------------------------------------------------------

    def validate_if_due(self) -> None:
        every = self.cfg.validation.every
        if every and self.validator is not None and self.step % every == 0:
            self.validator.run(self.step)
            self.validated_step = self.step

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def _save_due(self) -> bool:
        ck = self.cfg.checkpoint
        return self.step % ck.save_every == 0 or self.step == ck.debug_step

    def save(self) -> None:
        window = self._open_window()
        self.saved_tokens_seen = self.tokens_seen + int(window["counts"]["real_tokens"])  # (its window: not logged)
        state = {"skipped_steps": self.skipped_steps, "tokens_seen": self.saved_tokens_seen, "window": window,
                 "validated_step": self.validated_step, "model": to_dict(self.cfg.model),
                 "parameters": self._shapes(), "data_fingerprint": self.loader.spec.fingerprint(),
                 "data_groups": data_groups(self.loader.spec.groups),
                 "engine": engine_setup(self.cfg.train.precision, self.ds_config),
                 "cuts": self.cuts}
        self.checkpointer.save(self.engine, self.step, state, to_dict(self.cfg), self.loader.state_dict(), self.ema)
        self.saved_step = self.step

    def _open_window(self) -> dict:
        """The logging window since the last point, summed over ranks (collective), for a checkpoint."""
        counts = summed_over_ranks(dict(self.speed.counts), self.dist.device)
        return {"meter": self.meter.state_dict(), "seconds": self.speed.seconds(), "counts": counts,
                "task_losses": distributed.sum_over_ranks(self.task_losses.sums).tolist()}

    def _carry_window(self, window: dict | None) -> None:
        """Continue the window a checkpoint saved (None: saved by an older lance_ds): rank 0 holds its sums over the
        ranks that saved it, which the next point sums with this run's."""
        if window is None:
            return
        self.speed.earlier_s = window["seconds"]
        self.meter.load_state_dict(window["meter"])  # (rank 0's: the ranks' grad norms and scored tokens agree)
        if self.dist.is_first:
            self.speed.counts.update(window["counts"])
            self.task_losses.sums.copy_(torch.tensor(window["task_losses"], dtype=torch.float64))

    def _checkpoint_to_resume(self, resume: str) -> Path | None:
        """The checkpoint `resume` names (the same on every rank), or None to start from scratch."""
        train = self.cfg.train
        # (the data order was checked before the build, by train.py; the loader refuses another one too)
        resumable = self.checkpointer.check_resume(resume, to_dict(self.cfg.model), train.max_steps,
                                                   train.weight_decay, shapes=self._shapes(),
                                                   prediction=self.cfg.objective.prediction,
                                                   engine=engine_setup(train.precision, self.ds_config))
        return agree_on_resume(self.checkpointer.root, resumable, self.dist.device)

    def _shapes(self) -> dict[str, list[int]]:
        """The engine's parameters by name and (unpartitioned) shape: what a checkpoint of this run holds."""
        return {name: list(shape) for name, shape in model_shapes(self.parts.model).items()}

    def _resume(self, path: Path | None) -> bool:
        """Restore the checkpoint at `path`; False when the run starts from scratch."""
        if path is None:
            earlier = self.checkpointer.complete_steps()
            if earlier and self.dist.is_first:
                print(f"lance_ds: starting from scratch; {self.checkpointer.root} holds an earlier run's checkpoints "
                      f"(steps {earlier}), replaced as this run reaches their steps", flush=True)
            return False
        resumed = self.checkpointer.load(self.engine, path)
        follow_run_schedule(self.engine, self.cfg.train)
        saved_train = read_config(path).get("train", {})
        if self.dist.is_first:
            changed = schedule_changes(saved_train, self.cfg.train)
            if changed:
                print(f"lance_ds: the learning-rate schedule changed since the checkpoint ({'; '.join(changed)}): "
                      f"from step {resumed.step} the rate follows the new one", flush=True)
        self.step = self.saved_step = resumed.step
        self.skipped_steps = int(resumed.trainer_state.get("skipped_steps", 0))
        window = resumed.trainer_state.get("window")
        self._carry_window(window)
        self.tokens_seen = int(resumed.trainer_state.get("tokens_seen", 0)) - int(window["counts"]["real_tokens"]
                                                                                  if window else 0)
        # (checkpoints written before this was recorded: their step was validated, if due, before the save)
        self.validated_step = resumed.trainer_state.get("validated_step", self.step)
        resharded = self._resume_data(resumed)
        if self.ema is not None:
            shards = resumed.rank_files(EMA_WEIGHTS)
            if resumed.ema_state is None and shards:
                self.ema.load_repartitioned(shards, self.dist.rank)
            else:  # None: EMA is new at this resume, starts from these weights
                self.ema.load_state_dict(resumed.ema_state)
        if self.dist.is_first:
            saved_model, model = resumed.trainer_state.get("model", {}), to_dict(self.cfg.model)
            for key in (k for k in MODEL_DIRS if saved_model.get(k, model[k]) != model[k]):
                print(f"lance_ds: model.{key} was {saved_model[key]} when {path.name} was saved, now {model[key]} "
                      "(same parameter shapes; weights trained are the checkpoint's, frozen parts load from the new "
                      "directory)", flush=True)
            print(f"lance_ds: resumed from {path} at step {self.step}" + (
                f" (saved by {resumed.saved_world} ranks x {resharded} loader workers; this run has "
                f"{self.dist.world_size} x {self.loader.num_workers}: {RESHARD_NOTE})" if resharded else ""),
                  flush=True)
            changed = batch_change(saved_train, resumed.saved_world, self.cfg.train, self.dist.world_size)
            if changed:
                print(f"lance_ds: {changed}", flush=True)
        return True

    def _resume_data(self, resumed) -> int | None:
        """Restore the data position; from another layout of loader slots (ranks x workers) it is rebuilt from
        every rank's (data/reshard.py) and the saved number of workers is returned. Another data order (allowed by
        checkpoint.data_change=restart) is read from its beginning."""
        groups = data_groups(self.loader.spec.groups)
        restart = self.cfg.checkpoint.data_change == "restart"  # (else train.py, and the loader, refuse another)
        if restart and data_order_differs(resumed.trainer_state, self.loader.spec.fingerprint(), groups):
            if self.dist.is_first:
                changed = data_order_changes(read_config(resumed.path), to_dict(self.cfg),
                                             resumed.trainer_state.get("data_groups"), groups)
                print(f"lance_ds: the data order changed since {resumed.path.name} was saved ({'; '.join(changed)}): "
                      "checkpoint.data_change=restart reads the new data from its beginning", flush=True)
            return None
        own = resumed.data_state
        if own is not None and own.get("num_workers") == self.loader.num_workers:
            self.loader.load_state_dict(own)
            return None
        everyone = self.checkpointer.every_rank_data(resumed)
        if not everyone:
            return None  # (saved without a data position)
        self.loader.load_resharded(everyone)
        return int(everyone[0]["num_workers"])

    def close(self, finished: bool = True) -> None:
        """Release what the run holds. After a failure on this rank (finished=False) no collective: the other ranks
        may be inside one, and a barrier here would wait out the process group's timeout (30 min); the caller exits
        and the launcher stops them."""
        self.loader.close()  # first: its workers ignore SIGTERM, and exiting with them alive would hang
        self.tb.close()
        if self.output_lock is not None:
            self.output_lock.close()  # the output_dir is free for the next run
        if finished and distributed.initialized():
            dist.barrier()
            dist.destroy_process_group()  # otherwise a rank can abort at exit ("terminate called ...")


RESHARD_NOTE = ("weights, optimizer and schedule go on as saved; the samples not yet trained are dealt to the new "
                "loader slots, then the next epoch starts, split the new way")


def training_cuts(dataset) -> dict[str, dict]:
    """task -> the image / video options of its heaviest group and the system prompt most of its samples trained
    under: what inference cuts inputs and prompts with (saved with each checkpoint, carried into exports), so that a
    model trained at 448 px is not asked at 64, nor under another system prompt."""
    cuts: dict[str, dict] = {}
    for task in dict.fromkeys(group.task for group in dataset.groups):
        groups = [group for group in dataset.groups if group.task == task]
        heaviest = max(groups, key=lambda group: group.weight)  # (the first of equal weights)
        cuts[task] = {"image": to_dict(heaviest.image), "video": to_dict(heaviest.video),
                      "system_prompt": trained_system_prompt(groups) if task in UND_TASKS else heaviest.system_prompt}
    return cuts


def trained_system_prompt(groups) -> str | None:
    """The system prompt most of an i2t / v2t task's samples trained under (None: not known, no manifest counted the
    rows'). A row's own caption_i, counted by its converter manifest, else its group's system_prompt, else the task's
    default; each group weighs its share of the mixture, whatever its number of rows."""
    shares: Counter = Counter()
    for group in groups:
        rows = system_prompt_counts(group.shards)
        if not rows:  # nothing counted: the group's own, if it names one
            shares[group.system_prompt or ""] += group.weight
            continue
        total = sum(rows.values())
        for text, count in rows.items():
            own = text if text.strip() else group.system_prompt or DEFAULT_SYSTEM_PROMPTS[group.task]
            shares[own] += group.weight * count / total
    return shares.most_common(1)[0][0] or None


def describe_weights(model, resumed_from: Path | None = None) -> str:
    """Where training starts from: 'model.path /m/lance; model.vit_path /m/qwen', or 'random decoder ...'; a resumed
    run: 'the checkpoint .../step_00000400 (the run began from ...)'."""
    dirs = [f"model.{k} {getattr(model, k)}" for k in ("path", "vit_path", "vae_path") if getattr(model, k)]
    random = [] if model.path else ["random decoder (no model.path)"]
    if model.visual_und and not (model.path or model.vit_path):
        random.append(f"random {'trainable' if model.vit_trainable else 'frozen'} ViT")
    began = "; ".join(random + dirs)
    return began if resumed_from is None else f"the checkpoint {resumed_from} (the run began from {began})"


def describe_cut(group) -> str:
    """How a group's media are cut, in a few words: '512 px' (the side of the area; a video's own side if it has
    one), ', ViT 448 px' (when the ViT sees another side), ', 33 frames at 12 fps'."""
    video = group.task in VIDEO_TASKS
    cut = f"{group.resolution_for(video)} px"
    if group.image.vit_resolution is not None and group.task not in TEXT_TO_MEDIA_TASKS:
        cut += f", ViT {group.image.vit_resolution} px"
    if video:
        cut += f", {group.video.max_frames} frames at {group.video.sample_fps:g} fps"
    return cut


def schedule_changes(saved: dict, train) -> list[str]:
    """The schedule settings a resume changes (max_steps only for cosine: the horizon the rate decays to)."""
    keys = ["lr", "lr_schedule", "warmup_steps", "min_lr"] + (["max_steps"] if train.lr_schedule == "cosine" else [])
    return [f"train.{k} {saved[k]} -> {getattr(train, k)}" for k in keys
            if k in saved and saved[k] != getattr(train, k)]


def batch_change(saved: dict, saved_world: int, train, world: int) -> str | None:
    """What a resume changes in the sequences per optimizer step (micro batch x grad_accum x ranks), and the
    grad_accum that keeps it, if any; None when it stays."""
    before = int(saved.get("micro_batch_size", train.micro_batch_size)) * int(saved.get("grad_accum", 1)) * saved_world
    now = train.micro_batch_size * train.grad_accum * world
    if before == now:
        return None
    keeps, rest = divmod(before, train.micro_batch_size * world)
    hint = f"; train.grad_accum={keeps} keeps it" if keeps and not rest else ""
    return (f"the global batch changes from {before} to {now} sequences per step (micro batch x grad_accum x "
            f"ranks){hint}; the learning rate stays as configured")


def flat_hparams(tree: dict, prefix: str = "") -> dict[str, float | int | str | bool]:
    """The run config as TensorBoard hparams: dotted keys; lists and None as strings."""
    out: dict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def refuse_disagreeing_ranks(run: Run, ds_config: dict) -> None:
    """Every rank reads the config files itself (each node its own checkout; a file edited while the job starts): one
    that resolved another run, dataset or DeepSpeed config than rank 0 would hang the rest in a collective (seen: a
    rank with another train.max_steps) or train on other data. Compared once, before anything is built."""
    resolved = {"run": to_dict(run.config), "deepspeed": ds_config, "data": to_dict(run.dataset),
                "validation data": to_dict(run.val_dataset) if run.val_dataset is not None else None}
    fingerprints = {name: hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()
                    for name, part in resolved.items()}
    every = distributed.every_rank(fingerprints)
    refused = [rank for rank, value in enumerate(every) if value == distributed.REFUSED]
    if refused:
        raise ConfigError([f"rank(s) {refused} refused the config or --resume (the reason is in their output: a "
                           "problem only their node has, such as a path not mounted there)"])
    first, *others = every
    differing = [f"rank {rank}: {', '.join(name for name in first if theirs[name] != first[name])}"
                 for rank, theirs in enumerate(others, start=1) if theirs != first]
    if differing:
        raise ConfigError([f"ranks resolved other configs than rank 0 ({'; '.join(differing)}) from the files their "
                           "nodes read: launch every node from the same files, and do not edit them while a job "
                           "starts"])


@torch.no_grad()
def encode_latents(vae, pixels: list[torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
    """Clean latent tokens [N, z] of a batch's VAE blocks (sampled from the posterior), block after block."""
    blocks = vae.encode_blocks(pixels, sample=True, generator=generator)
    return torch.cat(blocks) if blocks else torch.zeros(0, vae.latent_channels, device=vae.device)

