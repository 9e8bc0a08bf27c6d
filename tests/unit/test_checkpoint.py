"""Checkpointer bookkeeping (atomic publish, `latest`, retention, refusals) and the sharded EMA, without a launcher;
the 2-rank DeepSpeed behaviour is in tests/dist/test_train.py."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lance_ds.checkpoint import Checkpointer, CheckpointError, Resumed, step_name
from lance_ds.config.core import ConfigError
from lance_ds.ema import ShardedEMA, consolidate


class FakeEngine:
    """Writes one file per save, like DeepSpeed's engine files, and records loads."""

    def __init__(self):
        self.loaded = None

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert not save_latest  # `latest` is ours to move, after the directory is complete
        path = f"{root}/{tag}"
        import os

        os.makedirs(path, exist_ok=True)
        with open(f"{path}/engine.bin", "w") as f:
            f.write(json.dumps(client_state))

    def load_checkpoint(self, root, tag, **kw):
        self.loaded = (root, tag)
        return f"{root}/{tag}", {}


def save(ck: Checkpointer, step: int, ema=None):
    return ck.save(FakeEngine(), step, {"model": {"size": "debug"}}, {"train": {"lr": 1.0}}, {"position": step}, ema)


def test_save_publishes_atomically_and_keeps_the_last(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    assert ck.resolve("latest") is None and ck.resolve("none") is None
    for step in (10, 20, 30):
        save(ck, step)
    assert ck.complete_steps() == [20, 30]
    assert (tmp_path / "latest").read_text() == step_name(30)
    import shutil  # a user's copy beside them is not a step (its name made every start and resume raise)

    shutil.copytree(tmp_path / step_name(20), tmp_path / f"{step_name(20)}.bak")
    assert ck.complete_steps() == [20, 30]
    assert not list(tmp_path.glob("*.tmp"))
    path = ck.resolve("latest")
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 30
    assert (path / "rank_00000" / "data.json").is_file() and (path / "config.yaml").is_file()
    assert ck.resolve("20") == tmp_path / step_name(20)
    resumed = ck.load(FakeEngine(), path)
    assert resumed.step == 30 and resumed.data_state == {"position": 30} and resumed.ema_state is None


def test_a_first_save_cut_before_its_latest_pointer_is_still_resumed(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    save(ck, 10)
    save(ck, 20)
    (tmp_path / "latest").unlink()  # as a run killed between publishing its first save and writing `latest` leaves it
    assert ck.resolve("latest") == tmp_path / step_name(20)  # not None: the run would start over and overwrite it


@pytest.mark.parametrize("lost", ["data.json", "ema.safetensors"])
def test_a_rank_file_the_save_wrote_must_be_there_to_resume(tmp_path, lost):
    """Without its data position a rank would read its data from the start again, without its EMA shard it would
    restart the average: quietly inexact. Missing after the save (a partial copy, a hand clean-up): refused."""
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    path = save(ck, 10, ShardedEMA(torch.nn.Linear(3, 2), 0.5))
    (path / "rank_00000" / lost).unlink()
    with pytest.raises(CheckpointError, match=rf"rank_00000/{lost} could not be read \(FileNotFoundError: missing"):
        ck.load(FakeEngine(), path)
    assert save(ck, 20).exists() and ck.load(FakeEngine(), ck.resolve("20")).ema_state is None  # saved without EMA


def test_a_restarted_run_keeps_its_own_new_checkpoints(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    for step in (40, 50, 60):  # an earlier run in this output_dir
        save(ck, step)
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    save(ck, 10)  # a run started again (--resume none) saves step 10: it must survive retention
    assert ck.complete_steps() == [10, 50, 60] and ck.resolve("latest") == tmp_path / step_name(10)
    save(ck, 20)
    save(ck, 30)
    assert ck.complete_steps() == [20, 30, 50, 60]  # keep_last counts this run's steps; later ones wait to be redone
    save(ck, 50)  # and are replaced when this run reaches them
    assert ck.complete_steps() == [30, 50, 60] and ck.resolve("latest") == tmp_path / step_name(50)


def test_a_run_resumed_from_an_earlier_step_keeps_its_own_saves_to_fall_back_on(tmp_path):
    """Run A saved 10 .. 50; run B resumed from 40 and saves 45 and 55: keep_last counts B's line (55, 45, then 40 and
    what came before it), not A's abandoned 50, which stays until B reaches step 50."""
    a = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    for step in (10, 20, 30, 40, 50):
        save(a, step)
    assert a.complete_steps() == [40, 50]
    b = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    b.load(FakeEngine(), b.resolve("40"))
    save(b, 45)
    assert b.complete_steps() == [40, 45, 50]
    save(b, 55)
    assert b.complete_steps() == [45, 50, 55] and not list(tmp_path.glob("*.tmp"))
    save(b, 50)  # B's own 50 replaces A's and joins B's line
    assert b.complete_steps() == [50, 55] and b.resolve("latest") == tmp_path / step_name(50)


def test_a_resave_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    import os

    ck = Checkpointer(tmp_path, keep_last=3, rank=0, world_size=1)
    save(ck, 10)
    real_replace = os.replace

    def crash_on_publish(src, dst):
        if str(src).endswith(step_name(10) + ".tmp"):
            raise KeyboardInterrupt  # killed between moving the old copy aside and putting the new one in place
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        save(ck, 10)
    monkeypatch.setattr(os, "replace", real_replace)
    aside = tmp_path / (step_name(10) + ".old.tmp")
    assert (aside / "trainer_state.json").is_file()  # the old copy is whole, and the refusal says where
    with pytest.raises(CheckpointError, match="rename .*step_00000010.old.tmp"):
        ck.resolve("latest")
    save(ck, 10)
    assert ck.complete_steps() == [10] and not list(tmp_path.glob("*.tmp"))


def test_a_save_killed_midway_is_ignored_then_cleaned(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3, rank=0, world_size=1)
    save(ck, 10)
    partial = tmp_path / (step_name(20) + ".tmp")
    (partial / "rank_00000").mkdir(parents=True)  # what a SIGKILL during the save of step 20 leaves
    assert ck.resolve("latest") == tmp_path / step_name(10)
    assert ck.complete_steps() == [10]
    save(ck, 30)
    assert not partial.exists()


def test_refusals_name_the_fix(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3, rank=0, world_size=1)
    save(ck, 10)
    with pytest.raises(CheckpointError, match="complete steps: \\[10\\]"):
        ck.resolve("15")
    with pytest.raises(CheckpointError, match="latest, none or a step"):
        ck.resolve("newest")
    (tmp_path / "latest").write_text(step_name(99))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ck.resolve("latest")
    model = {"size": "debug"}  # what save() records
    two_ranks = Checkpointer(tmp_path, keep_last=3, rank=0, world_size=2)  # (another number of ranks: resharded)
    assert two_ranks.check_resume("10", model, 100) == tmp_path / step_name(10)
    assert ck.check_resume("10", model, 100) == tmp_path / step_name(10)
    assert ck.check_resume("none", model, 100) is None
    with pytest.raises(CheckpointError, match="model.size: checkpoint .debug., now .100m."):
        ck.check_resume("10", {"size": "100m"}, 100)
    # saved without weight decay (save() records no train.weight_decay): one optimizer group; with it, two
    assert ck.check_resume("10", model, 100, weight_decay=0.0) == tmp_path / step_name(10)
    # what the flow head was trained to output (x0 read as a velocity: mse 1.04 -> 5.48 two steps after a resume)
    assert ck.check_resume("10", model, 100, prediction="velocity") == tmp_path / step_name(10)
    with pytest.raises(CheckpointError, match="objective.prediction=velocity: its flow head outputs that"):
        ck.check_resume("10", model, 100, prediction="data")
    with pytest.raises(CheckpointError, match="(?s)weight_decay=0 and this run has 0.1.*= 0, or start a new run"):
        ck.check_resume("10", model, 100, weight_decay=0.1)
    # a checkpoint past max_steps (the run ended at once, saying "done"); at max_steps: a finished run, nothing to do
    save(ck, 20)
    assert ck.check_resume("latest", model, 20) == tmp_path / step_name(20)
    with pytest.raises(CheckpointError, match=r"(?s)at step 20, past train.max_steps=15.*--resume 10; steps saved "
                                              r"up to 15: \[10\]"):
        ck.check_resume("latest", model, 15)
    with pytest.raises(CheckpointError, match="past train.max_steps=5.*above 20 to train further, or start a new run"):
        ck.check_resume("20", model, 5)


def test_a_resume_under_another_precision_or_zero_stage_is_refused_with_the_fix(tmp_path):
    """DeepSpeed finds no optimizer files of another precision or stage: every rank died in a bare FileNotFoundError
    (fp32 -> bf16) or AssertionError (ZeRO-3 -> 2); --check said "configs OK"."""
    from lance_ds.checkpoint import engine_setup

    ck = Checkpointer(tmp_path, keep_last=3, rank=0, world_size=1)
    zero3 = {"zero_optimization": {"stage": 3}}
    model = {"size": "debug"}
    ck.save(FakeEngine(), 10, {"model": model, "engine": engine_setup("fp32", zero3)}, {"train": {}}, None, None)
    assert ck.check_resume("10", model, 100, engine=engine_setup("fp32", zero3)) == tmp_path / step_name(10)
    with pytest.raises(CheckpointError, match=r"\(train.precision fp32, now bf16\).*export_checkpoint.py"):
        ck.check_resume("10", model, 100, engine=engine_setup("bf16", zero3))
    with pytest.raises(CheckpointError, match=r"zero_optimization.stage \(--ds_config\) 3, now 2"):
        ck.check_resume("10", model, 100, engine=engine_setup("fp32", {"zero_optimization": {"stage": 2}}))
    # a checkpoint from before the set-up was recorded: its precision is in its config.yaml
    ck.save(FakeEngine(), 20, {"model": model}, {"train": {"precision": "bf16"}}, None, None)
    with pytest.raises(CheckpointError, match=r"train.precision bf16, now fp32"):
        ck.check_resume("20", model, 100, engine=engine_setup("fp32", zero3))


def test_an_engine_state_deepspeed_cannot_find_names_the_rank_and_other_steps(tmp_path):
    class Empty(FakeEngine):
        def load_checkpoint(self, root, tag, **kw):
            return None, None  # what DeepSpeed returns when this rank's engine files are not there

    for step in (10, 20):
        Checkpointer(tmp_path, keep_last=3, rank=0, world_size=2).save(FakeEngine(), step, {"model": {}}, {}, None,
                                                                       None)
    ck = Checkpointer(tmp_path, keep_last=3, rank=1, world_size=2)
    with pytest.raises(CheckpointError, match=r"rank 1: cannot resume from .*step_00000020: DeepSpeed's engine files "
                                              r"could not be read .*complete: \[10\]") as raised:
        ck.load(Empty(), tmp_path / step_name(20))
    assert raised.value.rank == 1


def test_ema_follows_the_weights_and_round_trips(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = ShardedEMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], start + 1.0)  # halfway, decay 0.5
    ck = Checkpointer(tmp_path, keep_last=1, rank=0, world_size=1)
    save(ck, 1, ema)
    restored = ShardedEMA(torch.nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(ck.load(FakeEngine(), ck.resolve("latest")).ema_state)
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    full = consolidate([tmp_path / step_name(1) / "rank_00000" / "ema.safetensors"])
    assert torch.equal(full["weight"], ema.shadow["weight"]) and full["bias"].shape == (2,)
    # a checkpoint without EMA (turned on at this resume): the shadow starts from the resumed weights
    fresh = ShardedEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.mul_(3.0)  # what loading the checkpoint does to the weights after the EMA was built
    fresh.load_state_dict(None)
    assert torch.equal(fresh.shadow["weight"], model.weight)


def test_a_resume_from_damaged_files_names_them_and_the_other_steps(tmp_path):
    """Files check_resume cannot see into (DeepSpeed's, a rank's data position and EMA shard), cut short or garbled
    after the save: one error naming the file and the steps to resume from instead, not a reader's traceback."""
    from lance_ds.model.weights import WeightsFileError, load_safetensors

    model = torch.nn.Linear(3, 2)
    ck = Checkpointer(tmp_path, keep_last=3, rank=0, world_size=1)
    save(ck, 1, ShardedEMA(model, 0.5))
    path = save(ck, 2, ShardedEMA(model, 0.5))
    ema_file = path / "rank_00000" / "ema.safetensors"
    ema_file.write_bytes(ema_file.read_bytes()[:-4])
    with pytest.raises(WeightsFileError, match="ema.safetensors is not a readable safetensors file"):
        load_safetensors(ema_file)
    with pytest.raises(CheckpointError, match=r"rank_00000/ema.safetensors could not be read \(WeightsFileError.*"
                                              r"--resume STEP; complete: \[1\]"):
        ck.load(FakeEngine(), path)
    (path / "rank_00000" / "data.json").write_text('{"position": ')
    with pytest.raises(CheckpointError, match=r"data.json could not be read \(JSONDecodeError"):
        ck.load(FakeEngine(), path)

    class DamagedEngine(FakeEngine):
        def load_checkpoint(self, root, tag, **kw):
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    with pytest.raises(CheckpointError, match=r"rank 0: cannot resume.*DeepSpeed's files could not be read "
                                              r"\(RuntimeError: PytorchStreamReader.*complete: \[1\]") as caught:
        ck.load(DamagedEngine(), path)
    assert caught.value.rank == 0  # this rank's files: train.py has this rank say it (not only a node's first)

    class FailingEngine(FakeEngine):
        def load_checkpoint(self, root, tag, **kw):
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="^CUDA out of memory$"):  # not a damaged file: passed on as it is
        ck.load(FailingEngine(), path)
    assert ck.load(FakeEngine(), ck.resolve("1")).ema_state is not None  # the other step is whole


def write_run_config(tmp_path: Path) -> Path:
    """A run config (output_dir tmp_path/run) over one converter-like group: enough for train.py to pass its checks."""
    import yaml

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"task": "t2i", "num_samples": 1, "shards": [{"name": "a.tar"}]}))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"groups": [{"name": "gen", "shards": "shards"}]}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"dataset_config": "data.yaml",
                                                       "output_dir": str(tmp_path / "run")}))
    return tmp_path / "run.yaml"


