"""The three launch scripts: each runs the debug config for a step through the real launcher, and bad knobs are
refused with a message naming the knob before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from conftest import REPO, free_port

SCRIPTS = {  # script -> the tasks its default switches serve
    "sft_lance_unified.sh": ("t2i", "i2t"),
    "sft_lance_generation.sh": ("t2i", "i2i"),
    "sft_lance_understand.sh": ("i2t", "v2t"),
}


def subset(example_data, tmp_path, tasks) -> str:
    groups = [g for g in yaml.safe_load(example_data["train"].read_text())["groups"] if g["name"] in tasks]
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return str(path)


def run_script(name: str, tmp_path, timeout: float = 180, **knobs: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONFIG_FILE": "configs/debug.yaml", "OUTPUT_ROOT": str(tmp_path),
           "RUN_NAME": "run", "NUM_GPUS": "1", "MASTER_PORT": str(free_port()), **knobs}
    return subprocess.run(["bash", f"scripts/{name}", "train.max_steps=1", "validation.every=0",
                           "data.packing_length=512", "log.progress_bar=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_trains_the_debug_config(script, example_data, tmp_path):
    proc = run_script(script, tmp_path, DATASET_CONFIG_FILE=subset(example_data, tmp_path, SCRIPTS[script]),
                      SAVE_EVERY="1", NUM_WORKERS="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["num_workers"] == 0 and config["checkpoint"]["save_every"] == 1
    assert config["model"]["visual_gen"] == (script != "sft_lance_understand.sh")


def test_sigterm_to_the_script_reaches_the_ranks_which_save_and_stop(example_data, tmp_path):
    """DeepSpeed's runner passes no signal on to the ranks of one node: `kill PID` or `docker stop` on the script
    must still end the job with a checkpoint of the step it was in, not leave the ranks training unsaved."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONFIG_FILE": "configs/debug.yaml", "OUTPUT_ROOT": str(tmp_path),
           "RUN_NAME": "run", "NUM_GPUS": "1", "MASTER_PORT": str(free_port()), "NUM_WORKERS": "1",
           "DATASET_CONFIG_FILE": subset(example_data, tmp_path, ("t2i", "i2t")), "CKPT_DEBUG_STEPS": "1",
           "SAVE_EVERY": "1000"}
    proc = subprocess.Popen(["bash", "scripts/sft_lance_unified.sh", "train.max_steps=1000", "validation.every=0",
                             "data.packing_length=512", "log.progress_bar=false"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:  # step 1 saved: training
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the script alone
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not stop within 120 s of SIGTERM:\n{proc.communicate()[0][-3000:]}")
    stopped = int(latest.read_text().strip().removeprefix("step_"))
    assert 1 < stopped < 1000 and proc.returncode != 0
    assert f"stopped by SIGTERM at step {stopped} of 1000" in log, log[-3000:]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("knob, value, message", [
    ("NUM_GPUS", "0", "NUM_GPUS must be a positive integer"),
    ("SAVE_EVERY", "ten", "SAVE_EVERY must be a positive integer"),
    ("VISUAL_GEN", "maybe", "VISUAL_GEN must be true or false"),
    ("MODEL_PATH", "/no/such/model", "MODEL_PATH names '/no/such/model', which is not a directory"),
    ("DATASET_CONFIG_FILE", "/no/such.yaml", "DATASET_CONFIG_FILE names '/no/such.yaml', which is not a file"),
    ("NUM_NODES", "2", "NUM_NODES=2 needs HOSTFILE"),
])
def test_bad_knob_is_refused_before_launch(knob, value, message, example_data, tmp_path):
    knobs = {"DATASET_CONFIG_FILE": str(example_data["train"]), knob: value}
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=30, **knobs)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_config_problem_is_refused_before_launch(example_data, tmp_path):
    proc = run_script("sft_lance_understand.sh", tmp_path, timeout=60, DATASET_CONFIG_FILE=str(example_data["train"]))
    assert proc.returncode == 2
    assert "model.visual_gen is false" in proc.stderr and "deepspeed" not in proc.stdout.lower()


def test_the_check_before_launch_uses_the_run_world_size(example_data, tmp_path):
    """train_batch_size = micro x grad_accum x world size: 1 is right for one rank, wrong for NUM_GPUS=2."""
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["train_batch_size"] = 1
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    knobs = {"DATASET_CONFIG_FILE": str(example_data["train"]), "DS_CONFIG": str(tmp_path / "ds.json")}
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=60, **knobs, NUM_GPUS="2")
    assert proc.returncode == 2 and "train_batch_size" in proc.stderr, proc.stderr
    assert "deepspeed" not in (proc.stdout + proc.stderr).lower()  # refused before the launcher started a rank


def test_a_hostfile_sets_nodes_and_ranks_from_its_slots(example_data, tmp_path):
    """With HOSTFILE, each node runs its own slots (not the launching machine's GPU count) on every listed host,
    unless NUM_NODES / NUM_GPUS say otherwise; the config is checked for that world size."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'launched'}\n")
    (fake / "deepspeed").chmod(0o755)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b slots=3\n\n")
    knobs = {"DATASET_CONFIG_FILE": str(example_data["train"]), "HOSTFILE": str(hostfile),
             "PATH": f"{fake}:{os.environ['PATH']}", "MASTER_ADDR": "10.0.0.1"}
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=60, **knobs, NUM_GPUS="")  # empty: not given
    assert proc.returncode == 0, proc.stderr
    assert "5 rank(s) on 2 node(s)" in proc.stderr
    launched = (tmp_path / "launched").read_text()
    assert "--hostfile" in launched and "--num_nodes 2" in launched and "--num_gpus" not in launched
    assert "--master_addr 10.0.0.1" in launched
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=60, **knobs, NUM_NODES="1", NUM_GPUS="4")
    assert proc.returncode == 0 and "4 rank(s) on 1 node(s)" in proc.stderr, proc.stderr
    assert "--num_gpus 4" in (tmp_path / "launched").read_text()
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=30, **knobs, NUM_NODES="3", NUM_GPUS="")
    assert proc.returncode == 2 and "NUM_NODES=3 but HOSTFILE lists 2 host(s)" in proc.stderr

