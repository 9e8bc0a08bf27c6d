"""lance_ds.engine: the learning-rate schedule across a resume, on a plain torch optimizer (the LambdaLR that
build_engine hands DeepSpeed, saved and loaded as the engine's checkpoint does); the ranks a launcher describes."""

import functools
import os
from types import SimpleNamespace

import pytest
import torch

from lance_ds.config.run import TrainConfig
from lance_ds.engine import follow_run_schedule, launcher_env, lr_multiplier, optimizer_groups, set_cpu_threads


def scheduled(train: TrainConfig):
    """An optimizer and the schedule build_engine gives DeepSpeed, as an engine-like object."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, train=train))
    return SimpleNamespace(optimizer=optimizer, lr_scheduler=scheduler)


def test_a_resume_with_a_new_lr_follows_it_from_the_step_it_resumes_at():
    first = TrainConfig(lr=2e-3, warmup_steps=2, lr_schedule="cosine", max_steps=10, min_lr=0.0)
    run = scheduled(first)
    for _ in range(5):
        run.optimizer.step()
        run.lr_scheduler.step()
    saved = (run.optimizer.state_dict(), run.lr_scheduler.state_dict())

    lowered = TrainConfig(lr=1e-5, warmup_steps=2, lr_schedule="cosine", max_steps=10, min_lr=0.0)
    resumed = scheduled(lowered)
    resumed.optimizer.load_state_dict(saved[0])  # what the engine's checkpoint restores: the old rates
    resumed.lr_scheduler.load_state_dict(saved[1])
    assert follow_run_schedule(resumed, lowered) == pytest.approx(2e-3)
    rate = resumed.optimizer.param_groups[0]["lr"]
    assert rate == pytest.approx(1e-5 * lr_multiplier(5, lowered))  # the next step's rate, at the new peak
    assert resumed.lr_scheduler.get_last_lr() == [rate]
    resumed.optimizer.step()
    resumed.lr_scheduler.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * lr_multiplier(6, lowered))


def test_an_unchanged_lr_resumes_the_same_rates():
    train = TrainConfig(lr=1e-3, warmup_steps=3, max_steps=8)
    run = scheduled(train)
    for _ in range(4):
        run.optimizer.step()
        run.lr_scheduler.step()
    before = run.optimizer.param_groups[0]["lr"]
    assert follow_run_schedule(run, train) == pytest.approx(1e-3)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(before)


def test_a_resume_names_the_schedule_settings_it_changes():
    from lance_ds.trainer import schedule_changes

    saved = {"lr": 2e-3, "lr_schedule": "cosine", "warmup_steps": 2, "min_lr": 1e-4, "max_steps": 4}
    same = TrainConfig(lr=2e-3, lr_schedule="cosine", warmup_steps=2, min_lr=1e-4, max_steps=4)
    assert schedule_changes(saved, same) == []
    longer = TrainConfig(lr=2e-3, lr_schedule="cosine", warmup_steps=2, min_lr=1e-4, max_steps=8)
    assert schedule_changes(saved, longer) == ["train.max_steps 4 -> 8"]  # the cosine horizon moved
    constant = {**saved, "lr_schedule": "constant"}
    assert schedule_changes(constant, TrainConfig(lr=1e-5, lr_schedule="constant", warmup_steps=2, min_lr=1e-4,
                                                  max_steps=8)) == ["train.lr 0.002 -> 1e-05"]


def test_a_rank_without_omp_num_threads_takes_its_share_of_the_cores(monkeypatch):
    """Ranks on another node get no OMP_NUM_THREADS from the deepspeed launcher: each would take every core."""
    import os

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        torch.set_num_threads(cores + 3)
        set_cpu_threads()
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the launcher set is left alone
        torch.set_num_threads(3)
        set_cpu_threads()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_ranks_that_srun_or_mpirun_start_themselves_are_read_from_their_variables():
    srun = {"SLURM_STEP_NUM_TASKS": "6", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2),3"}
    assert launcher_env(srun) == ("srun", {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3"})
    mpirun = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
              "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert launcher_env(mpirun) == ("mpirun", {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                               "LOCAL_WORLD_SIZE": "2"})
    assert launcher_env({**srun, "RANK": "0"}) is None  # torchrun / deepspeed inside srun: theirs is what counts
    assert launcher_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) is None  # a batch script's plain python: one rank
    assert launcher_env({**srun, "SLURM_STEP_NUM_TASKS": "1"}) is None


def test_weight_decay_spares_biases_and_norm_gains():
    """Decay would pull a norm's gain towards 0: only matrices decay (one group, as before, without weight decay)."""
    from lance_ds.config.model import ModelConfig
    from lance_ds.model import build_model

    model = build_model(ModelConfig(size="debug", dtype="fp32", vit_dtype="fp32"), 300).model
    params = [p for p in model.parameters() if p.requires_grad]
    assert optimizer_groups(params, 0.0) == params
    decayed, spared = optimizer_groups(params, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "weight_decay" not in decayed and spared["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in spared["params"])
    spared_names = [names[id(p)] for p in spared["params"]]
    assert any("norm" in n for n in spared_names) and not any(n.endswith("proj.weight") for n in spared_names)
    assert len(decayed["params"]) + len(spared["params"]) == len(params)
    optimizer = torch.optim.AdamW(optimizer_groups(params, 0.1), lr=1.0, weight_decay=0.1)
    norm = next(p for n, p in model.named_parameters() if "norm" in n and p.ndim == 1)
    matrix = decayed["params"][0]
    norm_before, matrix_before = norm.detach().clone(), matrix.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)  # zero gradients: only decay moves a parameter
    optimizer.step()
    assert torch.equal(norm, norm_before) and torch.allclose(matrix, matrix_before * 0.9)


def test_a_build_lock_left_by_a_killed_process_is_removed_and_a_live_build_is_left_alone(tmp_path, monkeypatch,
                                                                                          capsys):
    """torch's JIT build lock of a DeepSpeed op outlives a process killed while holding it, and every later start
    waited for it forever. Once per node, before any rank loads an op, a lock that stays the same file while nothing
    works in its directory is removed, with a line saying so; a build in progress (a process working in the
    directory, or a lock taken again meanwhile) keeps its lock."""
    import subprocess
    import threading

    from lance_ds.engine import remove_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for op in ("left_by_a_kill", "being_built", "taken_again"):
        (tmp_path / op).mkdir()
        (tmp_path / op / "lock").touch()
    compiler = subprocess.Popen(["sleep", "30"], cwd=tmp_path / "being_built")  # as ninja runs in the build dir

    def take_again():  # another rank releases its lock and the next one takes it
        (tmp_path / "taken_again" / "lock").unlink()
        (tmp_path / "taken_again" / "lock").touch()

    timer = threading.Timer(0.2, take_again)
    timer.start()
    try:
        remove_stale_build_locks(recheck_s=0.6)
    finally:
        compiler.kill()
        timer.join()
    assert not (tmp_path / "left_by_a_kill" / "lock").exists()
    assert (tmp_path / "being_built" / "lock").exists() and (tmp_path / "taken_again" / "lock").exists()
    said = capsys.readouterr().err
    assert f"removed {tmp_path / 'left_by_a_kill' / 'lock'}" in said and said.count("removed") == 1


def test_a_task_bound_to_its_own_gpu_uses_the_one_it_sees(monkeypatch):
    """srun --gpus-per-task=1 gives task 3 of a node one visible GPU, cuda:0: its SLURM_LOCALID named cuda:3, which
    DeepSpeed's init_process_group refused ("device_id cuda:3 is out of range")."""
    import deepspeed

    from lance_ds import engine

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: seen.setdefault("set", index))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.setdefault("local", os.environ["LOCAL_RANK"]))
    monkeypatch.setattr(engine, "release_shm_buffer", lambda: None)
    monkeypatch.setattr(engine, "remove_stale_build_locks", lambda: None)
    monkeypatch.setattr(engine, "set_cpu_threads", lambda: None)
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_WORLD_SIZE", "8"),
                        ("LOCAL_SIZE", "8"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, value)  # (all restored after the test)
    info = engine.init_distributed()
    assert seen == {"local": "0", "set": 0} and info.device == torch.device("cuda", 0) and info.rank == 3