def test_a_rank_reports_the_errors_only_it_meets(tmp_path, capsys, monkeypatch):
    """Errors every rank meets are printed by each node's first rank; a rank's own damaged files by that rank (the
    first one would not know them: the run ended with exit status 2 and no word)."""
    import lance_ds.train as train
    import lance_ds.trainer

    write_run_config(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(train, "exit_now", lambda code, trace="": (_ for _ in ()).throw(SystemExit(code)))
    for error, printed in ((CheckpointError("its data.json is cut short", rank=1), True),
                           (CheckpointError("the same on every rank"), False),
                           (ConfigError(["model.freeze_modules: pattern 'x*' matches no parameter"]), False)):
        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(lance_ds.trainer, "Trainer", failing)
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--config", str(tmp_path / "run.yaml")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and (f"lance_ds: {error}" in err) == printed, err
    assert "rank 1: its data.json" in str(CheckpointError("its data.json", rank=1))


def test_ema_updates_in_bounded_chunks_as_one_lerp_per_tensor_would(monkeypatch):
    import lance_ds.ema

    monkeypatch.setattr(lance_ds.ema, "_CHUNK_ELEMENTS", 10)  # the Linear's weight (12) alone, then its bias
    model = torch.nn.Linear(4, 3)
    ema = ShardedEMA(model, decay=0.75)
    assert ema.chunks == [["weight"], ["bias"]]
    expected = {n: s.clone() for n, s in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for name, p in model.named_parameters():
        assert torch.allclose(ema.shadow[name], expected[name].lerp(p.detach(), 0.25))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    ShardedEMA(frozen, decay=0.5).update()  # nothing to average: nothing to do


def test_consolidate_reassembles_zero3_partitions(tmp_path):
    """ZeRO-3 gives rank r the r-th equal chunk of each flattened (padded) parameter."""
    full = torch.arange(7, dtype=torch.float32).view(7)
    chunks = [full[0:4], torch.cat([full[4:7], torch.zeros(1)])]  # 2 ranks, padded to 8
    meta = {"partitioned": "true", "shapes": json.dumps({"w": [7]})}
    files = []
    for rank, chunk in enumerate(chunks):
        files.append(tmp_path / f"ema{rank}.safetensors")
        save_file({"w": chunk}, str(files[-1]), metadata=meta)
    assert torch.equal(consolidate(files)["w"], full)


def test_a_checkpoint_deepspeed_cannot_convert_is_refused_with_what_to_do(tmp_path):
    """A resume on another number of ranks converts the checkpoint first; when DeepSpeed's converter fails (here: no
    ZeRO files), the run stops with its reason and the ways on, and leaves no half-written universal folder."""
    path = save(Checkpointer(tmp_path, keep_last=2, rank=0, world_size=2), 10)
    one_rank = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    with pytest.raises(CheckpointError, match="(?s)could not convert .*ds_to_universal.*Resume with the 2 ranks "
                                              ".*export_checkpoint.py"):
        one_rank.make_universal(path, torch.device("cpu"))
    assert [p.name for p in path.iterdir() if p.is_dir()] == ["rank_00000"]


def test_every_rank_data_position_is_read_for_a_reshard_or_the_file_is_named(tmp_path):
    path = save(Checkpointer(tmp_path, keep_last=2, rank=0, world_size=2), 10)  # (rank 1 did not write its part)
    resumed = Resumed(step=10, path=path, data_state=None, ema_state=None,
                      trainer_state=json.loads((path / "trainer_state.json").read_text()))
    one_rank = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    with pytest.raises(CheckpointError, match="rank_00001/data.json could not be read"):
        one_rank.every_rank_data(resumed)
    (path / "rank_00001").mkdir()
    (path / "rank_00001" / "data.json").write_text(json.dumps({"position": 11}))
    assert one_rank.every_rank_data(resumed) == [{"position": 10}, {"position": 11}]


def _partitioned_linear(rank: int, world: int) -> torch.nn.Module:
    """A Linear(3, 3) as ZeRO-3 leaves it on `rank` of `world`: each parameter's ds_tensor is its rank's chunk."""
    model = torch.nn.Linear(3, 3)
    for p in model.parameters():
        chunk = -(-p.numel() // world)
        p.ds_shape, p.ds_tensor = p.shape, torch.zeros(chunk)
    return model


@pytest.mark.parametrize("saved_world,world", [(2, 3), (3, 1), (1, 2), (2, 4), (0, 2), (2, 0)])  # 0: below stage 3
def test_an_ema_saved_by_other_ranks_is_repartitioned(tmp_path, saved_world, world):
    """A resume on another number of ranks: each rank's EMA is its chunk of the saved one, whatever partitioning
    (or none) saved it; the padding past a parameter's end is zeros."""
    full = {"weight": torch.arange(9.0).view(3, 3) + 1, "bias": torch.arange(3.0) + 100}
    files = []
    for rank in range(saved_world or 2):  # (below stage 3 each rank saves the whole EMA)
        model = _partitioned_linear(rank, saved_world) if saved_world else torch.nn.Linear(3, 3)
        ema = ShardedEMA(model, 0.9)
        for name, shadow in ema.shadow.items():
            padded = torch.cat([full[name].flatten(), torch.full((9,), -1.0)])  # (padding: whatever it holds)
            shadow.copy_(padded[rank * shadow.numel():][:shadow.numel()] if saved_world else full[name])
        files.append(tmp_path / f"ema{rank}.safetensors")
        save_file(ema.state_dict(), str(files[-1]), metadata=ema.metadata())
    parts = []
    for rank in range(max(world, 1)):
        ema = ShardedEMA(_partitioned_linear(rank, world) if world else torch.nn.Linear(3, 3), 0.9)
        ema.load_repartitioned(files, rank)
        parts.append(ema.shadow)
    for name, tensor in full.items():
        if not world:
            assert torch.equal(parts[0][name], tensor)
            continue
        joined = torch.cat([part[name] for part in parts])
        assert torch.equal(joined[:tensor.numel()], tensor.flatten()) and not joined[tensor.numel():].any()


def test_resume_into_another_architecture_is_refused_naming_the_keys(tmp_path):
    from lance_ds.config.core import to_dict
    from lance_ds.config.model import LoraConfig, ModelConfig
    from lance_ds.checkpoint import refuse_other_architecture

    saved = to_dict(ModelConfig())
    refuse_other_architecture(saved, to_dict(ModelConfig(attention="flex", gradient_checkpointing=True)), tmp_path)
    other = to_dict(ModelConfig(visual_gen=False))
    other["lape"]["enabled"] = True
    with pytest.raises(CheckpointError, match="model.visual_gen: checkpoint True, now False; model.lape"):
        refuse_other_architecture(saved, other, tmp_path)
    for change in (dict(vit_trainable=True), dict(freeze_modules=["vit_model.*"])):  # what the optimizer covers
        with pytest.raises(CheckpointError, match=f"model.{next(iter(change))}"):
            refuse_other_architecture(saved, to_dict(ModelConfig(**change)), tmp_path)
    # the same adapters listed in another order resume; other adapters do not
    lora = to_dict(ModelConfig(training_type="lora", lora=LoraConfig(target_modules=["q_proj", "v_proj"])))
    listed = to_dict(ModelConfig(training_type="lora", lora=LoraConfig(target_modules=["v_proj", "q_proj"])))
    refuse_other_architecture(lora, listed, tmp_path)
    with pytest.raises(CheckpointError, match="model.lora"):
        refuse_other_architecture(lora, to_dict(ModelConfig(training_type="lora", lora=LoraConfig(
            target_modules=["q_proj", "k_proj"]))), tmp_path)


def test_a_moved_model_directory_resumes_and_another_geometry_is_refused(tmp_path):
    """Base weights copied to a job's local disk sit at another path each run: that resumes. A directory that gives
    the model other shapes (another vocabulary, VAE, size) is refused before DeepSpeed's load, naming the
    parameters and the checkpoint's directories."""
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    shapes = {"embed.weight": [100, 8], "vae2llm.weight": [8, 16]}
    saved_model = {"size": "debug", "path": "/scratch/job1/base", "lora": {"r": 4, "dropout": 0.0}}
    ck.save(FakeEngine(), 10, {"model": saved_model, "parameters": shapes}, {"train": {}}, None, None)
    moved = {**saved_model, "path": "/scratch/job2/base", "lora": {"r": 4, "dropout": 0.1}}
    assert ck.check_resume("10", moved, 100, shapes=dict(shapes)) == tmp_path / step_name(10)
    other = {**shapes, "vae2llm.weight": [8, 48]}
    with pytest.raises(CheckpointError, match=r"vae2llm.weight: checkpoint \[8, 16\], now \[8, 48\].*"
                                              r"model.path=/scratch/job1/base"):
        ck.check_resume("10", moved, 100, shapes=other)
    with pytest.raises(CheckpointError, match="embed.weight: checkpoint .100, 8., now None"):
        ck.check_resume("10", moved, 100, shapes={"vae2llm.weight": [8, 16]})
    with pytest.raises(CheckpointError, match="model.lora"):  # the adapters' rank is their shapes
        ck.check_resume("10", {**moved, "lora": {"r": 8, "dropout": 0.0}}, 100, shapes=dict(shapes))



def test_a_resume_on_another_data_order_is_refused_before_any_rank_builds(tmp_path):
    """Another dataset (or seed, micro batch, packing) was refused by the loader, after every rank had built the
    model; its fingerprint is in trainer_state.json, so --check and each rank's own check refuse it first."""
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    ck.save(FakeEngine(), 10, {"model": {"size": "debug"}, "data_fingerprint": "abc"}, {"train": {}}, None, None)
    assert ck.check_resume("10", {"size": "debug"}, 100, data="abc") == tmp_path / step_name(10)
    with pytest.raises(CheckpointError, match="trained on another data order.*or start a new output_dir"):
        ck.check_resume("10", {"size": "debug"}, 100, data="def")
    # with the run's config the refusal names what changed (the checkpoint's config.yaml has what it was)
    ck.save(FakeEngine(), 20, {"model": {"size": "debug"}, "data_fingerprint": "abc"},
            {"train": {"seed": 0, "micro_batch_size": 1}, "data": {"packing_length": 1024}}, None, None)
    now = {"train": {"seed": 1, "micro_batch_size": 1}, "data": {"packing_length": 2048}}
    with pytest.raises(CheckpointError, match=r"another data order \(train.seed 0 -> 1; data.packing_length 1024 -> "
                                              r"2048\), so its data position does not apply"):
        ck.check_resume("20", {"size": "debug"}, 100, data="def", config=now)
    same = {"train": {"seed": 0, "micro_batch_size": 1}, "data": {"packing_length": 1024}}
    with pytest.raises(CheckpointError, match=r"another data order \(the dataset \(its groups, shards or weights\) "
                                              r"changed\)"):
        ck.check_resume("20", {"size": "debug"}, 100, data="def", config=same)
    # checkpoints record their groups: the refusal names the group that changed, and the way to keep the weights
    groups = {"a": {"weight": 1.0, "shards": 4, "digest": "x"}, "b": {"weight": 1.0, "shards": 2, "digest": "y"}}
    ck.save(FakeEngine(), 30, {"model": {"size": "debug"}, "data_fingerprint": "abc", "data_groups": groups},
            same, None, None)
    now = {"a": {"weight": 2.0, "shards": 5, "digest": "z"}, "c": {"weight": 1.0, "shards": 1, "digest": "w"}}
    with pytest.raises(CheckpointError, match=r"another data order \(group b removed; group c added; group a weight "
                                              r"1.0 -> 2.0; group a shards 4 -> 5 \(another list\)\).*"
                                              r"checkpoint.data_change=restart"):
        ck.check_resume("30", {"size": "debug"}, 100, data="def", config=same, groups=now)
    swapped = dict(reversed(list(groups.items())))
    with pytest.raises(CheckpointError, match=r"the groups' order \['a', 'b'\] -> \['b', 'a'\]"):
        ck.check_resume("30", {"size": "debug"}, 100, data="def", config=same, groups=swapped)


def test_a_micro_step_draws_from_its_coordinates_alone():
    """Noise and dropout (LoRA adapters draw from torch's global RNG) of a micro-step do not depend on what ran
    before it, so a resumed run draws what the uninterrupted one drew."""
    from lance_ds.engine import seed_micro_step

    dropout = torch.nn.Dropout(0.5)

    def draws(step: int):
        generator = seed_micro_step(0, step, 1, 0, torch.device("cpu"))
        return torch.randn(3, generator=generator), dropout(torch.ones(64))

    first = draws(5)
    torch.rand(100)  # the uninterrupted run's history, which a resumed run does not have
    again = draws(5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(draws(6)[1], first[1])
    generator = seed_micro_step(0, 5, 1, 0, torch.device("cpu"))
    assert not torch.equal(torch.rand(64, generator=generator), torch.rand(64))  # dropout's stream is not the noise's


def test_every_file_of_a_save_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """A power cut right after the rename must not leave a published checkpoint whose files were only in memory:
    each file of the save is fsynced before the directory gets its final name."""
    import os

    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    synced, real_fsync, real_replace = set(), os.fsync, os.replace

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)  # by inode: trainer_state.json is synced under its temporary name
        real_fsync(fd)

    def replace(src, dst):
        if str(src).endswith(step_name(10) + ".tmp"):  # publishing: everything inside must be on disk by now
            files = {p: p.stat().st_ino for p in tmp_path.joinpath(step_name(10) + ".tmp").rglob("*")}
            assert len(files) >= 5 and not [p for p, inode in files.items() if inode not in synced]
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save(ck, 10)
    assert ck.complete_steps() == [10]


def test_check_refuses_a_resume_this_run_cannot_make_before_any_work(tmp_path, capsys, monkeypatch):
    """`train.py --check` (what the launch scripts run first) looks at what --resume names: a bad step or another
    architecture are refused there, not after every rank has built the model."""
    from lance_ds.train import main

    write_run_config(tmp_path)
    ck = Checkpointer(tmp_path / "run" / "checkpoints", keep_last=2, rank=0, world_size=2)
    from lance_ds.config.core import to_dict
    from lance_ds.config.model import ModelConfig

    ck.save(FakeEngine(), 4, {"model": to_dict(ModelConfig())}, {"train": {"precision": "bf16"}}, None, None)
    args = ["--check", "--config", str(tmp_path / "run.yaml")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args) == 0 and "configs OK" in capsys.readouterr().out
    for resume, message in (("abc", "latest, none or a step"), ("7", "no complete checkpoint for step 7")):
        assert main([*args, "--resume", resume]) == 2 and message in capsys.readouterr().err
    assert main([*args, "model.lape.enabled=true"]) == 2
    assert "model.lape: checkpoint" in capsys.readouterr().err
    assert main([*args, "train.precision=fp32"]) == 2
    assert "train.precision bf16, now fp32" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(args) == 0  # another number of ranks resumes it (resharded)


def _two_rank_worker(rank: int, store: str, roots: list, results: str) -> None:
    """One of two gloo ranks: the shared-output check and the agreed resume, each on this rank's view of the run."""
    import torch.distributed as dist

    from lance_ds.checkpoint import agree_on_resume, check_output_dir_shared

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    root = Path(roots[rank])
    outcome = {}
    for name, call in (("shared", lambda: check_output_dir_shared(root, torch.device("cpu"))),
                       ("resume", lambda: agree_on_resume(root / "checkpoints", Checkpointer(
                           root / "checkpoints", 2, rank, 2).resolve("latest"), torch.device("cpu")))):
        try:
            value = call()
            outcome[name] = "ok" if value is None else value.name
        except CheckpointError as e:
            outcome[name] = str(e)
    dist.destroy_process_group()
    Path(results, f"{rank}.json").write_text(json.dumps(outcome))


def run_two_ranks(tmp_path, roots: list) -> list[dict]:
    import torch.multiprocessing as mp

    store, results = tmp_path / f"store{len(list(tmp_path.iterdir()))}", tmp_path / "results"
    results.mkdir(exist_ok=True)
    mp.start_processes(_two_rank_worker, args=(str(store), [str(r) for r in roots], str(results)), nprocs=2,
                       start_method="fork")
    return [json.loads((results / f"{rank}.json").read_text()) for rank in range(2)]


def test_every_rank_must_see_the_output_dir_and_resumes_what_rank_0_resumes(tmp_path):
    """Rank 0 alone publishes checkpoints: a node-local output_dir (here: rank 1 looks at another folder) is refused
    on every rank at start, and every rank resumes rank 0's checkpoint or all refuse."""
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    one = run_two_ranks(tmp_path, [shared, shared])
    assert one == [{"shared": "ok", "resume": "ok"}] * 2
    save(Checkpointer(shared / "checkpoints", keep_last=2, rank=0, world_size=1), 4)
    assert run_two_ranks(tmp_path, [shared, shared]) == [{"shared": "ok", "resume": step_name(4)}] * 2
    split = run_two_ranks(tmp_path, [shared, elsewhere])
    for outcome in split:  # both ranks refuse, with the reason
        assert "not the same directory on every node: 1 rank(s)" in outcome["shared"]
        assert "1 rank(s) cannot see" in outcome["resume"] and step_name(4) in outcome["resume"]


def test_each_rank_flushes_the_files_it_wrote(tmp_path, monkeypatch):
    import os

    from lance_ds import checkpoint, files as lance_files

    files = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_12_mp_rank_00_model_states.pt",
             "rank_00000/data.json", "rank_00001/data.json", "rank_00001/ema.safetensors", "config.yaml"]
    for name in files:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert [checkpoint.writer_of(Path(name)) for name in files] == [0, 0, 1, 12, 0, 1, 1, 0]
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    checkpoint._fsync_own(tmp_path, 1)
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p in synced) == [
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_00001", "rank_00001/data.json",
        "rank_00001/ema.safetensors"]  # and its own folder: only this rank knows when the names in it are final
    synced.clear()
    checkpoint._fsync_folders(tmp_path)  # rank 0, once every rank has written
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p in synced) == [".", "rank_00000", "rank_00001"]

    def unsupported(fd):
        raise OSError(22, "Invalid argument")  # what some FUSE / network mounts answer for a directory

    monkeypatch.setattr(os, "fsync", unsupported)
    lance_files.fsync_dir(tmp_path)  # tolerated



