"""DeepSpeed JSON resolution: "auto" values are filled from the run config; explicit values must agree with it.

The JSON holds engine settings (ZeRO stage, offload, bucket sizes); the run config holds the training recipe.
Where both can say something (batch size, clipping, precision, optimizer) the run config decides, and
an explicit JSON value that disagrees is an error naming both keys rather than a silent pick.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import inspect
import json
from pathlib import Path
from typing import Any

from .core import Problems, read_text
from .run import RunConfig

AUTO = "auto"


def load_ds_json(path: str, problems: Problems) -> dict:
    text = read_text(Path(path), problems, "--ds_config")
    if text is None:
        return {}
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as e:
        problems.add("--ds_config", f"{path} is not valid JSON: {e}")
        return {}
    except DuplicateJsonKey as e:
        problems.add("--ds_config", f"{path}: {e}")
        return {}
    if not isinstance(data, dict):
        problems.add("--ds_config", f"{path} must hold a JSON object")
        return {}
    return data


class DuplicateJsonKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """json keeps the last of two equal keys: a second "zero_optimization" block would silently replace the first."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateJsonKey(f"key {key!r} is given twice in one object; JSON would keep only the last: merge "
                                   "them into one")
        out[key] = value
    return out


# Top-level keys of a DeepSpeed config, as deepspeed/runtime/config.py (DeepSpeedConfig) and the configs it hands the
# JSON to (zero, precision, monitor, profiling, data_pipeline, autotuning, ...) read them. DeepSpeed ignores a key it
# does not read, so a misspelt "zero_optimisation" trains with ZeRO stage 0: an unknown key close to one of these is
# refused. The list is explicit (DeepSpeed's constants mix top-level and nested keys, and no model of its own lists
# the top level); tests/unit/test_config.py checks every name against DeepSpeed's source.
# Keys not listed and not close to a listed one pass (DeepSpeed has many more, and adds some every release).
# Keys DeepSpeed has removed (amp, elasticity, curriculum_learning, sparse_attention, ...) are not listed: its
# DeepSpeedConfig refuses them in deepspeed.initialize, after every rank has built the model, so check_top_level_keys
# refuses them here with DeepSpeed's own reason (removed_top_level_keys).
DS_TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "bf16", "bfloat16", "fp16", "torch_autocast", "data_types", "communication_data_type",
    "seq_parallel_communication_data_type", "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "log_level",
    "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet",
    "aio", "checkpoint", "autotuning", "data_efficiency", "pipeline", "hybrid_engine", "compile", "timers",
    "tensor_parallel", "expert_parallel", "sequence_parallel_size", "dataloader_drop_last", "disable_allgather",
    "disable_python_gc", "managed_gradient_accumulation", "use_data_before_expert_parallelism", "vocabulary_size",
    "weight_quantization", "datastates_ckpt",
)


def removed_top_level_keys() -> dict[str, str]:
    """Top-level key -> DeepSpeed's reason, for the keys the installed DeepSpeed refuses (deepspeed/runtime/config.py,
    _reject_removed_config_keys: "amp", "elasticity", "sparse_attention", ... in 0.19.8). Read from DeepSpeed so that
    the list follows the installed version; tests/unit/test_deepspeed_config.py fails if DeepSpeed renames it."""
    from deepspeed.runtime import config as ds_runtime_config

    return dict(getattr(ds_runtime_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))


def check_top_level_keys(raw: dict, problems: Problems) -> None:
    removed = removed_top_level_keys()
    for key in raw:
        if key in removed:
            import deepspeed

            problems.add(f"--ds_config {key}", f"DeepSpeed {deepspeed.__version__} no longer accepts it and would stop "
                         f"every rank in deepspeed.initialize, after the model is built; remove it. DeepSpeed says: "
                         f"{removed[key].strip()}")
            continue
        if key in DS_TOP_LEVEL_KEYS:
            continue
        close = difflib.get_close_matches(key, DS_TOP_LEVEL_KEYS, n=1, cutoff=0.8)
        if close:
            problems.add(f"--ds_config {key}", f"is not a DeepSpeed key (DeepSpeed would silently ignore it); did you "
                         f"mean {close[0]}?")


# The sections resolve_ds_config reads into, with an example of each: another type would crash it (or DeepSpeed).
_SECTIONS = {
    "zero_optimization": '{"stage": 3}',
    "bf16": '{"enabled": "auto"}',
    "bfloat16": '{"enabled": "auto"} (or, better, "bf16": {"enabled": "auto"}: its current name)',
    "fp16": '{"enabled": "auto"}',
    "optimizer": '{"type": "AdamW", "params": {"lr": "auto"}} (or leave it out: the run config\'s AdamW)',
    "optimizer.params": '{"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}',
}


