"""The trainer under the real `deepspeed` launcher with 2 CPU ranks, on shards made by the real converter:
the loss falls, TensorBoard and checkpoints are written, and every way a run can stop - a clean end, SIGKILL during
training, SIGKILL during a save - resumes to exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import REPO, RESOLUTION, deepspeed_cmd, free_port, launch, launch_env, read_scalars

STEPS = 8
NAN_AT = "nan_loss:3"  # every run: one rank's loss of step 3 is NaN, so step 3 is skipped on both ranks


def train_args(out: Path, data: dict, steps: int = STEPS, *extra: str) -> list[str]:
    return ["--ds_config", str(REPO / "ds_configs/zero3.json"), "--config", str(REPO / "configs/debug.yaml"),
            "--dataset_config", str(data["train"]), "--output_dir", str(out),
            f"train.max_steps={steps}", "train.warmup_steps=2", "train.lr_schedule=constant", "log.every=3",
            "data.packing_length=512", "checkpoint.save_every=2", "checkpoint.keep_last=2", "train.ema_decay=0.9",
            "validation.every=0", "train.grad_accum=2",
            "train.weight_decay=0.1", *extra]  # (weight decay: two optimizer groups, which every resume must restore)


# log.every=3 with save_every=2: scalars every third step and at the end, whatever the saves (a checkpoint carries
# its logging window), so a run resumed mid-window (at 2, 4, or where a SIGTERM stopped it) logs the points of one
# that was not
LOGGED = [3, 6, 8]
LOSSES_LOGGED = [3, 6, 8]  # (the window of step 3 averages steps 1 and 2: step 3, NaN, was skipped)


def losses(run_dir: Path) -> dict[int, float]:
    return read_scalars(run_dir)["train/loss"]


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps of a scalar as TensorBoard shows them (points purged by a later writer's purge step left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def read_images(run_dir: Path) -> dict[str, dict[int, tuple[int, int]]]:
    """TensorBoard images: tag -> step -> (height, width)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: {e.step: (e.height, e.width) for e in acc.Images(tag)} for tag in acc.Tags()["images"]}