def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path):
    """Two runs training into one output_dir (two configs naming it, a job started twice) published each other's
    half-written checkpoints and pruned the good ones: the second is refused while the first holds the directory,
    and a run that ended (or crashed) frees it."""
    import os
    import socket

    from lance_ds.checkpoint import claim_output_dir

    first = claim_output_dir(tmp_path / "run", torch.device("cpu"))
    with pytest.raises(CheckpointError, match=f"in use by another run \\({socket.gethostname()} pid {os.getpid()}\\)"):
        claim_output_dir(tmp_path / "run", torch.device("cpu"))
    first.close()  # the first run's process ended
    claim_output_dir(tmp_path / "run", torch.device("cpu")).close()


@pytest.mark.parametrize("damage", ["empty_state", "garbled_config", "no_config"])
def test_a_damaged_trainer_state_or_config_is_named_with_the_other_steps(tmp_path, damage):
    """They gave a bare JSONDecodeError / FileNotFoundError / YAML traceback from --check and from every rank."""
    ck = Checkpointer(tmp_path, keep_last=3, rank=0, world_size=1)
    save(ck, 10)
    save(ck, 20)
    step = tmp_path / step_name(20)
    if damage == "empty_state":
        (step / "trainer_state.json").write_text("")
    elif damage == "garbled_config":
        (step / "config.yaml").write_text("train: [unclosed")
    else:
        (step / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step_00000020: its trainer_state.json or "
                                              r"config.yaml could not be read .*--resume STEP; complete: \[10\]") as e:
        ck.check_resume("latest", {"size": "debug"}, 100)
    assert e.value.rank is None  # every rank meets it: said once per node, not as one rank's problem


