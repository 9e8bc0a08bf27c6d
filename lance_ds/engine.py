"""DeepSpeed set-up: the process group, the device, and the engine around the trainable model.

What goes where (rule 5): the trainable LanceModel is built under `deepspeed.zero.Init` (by lance_ds.model) and
wrapped by the engine here; the frozen VAE and the frozen ViT are plain modules on the device, outside the engine,
so ZeRO never partitions them and checkpoints never contain them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import re
import sys
import time
import types
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .config.core import ConfigError
from .config.run import TrainConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device  # (this node's local rank picks the GPU)

    @property
    def is_first(self) -> bool:
        return self.rank == 0


# How launchers that start the training processes themselves (no torchrun / deepspeed launcher in between) describe
# them: (name, world size, rank, local rank, ranks on this node)
_TASK_LAUNCHERS = (("srun", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", None),
                   ("mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                    "OMPI_COMM_WORLD_LOCAL_SIZE"),
                   ("mpiexec", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))


def launcher_env(env: dict[str, str]) -> tuple[str, dict[str, str]] | None:
    """(launcher, RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE) for a process that srun or mpirun started as one
    of several tasks, read from their own variables; None when RANK is set already or no such launcher is found.
    Without this each task saw no RANK and trained alone, a world of one on GPU 0, all into one output_dir."""
    if "RANK" in env:
        return None
    for name, size, rank, local_rank, local_size in _TASK_LAUNCHERS:
        if env.get(size, "").isdigit() and int(env[size]) > 1 and env.get(rank, "").isdigit():
            local = {"LOCAL_RANK": env.get(local_rank, "0")}
            ranks_here = env.get(local_size) if local_size else _slurm_tasks_on_this_node(env)
            if ranks_here:
                local["LOCAL_WORLD_SIZE"] = ranks_here
            return name, {"RANK": env[rank], "WORLD_SIZE": env[size], **local}
    return None


def _slurm_tasks_on_this_node(env: dict[str, str]) -> str | None:
    """This node's entry of SLURM_STEP_TASKS_PER_NODE ("4(x2),3": 4 tasks on each of 2 nodes, then 3)."""
    counts: list[str] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match:
            counts += [match[1]] * int(match[2] or 1)
    node = env.get("SLURM_NODEID", "")
    return counts[int(node)] if node.isdigit() and int(node) < len(counts) else None


def adopt_launcher_env() -> str | None:
    """Set RANK, WORLD_SIZE and LOCAL_RANK from srun's or mpirun's variables (see launcher_env); returns a reason
    to refuse the run when they cannot be used, else None. Call before anything reads the world size."""
    found = launcher_env(dict(os.environ))
    if found is None:
        return None
    name, ranks = found
    os.environ.update(ranks)
    if not os.environ.get("MASTER_ADDR"):
        return (f"started by {name} as rank {ranks['RANK']} of {ranks['WORLD_SIZE']}, but MASTER_ADDR is not set: "
                "every rank must know where rank 0 listens; set it in the job script, e.g. export MASTER_ADDR=$("
                "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) (and MASTER_PORT, default 29500)")
    os.environ.setdefault("MASTER_PORT", "29500")  # the same on every rank (the one-process default below is not)
    return None


STARTUP_TIMEOUT_S = 1800.0  # how long a collective may wait before limit_collective_waits (torch's default)


def stale_build_locks(recheck_s: float = 5.0) -> list[Path]:
    """torch JIT-loads DeepSpeed's ops (the CPU comm op at every start; FusedAdam, CPUAdam when not prebuilt) under
    a lock file in the op's build directory, which a process killed while holding it never removes: every later start
    then waits for it forever at 0% CPU (pytorch/pytorch#189245). A lock in a directory of ours is stale when it stays
    the same file for `recheck_s` while no process works in that directory (a build runs ninja and the compilers
    there; otherwise the holder holds the lock for about a second)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = {lock: _identity(lock) for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]}
    locks = {lock: seen for lock, seen in locks.items() if seen is not None and seen[0] == os.getuid()}
    if not locks:
        return []
    time.sleep(recheck_s)
    return [lock for lock, seen in locks.items() if _identity(lock) == seen and not _someone_works_in(lock.parent)]


def remove_stale_build_locks(recheck_s: float = 5.0) -> None:
    for lock in stale_build_locks(recheck_s):
        lock.unlink(missing_ok=True)
        print(f"lance_ds: removed {lock}: torch's lock on building a DeepSpeed op, left by a process killed while "
              "it held it (nothing is building there); every start would have waited for it forever",
              file=sys.stderr, flush=True)


def _identity(lock: Path) -> tuple[int, int, int] | None:
    """(owner of the lock's directory, the lock's inode, its mtime): whether it is still the same file."""
    try:
        return lock.parent.stat().st_uid, lock.stat().st_ino, lock.stat().st_mtime_ns
    except OSError:
        return None


def _someone_works_in(directory: Path) -> bool:
    target = directory.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")) == target:
                return True
        except OSError:  # gone meanwhile, or another user's (who cannot build in a directory of ours)
            continue
    return False


def init_distributed(timeout_s: float = STARTUP_TIMEOUT_S) -> DistInfo:
    """Join the process group the launcher described (deepspeed, torchrun, or a single plain process)."""
    # A plain `python lance_ds/train.py` is a world of one; DeepSpeed would otherwise try MPI discovery.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    # DeepSpeed's CPU backend runs `numactl` (absent here) on every collective unless LOCAL_SIZE is set; the deepspeed
    # launcher sets it, torchrun and plain python do not (measured: +12% per debug step)
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    set_cpu_threads()
    if os.environ["LOCAL_RANK"] == "0":  # once per node: the other ranks waiting on a stale lock then go on
        remove_stale_build_locks()
    if torch.cuda.is_available():
        # a launcher that binds each task its own GPU (srun --gpus-per-task=1, mpirun with a GPU binding) shows task 3
        # one device, cuda:0: its node-local index would name a device it cannot see (DeepSpeed then refused it)
        os.environ["LOCAL_RANK"] = str(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    import deepspeed

    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cpu" and world_size > 1:
        torch.distributed.barrier()  # every rank has mapped every rank's CPU all-reduce buffer: the names can go
    release_shm_buffer()
    return DistInfo(int(os.environ["RANK"]), world_size, device)


def limit_collective_waits(seconds: float) -> None:
    """From now on a collective that waits more than `seconds` for another rank fails (gloo raises, NCCL's watchdog
    aborts) instead of hanging: a stalled or lost rank ends the run, and the launcher stops the others. Every group
    DeepSpeed made too: ZeRO's gathers run on a copy of the world group, created with torch's 30-minute default."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world  # no public setter for a live group

    for group in list(_world.pg_map):
        _set_pg_timeout(timedelta(seconds=seconds), group)


