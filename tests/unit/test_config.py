"""Config loading: every bad config is refused at once with a message naming the dotted key."""

import json
from pathlib import Path

import pytest
import yaml

from lance_ds.config import ConfigError, Problems, load_ds_json, resolve_ds_config
from lance_ds.config.core import apply_overrides, describe, from_dict
from lance_ds.config.model import ModelConfig
from lance_ds.config.run import RunConfig, load_run

REPO = Path(__file__).resolve().parents[2]
HIDDEN = 64


def load(tmp_path, run: dict, overrides=(), ds_json: dict | None = None, world_size: int = 2):
    """Load a run the way train.py does, returning (run, ds) or raising one ConfigError."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "ds.json").write_text(json.dumps(ds_json if ds_json is not None else
                                                 json.loads((REPO / "ds_configs/zero3.json").read_text())))
    problems = Problems()
    result = load_run(str(tmp_path / "run.yaml"), list(overrides), problems)
    raw = load_ds_json(str(tmp_path / "ds.json"), problems)
    problems.raise_if_any()
    ds = resolve_ds_config(raw, result.config, world_size, HIDDEN, on_gpu=False, problems=problems)
    problems.raise_if_any()
    return result, ds


GOOD = {"dataset_config": "data.yaml", "train": {"max_steps": 10}}


def test_good_config_loads_and_fills_auto(dataset_dir):
    run, ds = load(dataset_dir, GOOD, ["train.lr=2e-5", "train.micro_batch_size=2", "train.grad_accum=3",
                                       "model.freeze_modules=[a*, b]", "model.visual_gen=true"])
    cfg = run.config
    assert cfg.train.lr == 2e-5 and cfg.model.freeze_modules == ["a*", "b"]
    assert [g.task for g in run.dataset.groups] == ["t2i", "i2t"]  # read from the manifests
    assert ds["train_batch_size"] == 2 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["lr"] == 2e-5 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["reduce_bucket_size"] == HIDDEN * HIDDEN
    assert "scheduler" not in ds  # "auto": lance_ds.engine builds the run config's schedule
    assert "auto" not in json.dumps(ds)


def test_explicit_agreeing_values(dataset_dir):
    ds_json = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    run, ds = load(dataset_dir, GOOD, [], ds_json)
    assert "scheduler" not in ds and ds["optimizer"]["type"] == "AdamW"


def test_lr_schedule_warms_up_from_the_first_step_then_holds_or_decays():
    from lance_ds.config.run import TrainConfig
    from lance_ds.engine import lr_multiplier

    constant = TrainConfig(max_steps=10, warmup_steps=4)
    assert [lr_multiplier(s, constant) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(0, TrainConfig(warmup_steps=0)) == 1.0  # no warmup: full lr at once
    cosine = TrainConfig(max_steps=12, warmup_steps=2, lr=1e-3, min_lr=1e-4, lr_schedule="cosine")
    decay = [lr_multiplier(s, cosine) for s in range(2, 13)]
    assert decay[0] == 1.0 and decay[-1] == pytest.approx(0.1) and decay == sorted(decay, reverse=True)


BAD = [
    # (run yaml, overrides, ds json patch, the key the message must name)
    ({"trian": {}}, [], None, "trian"),
    ({"train": {"lerning_rate": 1}}, [], None, "train.lerning_rate"),
    ({}, ["train.max_step=5"], None, "train.max_step"),
    ({}, ["train.max_steps=0"], None, "train.max_steps"),
    ({}, ["train.max_steps=ten"], None, "train.max_steps"),
    ({}, ["train.lr=-1"], None, "train.lr"),
    ({}, ["train.lr=fast"], None, "train.lr"),
    ({}, ["train.betas=0.9"], None, "train.betas"),
    ({}, ["train.micro_batch_size=0"], None, "train.micro_batch_size"),
    ({}, ["train.grad_accum=1.5"], None, "train.grad_accum"),
    ({}, ["train.precision=fp8"], None, "train.precision"),
    ({}, ["train.lr_schedule=linear"], None, "train.lr_schedule"),
    ({}, ["train.betas=[0.9]"], None, "train.betas"),
    ({}, ["train.ema_decay=1.5"], None, "train.ema_decay"),
    ({}, ["train.stall_timeout_s=0"], None, "train.stall_timeout_s"),
    ({}, ["checkpoint.save_every=0"], None, "checkpoint.save_every"),
    ({}, ["checkpoint.keep_last=-1"], None, "checkpoint.keep_last"),
    ({}, ["validation.every=10"], None, "validation.dataset_config"),
    ({}, ["model.attention=xformers"], None, "model.attention"),
    ({}, ["model.size=3b", "model.visual_gen=false"], None, "model.random_init=true"),  # a random 3b by a lost path
    ({}, ["model.size=3b", "model.visual_gen=false", "model.random_init=true"], None, "model.tokenizer_path"),
    ({}, ["model.visual_und=false", "model.visual_gen=false"], None, "model.visual_und"),
    ({}, ["model.lape.num_spatial_tokens=0"], None, "model.lape.num_spatial_tokens"),
    ({}, ["model.lape.num_temporal_tokens=abc"], None, "model.lape.num_temporal_tokens"),
    ({}, ["model.visual_gen=false"], None, "groups[0]"),
    ({}, ["model.visual_und=false"], None, "groups[1]"),
    ({}, ["model.visual_gen=maybe"], None, "model.visual_gen"),
    ({}, ["model.training_type=qlora"], None, "model.training_type"),
    ({}, ["objective.prediction=noise"], None, "objective.prediction"),
    ({}, ["data.packing_length=0"], None, "data.packing_length"),
    ({}, ["dataset_config=missing.yaml"], None, "dataset_config"),
    ({}, ["train.lr"], None, "train.lr"),
    ({}, [], {"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
    ({}, [], {"gradient_clipping": 5.0}, "gradient_clipping"),
    ({}, [], {"train_batch_size": 7}, "train_batch_size"),
    ({}, [], {"bf16": {"enabled": False}}, "bf16.enabled"),
    ({}, [], {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "optimizer.params.lr"),
    ({}, [], {"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
    ({}, [], {"some_setting": "auto"}, "some_setting"),
    ({}, ["train.precision=fp16"], None, "train.precision"),  # on CPU
    ({}, ["validation.num_generations=-1"], None, "validation.num_generations"),
    ({}, ["validation.cfg_scale=-2"], None, "validation.cfg_scale"),
    ({}, ["model.freeze_modules=[*norm*,lm_head*]"], None, "model.freeze_modules"),  # YAML reads *norm* as an alias
    ({"validation": {"every": 5, "dataset_config": "data.yaml"}}, ["model.visual_gen=false"], None,
     "validation.dataset_config.groups[0]"),  # the held-out set is checked against the switches too
    ({}, ["validation.dataset_config=nowhere.yaml"], None, "validation.dataset_config"),  # named while off: read too
]


@pytest.mark.parametrize("run_patch, overrides, ds_patch, key", BAD, ids=[b[3] + str(i) for i, b in enumerate(BAD)])
def test_bad_config_is_refused_naming_the_key(dataset_dir, run_patch, overrides, ds_patch, key):
    run = {**GOOD, **run_patch}
    ds_json = None
    if ds_patch is not None:
        ds_json = json.loads((REPO / "ds_configs/zero3.json").read_text())
        ds_json.update(ds_patch)
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, run, overrides, ds_json)
    problems = err.value.problems
    assert any(key in p for p in problems), problems
    assert len({p.split(": ")[0] for p in problems}) == len(problems), problems  # each key said once


def test_an_edit_group_needs_the_vit():
    """A generation-only model (model.visual_und=false) with an i2i / v2v group was accepted, then failed at the first
    edit batch: an edit's source reaches the model through the ViT."""
    from lance_ds.config.core import Problems
    from lance_ds.config.data import DatasetConfig, GroupConfig
    from lance_ds.config.model import ModelConfig
    from lance_ds.config.run import check_switches

    for task, refused in (("t2i", False), ("i2i", True), ("v2v", True)):
        problems = Problems()
        check_switches(ModelConfig(visual_und=False), DatasetConfig([GroupConfig("g", ["x"], task=task)]), problems,
                       "dataset_config")
        assert bool(problems.items) == refused, (task, problems.items)
        assert not refused or "model.visual_und=true" in str(problems.items[0])