def check_sections(raw: dict, problems: Problems) -> bool:
    """Whether every section the resolver reads is a mapping; reports those that are not."""
    ok = True
    for key, example in _SECTIONS.items():
        present, value = _get(raw, key)
        if present and not isinstance(value, dict):
            problems.add(f"--ds_config {key}", f"must be a mapping like {example}, got {json.dumps(value)}")
            ok = False
    return ok


def check_scheduler(raw: dict, problems: Problems) -> None:
    """The learning-rate schedule is the run config's (train.lr, warmup_steps, lr_schedule, min_lr), a LambdaLR built
    by lance_ds.engine and shown in the banner. A DeepSpeed scheduler in the JSON would silently replace it, and the
    checkpoints it writes hold that scheduler's state, which a resume under the stock JSONs (the LambdaLR) cannot
    load (KeyError 'lr_lambdas' in engine.load_checkpoint): refused, so only "auto" (or no key) is left."""
    if "scheduler" in raw and raw["scheduler"] != AUTO:
        problems.add("--ds_config scheduler", "must be \"auto\" (the run config's schedule) or left out: lance_ds "
                     "builds the learning-rate schedule from train.lr, train.warmup_steps, train.lr_schedule (constant "
                     "or cosine) and train.min_lr, and a DeepSpeed scheduler would silently replace it (and its "
                     "checkpoints would not resume under the stock JSONs); set those train.* keys instead, got "
                     f"{json.dumps(raw['scheduler'])}")


# The optimizer types lance_ds builds, as DeepSpeed names them (it lower-cases its own optimizers' names, so "adamw"
# and "ADAMW" are these too). "Adam" is AdamW in DeepSpeed unless "adam_w_mode" is false, which is refused below.
# Any other type is refused rather than filled with what it might take: train.lr / betas / eps / weight_decay
# describe AdamW, and another type fails only in deepspeed.initialize, after every rank has built the model (SGD
# given betas raises TypeError; ZeRO refuses an optimizer it has not tested unless "zero_allow_untested_optimizer";
# Lamb / Lion are DeepSpeed kernels compiled on first use; MuAdam needs the mup package). Refusing cannot fail late.
ADAM_TYPES = ("adam", "adamw")
# Optimizer params DeepSpeed takes out before it builds torch's AdamW ("torch_adam": true); the rest go to
# torch.optim.AdamW (deepspeed/runtime/engine.py, _configure_basic_optimizer and get_optimizer_configuration).
_DEEPSPEED_OPTIMIZER_PARAMS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states")


def check_optimizer_type(ds: dict, problems: Problems) -> bool:
    """Whether the optimizer is Adam / AdamW; a missing (or "auto") type is the run config's AdamW (without a type
    DeepSpeed builds no optimizer at all)."""
    optimizer = ds["optimizer"]
    kind = optimizer.get("type", AUTO)
    if kind == AUTO:
        optimizer["type"] = "AdamW"
        return True
    if isinstance(kind, str) and kind.lower() in ADAM_TYPES:
        return True
    problems.add("--ds_config optimizer.type", f"is {json.dumps(kind)}, but lance_ds trains with AdamW (train.lr, "
                 "train.betas, train.eps and train.weight_decay are AdamW's); use \"AdamW\" (or \"Adam\", which "
                 "DeepSpeed runs as AdamW), or leave the optimizer section out")
    return False


def check_optimizer_params(params: dict, problems: Problems) -> None:
    """Optimizer params DeepSpeed or torch would refuse in deepspeed.initialize, after every rank built the model."""
    if params.get("adam_w_mode", True) is False:
        problems.add("--ds_config optimizer.params.adam_w_mode", "false makes Adam add the weight decay to the "
                     "gradient (L2), but train.weight_decay is AdamW's decoupled decay; remove it")
    if "max_grad_norm" in params:
        problems.add("--ds_config optimizer.params.max_grad_norm", "DeepSpeed refuses it (ValueError in "
                     "deepspeed.initialize); clipping is train.grad_clip (DeepSpeed's gradient_clipping): remove it")
    if params.get("torch_adam") is not True:
        return  # DeepSpeed's FusedAdam / DeepSpeedCPUAdam, each with parameters of its own
    import torch

    takes = [name for name in inspect.signature(torch.optim.AdamW.__init__).parameters
             if name not in ("self", "params")]
    for key in params:
        if key not in takes and key not in _DEEPSPEED_OPTIMIZER_PARAMS and key != "max_grad_norm":
            problems.add(f"--ds_config optimizer.params.{key}", f"torch.optim.AdamW (what \"torch_adam\": true "
                         f"builds) takes no {key!r}, so every rank would stop with a TypeError once the model is "
                         f"built; it takes {', '.join(takes)}. Remove it (or set \"torch_adam\": false for DeepSpeed's "
                         "FusedAdam / DeepSpeedCPUAdam and their parameters)")


