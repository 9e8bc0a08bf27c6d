"""The three launch scripts: they train through the real launcher, resolve each knob (or leave the config's value),
stop and save on SIGTERM, and refuse bad knobs with a message naming the knob before anything starts."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from conftest import REPO, free_port

from lance_ds.data.tokenizer import DEBUG_TOKENIZER_DIR


def subset(example_data, tmp_path, tasks) -> str:
    groups = [g for g in yaml.safe_load(example_data["train"].read_text())["groups"] if g["name"] in tasks]
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return str(path)


TRAIN_ONE_STEP = ("train.max_steps=1", "validation.every=0", "data.packing_length=512", "log.progress_bar=false")


def run_script(name: str, tmp_path, timeout: float = 180, args=TRAIN_ONE_STEP, cwd=REPO, repo=REPO,
               **knobs: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONFIG_FILE": str(REPO / "configs/debug.yaml"),
           "OUTPUT_ROOT": str(tmp_path), "RUN_NAME": "run", "NUM_GPUS": "1", "MASTER_PORT": str(free_port()), **knobs}
    return subprocess.run(["bash", str(repo / "scripts" / name), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def repo_with_shards(root) -> object:
    """A copy of the repository's scripts and configs (lance_ds and ds_configs linked) whose shards/ holds a manifest
    for every task: the shipped configs' dataset YAMLs name ../../shards/TASKDIR, which a clean clone lacks."""
    import shutil

    repo = root / "repo"
    for name in ("scripts", "configs"):
        shutil.copytree(REPO / name, repo / name)
    for name in ("lance_ds", "ds_configs"):
        (repo / name).symlink_to(REPO / name)
    for task, directory in (("t2i", "text2image"), ("t2v", "text2video"), ("i2i", "image2image"),
                            ("v2v", "video2video"), ("i2t", "image2text"), ("v2t", "video2text")):
        (repo / "shards" / directory).mkdir(parents=True)
        (repo / "shards" / directory / "manifest.json").write_text(json.dumps(
            {"task": task, "num_samples": 1, "shards": [{"name": "shard-000000.tar", "num_samples": 1}]}))
    return repo