def test_every_problem_is_reported_at_once(dataset_dir):
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, {**GOOD, "trian": 1}, ["train.lr=-1", "checkpoint.keep_last=0", "model.attention=x"])
    assert len(err.value.problems) == 4


def test_unknown_key_suggests_the_closest_name():
    problems = Problems()
    from_dict(RunConfig, {"train": {"warmup_step": 3}}, problems)
    assert "did you mean 'warmup_steps'" in problems.items[0]
    # a key in the wrong section, or in none, is found where it lives
    problems = Problems()
    from_dict(RunConfig, {"optim": {"lr": 1e-3}, "max_steps": 5}, problems)
    assert problems.items[0].startswith("optim: unknown key; did you mean 'train.lr'?"), problems.items
    assert problems.items[1].startswith("max_steps: unknown key; did you mean 'train.max_steps'?"), problems.items


def test_missing_group_shards_and_wrong_task(dataset_dir):
    ds = {"groups": [{"name": "a", "shards": ["nowhere/*.tar"]},
                     {"name": "b", "shards": ["shards/t2i"], "task": "i2t"},
                     {"name": "b", "shards": ["shards/i2t"], "weight": 0}]}
    (dataset_dir / "bad.yaml").write_text(yaml.safe_dump(ds))
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, {**GOOD, "dataset_config": "bad.yaml"})
    text = str(err.value)
    assert "groups[0].shards" in text and "nowhere" in text
    assert "groups[1].task" in text and "manifest says t2i" in text
    assert "used twice" in text and "groups[2].weight" in text


def test_shard_globs_name_tar_files_and_take_the_task_beside_them(dataset_dir):
    """DIR/* over a converter output matched its manifest.json and rejects.jsonl, read as corrupt shards every epoch;
    its .tar files listed by a glob could not tell the task that the manifest beside them says."""
    from lance_ds.data.stream import resolve_sources

    for name in ("shard-000000.tar", "shard-000001.tar", "rejects.jsonl"):
        (dataset_dir / "shards" / "t2i" / name).write_bytes(b"")
    (dataset_dir / "shards" / "notes").mkdir()
    (dataset_dir / "shards" / "notes" / "a.txt").write_text("x")
    ds = {"groups": [{"name": "a", "shards": ["shards/t2i/*"]}, {"name": "b", "shards": ["shards/t2i/shard-00000{0,1}.tar"]}]}
    (dataset_dir / "glob.yaml").write_text(yaml.safe_dump(ds))
    run, _ = load(dataset_dir, {**GOOD, "dataset_config": "glob.yaml"})
    assert [g.task for g in run.dataset.groups] == ["t2i", "t2i"]  # from the manifest beside the tars
    shards, tasks = resolve_sources([str(dataset_dir / "shards/t2i/*")])
    assert [Path(s.url).name for s in shards] == ["shard-000000.tar", "shard-000001.tar"] and tasks == {"t2i"}
    (dataset_dir / "bad.yaml").write_text(yaml.safe_dump({"groups": [{"name": "a", "shards": ["shards/notes/*"],
                                                                      "task": "t2i"}]}))
    with pytest.raises(ConfigError, match="shards/notes/\\* matches no .tar shard, only .*a.txt; match the .tar"):
        load(dataset_dir, {**GOOD, "dataset_config": "bad.yaml"})
    # the converter's rejects.jsonl named as a shard (beside a manifest): refused here, not read as a corrupt shard
    # for 5 epochs by the ranks
    (dataset_dir / "named.yaml").write_text(yaml.safe_dump({"groups": [{"name": "a", "shards": [
        "shards/t2i/rejects.jsonl"]}]}))
    with pytest.raises(ConfigError, match="shards/t2i/rejects.jsonl is not a .tar shard; name the .tar files"):
        load(dataset_dir, {**GOOD, "dataset_config": "named.yaml"})