def use_bf16_name(ds: dict, problems: Problems) -> dict[str, str]:
    """DeepSpeed reads "bfloat16", its older name for "bf16", only when "bf16" is absent (runtime/precision_config.py),
    and its tensor-parallel set-up reads "bf16" alone: the section moves to "bf16", where it is filled and checked
    against train.precision like "bf16". Returns {"bf16": "bfloat16"} when it moved (messages name the key as written).
    Next to "bf16" it would be silently ignored: refused."""
    if "bfloat16" not in ds:
        return {}
    if "bf16" in ds:
        problems.add("--ds_config bfloat16", "is DeepSpeed's older name for \"bf16\", and DeepSpeed reads only "
                     "\"bf16\" when both are given, so this section would be silently ignored; merge it into "
                     "\"bf16\" and remove it")
        del ds["bfloat16"]
        return {}
    ds["bf16"] = ds.pop("bfloat16")
    return {"bf16": "bfloat16"}


def _as_written(key: str, renamed: dict[str, str]) -> str:
    first, dot, rest = key.partition(".")
    return renamed.get(first, first) + dot + rest


def recipe_values(cfg: RunConfig, world_size: int, hidden_size: int, on_gpu: bool) -> dict[str, tuple[Any, str]]:
    """Dotted DeepSpeed key -> (value the run config implies, the run-config key that sets it)."""
    t = cfg.train
    return {
        # torch's AdamW on every device: DeepSpeed's FusedAdam is compiled on first use, which needs nvcc and a
        # DeepSpeed that parses the machine's CUDA arch list (on an H200 with torch 2.11 it failed on "9.0a"); a
        # JSON with "torch_adam": false still gets it. With the optimizer offloaded (zero3_offload.json) torch's AdamW
        # then steps on the CPU too: DeepSpeed checks torch_adam before offload. "torch_adam": false there selects
        # DeepSpeedCPUAdam (faster; compiled with the host's C++ compiler on first use; untested here, no GPU).
        "optimizer.params.torch_adam": (True, "lance_ds (torch's AdamW: nothing to compile)"),
        "zero_force_ds_cpu_optimizer": (on_gpu, "the device (it matters only for an optimizer passed in by code)"),
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
        "train_batch_size": (t.micro_batch_size * t.grad_accum * world_size,
                             f"train.micro_batch_size x train.grad_accum x {world_size} rank(s)"),
        "gradient_clipping": (t.grad_clip, "train.grad_clip"),
        "bf16.enabled": (t.precision == "bf16", "train.precision"),
        "fp16.enabled": (t.precision == "fp16", "train.precision"),
        "optimizer.params.lr": (t.lr, "train.lr"),
        "optimizer.params.betas": (list(t.betas), "train.betas"),
        "optimizer.params.eps": (t.eps, "train.eps"),
        "optimizer.params.weight_decay": (t.weight_decay, "train.weight_decay"),
        # ZeRO bucket sizes scale with the hidden size (the usual H^2 heuristics).
        "zero_optimization.reduce_bucket_size": (hidden_size * hidden_size, "model hidden size^2"),
        "zero_optimization.stage3_prefetch_bucket_size": (int(0.9 * hidden_size * hidden_size), "model hidden size"),
        "zero_optimization.stage3_param_persistence_threshold": (10 * hidden_size, "model hidden size"),
    }


def _get(d: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# Keys the run config always owns: an explicit JSON value must agree. Bucket sizes are only filled when "auto".
_ALWAYS_OWNED = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping", "bf16.enabled", "fp16.enabled", "optimizer.params.lr", "optimizer.params.betas",
                 "optimizer.params.eps", "optimizer.params.weight_decay"}
# Keys filled when missing or "auto", an explicit value kept: without "torch_adam" DeepSpeed builds FusedAdam.
_FILLED_WHEN_MISSING = {"optimizer.params.torch_adam"}