def set_cpu_threads() -> None:
    """Without OMP_NUM_THREADS (scripts/launch.sh sets 1; the deepspeed launcher does not forward it to other nodes),
    a rank takes its share of the node's cores, not every core as each of a node's ranks would by default."""
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_SIZE", "1"))))


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer (/dev/shm, 66 MB per rank).

    DeepSpeed never unlinks it: every CPU run would leave its buffers in RAM until reboot (measured: 19 GB after a
    day of runs on one machine), and a later run on the same port could map a stale one. Its initialisation maps all
    ranks' buffers, so init_distributed unlinks them right after it (and a barrier): the memory stays mapped while
    the ranks live and goes with the last of them, however they end (a killed run used to leave its buffers).
    """
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "")])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: ZeRO-3 initialises each partition from the same full-model draw."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_micro_step(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG of one micro-step's noise and timesteps, returned, and torch's global RNG (dropout, e.g. in LoRA
    adapters), seeded: pure functions of the step's coordinates, so a resumed run draws exactly what the
    uninterrupted run drew, with no RNG state to checkpoint."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, step, micro, rank)) % 2**63)
    torch.manual_seed(hash((seed, step, micro, rank, 1)) % 2**63)  # another stream: dropout masks apart from the noise
    return g


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """train.lr times this is the learning rate of optimizer step `step` (0-based): linear warmup that reaches the
    peak at step warmup_steps - 1 (the first step already moves the weights), then constant or cosine to min_lr.
    (`step` counts the steps applied: DeepSpeed does not advance the schedule over a step it skipped.)"""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "cosine":
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
        floor = train.min_lr / train.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def follow_run_schedule(engine, train: TrainConfig) -> float:
    """After a resume: make the restored schedule use this run's train.lr. Loading a checkpoint restores the
    scheduler's base rate and the optimizer's current rate (the checkpoint's train.lr), while the schedule's shape
    (warmup, cosine, min_lr, max_steps) is this run's: without this, lowering train.lr to rescue a diverging run
    would silently keep the old rate. Returns the checkpoint's base rate."""
    scheduler = engine.lr_scheduler
    saved = scheduler.base_lrs[0]
    scheduler.base_lrs = [train.lr] * len(scheduler.base_lrs)
    rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["initial_lr"], group["lr"] = train.lr, rate
    scheduler._last_lr = rates  # what get_last_lr() reports until the next step
    return saved


def optimizer_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list:
    """What AdamW steps. With weight decay, matrices (linear and embedding weights, LoRA adapters) decay and vectors
    (biases, norm gains) do not: decay would pull a norm's gain towards 0 (nanoGPT, litgpt and transformers' Trainer
    leave them out alike). Without weight decay, one group (a checkpoint resumes only into the grouping it was saved
    with: checkpoint.check_resume)."""
    if weight_decay == 0:
        return params
    matrices, vectors = [], []
    for p in params:
        (matrices if len(getattr(p, "ds_shape", p.shape)) >= 2 else vectors).append(p)  # (ZeRO-3: shape before split)
    return [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}] if vectors and matrices else params


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def without_muon_kernels() -> None:
    """DeepSpeed's ZeRO engine imports its Muon optimizer only to ask whether the optimizer is one, and that import
    torch.compile's Muon's kernels: ~1.5 s of CPU in every rank's start-up (~10% of a short CPU run's wall time). The
    optimizer is AdamW (the config check refuses any other type), so a stand-in module whose MuonWithAuxAdam nothing
    is an instance of answers the same. A process that imported the real one keeps it."""
    if MUON_MODULE not in sys.modules:
        stand_in = types.ModuleType(MUON_MODULE)
        stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (torch.optim.Optimizer,), {})
        sys.modules[MUON_MODULE] = stand_in


def build_engine(model: torch.nn.Module, ds_config: dict, train: TrainConfig):
    """Wrap the trainable model: DeepSpeed builds the optimizer from the resolved JSON; the schedule is the run
    config's (a LambdaLR, checkpointed by the engine; the config check refuses a DeepSpeed scheduler)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(["model.freeze_modules: froze every parameter, so there is nothing to train; unfreeze "
                           "something"])

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, train=train))

    without_muon_kernels()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(params, train.weight_decay),
                                           config=ds_config, lr_scheduler=schedule)
    from .model.vision import fp32_rope

    fp32_rope(engine.module)  # (a trainable ViT's RoPE buffers, cast to bf16 with the model below ZeRO-3)
    return engine