def test_below_stage_3_each_rank_keeps_and_saves_its_chunk_of_the_ema_not_all_of_it(tmp_path):
    """ZeRO-2 with train.ema_decay: every rank kept and saved the same full fp32 EMA (24 GB per GPU and again per
    rank in every checkpoint for a 6B model). Each rank now keeps ZeRO-3's chunk of each flattened parameter."""
    model = torch.nn.Linear(3, 3)  # weight: 9 elements -> chunks of 5 and 4 on 2 ranks
    emas = [ShardedEMA(model, 0.5, rank=r, world_size=2) for r in range(2)]
    assert [e.shadow["weight"].numel() for e in emas] == [5, 4] and [e.shadow["bias"].numel() for e in emas] == [2, 1]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(2.0)
    files = []
    for rank, ema in enumerate(emas):
        ema.update()
        files.append(tmp_path / f"ema{rank}.safetensors")
        save_file(ema.state_dict(), str(files[-1]), metadata=ema.metadata())
    full = consolidate(files)
    assert torch.allclose(full["weight"], start["weight"] + 1.0) and torch.equal(full["bias"], start["bias"])
    # resumed on 3 ranks (chunks of 3), and on 1 (the whole parameter)
    three = [ShardedEMA(model, 0.5, rank=r, world_size=3) for r in range(3)]
    for rank, ema in enumerate(three):
        ema.load_repartitioned(files, rank)
    assert torch.equal(torch.cat([e.shadow["weight"] for e in three]), full["weight"].flatten())
    alone = ShardedEMA(model, 0.5)
    alone.load_repartitioned(files, 0)
    assert torch.equal(alone.shadow["weight"], full["weight"])
    # a checkpoint from before the split (each rank saved it whole), resumed on as many ranks: each takes its chunk
    whole = {"weight": full["weight"].clone(), "bias": full["bias"].clone()}
    again = ShardedEMA(model, 0.5, rank=1, world_size=2)
    again.load_state_dict(whole)
    assert torch.equal(again.shadow["weight"], full["weight"].flatten()[5:]) and again.shadow["bias"].numel() == 1


