"""Checkpoints that survive anything: atomic save, `latest` pointer, retention, per-rank trainer state, resume.

Layout of OUTPUT_DIR/checkpoints/:
  step_00000040/             one complete checkpoint (DeepSpeed engine files + ours)
    trainer_state.json       step, world size, model config (rank 0)
    config.yaml              the resolved run config (rank 0)
    rank_00000/data.json     this rank's data-loader position   (one dir per rank)
    rank_00000/ema.safetensors this rank's EMA shard (when EMA is on)
    universal/               DeepSpeed's universal form of the engine files, made by the first resume on another
                             number of ranks (kept for the next one)
  step_00000040.tmp/         a save in progress: ignored by resume, removed by the next save
  latest                     the name of the newest complete checkpoint (replaced atomically); without it, the
                             newest complete step is the latest

A save is written under `<name>.tmp`, every rank finishes, then rank 0 renames it and only then moves `latest`
(rule 7), so a run killed at any moment - even during a save - resumes from the last complete checkpoint. Every file
is flushed to disk (fsync, by the rank that wrote it) before the rename, so that a power cut cannot publish a
checkpoint whose files are still only in memory. A re-save
of a step (after a resume from an earlier one) moves the old copy aside as `<name>.old.tmp` until the new one is in
place. Retention keeps the `keep_last` newest checkpoints of the line a save continues (each records the checkpoint
it follows); checkpoints off that line (another run's, before a resume from an earlier step or --resume none) stay
until this run replaces them.
Nothing here unpickles data (rule 10): our own state is JSON and safetensors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import re
import secrets
import socket
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from . import distributed
from .config.deepspeed import zero_stage
from .config.model import MODEL_DIRS
from .ema import ShardedEMA
from .faults import kill_if_armed, terminate_if_armed
from .files import TMP_SUFFIX, fsync, fsync_dir, write_atomic
from .model.weights import save_safetensors

CHECKPOINTS = "checkpoints"  # OUTPUT_DIR/checkpoints holds the step directories and LATEST
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"  # written last: a step directory that has it is complete
UNIVERSAL = "universal"  # in a step dir: its engine state in DeepSpeed's universal form (any number of ranks)
RUN_CONFIG = "config.yaml"  # in a step dir and an output dir: the run config
DATA_POSITION = "data.json"  # per rank: the loader's position
EMA_WEIGHTS = "ema.safetensors"  # per rank: its part of the EMA
# Model keys that change the architecture: a checkpoint saved with other values cannot be resumed.
# (vit_trainable, freeze_modules: which parameters the optimizer state covers. Not the directories, model.path and
# the like: they move between runs, e.g. copied to a job's local disk; what they give the model is compared as its
# parameters' shapes once it is built, refuse_other_shapes.)
ARCHITECTURE_KEYS = ("size", "visual_und", "visual_gen", "lape", "training_type", "lora", "vit_trainable",
                     "freeze_modules")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_dir(checkpoint_dir: Path, rank: int) -> Path:
    return checkpoint_dir / f"rank_{rank:05d}"


def _barrier() -> None:
    if distributed.initialized():
        dist.barrier()


_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files: bf16_zero_pp_rank_3_...


def writer_of(relative: Path) -> int:
    """The rank that writes a file of a save: its rank_XXXXX folder, DeepSpeed's zero_pp_rank_N files, else 0."""
    if len(relative.parts) > 1 and relative.parts[0].startswith("rank_"):
        return int(relative.parts[0][len("rank_"):])
    found = _RANK_FILE.search(relative.name)
    return int(found.group(1)) if found else 0