def resolve_ds_config(raw: dict, cfg: RunConfig, world_size: int, hidden_size: int, on_gpu: bool | None,
                      problems: Problems) -> dict:
    """Fill "auto" from the run config, report conflicts, and add what is missing (the optimizer). on_gpu None: the
    ranks run on other machines than this one (a launch from a login node), whose devices each rank checks."""
    ds = copy.deepcopy(raw)
    check_top_level_keys(ds, problems)
    check_scheduler(ds, problems)
    ds.pop("scheduler", None)  # "auto": lance_ds.engine builds the run config's schedule
    if not check_sections(ds, problems):
        return ds  # resolving reads into these sections; they are reported
    renamed = use_bf16_name(ds, problems)
    if "optimizer" not in ds:  # the recipe's AdamW; every param below is then filled from the run config
        ds["optimizer"] = {"type": "AdamW", "params": {k: AUTO for k in ("lr", "betas", "eps", "weight_decay")}}
    adam = check_optimizer_type(ds, problems)
    for key, (value, source) in recipe_values(cfg, world_size, hidden_size, bool(on_gpu)).items():
        present, current = _get(ds, key)
        if present and current == AUTO:
            _set(ds, key, value)
        elif present and key in _ALWAYS_OWNED and not _same(current, value):
            problems.add(f"--ds_config {_as_written(key, renamed)}", f"is {current!r} but {source} gives {value!r}; "
                         "set it to \"auto\" (recommended) or make the two agree")
        elif not present and (key in _ALWAYS_OWNED or key in _FILLED_WHEN_MISSING):
            _set(ds, key, value)
    if adam:
        check_optimizer_params(ds["optimizer"]["params"], problems)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if cfg.train.precision == "bf16" and stage in (1, 2, 3) and not _get(ds, "data_types.grad_accum_dtype")[0]:
        # DeepSpeed sums the micro-steps' gradients in the model's dtype unless told otherwise: in bf16 that lost
        # ~0.3% of the gradient at train.grad_accum=8 (Megatron and torchtitan accumulate in fp32; ZeRO-0 cannot)
        _set(ds, "data_types.grad_accum_dtype", "fp32")
    for key in _find_auto(ds):
        problems.add(f"--ds_config {_as_written(key, renamed)}", "is \"auto\" but lance_ds has no value for it; "
                     "give a number")
    zero = ds.get("zero_optimization", {})
    problems.one_of(zero.get("stage", 0), (0, 1, 2, 3), "--ds_config zero_optimization.stage")
    check_zero_section(zero, problems)
    check_checkpoint_writer(ds, problems)
    if on_gpu is False and cfg.train.precision == "fp16":
        problems.add("train.precision", "fp16 needs a GPU (DeepSpeed has no fp16 engine on CPU); use bf16 or fp32")
    if cfg.model.attention == "flex" and on_gpu is False:  # torch's flex_attention has no backward on CPU
        problems.add("model.attention", "flex trains on CUDA only (on CPU it has no backward); use sdpa on CPU")
    if cfg.model.attention == "flash":  # here, not at the first forward of every rank
        if on_gpu is False or (on_gpu and importlib.util.find_spec("flash_attn") is None):
            problems.add("model.attention", "flash needs a GPU and the flash_attn package (pip install flash-attn); "
                                            "use flex or sdpa")
        elif cfg.train.precision == "fp32":
            problems.add("model.attention", "flash takes fp16 / bf16 only; set train.precision=bf16 or use flex")
    return ds


def check_zero_section(zero: dict, problems: Problems) -> None:
    """zero_optimization through DeepSpeed's own model of it (unknown keys forbidden), here rather than in
    deepspeed.initialize, where a misspelt stage3_* key or offload device "gpu" stops every rank after it has
    built the model."""
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as e:
        for error in e.errors():
            if tuple(error["loc"]) == ("stage",):  # said once, by resolve_ds_config's own check
                continue
            where = ".".join(map(str, error["loc"]))
            problems.add(f"--ds_config zero_optimization.{where}", f"{error['msg']} (DeepSpeed's ZeRO config)")


def check_checkpoint_writer(ds: dict, problems: Problems) -> None:
    """DeepSpeed's asynchronous checkpoint writers return from save_checkpoint before the files are written: lance_ds
    would publish a save (rename it, move `latest`) whose files are still being written, so they are refused."""
    writer = ds.get("checkpoint", {}).get("writer") if isinstance(ds.get("checkpoint"), dict) else None
    if isinstance(writer, dict) and writer.get("decoupled"):
        problems.add("--ds_config checkpoint.writer.decoupled", "writes checkpoints in the background, so lance_ds "
                     "could publish one before its files are complete; set it to false (or remove it)")
    datastates = ds.get("datastates_ckpt")
    if isinstance(datastates, dict) and datastates.get("enabled"):
        problems.add("--ds_config datastates_ckpt.enabled", "writes checkpoints in the background, so lance_ds could "
                     "publish one before its files are complete; set it to false (or remove the section)")


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}.{key}" if prefix else key)]
    return [prefix] if node == AUTO else []


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