def test_extends_and_overrides_merge(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"train": {"lr": 1e-3, "max_steps": 5}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "train": {"max_steps": 7}}))
    from lance_ds.config.core import load_yaml

    problems = Problems()
    data = apply_overrides(load_yaml(tmp_path / "child.yaml", problems), ["train.seed=3", "log.every=2"], problems)
    cfg = from_dict(RunConfig, data, problems)
    assert not problems
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.seed, cfg.log.every) == (1e-3, 7, 3, 2)


def test_paths_are_relative_to_the_yaml_that_names_them_and_absolute_after(dataset_dir, monkeypatch):
    (dataset_dir / "experiments").mkdir()
    (dataset_dir / "base.yaml").write_text(yaml.safe_dump(GOOD))  # names data.yaml beside itself
    (dataset_dir / "experiments" / "child.yaml").write_text(yaml.safe_dump({"extends": "../base.yaml"}))
    problems = Problems()
    run = load_run(str(dataset_dir / "experiments" / "child.yaml"), [], problems)
    assert not problems, problems.items
    assert run.config.dataset_config == str(dataset_dir / "data.yaml")
    assert run.dataset.groups[0].shards == [str(dataset_dir / "shards" / "t2i")]
    # the same config named another way (relative to a different working directory) gives the same paths
    monkeypatch.chdir(dataset_dir / "experiments")
    again = load_run("../experiments/child.yaml", ["model.vae_path=codec"], problems)
    assert again.config.model.vae_path == str(dataset_dir / "experiments" / "codec")  # from where it runs
    assert again.dataset.groups == run.dataset.groups and again.config.dataset_config == run.config.dataset_config


def test_path_flags_stay_strings():
    from lance_ds.train import parse_args

    args = parse_args(["--config", "a.yaml", "--output_dir", "runs/exp #2", "--dataset_config", "0755", "train.seed=3"])
    problems = Problems()
    data = apply_overrides({}, args.overrides, problems)
    assert not problems and data == {"output_dir": "runs/exp #2", "dataset_config": "0755", "train": {"seed": 3}}
    # overrides after a flag (argparse took them for unknown arguments: the key looked wrong, not its place)
    late = parse_args(["--config", "a.yaml", "train.lr=1e-3", "--output_dir", "d", "train.max_steps=10"])
    assert late.overrides == ['output_dir="d"', "train.lr=1e-3", "train.max_steps=10"] and late.config == "a.yaml"
    # an empty flag (`--output_dir "$RUN"` with RUN unset) is passed on, to be refused, not dropped for the default
    assert parse_args(["--config", "a.yaml", "--output_dir", ""]).overrides == ['output_dir=""']
    # string keys take an override's text as typed (YAML would cut a path at " #" and read 0755 as 493) ...
    data = apply_overrides({}, ["model.path=/m/run #2", "output_dir=0755", "model.vae_path=null",
                                "model.attention='flex'", "train.seed=0755", "model.tokenizer_path=2024_01"],
                           problems, RunConfig)
    assert not problems and data == {"model": {"path": "/m/run #2", "vae_path": None, "tokenizer_path": "2024_01",
                                               "attention": "flex"},
                                     "output_dir": "0755", "train": {"seed": 493}}
    # ... and a number where YAML files give text is refused, not turned into other text
    found = Problems()
    from_dict(RunConfig, {"output_dir": 493}, found)
    assert found.items == ["output_dir: YAML reads this as the number 493, not as text; quote it (e.g. '0755')"]


def test_every_shipped_config_loads():
    """Every YAML under configs/ parses into its dataclass with no unknown keys (litgpt's rule)."""
    from lance_ds.config.core import check, load_yaml
    from lance_ds.config.data import DatasetConfig

    shipped = sorted((REPO / "configs").rglob("*.yaml"))
    assert shipped
    for path in shipped:
        problems = Problems()
        data = load_yaml(path, problems)
        cls = DatasetConfig if "groups" in data else RunConfig
        check(from_dict(cls, data, problems), problems)
        # dataset shards may not exist before the main job makes them, the 3b configs name no model.path (MODEL_PATH
        # gives it); everything else must be clean
        assert not [p for p in problems.items if "shards" not in p and not p.startswith("model.path")], \
            (path, problems.items)


def test_every_field_is_documented():
    undocumented = [key for key, _, text in describe(RunConfig) if not text]
    assert not undocumented