def config_seen(name: str, tmp_path, args=(), cwd=REPO, repo=REPO, **knobs: str) -> dict:
    """The run config lance_ds resolves from what the script launches: a stub `deepspeed` on PATH records the
    lance_ds/train.py command line it was asked to start, which is resolved here, where the script ran, as a rank
    resolves it (the script's own check before the launch runs as it does for users)."""
    from lance_ds.config import load_and_check
    from lance_ds.config.core import to_dict
    from lance_ds.train import parse_args

    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    launched = tmp_path / "launched_argv"
    (fake / "deepspeed").write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{launched}'\n")  # (NUL-separated)
    (fake / "deepspeed").chmod(0o755)
    proc = run_script(name, tmp_path, timeout=60, args=args, cwd=cwd, repo=repo, PATH=f"{fake}:{os.environ['PATH']}",
                      **knobs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = launched.read_bytes().decode().split("\0")[:-1]
    train = next(i for i, arg in enumerate(argv) if arg.endswith("/lance_ds/train.py"))
    launch = parse_args(argv[train + 1:])
    with contextlib.chdir(cwd):  # (paths relative to where the script was called, as the ranks read them)
        run, _ = load_and_check(launch.config, launch.overrides, launch.ds_config, world_size=1)
    return to_dict(run.config)


def test_a_script_trains_the_debug_config(example_data, tmp_path):
    """Through the real launcher, with knobs. (One script: the three differ only in their default CONFIG_FILE, which
    test_each_script_defaults_to_its_mixture checks; the stop test trains through sft_lance_unified.sh too.)"""
    script = "sft_lance_understand.sh"  # debug.yaml builds both paths: the knob turns generation off
    proc = run_script(script, tmp_path, args=(*TRAIN_ONE_STEP, "train.warmup_steps=5"),
                      DATASET_CONFIG_FILE=subset(example_data, tmp_path, ("i2t", "v2t")),
                      SAVE_EVERY="1", NUM_WORKERS="0", VISUAL_GEN="false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # a config warning is said once: by the script's check before the launch, not again by rank 0
    assert proc.stderr.count("warning: train.warmup_steps=5 is not below train.max_steps=1") == 1, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["num_workers"] == 0 and config["checkpoint"]["save_every"] == 1
    assert config["model"]["visual_gen"] is False
    # the run goes on with other data: refused by the script's check (naming the change), or, with
    # checkpoint.data_change=restart, from the checkpoint's weights and step on the new data from its beginning
    other = {"DATASET_CONFIG_FILE": subset(example_data, tmp_path, ("i2t",)), "NUM_WORKERS": "0", "VISUAL_GEN": "false"}
    two_steps = ("train.max_steps=2", *TRAIN_ONE_STEP[1:])
    proc = run_script(script, tmp_path, args=two_steps, **other)
    assert proc.returncode == 2 and "another data order (group v2t removed)" in proc.stderr, proc.stderr[-3000:]
    proc = run_script(script, tmp_path, args=(*two_steps, "checkpoint.data_change=restart"), **other)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the data order changed since step_00000001 was saved (group v2t removed)" in proc.stdout
    assert "resumed from" in proc.stdout and (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_knobs_not_set_leave_the_config_files_values(tmp_path):
    """A knob the user did not set passes nothing: CONFIG_FILE's own switches and dataset YAML apply (configs/tasks/
    i2t.yaml: model.visual_gen false, datasets/i2t.yaml); a knob that is set wins. (launch.sh, shared by the three.)"""
    repo = repo_with_shards(tmp_path)
    task_config = str(repo / "configs/tasks/i2t.yaml")
    random_3b = ("model.random_init=true", f"model.tokenizer_path={DEBUG_TOKENIZER_DIR}")  # (no model.path here)
    config = config_seen("sft_lance_unified.sh", tmp_path, random_3b, repo=repo, CONFIG_FILE=task_config)
    assert config["model"]["visual_gen"] is False and config["model"]["visual_und"] is True
    assert os.path.realpath(config["dataset_config"]) == str(repo / "configs/datasets/i2t.yaml")
    assert config["checkpoint"]["debug_step"] == 10 and config["data"]["num_workers"] == 4  # base.yaml's
    debug_size = ("model.size=debug",)  # generation at size 3b needs a model.vae_path
    config = config_seen("sft_lance_unified.sh", tmp_path, debug_size, repo=repo, CONFIG_FILE=task_config,
                         VISUAL_GEN="true")
    assert config["model"]["visual_gen"] is True


@pytest.mark.parametrize("script, mixture", [("sft_lance_unified.sh", "unified"),
                                             ("sft_lance_generation.sh", "multi_gen"),
                                             ("sft_lance_understand.sh", "multi_und")])
def test_each_script_defaults_to_its_mixture(script, mixture, tmp_path):
    repo = repo_with_shards(tmp_path)
    config = config_seen(script, tmp_path, ("model.size=debug",), repo=repo, CONFIG_FILE="")
    assert os.path.realpath(config["dataset_config"]) == str(repo / f"configs/datasets/{mixture}.yaml")
    assert config["model"]["visual_gen"] == (mixture != "multi_und") and config["model"]["visual_und"] is True


def test_path_knobs_reach_lance_ds_as_the_exact_path(example_data, tmp_path):
    """Override values are YAML: unquoted, "/x/it's #1: odd/val.yaml" would be cut at the '#' (or read as a mapping
    {"/x/it's #1": "odd/val.yaml"} without the '#')."""
    odd = tmp_path / "it's #1: odd"
    (odd / "model").mkdir(parents=True)
    (odd / "val.yaml").write_text((example_data["val"]).read_text())
    config = config_seen("sft_lance_unified.sh", tmp_path, DATASET_CONFIG_FILE=str(example_data["train"]),
                         VAL_DATASET_CONFIG_FILE=str(odd / "val.yaml"), OUTPUT_ROOT=str(odd))
    assert config["validation"]["dataset_config"] == str(odd / "val.yaml")
    assert config["output_dir"] == str(odd / "run")
    # an empty directory is no checkpoint: what matters here is the path lance_ds looked in (stub still on PATH)
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=60, DATASET_CONFIG_FILE=str(example_data["train"]),
                      MODEL_PATH=str(odd / "model"), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert proc.returncode == 2 and f"model.path {odd / 'model'} is neither a Lance checkpoint" in proc.stderr, \
        proc.stderr


def test_relative_paths_are_the_callers(example_data, tmp_path):
    """Knobs and overrides name files relative to where the script is called from, as train.py reads them."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.yaml").write_text(example_data["train"].read_text())
    (work / "run.yaml").write_text(yaml.safe_dump({"extends": str(REPO / "configs/debug.yaml")}))
    config = config_seen("sft_lance_unified.sh", tmp_path, cwd=work, CONFIG_FILE="run.yaml", OUTPUT_ROOT="out",
                         DATASET_CONFIG_FILE="data/train.yaml", args=["validation.dataset_config=data/train.yaml"])
    assert config["dataset_config"] == config["validation"]["dataset_config"] == str(work / "data" / "train.yaml")
    assert config["output_dir"] == "out/run"  # (relative: train.py runs where the script was called)


def test_a_configs_output_dir_stands_unless_a_knob_names_another(example_data, tmp_path):
    """Every run went to runs/<config file name>: two experiments' train.yaml shared runs/train, and the second
    resumed the first's checkpoint. The config's output_dir stands unless RUN_NAME or OUTPUT_ROOT is set."""
    work = tmp_path / "work"
    (work / "expA").mkdir(parents=True)
    (work / "expA" / "train.yaml").write_text(yaml.safe_dump({"extends": str(REPO / "configs/debug.yaml"),
                                                              "output_dir": "scratch/expA"}))
    seen = functools.partial(config_seen, "sft_lance_unified.sh", tmp_path, cwd=work, CONFIG_FILE="expA/train.yaml",
                             DATASET_CONFIG_FILE=str(example_data["train"]), VALIDATION_STEP="0")
    assert seen(OUTPUT_ROOT="", RUN_NAME="")["output_dir"] == "scratch/expA"
    assert seen(OUTPUT_ROOT="", RUN_NAME="try2")["output_dir"] == "runs/try2"
    assert seen(OUTPUT_ROOT="out", RUN_NAME="")["output_dir"] == "out/train"


def test_zero_turns_the_debug_save_and_validation_off(example_data, tmp_path):
    """checkpoint.debug_step=0 and validation.every=0 mean off: CKPT_DEBUG_STEPS=0 and VALIDATION_STEP=0 say so."""
    config = config_seen("sft_lance_unified.sh", tmp_path, DATASET_CONFIG_FILE=str(example_data["train"]),
                         CKPT_DEBUG_STEPS="0", VALIDATION_STEP="0")  # debug.yaml: validation.every 200
    assert config["checkpoint"]["debug_step"] == 0 and config["validation"]["every"] == 0


def job_processes(script: int, mark: str) -> list[str]:
    """'pid ppid status command' of the script's descendants and of any process whose command line names `mark`
    (ranks and loader workers orphaned by a launcher that exited)."""
    try:
        family = {p.pid for p in psutil.Process(script).children(recursive=True)} | {script}
    except psutil.Error:
        family = set()
    found = []
    for p in psutil.process_iter(["pid", "ppid", "status", "cmdline"]):
        command = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] in family or mark in command:
            found.append(f"{p.info['pid']} {p.info['ppid']} {p.info['status']} {command[:120]}")
    return found


def test_a_stop_signal_to_the_script_reaches_the_ranks_which_save_and_stop(example_data, tmp_path):
    """DeepSpeed's runner passes no signal on to the ranks of one node: `kill PID`, `docker stop` (SIGTERM) or Ctrl-C
    (SIGINT) on the script must still end the job with a checkpoint of the step it was in, not leave the ranks
    training unsaved. The save may take longer than the 30 s after which DeepSpeed's launcher kills ranks it has
    signalled (a 3B model's optimizer state): the script signals the ranks, not the launcher (here the stop's save
    takes 32 s; both signals take the same path: Ctrl-C, sent here, went to the launcher too and lost the save). And
    the console may be gone by then (multi-node ranks write into ssh pipes that end first): the next progress-bar
    update raised BrokenPipeError, and the rank died unsaved before the stop reached it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONFIG_FILE": "configs/debug.yaml", "OUTPUT_ROOT": str(tmp_path),
           "RUN_NAME": "run", "NUM_GPUS": "1", "MASTER_PORT": str(free_port()), "NUM_WORKERS": "1",
           "DATASET_CONFIG_FILE": subset(example_data, tmp_path, ("t2i", "i2t")), "CKPT_DEBUG_STEPS": "1",
           "SAVE_EVERY": "1000", "LANCE_DS_FAULT": "slow_stop_save:32"}
    # Ctrl-C reaches a job started from a terminal: SIGINT not ignored, whatever this process inherited (a shell's
    # background job starts with SIGINT ignored, and a shell cannot trap a signal ignored when it started)
    proc = subprocess.Popen(["bash", "scripts/sft_lance_unified.sh", "train.max_steps=1000", "validation.every=0",
                             "data.packing_length=512"], cwd=REPO, env=env,  # the progress bar on (the default)
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:  # step 1 saved: training
        time.sleep(0.05)
    proc.stdout.close()  # the console goes away
    time.sleep(3)  # steps go on, each one writing to it
    assert proc.poll() is None, "the job died when its console went away"
    proc.send_signal(signal.SIGINT)  # to the script alone, as a terminal's Ctrl-C (the job has a session of its own)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        left = job_processes(proc.pid, str(tmp_path))  # (what still ran, to say where it hung)
        for line in left:  # the script and the job, which runs in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        raise AssertionError(f"the job did not stop within 120 s of SIGINT; still there: {left}") from None
    # (step 1 was the only save before the stop: a later step is the stop's save, which outlasted the launcher's 30 s)
    assert 1 < int(latest.read_text().strip().removeprefix("step_")) < 1000 and proc.returncode != 0
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("knob, value, message", [
    ("NUM_GPUS", "0", "NUM_GPUS must be a positive integer"),
    ("SAVE_EVERY", "ten", "SAVE_EVERY must be a positive integer"),
    ("SAVE_EVERY", "0", "SAVE_EVERY must be a positive integer"),
    ("CKPT_DEBUG_STEPS", "-1", "CKPT_DEBUG_STEPS must be an integer >= 0"),
    ("VALIDATION_STEP", "01", "VALIDATION_STEP must be an integer >= 0"),
    ("VISUAL_GEN", "maybe", "VISUAL_GEN must be true or false"),
    ("MODEL_PATH", "/no/such/model", "MODEL_PATH names '/no/such/model', which is not a directory"),
    ("DATASET_CONFIG_FILE", "/no/such.yaml", "DATASET_CONFIG_FILE names '/no/such.yaml', which is not a file"),
    ("NUM_NODES", "2", "NUM_NODES=2 needs HOSTFILE"),
])
def test_bad_knob_is_refused_before_launch(knob, value, message, example_data, tmp_path):
    knobs = {"DATASET_CONFIG_FILE": str(example_data["train"]), knob: value}
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=30, **knobs)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_python_without_lance_ds_is_told_how_to_set_up(tmp_path):
    """The scripts are run from a shell where the venv is not active: the message names the python and the fix."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # -S: no site-packages (no torch)
    (fake / "python").chmod(0o755)
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=30, PATH=f"{fake}:{os.environ['PATH']}")
    assert proc.returncode == 2 and f"this python ({fake / 'python'}) cannot import" in proc.stderr, proc.stderr
    assert "scripts/setup_env.sh" in proc.stderr


def test_config_problem_is_refused_before_launch(example_data, tmp_path):
    proc = run_script("sft_lance_understand.sh", tmp_path, timeout=60, DATASET_CONFIG_FILE=str(example_data["train"]),
                      VISUAL_GEN="false")
    assert proc.returncode == 2
    assert "model.visual_gen is false" in proc.stderr and "deepspeed" not in proc.stdout.lower()
    # a group whose samples cannot fit a packed sequence: found from a few samples (it was found only by the ranks,
    # after the launch and the model's build)
    proc = run_script("sft_lance_understand.sh", tmp_path, timeout=60, args=(*TRAIN_ONE_STEP, "data.packing_length=24"),
                      DATASET_CONFIG_FILE=subset(example_data, tmp_path, ("i2t",)), VISUAL_GEN="false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "(i2t): the 8 samples read across its shards are" in proc.stderr
    assert "all longer than data.packing_length=24" in proc.stderr and "deepspeed" not in proc.stdout.lower()


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
    # launched from a machine without GPUs (a login node): what needs the ranks' GPUs is theirs to check
    gpu_only = (*TRAIN_ONE_STEP, "train.precision=fp16")
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=60, args=gpu_only, **knobs, NUM_GPUS="")
    assert proc.returncode == 0, proc.stderr
    here = {k: v for k, v in knobs.items() if k != "HOSTFILE"}
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=60, args=gpu_only, **here)
    assert proc.returncode == 2 and "fp16 needs a GPU" in proc.stderr, proc.stderr



def test_cuda_visible_devices_choose_the_gpus(example_data, tmp_path):
    """Given --num_gpus, DeepSpeed's runner drops CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1: a job told to use GPUs
    4-7 of a shared machine trained on 0-3. The scripts name the visible GPUs instead (a stub reports 4 GPUs, as
    torch does under CUDA_VISIBLE_DEVICES=4,5,6,7; a stub deepspeed records what it is asked to run)."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", repo / "scripts")
    for name in ("lance_ds", "configs", "ds_configs"):
        (repo / name).symlink_to(REPO / name)
    (repo / "scripts" / "num_ranks.sh").write_text("echo 4\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'launched'}\n")
    (fake / "deepspeed").chmod(0o755)
    knobs = {"DATASET_CONFIG_FILE": str(example_data["train"]), "PATH": f"{fake}:{os.environ['PATH']}"}

    def launched(**more: str) -> str:
        proc = run_script("sft_lance_unified.sh", tmp_path, timeout=60, repo=repo, **{**knobs, **more})
        assert proc.returncode == 0, proc.stderr
        return (tmp_path / "launched").read_text()

    every = launched(CUDA_VISIBLE_DEVICES="4,5,6,7", NUM_GPUS="")
    assert "--include localhost:4,5,6,7" in every and "--num_gpus" not in every
    assert "--include localhost:4,5 " in launched(CUDA_VISIBLE_DEVICES="4,5,6,7", NUM_GPUS="2")
    assert "--num_gpus 4" in launched(CUDA_VISIBLE_DEVICES="", NUM_GPUS="")  # not set: DeepSpeed's numbering
    proc = run_script("sft_lance_unified.sh", tmp_path, timeout=60, repo=repo,
                      **{**knobs, "CUDA_VISIBLE_DEVICES": "4,5", "NUM_GPUS": "3"})
    assert proc.returncode == 2 and "NUM_GPUS=3 but CUDA_VISIBLE_DEVICES=4,5 names 2 GPU(s)" in proc.stderr