def _fsync_own(root: Path, rank: int) -> None:
    """Flush to disk the files of the save under `root` that this rank wrote (each rank its own: N ranks opening
    every file would be N^2 metadata operations on a shared file system), and its own rank folder."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if writer_of(path.relative_to(root)) == rank:
                fsync(path)
    if rank_dir(root, rank).is_dir():
        fsync_dir(rank_dir(root, rank))


def _fsync_folders(root: Path) -> None:
    """Flush the folders of a save (the names they hold), once every rank has written into them (rank 0)."""
    for folder, _, _ in os.walk(root):
        fsync_dir(Path(folder))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed; the message says why and what to do. `rank`: set when only that rank met the
    problem (its own files), so that it reports it itself (train.py prints other errors once per node)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message if rank is None else f"rank {rank}: {message}")
        self.rank = rank


@dataclass
class Resumed:
    """What a resume restores besides the engine: the step and this rank's extra state."""

    step: int
    path: Path
    data_state: dict | None  # this rank's data position (None: saved without one, or by other ranks)
    ema_state: dict[str, torch.Tensor] | None  # this rank's EMA shard (None: saved without EMA, or by other ranks)
    trainer_state: dict

    @property
    def saved_world(self) -> int:
        return int(self.trainer_state["world_size"])

    def rank_files(self, name: str) -> list[Path]:
        """Every saving rank's file `name` (data.json, ema.safetensors) in rank order; [] when it saved none."""
        if name not in self.trainer_state.get("rank_files", []):
            return []
        return [rank_dir(self.path, rank) / name for rank in range(self.saved_world)]