def test_print_config_and_check_exit_before_any_work(dataset_dir, capsys):
    from lance_ds.train import main

    (dataset_dir / "run.yaml").write_text(yaml.safe_dump(GOOD))
    args = ["--config", str(dataset_dir / "run.yaml"), "--ds_config", str(REPO / "ds_configs/zero3.json"),
            "train.lr=3e-5"]
    assert main(["--print_config", *args]) == 0
    out = capsys.readouterr().out
    printed_run, _, printed_ds = out.partition("\n{")
    assert yaml.safe_load(printed_run)["train"]["lr"] == 3e-5
    assert json.loads("{" + printed_ds)["optimizer"]["params"]["lr"] == 3e-5
    assert main(["--check", *args]) == 0
    out, err = capsys.readouterr()
    assert "configs OK" in out
    # allowed, but rarely meant: said (GOOD trains 10 steps under the default 500 warmup steps, random frozen ViT)
    assert "warning: train.warmup_steps=500 is not below train.max_steps=10" in err and "(it ends at 6e-07)" in err
    assert "warning: the ViT is random (no model.vit_path or model.path) and frozen" in err
    assert main(["--check", *args, "train.warmup_steps=2", "model.vit_trainable=true"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["--check", *args, "train.lr=-1"]) == 2 and "train.lr: must be > 0" in capsys.readouterr().err
    # validation on held-out data that is not there (a shipped config's example YAML): how to point it elsewhere
    assert main(["--check", *args, "validation.every=5", f"validation.dataset_config={dataset_dir / 'no.yaml'}"]) == 2
    assert ("validation.dataset_config: " + f"{dataset_dir / 'no.yaml'} is the held-out data validation.every=5 "
            "reads: set validation.dataset_config=YOUR_VAL.yaml, or validation.every=0") in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a run YAML is required: the bare defaults are no run anyone meant
        main(["--check", "--dataset_config", str(dataset_dir / "data.yaml")])
    assert "the following arguments are required: --config" in capsys.readouterr().err
    # a JSON written for 8 ranks, checked where it is written (outside the launcher): --world_size says so
    eight = dataset_dir / "eight.json"
    eight.write_text(json.dumps({**json.loads((REPO / "ds_configs/zero3.json").read_text()), "train_batch_size": 8}))
    one_each = ["--ds_config", str(eight), "train.micro_batch_size=1", "train.grad_accum=1"]
    assert main(["--check", *args, *one_each]) == 2
    assert "x 1 rank(s)" in capsys.readouterr().err
    assert main(["--check", *args, *one_each, "--world_size", "8"]) == 0
    with pytest.raises(SystemExit):  # a launched run's ranks are the launcher's
        main([*args, "--world_size", "8"])
    # from elsewhere than the repository, without --ds_config (its default is the repository's): stdout holds the
    # config alone (DeepSpeed's accelerator notice went there, ahead of the YAML)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "lance_ds" / "train.py"), "--print_config", "--config",
                           "run.yaml"], cwd=dataset_dir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("output_dir:"), (done.stdout[:300], done.stderr[-1000:])


def test_a_resume_on_another_data_order_is_refused_by_the_check_before_any_build(dataset_dir, capsys):
    """train.py checks what --resume names on every rank before building; a checkpoint trained on other data (its
    fingerprint in trainer_state.json) is refused there, not by the loader after the build."""
    from lance_ds.checkpoint import Checkpointer
    from lance_ds.config import load_and_check
    from lance_ds.data.stream import run_data_order
    from lance_ds.train import main

    (dataset_dir / "run.yaml").write_text(yaml.safe_dump({**GOOD, "output_dir": str(dataset_dir / "out")}))
    args = ["--check", "--config", str(dataset_dir / "run.yaml")]
    run, _ = load_and_check(str(dataset_dir / "run.yaml"), [], str(REPO / "ds_configs/zero3.json"), 1)

    class Engine:
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)

    for fingerprint, code in ((run_data_order(run)[0], 0), ("trained on other data", 2)):
        Checkpointer(dataset_dir / "out" / "checkpoints", 2, 0, 1).save(
            Engine(), 5, {"model": {}, "data_fingerprint": fingerprint}, {"train": {}}, None, None)
        assert main(args) == code
    assert "was trained on another data order" in capsys.readouterr().err
    assert main([*args, "checkpoint.data_change=restart"]) == 0  # the weights go on; the new data from its start
    # the same shard paths holding other data (the dataset converted again into the same folder): the saved position
    # points into the old files (the ranks failed at their first step, restart or not)
    fingerprint, groups = run_data_order(run)
    Checkpointer(dataset_dir / "out" / "checkpoints", 2, 0, 1).save(
        Engine(), 6, {"model": {}, "data_fingerprint": fingerprint, "data_groups": groups}, {"train": {}}, None, None)
    capsys.readouterr()
    assert main(args) == 0
    manifest = dataset_dir / "shards" / "t2i" / "manifest.json"
    converted_again = json.loads(manifest.read_text())
    converted_again["shards"][0].update(num_samples=27, bytes=123456, crc32="0badf00d")
    manifest.write_text(json.dumps(converted_again))
    assert run_data_order(load_and_check(str(dataset_dir / "run.yaml"), [], str(REPO / "ds_configs/zero3.json"),
                                         1)[0])[0] == fingerprint  # (the same order: only the contents tell)
    assert main(args) == 2
    assert "group gen: its 1 shard(s) hold other data at the same paths" in capsys.readouterr().err
    assert main([*args, "checkpoint.data_change=restart"]) == 0