def read_texts(run_dir: Path, tag: str) -> dict[int, str]:
    """A TensorBoard text: step -> its markdown."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


def latest(run_dir: Path) -> str:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else ""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, example_data) -> Path:
    """An uninterrupted 2-rank run with validation at steps 0, 4 and 8."""
    out = tmp_path_factory.mktemp("reference") / "run"
    port = free_port()
    launch(train_args(out, example_data, STEPS, "validation.every=4",
                      f"validation.dataset_config={example_data['val']}", "validation.max_samples=4",
                      "validation.num_generations=1", "validation.sample_steps=2", "validation.max_new_tokens=4"),
           env=launch_env(LANCE_DS_FAULT=NAN_AT), port=port)
    left = shm_buffers(port)
    assert not left, f"a finished run left DeepSpeed's shared-memory buffers behind: {sorted(left)}"
    return out


def shm_buffers(*ports: int) -> set[str]:
    """This user's DeepSpeed CPU all-reduce buffers in /dev/shm (66 MB per rank each) of the jobs on these master
    ports, which the buffers' names carry (other tests' jobs may run beside, on the other pytest-xdist worker)."""
    return {p.name for port in ports
            for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")}


def test_training_writes_what_users_watch(reference):
    scalars = read_scalars(reference)
    for tag in ("train/loss", "train/ce", "train/mse", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/tflops_per_rank",
                "train/ce/i2t", "train/mse/t2i", "train/mse/v2v", "data/skipped", "memory/host_rss_gb",
                "val/loss", "val/ce/v2t", "val/mse/i2i"):
        assert tag in scalars, f"missing TensorBoard scalar {tag}"
    assert "train/mfu" not in scalars and all(v > 0 for v in scalars["train/tflops_per_rank"].values())  # no CPU peak
    loss = scalars["train/loss"]
    assert sorted(loss) == LOSSES_LOGGED and sorted(scalars["train/lr"]) == LOGGED
    assert all(map(math.isfinite, loss.values())), loss  # the NaN step's losses were not averaged in
    assert loss[8] < loss[3]  # it learns
    assert sorted(scalars["val/loss"]) == [0, 4, 8] and scalars["val/loss"][8] < scalars["val/loss"][0]
    lr = yaml.safe_load((reference / "config.yaml").read_text())["train"]["lr"]
    assert scalars["train/lr"][3] == pytest.approx(lr)  # the rate of step 3, warmed up (not the window's mean)
    assert scalars["train/lr"][STEPS] == pytest.approx(lr)
    assert scalars["train/skipped_steps"][3] == 1 and scalars["train/skipped_steps"][STEPS] == 1  # the NaN step
    # the norm averages the steps applied: the window of step 3 has steps 1 and 2 only, no NaN
    norms = scalars["train/grad_norm"]
    assert sorted(norms) == [3, 6, 8] and all(map(math.isfinite, norms.values())), norms
    # real (not padding) tokens per packed batch: first-fit fills the 1024-token batches of the example mixture
    assert all(0.5 < v <= 1.0 for v in scalars["data/packing_efficiency"].values()), scalars["data/packing_efficiency"]
    images = read_images(reference)
    for task in ("t2i", "t2v", "i2i", "v2v"):
        assert sorted(images[f"samples/{task}/0"]) == [0, 4, 8]  # generated at every validation, on all ranks
    assert images["samples/i2i/0"][8][1] == 2 * images["samples/t2i/0"][8][1]  # edits shown source | output
    assert images["samples/t2i/0"][8][0] == RESOLUTION["t2i"]  # prompts cut at their group's resolution
    answers = read_texts(reference, "samples/answers")  # a table of question, reference and answer per task
    assert sorted(answers) == [0, 4, 8]
    assert [row.split(" | ")[0] for row in answers[8].splitlines()[2:]] == ["| i2t", "| v2t"], answers[8]
    config = yaml.safe_load((reference / "config.yaml").read_text())
    assert config["train"]["max_steps"] == STEPS and config["checkpoint"]["save_every"] == 2
    ckpts = sorted(p.name for p in (reference / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000008"]  # keep_last=2
    assert latest(reference) == "step_00000008"
    assert len(list((reference / "checkpoints" / "step_00000008").glob("rank_*/ema.safetensors"))) == 2
    # the tokens the run counts are every rank's own (ranks pack different numbers of real tokens)
    final = reference / "checkpoints" / "step_00000008"
    real = [sum(w["real_tokens"] for w in json.loads(d.read_text())["workers"] if w)
            for d in sorted(final.glob("rank_*/data.json"))]
    assert json.loads((final / "trainer_state.json").read_text())["tokens_seen"] == sum(real), real
    assert tensorboard_steps(reference, "hparam/train/loss") == [0]  # one record of the finished run


def test_kill9_during_save_and_during_training_resume_exactly(reference, example_data, tmp_path):
    out = tmp_path / "run"
    ports = free_port(), free_port()
    # 1. SIGKILL inside the save of step 4, after the engine files are written but before they are published
    killed = launch(train_args(out, example_data), env=launch_env(LANCE_DS_FAULT=f"{NAN_AT},kill_during_save:4"),
                    check=False, port=ports[0])
    assert killed.returncode != 0
    assert latest(out) == "step_00000002" and (out / "checkpoints" / "step_00000004.tmp").is_dir()
    # 2. resume from step 2; SIGKILL the whole job from outside once step 6 is saved, mid step 7 (where one rank is
    # held: a fast machine cannot finish the run first)
    proc = subprocess.Popen(deepspeed_cmd(2, *train_args(out, example_data), port=ports[1]), cwd=REPO,
                            env=launch_env(LANCE_DS_FAULT=f"{NAN_AT},stall:7"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while latest(out) != "step_00000006" and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest(out) == "step_00000006", "the job ended before it could be killed after step 6"
    left = shm_buffers(*ports)
    assert not left, f"killed runs left DeepSpeed's shared-memory buffers behind: {sorted(left)}"
    assert not (out / "checkpoints" / "step_00000004.tmp").exists()  # the next save cleaned the partial one
    # 3. resume from step 6 to the end, with a SIGTERM in the last step: the run is complete (done, exit status 0,
    # its hparams record), not stopped
    log = launch(train_args(out, example_data), env=launch_env(LANCE_DS_FAULT="sigterm:8")).stdout
    assert "lance_ds: done: steps 7-8 (resumed at 6) in" in log, log[-3000:]  # not "8 steps" at its pace
    assert tensorboard_steps(out, "hparam/train/loss") == [0]
    expected, got = losses(reference), losses(out)
    assert sorted(got) == LOSSES_LOGGED  # the same windows (resumed at 2, mid-window, and at 6)
    # and TensorBoard shows each once: what the run killed in its save of step 4 had logged past step 2 is purged
    assert tensorboard_steps(out, "train/lr") == LOGGED
    for step in LOSSES_LOGGED:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)


def test_an_error_on_one_rank_ends_the_job_at_once_with_its_traceback(example_data, tmp_path):
    """The other rank waits in a ZeRO-3 collective the failed one never joins: the failed rank must exit (not wait
    in a barrier for the process group's 30-minute timeout) so that the launcher stops the job (within launch's
    timeout: a wall-clock bound of its own would only add flakiness on a loaded machine). It trains in bf16, as the
    shipped recipes do: gradients accumulated in fp32 (data_types), which DeepSpeed's ZeRO-3 engine builds with."""
    result = launch(train_args(tmp_path / "run", example_data, STEPS, "train.precision=bf16"),
                    env=launch_env(LANCE_DS_FAULT="raise:3"), timeout=180, check=False)
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 3" in result.stdout and "Traceback" in result.stdout
    assert latest(tmp_path / "run") == "step_00000002"  # the last checkpoint is usable


