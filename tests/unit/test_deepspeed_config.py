"""DeepSpeed JSON sections lance_ds cannot honour are refused at check time, before any rank builds the model:
a scheduler of its own (it would replace the run config's schedule), an optimizer other than Adam / AdamW (the run
config's train.* describe AdamW), top-level keys DeepSpeed itself has removed, and the legacy "bfloat16" name."""

import json

import pytest
import torch
import yaml
from test_config import GOOD, HIDDEN, REPO, load

from lance_ds.config import ConfigError, Problems, resolve_ds_config
from lance_ds.config.deepspeed import DS_TOP_LEVEL_KEYS

STOCK = sorted((REPO / "ds_configs").glob("*.json"))


def stock(name: str = "zero3.json", **patch) -> dict:
    ds_json = json.loads((REPO / "ds_configs" / name).read_text())
    ds_json.update(patch)
    return ds_json


def refused(dataset_dir, ds_json: dict, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load(dataset_dir, GOOD, overrides, ds_json)
    return err.value.problems


@pytest.mark.parametrize("path", STOCK, ids=[p.name for p in STOCK])
def test_stock_jsons_resolve_with_no_scheduler_and_torchs_adamw(dataset_dir, path):
    _, ds = load(dataset_dir, GOOD, [], json.loads(path.read_text()))
    assert "scheduler" not in ds  # lance_ds.engine builds the run config's LambdaLR
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize("path", STOCK, ids=[p.name for p in STOCK])
def test_bf16_gradients_accumulate_in_fp32(dataset_dir, path):
    """DeepSpeed sums micro-step gradients in the model's dtype unless data_types says otherwise: under bf16 a step
    of grad_accum 8 differed by 0.3% from the same step summed in fp32 (a reviewer's probe)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    _, ds = load(dataset_dir, GOOD, ["train.precision=bf16"], json.loads(path.read_text()), world_size=1)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert DeepSpeedConfig(ds).grad_accum_dtype == "fp32"  # (the key DeepSpeed's engine reads it from)
    _, ds = load(dataset_dir, GOOD, ["train.precision=bf16"], {**json.loads(path.read_text()),
                                                               "data_types": {"grad_accum_dtype": "bf16"}})
    assert ds["data_types"]["grad_accum_dtype"] == "bf16"  # a JSON's own choice stays
    _, ds = load(dataset_dir, GOOD, ["train.precision=fp32"], json.loads(path.read_text()))
    assert "data_types" not in ds  # fp32 accumulates in fp32 anyway


# ---------------------------------------------------------------------------------------------------------------
# 1. scheduler: the schedule is the run config's


@pytest.mark.parametrize("scheduler", [
    {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
    {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2}},
    {"type": "WarmupLR"},
    5,
    None,
])
def test_a_deepspeed_scheduler_is_refused_naming_the_run_config_keys(dataset_dir, scheduler):
    """A DeepSpeed scheduler silently replaced train.lr_schedule / warmup_steps / min_lr (the banner still showed
    them), and a resume with the stock JSON then crashed in engine.load_checkpoint (KeyError 'lr_lambdas')."""
    problems = refused(dataset_dir, stock(scheduler=scheduler))
    assert len(problems) == 1, problems
    assert problems[0].startswith("--ds_config scheduler: "), problems
    for key in ("train.lr_schedule", "train.warmup_steps", "train.min_lr"):
        assert key in problems[0], problems


def test_scheduler_auto_or_left_out_is_the_run_configs(dataset_dir):
    ds_json = stock()
    del ds_json["scheduler"]
    for given in (ds_json, stock(scheduler="auto")):
        _, ds = load(dataset_dir, GOOD, [], given)
        assert "scheduler" not in ds


def test_check_refuses_a_deepspeed_scheduler_before_any_work(dataset_dir, capsys):
    from lance_ds.train import main

    (dataset_dir / "run.yaml").write_text(yaml.safe_dump(GOOD))
    (dataset_dir / "ds.json").write_text(json.dumps(stock(scheduler={"type": "WarmupLR",
                                                                     "params": {"warmup_num_steps": 5}})))
    assert main(["--check", "--config", str(dataset_dir / "run.yaml"), "--ds_config",
                 str(dataset_dir / "ds.json")]) == 2
    err = capsys.readouterr().err
    assert "--ds_config scheduler: " in err and "train.warmup_steps" in err, err


# ---------------------------------------------------------------------------------------------------------------
# 2. optimizer: Adam / AdamW only, built by torch (no late TypeError in the optimizer's constructor)


@pytest.mark.parametrize("optimizer", [
    {"type": "SGD", "params": {"lr": "auto", "momentum": 0.9}},
    {"type": "Lamb", "params": {"lr": "auto"}},
    {"type": "Lion"},
    {"type": "adagrad", "params": {"lr": "auto", "weight_decay": "auto"}},
    {"type": 5},
])
def test_an_optimizer_other_than_adam_is_refused_naming_the_supported_ones(dataset_dir, optimizer):
    """An SGD section got Adam's betas / eps / torch_adam added and failed in SGD.__init__ once every rank had
    built the model."""
    problems = refused(dataset_dir, stock(optimizer=optimizer))
    assert len(problems) == 1, problems
    assert problems[0].startswith("--ds_config optimizer.type: "), problems
    assert '"AdamW"' in problems[0] and '"Adam"' in problems[0], problems


@pytest.mark.parametrize("kind", ["AdamW", "Adam", "adamw", "ADAM"])  # DeepSpeed lower-cases its optimizer names
def test_adam_and_adamw_in_any_case_are_accepted_and_filled(dataset_dir, kind):
    _, ds = load(dataset_dir, GOOD, ["train.lr=3e-4", "train.weight_decay=0.1"],
                 stock(optimizer={"type": kind, "params": {"lr": "auto"}}))
    assert ds["optimizer"]["type"] == kind
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-15, "weight_decay": 0.1,
                                         "torch_adam": True}


def test_the_recipes_adamw_is_torchs_when_the_json_leaves_the_optimizer_or_its_type_out(dataset_dir):
    """Without "torch_adam" DeepSpeed builds FusedAdam (a JIT build on GPUs that failed before step 1 on an H200)
    and without a "type" it builds no optimizer at all."""
    ds_json = stock()
    del ds_json["optimizer"]
    _, ds = load(dataset_dir, GOOD, [], ds_json)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    _, ds = load(dataset_dir, GOOD, [], stock(optimizer={"params": {"lr": "auto"}}))
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    # an explicit false is kept (DeepSpeed's FusedAdam / DeepSpeedCPUAdam), and so are their own parameters
    _, ds = load(dataset_dir, GOOD, [], stock(optimizer={"type": "AdamW", "params": {"torch_adam": False,
                                                                                     "bias_correction": True}}))
    assert ds["optimizer"]["params"]["torch_adam"] is False and ds["optimizer"]["params"]["bias_correction"]


@pytest.mark.parametrize("params, key", [
    ({"momentum": 0.9}, "optimizer.params.momentum"),  # torch's AdamW would raise TypeError on every rank
    ({"bias_correction": True}, "optimizer.params.bias_correction"),  # FusedAdam's, not torch's
    ({"max_grad_norm": 1.0}, "optimizer.params.max_grad_norm"),  # DeepSpeed raises ValueError at build
    ({"adam_w_mode": False}, "optimizer.params.adam_w_mode"),  # Adam with L2 decay, not train.weight_decay's AdamW
])
def test_optimizer_params_torchs_adamw_would_refuse_are_refused(dataset_dir, params, key):
    problems = refused(dataset_dir, stock(optimizer={"type": "AdamW", "params": {"lr": "auto", **params}}))
    assert len(problems) == 1 and problems[0].startswith(f"--ds_config {key}: "), problems


def test_every_accepted_optimizer_section_builds_the_way_deepspeed_builds_it(dataset_dir):
    """What DeepSpeed's _configure_basic_optimizer does with a torch_adam section: pop its own keys, then
    torch.optim.AdamW(params, **rest, foreach=...). Each accepted section constructs here, as it will on every rank."""
    for optimizer in ({"type": "AdamW", "params": {"lr": "auto", "amsgrad": True, "foreach": False}},
                      {"type": "Adam", "params": {"adam_w_mode": True}}, {"type": "adamw"}):
        _, ds = load(dataset_dir, GOOD, [], stock(optimizer=optimizer))
        params = dict(ds["optimizer"]["params"])
        assert params.pop("torch_adam") is True
        params.pop("adam_w_mode", None)
        foreach = params.pop("foreach", None)
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **params, foreach=foreach)


# ---------------------------------------------------------------------------------------------------------------
# 3. top-level keys DeepSpeed 0.19.8 has removed, and the legacy "bfloat16"


REMOVED_IN_DEEPSPEED = ["amp", "elasticity", "curriculum_learning", "progressive_layer_drop", "sparse_attention",
                        "eigenvalue", "sparse_gradients", "quantize_training", "nebula", "compression_training"]


@pytest.mark.parametrize("key", REMOVED_IN_DEEPSPEED)
def test_keys_deepspeed_refuses_at_engine_build_are_refused_at_check_time(dataset_dir, key):
    from deepspeed.runtime.config import DeepSpeedConfigError, _reject_removed_config_keys

    with pytest.raises(DeepSpeedConfigError):  # what deepspeed.initialize does with it, once the model is built
        _reject_removed_config_keys({key: {}})
    assert key not in DS_TOP_LEVEL_KEYS
    problems = refused(dataset_dir, stock(**{key: {"enabled": False}}))
    assert len(problems) == 1 and problems[0].startswith(f"--ds_config {key}: DeepSpeed "), problems
    assert "has been removed" in problems[0], problems  # DeepSpeed's own reason


def test_check_refuses_amp_before_any_work(dataset_dir, capsys):
    from lance_ds.train import main

    (dataset_dir / "run.yaml").write_text(yaml.safe_dump(GOOD))
    (dataset_dir / "ds.json").write_text(json.dumps(stock(amp={"enabled": True, "opt_level": "O1"})))
    assert main(["--check", "--config", str(dataset_dir / "run.yaml"), "--ds_config",
                 str(dataset_dir / "ds.json")]) == 2
    err = capsys.readouterr().err
    assert "--ds_config amp: " in err and "Apex AMP" in err, err


def bfloat16_json(enabled) -> dict:
    ds_json = stock()
    del ds_json["bf16"]
    ds_json["bfloat16"] = {"enabled": enabled}
    return ds_json


def test_legacy_bfloat16_is_bf16(dataset_dir):
    """DeepSpeed reads "bfloat16" as "bf16" when "bf16" is absent (runtime/precision_config.py): the same agreement
    with train.precision, and the resolved JSON says "bf16" (which DeepSpeed's tensor-parallel set-up reads alone)."""
    _, ds = load(dataset_dir, GOOD, ["train.precision=bf16"], bfloat16_json("auto"))
    assert ds["bf16"] == {"enabled": True} and "bfloat16" not in ds
    _, ds = load(dataset_dir, GOOD, ["train.precision=fp32"], bfloat16_json("auto"))
    assert ds["bf16"] == {"enabled": False} and "bfloat16" not in ds
    _, ds = load(dataset_dir, GOOD, ["train.precision=bf16"], bfloat16_json(True))
    assert ds["bf16"] == {"enabled": True}


def test_legacy_bfloat16_that_disagrees_with_the_precision_is_refused(dataset_dir):
    """It was silently ignored (the always-added "bf16" hid it): fp32 training under a JSON that asked for bf16."""
    problems = refused(dataset_dir, bfloat16_json(True), ["train.precision=fp32"])
    assert len(problems) == 1 and problems[0].startswith("--ds_config bfloat16.enabled: is True but train.precision "
                                                         "gives False"), problems
    problems = refused(dataset_dir, bfloat16_json(False), ["train.precision=bf16"])
    assert len(problems) == 1 and problems[0].startswith("--ds_config bfloat16.enabled: "), problems
    problems = refused(dataset_dir, {**bfloat16_json(True), "bfloat16": 1})
    assert len(problems) == 1 and problems[0].startswith("--ds_config bfloat16: must be a mapping"), problems


def test_bfloat16_next_to_bf16_is_refused(dataset_dir):
    problems = refused(dataset_dir, stock(bfloat16={"enabled": True}))  # zero3.json has "bf16"
    assert len(problems) == 1 and problems[0].startswith("--ds_config bfloat16: "), problems
    assert '"bf16"' in problems[0], problems


def test_resolving_does_not_change_the_json_it_was_given(dataset_dir):
    run, _ = load(dataset_dir, GOOD)
    raw = bfloat16_json("auto")
    before = json.dumps(raw)
    resolve_ds_config(raw, run.config, 2, HIDDEN, on_gpu=False, problems=Problems())
    assert json.dumps(raw) == before