def test_a_key_given_twice_is_refused_naming_the_file_line_and_key(dataset_dir):
    """PyYAML (and json) keep the last of two equal keys: the first `train:` block would be silently dropped."""
    (dataset_dir / "run.yaml").write_text("dataset_config: data.yaml\ntrain:\n  lr: 1.0e-3\ntrain:\n  max_steps: 5\n")
    problems = Problems()
    load_run(str(dataset_dir / "run.yaml"), [], problems)
    assert len(problems.items) == 1, problems.items
    assert f"{dataset_dir / 'run.yaml'}, line 4: key 'train' is given twice (also on line 2)" in problems.items[0]

    (dataset_dir / "dup.yaml").write_text("groups:\n  - name: gen\n    shards: shards/t2i\n    name: again\n")
    (dataset_dir / "run.yaml").write_text("dataset_config: dup.yaml\n")
    problems = Problems()
    load_run(str(dataset_dir / "run.yaml"), [], problems)
    assert problems.items == [f"dataset_config: {dataset_dir / 'dup.yaml'}, line 4: key 'name' is given twice (also "
                              "on line 2); YAML would keep only the last, silently dropping the first: merge them "
                              "into one"]

    (dataset_dir / "ds.json").write_text('{"zero_optimization": {"stage": 3}, "zero_optimization": {"stage": 0}}')
    problems = Problems()
    assert load_ds_json(str(dataset_dir / "ds.json"), problems) == {}
    assert problems.items == [f"--ds_config: {dataset_dir / 'ds.json'}: key 'zero_optimization' is given twice in "
                              "one object; JSON would keep only the last: merge them into one"]


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from lance_ds.config.core import load_yaml

    (tmp_path / "run.yaml").write_text("base: &b {lr: 1.0, max_steps: 3}\ntrain:\n  <<: *b\n  lr: 2.0\n")
    problems = Problems()
    assert load_yaml(tmp_path / "run.yaml", problems)["train"] == {"lr": 2.0, "max_steps": 3} and not problems


def test_non_utf8_or_unreadable_files_are_reported_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_bytes(b"train:\n  lr: 1.0e-4  # caf\xe9\n")
    (tmp_path / "ds.json").write_bytes(b'{"steps_per_print": 1, "note": "caf\xe9"}')

    def problems_reading_both() -> list[str]:
        problems = Problems()
        load_run(str(tmp_path / "run.yaml"), [], problems)
        load_ds_json(str(tmp_path / "ds.json"), problems)
        return [problems.items[0], problems.items[-1]]

    assert problems_reading_both() == [
        f"--config: {tmp_path / 'run.yaml'} is not UTF-8 text (byte 26: invalid continuation byte); save it as UTF-8",
        f"--ds_config: {tmp_path / 'ds.json'} is not UTF-8 text (byte 35: invalid continuation byte); save it as UTF-8"]

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    config, ds = problems_reading_both()
    assert config.startswith(f"--config: cannot read {tmp_path / 'run.yaml'}: Permission denied")
    assert ds.startswith(f"--ds_config: cannot read {tmp_path / 'ds.json'}: Permission denied")


def test_extends_cycles_and_non_file_extends_are_refused(tmp_path):
    from lance_ds.config.core import load_yaml

    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: [a.yaml]\n")
    problems = Problems()
    assert load_yaml(tmp_path / "a.yaml", problems) == {}
    cycle = f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}"
    assert problems.items == [f"{tmp_path / 'b.yaml'}: extends: `extends:` goes round in a circle ({cycle}); "
                              "remove one of these extends"]
    (tmp_path / "c.yaml").write_text("extends: 5\n")
    problems = Problems()
    load_yaml(tmp_path / "c.yaml", problems)
    assert problems.items == [f"{tmp_path / 'c.yaml'}: extends: must be a file name or a list of them (relative to "
                              "this file), got 5"]
    # two parents sharing a grandparent are no cycle
    (tmp_path / "base.yaml").write_text("train: {lr: 1.0}\n")
    (tmp_path / "p.yaml").write_text("extends: base.yaml\n")
    (tmp_path / "q.yaml").write_text("extends: base.yaml\n")
    (tmp_path / "child.yaml").write_text("extends: [p.yaml, q.yaml]\n")
    problems = Problems()
    assert load_yaml(tmp_path / "child.yaml", problems) == {"train": {"lr": 1.0}} and not problems


@pytest.mark.parametrize("patch, message", [
    ({"zero_optimization": 3}, '--ds_config zero_optimization: must be a mapping like {"stage": 3}, got 3'),
    ({"bf16": True}, '--ds_config bf16: must be a mapping like {"enabled": "auto"}, got true'),
    ({"optimizer": None}, '--ds_config optimizer: must be a mapping like {"type": "AdamW", "params": {"lr": "auto"}} '
                          "(or leave it out: the run config's AdamW), got null"),
    ({"optimizer": {"type": "AdamW", "params": [0.1]}}, "--ds_config optimizer.params: must be a mapping like"),
    ({"scheduler": 5}, '--ds_config scheduler: must be "auto" (the run config\'s schedule) or left out'),
    ({"zero_optimisation": {"stage": 3}}, "--ds_config zero_optimisation: is not a DeepSpeed key (DeepSpeed would "
                                          "silently ignore it); did you mean zero_optimization?"),
    ({"gradient_cliping": "auto"}, "did you mean gradient_clipping?"),
    ({"checkpoint": {"writer": {"decoupled": True}}}, "--ds_config checkpoint.writer.decoupled: writes checkpoints "
                                                      "in the background"),
    ({"datastates_ckpt": {"enabled": True}}, "--ds_config datastates_ckpt.enabled: writes checkpoints in the "
                                             "background"),
])
def test_deepspeed_sections_of_the_wrong_type_or_misspelt_are_refused(dataset_dir, patch, message):
    ds_json = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds_json.update(patch)
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD, [], ds_json)
    assert any(message in p for p in err.value.problems), err.value.problems


def test_unknown_deepspeed_keys_not_close_to_a_known_one_pass(dataset_dir):
    ds_json = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds_json.update({"zero_quantized_nontrainable_weights": False, "my_note": "x"})
    load(dataset_dir, GOOD, [], ds_json)


def test_known_deepspeed_keys_are_deepspeeds():
    """Each listed top-level key is a string DeepSpeed's own source names (a typo in the list would pass typos)."""
    import importlib.util

    from lance_ds.config.deepspeed import DS_TOP_LEVEL_KEYS

    spec = importlib.util.find_spec("deepspeed")  # finds the package without importing it
    source = "\n".join(p.read_text(errors="replace") for p in Path(spec.origin).parent.rglob("*.py"))
    assert [k for k in DS_TOP_LEVEL_KEYS if f'"{k}"' not in source and f"'{k}'" not in source] == []


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=.nan", "train.min_lr=-.inf", "train.betas=[nan, 0.9]",
                                      "objective.timestep_shift=.inf", "validation.cfg_scale=NaN"])