def test_validation_losses_do_not_depend_on_the_number_of_ranks(reference, example_data, tmp_path):
    """Held-out batch j goes to rank j % world and draws its noise from j alone: 1 rank scores what 2 ranks did.
    (This one-step run also gets a SIGTERM during its final save, which completes: the default handler was back by
    then, and the rank died with the save unmade. It validates with the EMA, swapped in and out under ZeRO-3: at step
    0 the EMA is the weights.)"""
    out = tmp_path / "one_rank"
    validating = ("validation.every=4", f"validation.dataset_config={example_data['val']}", "validation.max_samples=4",
                  "validation.num_generations=0", "validation.weights=ema")
    log = launch(train_args(out, example_data, 1, *validating), num_ranks=1,
                 env=launch_env(LANCE_DS_FAULT="sigterm_during_save:1")).stdout  # (launch: exit status 0 asserted)
    assert "lance_ds: done: 1 steps" in log and latest(out) == "step_00000001", log[-3000:]
    one, two = read_scalars(out), read_scalars(reference)
    val_tags = [t for t in two if t.startswith(("val/ce", "val/mse", "val/loss"))]
    assert len(val_tags) >= 8
    for tag in val_tags:
        assert one[tag][0] == pytest.approx(two[tag][0], rel=1e-5), tag


