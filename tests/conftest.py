"""Shared test fixtures: example shards made by the real tools, and the real `deepspeed` launcher on CPU ranks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# A tiny Lance model, one packed batch and the original code's outputs for it (a copy of reference/lance_tiny from
# the project's shared reference, kept in the repo so that a clean clone tests parity); LANCE_REFERENCE_DIR overrides.
LANCE_TINY = Path(os.environ.get("LANCE_REFERENCE_DIR", REPO / "tests" / "fixtures")) / "lance_tiny"
TASK_DIRS = {"t2i": "text2image", "t2v": "text2video", "i2i": "image2image", "v2v": "video2video",
             "i2t": "image2text", "v2t": "video2text"}
# group image.resolution of the test datasets: the main job's 16 px for generation (4 x 4 latent tokens of the debug
# codec), 56 px for understanding (2 x 2 ViT tokens), so a 512-token pack holds every task's samples
RESOLUTION = {"t2i": 16, "t2v": 16, "i2i": 16, "v2v": 16, "i2t": 56, "v2t": 56}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_gloo_ranks(work) -> dict[int, object]:
    """work(rank) run in 2 forked processes joined by a real gloo process group; what each returned, by rank."""
    import multiprocessing

    def rank_main(rank: int, port: int, results) -> None:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        try:
            results.put((rank, work(rank)))
        finally:
            dist.destroy_process_group()

    context = multiprocessing.get_context("fork")
    results, port = context.Queue(), free_port()
    procs = [context.Process(target=rank_main, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    return got


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def make_shards(root: Path, split: str, num_per_task: int, tasks=tuple(TASK_DIRS)) -> Path:
    """Parquet from tools/make_example_dataset.py, shards from tools/parquet_to_wds.py, and a dataset YAML."""
    parquet = root / f"parquet_{split}"
    run_tool("tools/make_example_dataset.py", "--out", str(parquet), "--split", split, "--num-per-task",
             str(num_per_task), "--tasks", *tasks)
    groups = []
    for task in tasks:
        out = root / f"shards_{split}" / TASK_DIRS[task]
        run_tool("tools/parquet_to_wds.py", "--input", str(parquet / TASK_DIRS[task]), "--output", str(out),
                 "--samples-per-shard", str(max(1, num_per_task // 4)), "--no-progress")
        groups.append({"name": task, "shards": [str(out)], "weight": 1.0, "image": {"resolution": RESOLUTION[task]}})
    path = root / f"{split}.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


@pytest.fixture(scope="session")
def example_data(tmp_path_factory) -> dict[str, Path]:
    """Train and held-out dataset YAMLs over converter shards of all six tasks (small, made once per session)."""
    root = tmp_path_factory.mktemp("example")
    return {"train": make_shards(root, "train", 24), "val": make_shards(root, "val", 8)}


def deepspeed_cmd(num_ranks: int, *args: str, port: int = 0) -> list[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", str(num_ranks), "--master_port", str(port or free_port()),
            str(REPO / "lance_ds" / "train.py"), *args]


def launch_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def launch(args: list[str], num_ranks: int = 2, timeout: float = 240, env: dict | None = None,
           check: bool = True, port: int = 0) -> subprocess.CompletedProcess:
    """Run lance_ds/train.py under the real deepspeed launcher (its own process group, killed on timeout)."""
    proc = subprocess.Popen(deepspeed_cmd(num_ranks, *args, port=port), cwd=REPO, env=env or launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"training hung for {timeout} s:\n{out[-4000:]}")
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    if check:
        assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{out[-4000:]}"
    return result


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """TensorBoard scalars read back from the event files: tag -> step -> the most recently written value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
            out.setdefault(tag, {})[event.step] = event.value
    return out


@pytest.fixture
def dataset_dir(tmp_path):
    """(config tests) Two converter-like output dirs (a manifest is all the config layer reads) and a dataset YAML."""
    for name, task in (("t2i", "t2i"), ("i2t", "i2t")):
        d = tmp_path / "shards" / name
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"task": task, "num_samples": 1,
                                                   "shards": [{"name": "shard-000000.tar", "num_samples": 1}]}))
    ds = {"groups": [{"name": "gen", "shards": "shards/t2i"}, {"name": "und", "shards": ["shards/i2t"]}]}  # one or a list
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(ds))
    return tmp_path


# one 2-rank training launch shared by tests/unit/test_generate.py (which is also its worker) and test_export.py:
# defined here, once, so pytest runs it once per session (per xdist worker)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> dict:
    from test_generate import launch_runs

    return launch_runs(tmp_path_factory.mktemp("generate_runs"))


@pytest.fixture(scope="session")
def exported(trained_runs, tmp_path_factory) -> Path:
    """The full run exported (plain weights)."""
    from lance_ds.export import export_checkpoint

    return export_checkpoint(trained_runs["full"], tmp_path_factory.mktemp("exp") / "plain")


@pytest.fixture(scope="session")
def from_checkpoint(trained_runs):
    from lance_ds.generate import Generator

    return Generator.from_checkpoint(trained_runs["full"], device="cpu")