def test_non_finite_floats_are_refused(dataset_dir, override):
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD, [override])
    key = override.partition("=")[0]
    assert [p for p in err.value.problems if p.startswith(key) and "must be a finite number" in p], err.value.problems


@pytest.mark.parametrize("override, message", [
    ("train.eps=-1", "train.eps: must be > 0 (e.g. 1e-8), got -1.0"),
    ("train.eps=0", "train.eps: must be > 0"),
    ("train.weight_decay=-5", "train.weight_decay: must be >= 0 (0: no decay), got -5.0"),
    ("output_dir=", "output_dir: is empty; give a directory"),
    ("output_dir=' '", "output_dir: is empty; give a directory"),
    ("train.seed=18446744073709551616", "train.seed: must be in [0, 2**63), got 18446744073709551616"),
])
def test_optimizer_values_torch_refuses_and_an_empty_output_dir_are_refused(dataset_dir, override, message):
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD, [override])
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(message), err.value.problems


def test_a_model_path_that_is_no_checkpoint_is_a_config_problem(dataset_dir, tmp_path):
    from lance_ds.config import load_and_check

    (dataset_dir / "run.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ConfigError) as err:
        load_and_check(str(dataset_dir / "run.yaml"), [f"model.path={tmp_path / 'not_a_model'}"],
                       str(REPO / "ds_configs/zero3.json"), 1, on_gpu=False)
    assert err.value.problems == [f"model.path: model.path {tmp_path / 'not_a_model'} is neither a Lance checkpoint "
                                  "(model.safetensors + llm_config.json) nor a Qwen2.5-VL directory (config.json + "
                                  "*.safetensors)"], err.value.problems


def test_model_files_the_build_would_fail_on_are_config_problems(dataset_dir, tmp_path):
    """Refused by --check, before any rank starts work (they were tracebacks on every rank after the launch), and a
    pretrained model.path is tokenized with its own tokenizer, not the debug one."""
    import shutil

    from lance_ds.config import load_and_check
    from lance_ds.data.tokenizer import DEBUG_TOKENIZER_DIR, load_tokenizer
    from lance_ds.model import build_model
    from lance_ds.model.weights import save_lance_dir

    (dataset_dir / "run.yaml").write_text(yaml.safe_dump(GOOD))
    tokenizer = load_tokenizer()
    model = build_model(ModelConfig(size="debug", dtype="fp32"), len(tokenizer))
    special = tokenizer.special
    lance = save_lance_dir(tmp_path / "lance", model.model.state_dict(), model.spec.llm, model.spec.vit,
                           model.vit.state_dict(), extra_config={"num_text_classes": len(tokenizer),
                                                                 "vision_start_token_id": special.vision_start})
    empty = tmp_path / "empty"
    empty.mkdir()

    def problems(*overrides: str) -> list[str]:
        try:
            load_and_check(str(dataset_dir / "run.yaml"), list(overrides), str(REPO / "ds_configs/zero3.json"), 1,
                           on_gpu=False)
        except ConfigError as e:
            return e.problems
        return []

    path = f"model.path={lance}"
    assert problems(path) == [
        f"model.tokenizer_path: model.path {lance} has no tokenizer (tokenizer.json / tokenizer_config.json): set "
        "model.tokenizer_path to the tokenizer its token ids come from"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEBUG_TOKENIZER_DIR / name, lance / name)
    run, _ = load_and_check(str(dataset_dir / "run.yaml"), [path],
                            str(REPO / "ds_configs/zero3.json"), 1, on_gpu=False)
    assert run.config.model.tokenizer_path == str(lance)  # the checkpoint's own
    config = json.loads((lance / "llm_config.json").read_text())
    (lance / "llm_config.json").write_text(json.dumps({**config, "num_text_classes": 2112,
                                                       "vision_start_token_id": 151652}))
    found = problems(path, f"model.tokenizer_path={DEBUG_TOKENIZER_DIR}")
    assert len(found) == 2 and "trained with a tokenizer of 2112 tokens" in found[0], found
    assert "<|vision_start|> = 151652" in found[1] and found[1].endswith("trained with (the debug tokenizer is used "
                                                                         "when it is unset and model.path has none)")
    assert problems(path, "model.size=3B")[0].startswith("model.size: must be one of")
    assert problems("model.tokenizer_path=/nonexistent") == [
        "model.tokenizer_path: /nonexistent is not a directory; point it at a local checkpoint directory"]
    assert problems("model.vae=frame") == ["model.vae_path: model.vae=frame for size 'debug' needs weights: set "
                                           "model.vae_path to a local frame VAE (tools/train_example_vae.py) "
                                           "directory"]
    assert problems(f"model.vae_path={empty}")[0].startswith(f"model.vae_path: model.vae_path {empty} has no "
                                                              "config.json")
    assert problems(f"model.vit_path={empty}")[0].startswith(f"model.vit_path: no *.safetensors files in {empty}")
    no_vit = save_lance_dir(tmp_path / "no_vit", model.model.state_dict(), model.spec.llm)  # and none named
    found = problems(f"model.path={no_vit}", f"model.tokenizer_path={lance}")
    assert found[0].startswith(f"model.path: no ViT weights in {no_vit}"), found
    assert found[0].endswith("or model.visual_und=false")
    assert problems("model.training_type=lora", "model.lora.target_modules=[qproj]")[0].startswith(
        "model.lora.target_modules: ['qproj'] name no linear layer of the model; choose from")
    assert problems("model.training_type=lora", "model.lora.target_modules=[]") == [
        "model.lora.target_modules: name at least one linear layer to adapt, e.g. [q_proj, k_proj, v_proj, o_proj]"]


def test_torch_adamw_on_every_device_unless_the_json_asks_for_fused_adam(dataset_dir):
    """DeepSpeed's FusedAdam is compiled on first use (nvcc; on an H200 with torch 2.11 the build failed before
    step 1): the recipe uses torch's AdamW on GPUs too, and an explicit "torch_adam": false is kept."""
    run, _ = load(dataset_dir, GOOD)
    raw = json.loads((REPO / "ds_configs/zero3.json").read_text())
    gpu = resolve_ds_config(raw, run.config, 2, HIDDEN, on_gpu=True, problems=Problems())
    assert gpu["optimizer"]["params"]["torch_adam"] is True
    raw["optimizer"]["params"]["torch_adam"] = False
    assert resolve_ds_config(raw, run.config, 2, HIDDEN, True, Problems())["optimizer"]["params"]["torch_adam"] is False


def test_flash_attention_is_checked_before_any_rank_starts(dataset_dir, monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match="model.attention: flash needs a GPU and the flash_attn package"):
        load(dataset_dir, GOOD, ["model.attention=flash"])  # on_gpu=False here
    with pytest.raises(ConfigError, match="model.attention: flex trains on CUDA only"):  # (failed at the first backward)
        load(dataset_dir, GOOD, ["model.attention=flex"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # as if flash_attn were installed
    run, _ = load(dataset_dir, GOOD, ["train.precision=fp32"])
    run.config.model.attention = "flash"  # on a GPU machine
    raw = json.loads((REPO / "ds_configs/zero3.json").read_text())
    problems = Problems()
    resolve_ds_config(raw, run.config, 2, HIDDEN, on_gpu=True, problems=problems)
    assert any("flash takes fp16 / bf16 only" in p for p in problems.items)


def test_zero_section_is_checked_by_deepspeeds_own_model(dataset_dir):
    zero = {"stage": 3, "offload_optimizer": {"device": "gpu"}, "stage3_prefetch_bucket_sise": 5}
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD, ds_json={"zero_optimization": zero})
    assert any(p.startswith("--ds_config zero_optimization.offload_optimizer.device: Input should be 'none', 'cpu'")
               for p in err.value.problems)
    assert any("zero_optimization.stage3_prefetch_bucket_sise: Extra inputs are not permitted" in p
               for p in err.value.problems)


def test_a_group_whose_conversions_wrote_nothing_is_refused(dataset_dir):
    """A converter output whose every row was rejected has an empty manifest: refused at check time (else the
    loader finds no shards once every rank has built the model), as is a manifest with no shard list."""
    empty = dataset_dir / "shards" / "t2i" / "manifest.json"
    empty.write_text(json.dumps({"task": "t2i", "num_samples": 0, "shards": []}))
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD)
    assert len(err.value.problems) == 1 and "groups[0].shards" in err.value.problems[0]
    assert "hold(s) no samples" in err.value.problems[0] and "rejects.jsonl" in err.value.problems[0]


@pytest.mark.parametrize("text, says", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"task": "t2i"}), "no list of named shards"),
    (json.dumps({"task": "t2i", "shards": [{"num_samples": 2}]}), "no list of named shards"),
    (json.dumps({"task": "text2image", "shards": []}), "task 'text2image', not one of t2i"),
])
def test_a_manifest_that_is_not_a_converters_is_refused_alike_by_the_check_and_the_loader(dataset_dir, text, says):
    from lance_ds.data.stream import DataError, resolve_sources

    manifest = dataset_dir / "shards" / "t2i" / "manifest.json"
    manifest.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD)
    [problem] = err.value.problems
    assert problem.startswith("dataset_config.groups[0].shards") and says in problem and "re-run tools/parquet_to_wds.py" in problem
    with pytest.raises(DataError) as loading:  # (a file replaced after the check, or a loader used on its own)
        resolve_sources([str(manifest.parent)])
    assert str(loading.value) in problem