def test_sigterm_stops_at_the_next_step_with_its_checkpoint_and_resumes_exactly(reference, example_data, tmp_path):
    """A scheduler's SIGTERM to the job: the deepspeed launcher passes it to rank 0 (and its loader workers) and waits
    up to 30 s before it signals rank 1. The ranks agree to stop after the step they are in, save it and exit; the
    same command then resumes from that step to the losses of the uninterrupted run."""
    out = tmp_path / "run"
    # validation at every step: the stop skips its step's validation (the save comes first); the resume runs it
    validating = ("validation.every=1", f"validation.dataset_config={example_data['val']}",
                  "validation.max_samples=4", "validation.num_generations=0")
    proc = subprocess.Popen(deepspeed_cmd(2, *train_args(out, example_data, STEPS, *validating)), cwd=REPO,
                            env=launch_env(LANCE_DS_FAULT=NAN_AT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while latest(out) != "step_00000002" and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    [launcher] = psutil.Process(proc.pid).children()  # deepspeed's launch.py: the process that signals the ranks
    launcher.send_signal(signal.SIGTERM)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not stop within 120 s of SIGTERM:\n{proc.communicate()[0][-4000:]}")
    stopped = int(latest(out).removeprefix("step_") or 0)
    assert 2 < stopped <= 6, f"stopped at step {stopped}, not within a few steps of the signal (after step 2):\n{log}"
    assert f"stopped by SIGTERM at step {stopped} of {STEPS}" in log and "Traceback" not in log, log[-4000:]
    assert f"validation   every 1 steps on {example_data['val']} (4 samples per group, 0 generation(s)" in log
    assert "weights      random decoder (no model.path)" in log  # said where training starts from
    assert re.search(r"v2t \(v2t, weight 1\.0, \d+ samples, 56 px, 9 frames at 12 fps\)", log)  # each group's cut
    assert tensorboard_steps(out, "train/lr") == [s for s in LOGGED if s <= stopped]  # a stop adds no point
    assert stopped not in read_scalars(out)["val/loss"]
    log = launch(train_args(out, example_data, STEPS, *validating), env=launch_env(LANCE_DS_FAULT=NAN_AT)).stdout
    assert (f"weights      the checkpoint {out / 'checkpoints' / f'step_{stopped:08d}'} (the run began from random "
            "decoder (no model.path)") in log, log[-3000:]  # (not "random decoder" alone: it goes on from there)
    expected, got = losses(reference), losses(out)
    assert sorted(got) == LOSSES_LOGGED
    for step in LOSSES_LOGGED:  # the window the stop cut short went on in the resumed run
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)
    assert tensorboard_steps(out, "val/loss") == list(range(STEPS + 1))  # each step validated once
    val, expected_val = read_scalars(out)["val/loss"], read_scalars(reference)["val/loss"]
    for step in expected_val:
        assert val[step] == pytest.approx(expected_val[step], rel=1e-5), (step, val, expected_val)
    assert tensorboard_steps(out, "hparam/train/loss") == [0]  # the finished run's record only, not the stop's


def test_a_run_resumes_on_another_number_of_ranks(reference, example_data, tmp_path):
    """2 ranks -> 1 (a node lost, a smaller box): the engine goes on from the 2-rank checkpoint through DeepSpeed's
    universal form (made once, into the step dir). With a learning rate too small to move a weight, the weights stay
    those saved, the EMA moves from its saved value towards them, Adam's step count goes on, and each optimizer group
    keeps its own weight decay (DeepSpeed's universal load gives every group the first one's)."""
    from lance_ds.ema import consolidate
    from lance_ds.export import zero_consolidated_state

    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    result = launch(train_args(out, example_data, STEPS + 2, "train.lr=1e-30", "train.min_lr=0"), num_ranks=1)
    assert re.search(r"resumed from .*step_00000008 at step 8 \(saved by 2 ranks x \d+ loader workers; this run has "
                     r"1 x \d+", result.stdout), result.stdout[-3000:]
    assert "global batch changes from 4 to 2 sequences per step" in result.stdout  # (grad_accum 2, 2 ranks -> 1)
    assert "train.grad_accum=4 keeps it" in result.stdout
    saved, went_on = out / "checkpoints" / "step_00000008", out / "checkpoints" / "step_00000010"
    assert (saved / "universal" / "zero").is_dir()
    weights = zero_consolidated_state(saved)
    assert all(torch.equal(weights[name], value) for name, value in zero_consolidated_state(went_on).items())
    ema_saved = consolidate([saved / f"rank_{rank:05d}" / "ema.safetensors" for rank in range(2)])
    ema_now = consolidate([went_on / "rank_00000" / "ema.safetensors"])
    decay = 0.9 ** 2  # two steps of train.ema_decay=0.9 towards the unchanged weights
    for name, value in ema_now.items():
        expected = decay * ema_saved[name] + (1 - decay) * weights[name]
        assert torch.allclose(value, expected, atol=1e-6), name
    assert any(not torch.equal(ema_saved[name], weights[name]) for name in ema_saved)  # (the EMA lags the weights)

    def adam(step_dir: Path, rank: int = 0) -> dict:
        state = torch.load(step_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        return state["optimizer_state_dict"]["optimizer_state_dict"]

    before, after = adam(saved), adam(went_on)
    assert int(after["state"][0]["step"]) == int(before["state"][0]["step"]) + 2
    assert [g["weight_decay"] for g in after["param_groups"]] == [0.1, 0.0]


def ranks_started_alone(per_rank_args: list[list[str]], launcher_env=None,
                        timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Rank r of len(per_rank_args) started on its own, each with its own args and the variables
    launcher_env(rank, world, port) gives it (default: a node's launcher's RANK, WORLD_SIZE, ..., one node each)."""
    port, world = str(free_port()), len(per_rank_args)

    def node_launcher(rank: int, world: int, port: str) -> dict[str, str]:
        return {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port}

    started = launcher_env or node_launcher
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = {k: v for k, v in launch_env(LANCE_DS_FAULT=NAN_AT).items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "lance_ds" / "train.py"), *args], cwd=REPO,
                                      env={**env, **started(rank, world, port)}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return [subprocess.CompletedProcess(p.args, p.returncode, log, "") for p, log in zip(procs, logs)]


def test_tasks_srun_starts_itself_train_as_one_run(reference, example_data, tmp_path):
    """`srun python lance_ds/train.py` starts every rank itself, and says which is which in its own variables (no
    RANK): each task used to train alone, a world of one on GPU 0, all of them into one output_dir. They now train
    as the ranks of one run: the reference's 2-rank losses, step for step (its first 4 steps)."""
    out = tmp_path / "run"

    def srun(rank: int, world: int, port: str) -> dict[str, str]:
        return {"SLURM_STEP_NUM_TASKS": str(world), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": str(world), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port}

    tasks = ranks_started_alone([train_args(out, example_data, 4)] * 2, srun, timeout=240)
    assert [t.returncode for t in tasks] == [0, 0], tasks[0].stdout[-3000:] + tasks[1].stdout[-3000:]
    assert "world        2 rank(s)" in tasks[0].stdout, tasks[0].stdout[-3000:]
    expected, got = losses(reference), losses(out)
    assert sorted(got) == [3, 4]  # (4: its end)
    assert got[3] == pytest.approx(expected[3], rel=1e-5, abs=1e-6), (got, expected)
    # no MASTER_ADDR: no task can find rank 0; refused up front with the fix (not a world of one each)
    [refused] = ranks_started_alone([train_args(tmp_path / "r2", example_data)],
                                    lambda rank, world, port: {**srun(0, 2, port), "MASTER_ADDR": ""})
    assert refused.returncode == 2 and "started by srun as rank 0 of 2, but MASTER_ADDR is not set" in refused.stdout
    assert not (tmp_path / "r2").exists()


def test_ranks_that_read_other_configs_are_refused_before_anything_is_built(example_data, tmp_path):
    """Each node reads the config files itself: a rank with another train.max_steps hung the others in a collective
    until the process group's timeout (30 min). The ranks now compare what they resolved and all stop at once."""
    out = tmp_path / "run"
    ranks = ranks_started_alone([train_args(out, example_data, 5), train_args(out, example_data, 3)])
    assert [r.returncode for r in ranks] == [2, 2], [r.stdout[-2000:] for r in ranks]
    assert "ranks resolved other configs than rank 0 (rank 1: run)" in ranks[0].stdout, ranks[0].stdout[-2000:]
    assert not (out / "checkpoints").exists()


def test_a_rank_that_refuses_its_config_stops_the_others(example_data, tmp_path):
    """A problem only one node sees (its dataset path not mounted) used to end that node's ranks while the others
    waited out the rendezvous timeout (30 min): the refusing rank now joins only to tell them, and all stop."""
    out = tmp_path / "run"
    missing = [*train_args(out, example_data), "--dataset_config", str(tmp_path / "not_mounted.yaml")]
    ranks = ranks_started_alone([train_args(out, example_data), missing])  # (within its timeout, not 30 min)
    assert [r.returncode for r in ranks] == [2, 2], [r.stdout[-2000:] for r in ranks]
    assert "not_mounted.yaml" in ranks[1].stdout  # the reason, where it happened
    assert "rank(s) [1] refused the config or --resume" in ranks[0].stdout, ranks[0].stdout[-2000:]
    assert not (out / "checkpoints").exists()


def test_a_stalled_rank_ends_the_run_after_the_stall_timeout(example_data, tmp_path):
    """A rank stuck mid-run (a hung file system, a wedged GPU) is alive but silent: the others waited in a ZeRO-3
    collective for the process group's 30 minutes. After the first step they wait train.stall_timeout_s, then fail
    with what it means, and the launcher stops the stuck rank; the last checkpoint is intact. Half-way, the stuck rank
    says where it is."""
    out = tmp_path / "run"
    result = launch(train_args(out, example_data, STEPS, "train.stall_timeout_s=10"),
                    env=launch_env(LANCE_DS_FAULT="stall:3"), timeout=180, check=False)
    assert result.returncode != 0
    assert "waited more than train.stall_timeout_s=10 s for another rank" in result.stdout, result.stdout[-3000:]
    assert "the last checkpoint (step 2) is intact" in result.stdout
    # half-way, the stuck rank said where it was (before the launcher ended it)
    said = result.stdout[result.stdout.index("lance_ds: rank 1: step 3 has run 5 s"):]
    assert re.search(r"File .*trainer\.py\", line \d+ in train_step", said), result.stdout[-3000:]
    assert latest(out) == "step_00000002"
