"""Helpers the benchmarks share: the machine line every figure needs, the example data as shards, a work directory,
and rank processes spawned as one process group (each prints one JSON result line)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULT_PREFIX = "BENCH_RESULT "


def noisy_jpeg(rng: np.random.Generator, side: int, quality: int) -> bytes:
    """A JPEG of smooth noise: decodes like a photo (not a flat image) and does not compress away."""
    from PIL import Image

    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    detail = rng.integers(0, 64, (side, side, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR)) // 4 * 3 + detail
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def machine_line() -> str:
    """CPU count and load averages (1, 5, 15 min): the context every figure here needs."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {load}"


def example_dataset(root: Path, num_per_task: int = 32, split: str = "train") -> str:
    """The six-task example data (`split`: train, or the held-out val scenes) as shards under `root`, with the groups
    of configs/datasets/example.yaml (example_val.yaml), their weights and resolutions, the main job's recipe;
    returns the dataset YAML's path."""
    import yaml

    from lance_ds.config.data import TASKS
    from lance_ds.data.convert import ConvertOptions, convert
    from lance_ds.data.example import ExampleConfig, write_example_dataset
    from lance_ds.data.schemas import SCHEMAS

    write_example_dataset(root / "parquet", ExampleConfig(num_per_task=num_per_task, split=split))
    recipe = REPO / "configs" / "datasets" / ("example.yaml" if split == "train" else "example_val.yaml")
    groups = {g["name"]: g for g in yaml.safe_load(recipe.read_text())["groups"]}
    for task in TASKS:
        out = root / "shards" / task
        convert(ConvertOptions(inputs=[str(root / "parquet" / SCHEMAS[task].dir_name)], output=str(out),
                               samples_per_shard=8, verify="none", progress=False))  # >= 2 shards per rank
        groups[task]["shards"] = str(out)
    path = root / "datasets.yaml"
    path.write_text(yaml.safe_dump({"groups": list(groups.values())}))
    return str(path)


@contextlib.contextmanager
def work_dir(path: str | None, prefix: str):
    """`path` (kept) or a temporary directory (removed afterwards)."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(script: str, argv: list[str], num_ranks: int, threads: int, log_dir: Path,
                timeout_s: float = 900.0) -> dict:
    """Run `script --worker argv` as `num_ranks` ranks of one process group; returns rank 0's result (JSON)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WORLD_SIZE": str(num_ranks), "LOCAL_SIZE": str(num_ranks),  # as the deepspeed launcher
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs, logs = [], []
    for rank in range(num_ranks):
        logs.append(log_dir / f"rank{rank}.log")
        with open(logs[-1], "w") as log:  # a file, not a pipe: a full pipe would block the rank
            procs.append(subprocess.Popen([sys.executable, script, "--worker", *argv], cwd=REPO, stdout=log,
                                          stderr=subprocess.STDOUT,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    deadline = time.monotonic() + timeout_s
    try:
        for rank, proc in enumerate(procs):
            if proc.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                tail = logs[rank].read_text()[-3000:]
                raise RuntimeError(f"rank {rank} of {script} exited with {proc.returncode}:\n{tail}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    text = logs[0].read_text()
    if RESULT_PREFIX not in text:
        raise RuntimeError(f"rank 0 printed no result; see {logs[0]}")
    return json.loads(text.rsplit(RESULT_PREFIX, 1)[1].splitlines()[0])  # the line may follow a progress bar's \r


def print_result(result: dict) -> None:
    """What a worker hands back to spawn_ranks (rank 0 only)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