def test_a_checkpoint_folder_that_cannot_be_written_says_why_and_what_is_kept(tmp_path, monkeypatch):
    """DeepSpeed swallowed the OSError and raised 'Parent directory ... does not exist' (no errno, no word of the
    checkpoint that is still good)."""
    ck = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    save(ck, 10)
    real_mkdir = Path.mkdir

    def full_disk(self, *args, **kwargs):
        if self.name.startswith("rank_") and ".tmp" in str(self):
            raise OSError(28, "No space left on device")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint of step 20 under .*\(No space left on "
                                              r"device\); the last complete one \(step_00000010\) stays usable"):
        save(ck, 20)
    assert ck.resolve("latest") == tmp_path / step_name(10)


def _ema_applied_on_a_rank(rank: int) -> dict:
    """Below stage 3 on 2 gloo ranks: identical full weights, each rank's EMA chunk; inside applied() every rank
    holds the whole EMA, after it exactly its trained weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)  # weight: 9 elements -> chunks of 5 and 4
    ema = ShardedEMA(model, 0.5)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(2.0)
        model.bias.mul_(-1.0)
    ema.update()  # EMA = (start + now) / 2
    now = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied():
        inside = {n: p.detach().tolist() for n, p in model.named_parameters()}
    after = {n: p.detach().tolist() for n, p in model.named_parameters()}
    # (plain lists: tensors would cross the queue as shared memory that dies with this process)
    return {"expected": {n: ((trained[n] + now[n]) / 2).tolist() for n in now}, "inside": inside, "after": after,
            "now": {n: v.tolist() for n, v in now.items()}}


def test_validating_with_the_ema_below_stage_3_gathers_every_ranks_chunk_and_gives_the_weights_back():
    from conftest import on_two_gloo_ranks

    for got in on_two_gloo_ranks(_ema_applied_on_a_rank).values():
        for name, expected in got["expected"].items():
            assert torch.allclose(torch.tensor(got["inside"][name]), torch.tensor(expected)), name  # all of it,
            assert got["after"][name] == got["now"][name], name  # not this rank's chunk only; then exactly back
    alone = ShardedEMA(torch.nn.Linear(2, 2), 0.0)  # one rank, no ZeRO: the whole parameter
    with torch.no_grad():
        alone.params["weight"].zero_()
    with alone.applied():
        assert not torch.equal(alone.params["weight"], torch.zeros(2, 2))  # (decay 0 kept the initial weights)
    assert torch.equal(alone.params["weight"], torch.zeros(2, 2))