def test_output_dir_that_is_a_file_or_not_writable_is_refused(dataset_dir, monkeypatch):
    (dataset_dir / "taken").write_text("")
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD, [f"output_dir={dataset_dir / 'taken'}"])
    assert err.value.problems == [f"output_dir: {dataset_dir / 'taken'} is a file, not a directory; choose another "
                                  "output_dir"]
    # a read-only mount (or another user's folder): --check said "configs OK", then every rank died in a traceback
    import lance_ds.config.core as core

    read_only = dataset_dir / "mnt"
    read_only.mkdir()
    monkeypatch.setattr(core.os, "access", lambda path, mode: Path(path) != read_only)  # (root may write anywhere)
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD, [f"output_dir={read_only / 'runs' / 'a'}"])
    assert err.value.problems == [f"output_dir: {read_only} is not writable here, so {read_only / 'runs' / 'a'} "
                                  "cannot be written; choose another path"]
    load(dataset_dir, GOOD, [f"output_dir={dataset_dir / 'runs' / 'a'}"])


def test_one_unknown_key_in_a_group_is_the_only_problem_reported(dataset_dir):
    ds = {"groups": [{"name": "gen", "shards": "shards/t2i", "imagee": {"resolution": 32}}]}
    (dataset_dir / "typo.yaml").write_text(yaml.safe_dump(ds))
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, {**GOOD, "dataset_config": "typo.yaml"})
    assert len(err.value.problems) == 1 and "groups[0].imagee: unknown key; did you mean 'image'?" in str(err.value)


def test_closing_after_a_failure_that_fails_again_still_lets_the_rank_exit(capsys):
    """train.py must reach exit_now after a failure: a close() that raised too (the same full disk) left the process
    in Python's exit, waiting on loader workers that ignore SIGTERM."""
    from lance_ds.train import close_after_failure

    class Failing:
        def close(self, finished=True):
            raise OSError(28, "No space left on device")

    close_after_failure(Failing())
    assert "while closing after the failure: OSError" in capsys.readouterr().err