class Checkpointer:
    """Saves and finds checkpoints under `root` (all ranks call save/load; rank 0 owns the directory layout)."""

    def __init__(self, root: str | Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.parent: str | None = None  # the checkpoint this run's next save follows: its last save, or the resumed

    # -- finding -----------------------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint directory, oldest first."""
        steps = []
        for p in self.root.glob("step_*"):  # (a user's step_00000020.bak or step_final is not one of ours)
            if (step := re.fullmatch(r"step_(\d+)", p.name)) and (p / TRAINER_STATE).is_file():
                steps.append(int(step[1]))
        return sorted(steps)

    def resolve(self, resume: str) -> Path | None:
        """`latest` (None when there is nothing yet), `none`, or a step number -> a checkpoint directory."""
        if resume == "none":
            return None
        if resume == "latest":
            name = latest_name(self.root)
            if name is None:  # nothing saved yet, or the first save ended between its rename and `latest`
                complete = self.complete_steps()
                return self.root / step_name(complete[-1]) if complete else None
            path = self.root / name
            if not (path / TRAINER_STATE).is_file():
                aside = self._aside(path.name)
                hint = (f", or rename {aside} (its previous copy, whole: a re-save of it was interrupted) to "
                        f"{path.name}" if (aside / TRAINER_STATE).is_file() else "")
                raise CheckpointError(f"{self.root / LATEST} names {path.name}, which is not a complete checkpoint; "
                                      f"resume from a step instead (--resume STEP, complete: {self.complete_steps()})"
                                      f"{hint}")
            return path
        if not resume.isdigit():
            raise CheckpointError(f"--resume must be latest, none or a step number, got {resume!r}")
        path = self.root / step_name(int(resume))
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"no complete checkpoint for step {resume} under {self.root} "
                                  f"(complete steps: {self.complete_steps()})")
        return path

    def check_resume(self, resume: str, model: dict, max_steps: int, weight_decay: float = 0.0,
                     shapes: dict[str, list[int]] | None = None, data: str | None = None,
                     prediction: str | None = None, engine: dict | None = None,
                     config: dict | None = None, groups: dict | None = None) -> Path | None:
        """The checkpoint `resume` names once it is known that this run can resume it (same architecture, the same
        optimizer grouping, the same data order, the same flow-head target, the same precision and ZeRO stage, a
        step not past max_steps; any number of ranks: see load), or None to start from scratch; else
        CheckpointError with the fix. It reads JSON / YAML only, so `--check` runs it before any rank starts work;
        `shapes` (the built model's parameters, model_shapes), `data` (the data order's fingerprint,
        data.stream.data_fingerprint), `prediction` (objective.prediction) and `engine` (engine_setup) are compared
        when given; `config` (the run's, as a dict) and `groups` (data.stream.data_groups) name what changed in
        another data order."""
        path = self.resolve(resume)
        if path is None:
            return None
        try:
            saved, saved_config = read_trainer_state(path), read_config(path)
            if not isinstance(saved, dict) or not isinstance(saved_config, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError, yaml.YAMLError) as e:  # (every rank meets it: said once, not by rank)
            raise self._unreadable(path, f"its {TRAINER_STATE} or config.yaml", e, own=False) from e
        refuse_other_architecture(saved.get("model", {}), model, path)
        if shapes is not None:
            refuse_other_shapes(saved.get("parameters"), shapes, saved.get("model", {}), path)
        if data is not None and data_order_differs(saved, data, groups):
            changed = (data_order_changes(saved_config, config, saved.get("data_groups"), groups)
                       if config is not None else
                       ["the dataset (groups, shards, weights), train.seed, train.micro_batch_size or the packing "
                        "settings changed"])
            raise CheckpointError(f"{path} was trained on another data order ({'; '.join(changed)}), so its data "
                                  "position does not apply. Resume with the dataset YAML and data settings it was "
                                  "trained with; or, to go on from its weights, optimizer and step on the new data "
                                  "(read from its beginning), checkpoint.data_change=restart; or start a new "
                                  "output_dir (or --resume none)")
        refuse_other_grouping(float(saved_config.get("train", {}).get("weight_decay") or 0.0), weight_decay, path)
        trained_to = saved_config.get("objective", {}).get("prediction", "velocity")
        if prediction is not None and trained_to != prediction:
            raise CheckpointError(f"{path} was trained with objective.prediction={trained_to}: its flow head outputs "
                                  f"that, which {prediction} would read as something else. Resume with "
                                  f"objective.prediction={trained_to}, or start a new output_dir (or --resume none)")
        if engine is not None:  # (checkpoints that did not record it: their precision is in their config)
            saved_engine = saved.get("engine", {"precision": saved_config.get("train", {}).get("precision")})
            refuse_other_engine(saved_engine, engine, path)
        step = int(saved.get("step", 0))
        if step > max_steps:  # (step == max_steps: a finished run started again, which has nothing left to do)
            earlier = [s for s in self.complete_steps() if s <= max_steps]
            raise CheckpointError(
                f"{path} is at step {step}, past train.max_steps={max_steps}, and a resume goes on from its step: "
                f"raise train.max_steps above {step} to train further"
                + (f", or resume an earlier step (--resume {earlier[-1]}; steps saved up to {max_steps}: {earlier})"
                   if earlier else "")
                + ", or start a new run with --resume none and another output_dir")
        return path

    # -- saving ------------------------------------------------------------------------------------------------

    def save(self, engine, step: int, trainer_state: dict, config: dict, data_state: dict | None,
             ema: ShardedEMA | None) -> Path:
        """Write a complete checkpoint for `step` on every rank, then publish it atomically."""
        name = step_name(step)
        tmp = self.root / (name + TMP_SUFFIX)
        terminate_if_armed("sigterm_during_save", step)  # crash tests: a stop that must wait for this save
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*" + TMP_SUFFIX):  # left by a run killed during a save
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        _barrier()
        mine = rank_dir(tmp, self.rank)
        try:  # first, so that a folder that cannot be written says why (DeepSpeed's own error drops the errno)
            mine.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot write the checkpoint of step {step} under {self.root} ({e.strerror or e}); "
                                  f"the last complete one ({latest_name(self.root) or 'none yet'}) stays usable: "
                                  "free space or fix the folder's permissions, then run the same command to resume",
                                  rank=self.rank) from e
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={"step": step}, save_latest=False)
        rank_files = [name for name, saved in ((DATA_POSITION, data_state), (EMA_WEIGHTS, ema)) if saved is not None]
        if data_state is not None:
            (mine / DATA_POSITION).write_text(json.dumps(data_state))
        if ema is not None:
            save_safetensors({k: v.contiguous() for k, v in ema.state_dict().items()}, str(mine / EMA_WEIGHTS),
                             metadata=ema.metadata())
        if self.rank == 0:
            (tmp / RUN_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        _fsync_own(tmp, self.rank)
        _barrier()
        kill_if_armed("kill_during_save", step)  # crash tests: after the engine files, before publishing
        if self.rank == 0:
            _fsync_folders(tmp)  # every rank's files and folders are in them by now
            state = dict(trainer_state, step=step, world_size=self.world_size, rank_files=rank_files,
                         parent=self.parent)
            # trainer_state.json is written last: its presence marks a complete directory.
            write_atomic(tmp / TRAINER_STATE, json.dumps(state, indent=2), durable=True)
            final, replaced = self.root / name, self._aside(name)
            if final.exists():  # a re-save of the same step (after a resume): the old copy goes only once the new
                os.replace(final, replaced)  # one is in place (a crash in between leaves it as a .tmp: see below)
            os.replace(tmp, final)
            fsync_dir(self.root)
            write_atomic(self.root / LATEST, name, durable=True)
            shutil.rmtree(replaced, ignore_errors=True)
            self._prune(name)
        self.parent = name
        _barrier()
        return self.root / name

    def _aside(self, name: str) -> Path:
        return self.root / (name + ".old" + TMP_SUFFIX)

    def _prune(self, saved: str) -> None:
        """Keep the keep_last newest checkpoints of the line the one just saved continues (it, the save before it,
        ..., the checkpoint the run resumed from, the saves before that, ...). Checkpoints off that line are another
        run's (after a resume from an earlier step, or --resume none): left alone, replaced as this run reaches their
        steps, and never counted, so that the saves this run may fall back to are its own."""
        line, name = [], saved
        while name is not None and name not in line and (self.root / name / TRAINER_STATE).is_file():
            line.append(name)
            name = self._parent_of(name)
        for old in line[self.keep_last:]:
            doomed = self.root / (old + ".pruned" + TMP_SUFFIX)  # whole or gone: never a step dir half deleted
            os.replace(self.root / old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _parent_of(self, name: str) -> str | None:
        try:
            state = read_trainer_state(self.root / name)
        except (OSError, ValueError):
            return None
        if "parent" in state:
            return state["parent"]
        older = [s for s in self.complete_steps() if s < int(state.get("step", 0))]  # saved before parents were kept
        return step_name(older[-1]) if older else None

    # -- loading -----------------------------------------------------------------------------------------------

    def saved_world(self, path: Path) -> int:
        return int(read_trainer_state(path)["world_size"])

    def make_universal(self, path: Path, device: torch.device) -> None:
        """Before a resume on another number of ranks (ZeRO partitions the optimizer state by rank): rank 0 writes
        the checkpoint's engine state in DeepSpeed's universal form (per parameter, any partitioning) into
        path/universal, once; the engine then loads it with checkpoint.load_universal (lance_ds sets it). Every rank
        fails together if the conversion does."""
        target = path / UNIVERSAL
        failure = None
        if self.rank == 0 and not target.is_dir():
            print(f"lance_ds: {path.name} was saved by {self.saved_world(path)} ranks and this run has "
                  f"{self.world_size}: converting it to DeepSpeed's universal checkpoint ({target}, once)", flush=True)
            failure = _convert_to_universal(path, target, self.saved_world(path))
        if _ranks_failing(failure is not None, device):
            raise CheckpointError(failure or f"rank 0 could not convert {path} to a universal checkpoint (its output "
                                  "says why)")

    def load(self, engine, path: Path) -> Resumed:
        """Restore the engine (weights, optimizer, scheduler) and read this rank's extra state (of a checkpoint
        check_resume accepted). From another number of ranks the engine loads path/universal (make_universal), and
        the per-rank state is left to the caller to repartition (Resumed.rank_files)."""
        from .model.weights import load_safetensors

        trainer_state = read_trainer_state(path)
        self.parent = path.name
        same_ranks = int(trainer_state["world_size"]) == self.world_size
        try:
            if same_ranks:
                load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
            else:
                with _universal_load_repaired(engine.optimizer):
                    load_path, _ = engine.load_checkpoint(str(path), tag=UNIVERSAL)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e):
                raise  # not an unreadable file (out of memory, a communication error, a shape mismatch): as it is
            raise self._unreadable(path, "DeepSpeed's files", e) from e  # a truncated zip, a cut pickle
        if load_path is None:
            raise self._unreadable(path, "DeepSpeed's engine files", FileNotFoundError("DeepSpeed found no engine "
                                                                                     "state for this rank"))
        if not same_ranks:
            return Resumed(step=int(trainer_state["step"]), path=path, data_state=None, ema_state=None,
                           trainer_state=trainer_state)
        mine = rank_dir(path, self.rank)
        for name in trainer_state.get("rank_files", []):  # (older checkpoints do not list them)
            if not (mine / name).is_file():  # the save wrote it: without it this rank would quietly start over
                raise self._unreadable(path, str(mine / name), FileNotFoundError("missing"))

        def read(file: Path, parse):  # None when this rank saved no such file
            try:
                return parse(file) if file.is_file() else None
            except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError, WeightsFileError
                raise self._unreadable(path, str(file), e) from e

        return Resumed(step=int(trainer_state["step"]), path=path,
                       data_state=read(mine / DATA_POSITION, lambda f: json.loads(f.read_text())),
                       ema_state=read(mine / EMA_WEIGHTS, load_safetensors), trainer_state=trainer_state)

    def every_rank_data(self, resumed: Resumed) -> list[dict]:
        """Every saving rank's data position, in rank order ([] when saved without): a resume on another layout of
        loader slots rebuilds this run's from them."""
        positions = []
        for file in resumed.rank_files(DATA_POSITION):
            try:
                positions.append(json.loads(file.read_text()))
            except (OSError, ValueError) as e:
                raise self._unreadable(resumed.path, str(file), e) from e
        return positions

    def _unreadable(self, path: Path, what: str, error: Exception, own: bool = True) -> CheckpointError:
        """The error for a checkpoint whose files cannot be read back; `own`: this rank's files (it says so)."""
        reason = (str(error).splitlines() or [""])[0][:300]
        others = [s for s in self.complete_steps() if self.root / step_name(s) != path]
        return CheckpointError(f"cannot resume from {path}: {what} could not be read ({type(error).__name__}: "
                               f"{reason}). If the save that wrote it was cut short or the files were damaged, "
                               f"resume from another step (--resume STEP; complete: {others or 'none'})",
                               rank=self.rank if own else None)


def _convert_to_universal(path: Path, target: Path, saved_world: int) -> str | None:
    """DeepSpeed's converter, path -> target (written aside, then renamed: whole or absent); None, or what failed."""
    tmp = target.with_name(target.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                           "--output_folder", str(tmp), "--inject_missing_state"], capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        return (f"could not convert {path} to a universal checkpoint for a resume on another number of ranks "
                f"(python -m deepspeed.checkpoint.ds_to_universal, exit {done.returncode}):\n{tail}\nResume with "
                f"the {saved_world} ranks it was saved by, or start a new run from its weights (python "
                f"tools/export_checkpoint.py {path} --out DIR, then model.path=DIR)")
    os.replace(tmp, target)
    return None


@contextlib.contextmanager
def _universal_load_repaired(optimizer):
    """Undo two slips of DeepSpeed's universal load (deepspeed 0.19, stage3.py
    load_hp_checkpoint_state_from_checkpoint_dir_stage3): it gives every parameter group the hyperparameters of the
    first, so biases and norm gains would be decayed (engine.optimizer_groups); and one step-count tensor to every
    group, which each group's update then advances, so Adam's bias correction would run N groups times too fast."""
    decays = [group.get("weight_decay") for group in optimizer.param_groups]
    yield
    for group, decay in zip(optimizer.param_groups, decays):
        group["weight_decay"] = decay
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _ranks_failing(failed: bool, device: torch.device) -> int:
    """How many ranks report a failure (collective: every rank calls it, so all of them raise together)."""
    return int(distributed.sum_over_ranks(torch.tensor([float(failed)], device=device)).item())


SHARED_TOKEN = ".lance_ds_shared"
RUN_LOCK = ".lance_ds_running"  # locked by rank 0 of the run training into the output_dir (released when it exits)


def claim_output_dir(output_dir: Path, device: torch.device):
    """Refuse a second run in an output_dir another one is training into (two configs naming one output_dir, a job
    started twice): each save sweeps the partial saves it finds, so the two would publish each other's half-written
    checkpoints and prune the good ones. Rank 0 holds an exclusive lock on a file there for the life of its process
    (a crash releases it); every rank fails together. Returns the open lock file, to keep. A filesystem without
    locks (some parallel filesystems) leaves the check undone."""
    held, holder = None, ""
    if distributed.rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        held = open(output_dir / RUN_LOCK, "a+")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.seek(0)
            held.truncate()
            held.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            held.flush()
        except BlockingIOError:
            held.seek(0)
            holder = held.read().strip() or "another process"
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
    if _ranks_failing(bool(holder), device):
        raise CheckpointError(f"output_dir {output_dir} is in use by another run ({holder or 'see rank 0'}): two runs "
                              "there would publish and prune each other's checkpoints. Wait for it to end, or give "
                              "this run another output_dir")
    return held


def check_output_dir_shared(output_dir: Path, device: torch.device) -> None:
    """Every rank must see the output_dir rank 0 writes to: rank 0 alone renames a save into place and moves `latest`,
    so on a node-local directory the other nodes' optimizer shards would never be part of a checkpoint. Rank 0
    writes a token there; every rank reads it back, and all of them fail together if one cannot."""
    if distributed.world_size() == 1:
        return
    token = [secrets.token_hex(8) if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / SHARED_TOKEN).write_text(token[0])
    dist.broadcast_object_list(token, src=0)  # after the write: every rank looks once it is there
    try:
        seen = (output_dir / SHARED_TOKEN).read_text() == token[0]
    except OSError:
        seen = False
    blind = _ranks_failing(not seen, device)
    if blind:
        raise CheckpointError(f"output_dir {output_dir} is not the same directory on every node: {blind} rank(s) "
                              "cannot see what rank 0 writes there, and checkpoints are published by rank 0 alone. "
                              "Put output_dir on a filesystem every node mounts.")


def agree_on_resume(root: Path, path: Path | None, device: torch.device) -> Path | None:
    """Rank 0's answer to --resume for every rank (each resolved it from its own view of the checkpoints dir
    `root`); a rank that cannot see that checkpoint there makes all of them fail, rather than some resuming and
    others starting over."""
    if distributed.world_size() == 1:
        return path
    chosen = [path.name if path is not None else None]
    dist.broadcast_object_list(chosen, src=0)
    path = root / chosen[0] if chosen[0] is not None else None
    blind = _ranks_failing(path is not None and not (path / TRAINER_STATE).is_file(), device)
    if blind:
        raise CheckpointError(f"{blind} rank(s) cannot see {path}, the checkpoint rank 0 resumes from: put output_dir "
                              "on a filesystem every node mounts")
    return path


def refuse_other_architecture(saved_model: dict, current_model: dict, path: Path) -> None:
    """A checkpoint resumes only into the architecture that wrote it; the error names every differing key."""
    def setting(model: dict, key: str):
        value = model.get(key)
        if key == "lora" and isinstance(value, dict):  # (adapter dropout: no weights of its own; the targets a set)
            value = {k: sorted(v) if k == "target_modules" else v for k, v in value.items() if k != "dropout"}
        return value

    differing = [k for k in ARCHITECTURE_KEYS
                 if k in saved_model and setting(saved_model, k) != setting(current_model, k)]
    if differing:
        detail = "; ".join(f"model.{k}: checkpoint {saved_model[k]!r}, now {current_model.get(k)!r}" for k in differing)
        raise CheckpointError(f"{path} was trained with a different architecture ({detail}). Resume with the "
                              f"same model settings, or start a new output_dir (or --resume none).")


def refuse_other_shapes(saved: dict[str, list[int]] | None, current: dict[str, list[int]], saved_model: dict,
                        path: Path) -> None:
    """The built model's parameters are those the checkpoint holds, by name and shape: its directories (model.path,
    vae_path, tokenizer_path, ...) may have moved since, not changed the geometry (the vocabulary, the VAE's
    latent channels, the decoder's sizes). Checkpoints written before shapes were saved are not compared."""
    if saved is None:
        return
    differing = [f"{name}: checkpoint {saved.get(name)}, now {current.get(name)}"
                 for name in sorted(saved.keys() | current.keys()) if saved.get(name) != current.get(name)]
    if differing:
        dirs = ", ".join(f"model.{k}={saved_model.get(k)}" for k in MODEL_DIRS if saved_model.get(k)) or "none"
        more = f"; and {len(differing) - 5} more" if len(differing) > 5 else ""
        raise CheckpointError(f"{path} holds parameters of other shapes than this run's model builds "
                              f"({'; '.join(differing[:5])}{more}): a model directory now gives another geometry "
                              f"(the checkpoint's: {dirs}). Point them at the directories it was trained from, or "
                              f"start a new output_dir (or --resume none).")


def refuse_other_grouping(saved: float, current: float, path: Path) -> None:
    """With weight decay the optimizer holds two parameter groups (engine.optimizer_groups), without it one; its
    saved state loads only into the same grouping."""
    if (saved > 0) != (current > 0):
        raise CheckpointError(f"{path} was trained with train.weight_decay={saved:g} and this run has {current:g}: "
                              "with weight decay, biases and norm gains sit in an optimizer group of their own (not "
                              "decayed), and the saved optimizer state fits only the grouping it was saved with. "
                              f"Resume with train.weight_decay {'> 0' if saved > 0 else '= 0'}, or start a new run "
                              f"from its weights (python tools/export_checkpoint.py {path} --out DIR, then "
                              "model.path=DIR)")


DATA_ORDER_KEYS = ("train.seed", "train.micro_batch_size", "data.shuffle_buffer", "data.packing_length",
                   "data.packing", "data.packing_buffer", "data.buffer_mb")  # with the dataset's groups: data.stream.data_fingerprint


def data_order_changes(saved_config: dict, config: dict, saved_groups: dict | None = None,
                       groups: dict | None = None) -> list[str]:
    """What differs in the data order between a checkpoint and the run: settings ('KEY A -> B') and, when both
    sides' data.stream.data_groups are known, groups ('group g weight 1.0 -> 2.0', 'group h added', ...)."""
    def value(cfg: dict, key: str):
        section, name = key.split(".")
        return cfg.get(section, {}).get(name)

    changed = [f"{key} {value(saved_config, key)} -> {value(config, key)}" for key in DATA_ORDER_KEYS
               if value(saved_config, key) is not None and value(saved_config, key) != value(config, key)]
    if saved_groups is not None and groups is not None:
        changed += group_changes(saved_groups, groups)
    return changed or ["the dataset (its groups, shards or weights) changed"]


def data_order_differs(trainer_state: dict, fingerprint: str, groups: dict[str, dict] | None) -> bool:
    """Whether a checkpoint (its trainer state) was trained on another data order than `fingerprint` and `groups`
    (data.stream.data_fingerprint / data_groups) describe, or on other files at the same paths: its data position
    would point into files that changed (a dataset converted again into the same folder)."""
    if trainer_state.get("data_fingerprint", fingerprint) != fingerprint:
        return True
    return groups is not None and bool(contents_changes(trainer_state.get("data_groups") or {}, groups))


def contents_changes(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """Groups whose shard list is the same but whose shards hold other data. (Checkpoints saved before the contents
    were recorded: nothing to compare.)"""
    return [f"group {name}: its {now[name]['shards']} shard(s) hold other data at the same paths (converted again "
            "into the same folder?)"
            for name in now if "contents" in saved.get(name, {}) and saved[name]["digest"] == now[name]["digest"]
            and saved[name]["contents"] != now[name].get("contents")]


def group_changes(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    changed = [f"group {name} removed" for name in saved if name not in now]
    changed += [f"group {name} added" for name in now if name not in saved]
    for name in (n for n in now if n in saved):
        before, after = saved[name], now[name]
        if before["weight"] != after["weight"]:
            changed.append(f"group {name} weight {before['weight']} -> {after['weight']}")
        if before["digest"] != after["digest"]:
            changed.append(f"group {name} shards {before['shards']} -> {after['shards']} (another list)")
    changed += contents_changes(saved, now)
    if not changed and list(saved) != list(now):
        changed.append(f"the groups' order {list(saved)} -> {list(now)}")
    return changed


def engine_setup(precision: str, ds_config: dict) -> dict[str, Any]:
    """What decides the layout of DeepSpeed's optimizer files: recorded with a checkpoint, compared at a resume."""
    return {"precision": precision, "zero_stage": zero_stage(ds_config)}


_ENGINE_KEYS = {"precision": "train.precision", "zero_stage": "zero_optimization.stage (--ds_config)"}


def refuse_other_engine(saved: dict, current: dict, path: Path) -> None:
    """DeepSpeed names and lays out its optimizer files by precision and ZeRO stage; under another one it finds
    none (a bare FileNotFoundError or AssertionError on every rank)."""
    changed = [f"{name} {saved[key]}, now {current[key]}" for key, name in _ENGINE_KEYS.items()
               if saved.get(key) is not None and key in current and saved[key] != current[key]]
    if changed:
        raise CheckpointError(f"{path} was saved under another DeepSpeed set-up ({'; '.join(changed)}), whose "
                              "optimizer files this one cannot read. Resume with the set-up it was saved with, or "
                              f"start a new run from its weights (python tools/export_checkpoint.py {path} --out DIR, "
                              "then model.path=DIR)")


def latest_name(root: Path) -> str | None:
    """The step directory root/latest names (None: no save was published there yet)."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    """step_dir/trainer_state.json: step, world_size, rank_files, parent, model, ... (OSError, ValueError as read)."""
    return json.loads((step_dir / TRAINER_STATE).read_text())


def read_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / RUN_CONFIG).read_text())