def test_the_banner_says_the_side_a_video_and_the_vit_are_cut_at():
    """It said the image side for a video group with a side of its own (64 px for 33 x 384 x 384 clips) and never the
    ViT's."""
    from lance_ds.config.data import GroupConfig, ImageOptions, VideoOptions
    from lance_ds.trainer import describe_cut

    t2v = GroupConfig(name="a", task="t2v", video=VideoOptions(resolution=384, max_frames=33, sample_fps=12))
    assert describe_cut(t2v) == "384 px, 33 frames at 12 fps"
    i2i = GroupConfig(name="b", task="i2i", image=ImageOptions(resolution=512, vit_resolution=224))
    assert describe_cut(i2i) == "512 px, ViT 224 px"
    t2i = GroupConfig(name="c", task="t2i", image=ImageOptions(resolution=512, vit_resolution=224))
    assert describe_cut(t2i) == "512 px"  # (no ViT input)


def test_generation_sizes_beyond_the_latent_position_table_are_said(tmp_path):
    """The 3b model's latent positions reach 64 x 16 = 1024 px a side and 121 frames: a group asking for 1280 px or
    161 frames was cut to them silently (its banner said 1280 px)."""
    from lance_ds.config.data import DatasetConfig, GroupConfig, ImageOptions, VideoOptions
    from lance_ds.model.build import planned_geometry
    from lance_ds.train import beyond_the_position_table

    # Wan2.2's VAE config (16x spatial: 8 from three downsamplings x its 2 x 2 patches, 4x temporal); no weights read
    wan = {"_class_name": "AutoencoderKLWan", "z_dim": 48, "patch_size": 2, "dim_mult": [1, 2, 4, 4],
           "temperal_downsample": [False, True, True]}
    (tmp_path / "config.json").write_text(json.dumps(wan))
    geometry = planned_geometry(ModelConfig(size="3b", vae_path=str(tmp_path)))
    assert (geometry.max_latent_size * geometry.vae_spatial_factor, geometry.vae_num_frames(10 ** 6)) == (1024, 121)
    groups = [GroupConfig(name="big", task="t2i", image=ImageOptions(resolution=1280)),
              GroupConfig(name="long", task="t2v", video=VideoOptions(resolution=512, max_frames=161)),
              GroupConfig(name="fits", task="v2v", image=ImageOptions(resolution=2048),
                          video=VideoOptions(resolution=1024, max_frames=121)),
              GroupConfig(name="und", task="i2t", image=ImageOptions(resolution=2048))]  # the ViT has no such table
    said = beyond_the_position_table(DatasetConfig(groups=groups), geometry)
    assert said == [
        "dataset_config.groups[0] (big): 1280 px, but the model's latent positions reach 1024 px (model "
        "max_latent_size 64 x the VAE's 16): its media are cut to at most 1024 px a side",
        "dataset_config.groups[1] (long): video.max_frames=161, but the model's latent positions hold 121 frames: "
        "clips are cut to 121"]


def test_media_scaled_up_far_to_their_groups_area_are_said(tmp_path):
    """64 px images in a group at image.resolution 448 (the README's example value) trained 7x upscaled, silently;
    the manifests' media sizes tell, before any rank starts. A question's images go to the ViT at its side."""
    from lance_ds.config.data import DatasetConfig, GroupConfig, ImageOptions
    from lance_ds.train import upscaled_media

    def output(name: str, task: str, height: int, width: int) -> str:
        stats = {"count": 4, "height": {"mean": height}, "width": {"mean": width}}
        member = "image" if task != "i2i" else "input_image"
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(
            {"task": task, "shards": [{"name": "shard-000000.tar", "num_samples": 4, "media": {member: stats}}]}))
        return str(tmp_path / name)

    groups = [GroupConfig(name="small", task="t2i", shards=[output("a", "t2i", 64, 64)],
                          image=ImageOptions(resolution=448)),
              GroupConfig(name="fine", task="i2i", shards=[output("b", "i2i", 64, 64)],
                          image=ImageOptions(resolution=96)),
              GroupConfig(name="asked", task="i2t", shards=[output("c", "i2t", 64, 64)],
                          image=ImageOptions(resolution=64, vit_resolution=448)),
              GroupConfig(name="thin", task="t2i", shards=[output("d", "t2i", 203, 17)],
                          image=ImageOptions(resolution=56)),
              GroupConfig(name="remote", task="t2i", shards=["https://host/shard-{0..3}.tar"])]
    said = upscaled_media(DatasetConfig(groups=groups))
    assert said == [
        "dataset_config.groups[0] (small): its image media are 64x64 on average, scaled up 7.0x a side to the 448 px "
        "area the group cuts them to; a lower resolution trains on fewer tokens, as sharp",
        "dataset_config.groups[2] (asked): its image media are 64x64 on average, scaled up 7.0x a side to the 448 px "
        "area the group cuts them to; a lower resolution trains on fewer tokens, as sharp",
        "dataset_config.groups[3] (thin): its image media are 17x203 on average, scaled up 3.3x a side to the 56 px "
        "area the group cuts them to; a lower resolution trains on fewer tokens, as sharp"]


def test_validating_with_the_ema_needs_one(dataset_dir):
    with pytest.raises(ConfigError, match=r"validation.weights: ema needs an EMA: set train.ema_decay > 0"):
        load(dataset_dir, GOOD, ["validation.weights=ema"])
    run, _ = load(dataset_dir, GOOD, ["validation.weights=ema", "train.ema_decay=0.999"])
    assert run.config.validation.weights == "ema"
