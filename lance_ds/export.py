"""Training checkpoint -> inference directory, on CPU, without a launcher.

  python tools/export_checkpoint.py [--checkpoint] RUN_DIR | RUN_DIR/checkpoints | RUN_DIR/checkpoints/step_XXXXXXXX
                                    --out EXPORT_DIR [--ema] [--dtype fp32|bf16|fp16] [--overwrite]
                                    [--vae-path DIR] [--vit-path DIR] [--model-path DIR] [--tokenizer-path DIR]

A run dir or a checkpoints dir means the checkpoint `latest` names. The weights are the fp32 master weights that
DeepSpeed's ZeRO consolidation (`deepspeed.utils.zero_to_fp32`) rebuilds from every rank's partitions, or, with
--ema, the EMA that `lance_ds.ema.consolidate` rebuilds from the per-rank shards (parameters the EMA does not track,
i.e. frozen ones, keep their trained values). LoRA runs are exported merged (W + alpha / r * B @ A), and their
adapters alone in peft's format. The --*-path flags say where this machine has the model directories the run's
config names (a checkpoint copied off the machine that trained it); the export names them there.

EXPORT_DIR/
  model.safetensors     Lance's names: both experts, the heads, latent_pos_embed.pos_embed, vit_model.* (the ViT)
  llm_config.json       Qwen2 fields, mrope section, vision_config, latent table range: `model.path=EXPORT_DIR` loads it
  tokenizer.json, ...   the run's tokenizer: `model.tokenizer_path=EXPORT_DIR`
  lance_ds.yaml         the run's `model` and `objective` sections, paths relative to EXPORT_DIR, so the codec, sizes
                        and sampling settings are rebuilt as trained (`load_export` reads it)
  export.json           what was exported: source checkpoint, step, plain or EMA weights, LoRA merged or not
  llm/                  the understanding expert alone as transformers' Qwen3ForCausalLM (config.json,
                        model.safetensors, tokenizer): AutoModelForCausalLM.from_pretrained(EXPORT_DIR/llm)
  lora/                 LoRA runs: adapter_config.json + adapter_model.safetensors (peft's format)
  vae/                  only when the codec has random weights (no model.vae_path): its diffusers save_pretrained

Why Qwen3ForCausalLM for llm/: Lance's understanding expert is a Qwen2 decoder with per-head q/k RMSNorm before
RoPE and biases on q/k/v only. Qwen2ForCausalLM has no q/k norms; Qwen3ForCausalLM has them (per head, before RoPE,
the same RMSNorm) and, with attention_bias=true, biases on q/k/v *and* o_proj, so o_proj gets a zero bias. On
text (all three mRoPE ids equal) Qwen2.5-VL's multimodal RoPE is plain RoPE, so the logits are the same function.

Safety (DESIGN rule 10): our own files are safetensors / JSON / YAML. DeepSpeed's `*.pt` files are pickles that only
DeepSpeed's reader understands; before handing them to it, every global they reference is listed without running
anything (`torch.serialization.get_unsafe_globals_in_checkpoint`) and a file naming anything beyond the few
DeepSpeed types below is refused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from .checkpoint import (CHECKPOINTS, EMA_WEIGHTS, LATEST, RUN_CONFIG, TRAINER_STATE, Checkpointer, latest_name,
                         rank_dir, read_trainer_state, step_name)
from .config.core import Problems, from_dict, load_yaml, output_problem, to_dict
from .config.model import MODEL_DIRS, PRECISIONS, LoraConfig, ModelConfig, ObjectiveConfig
from .config.run import RunConfig
from .model.weights import save_safetensors

EXPORT_CONFIG = "lance_ds.yaml"
EXPORT_INFO = "export.json"
LLM_DIR, LORA_DIR, VAE_DIR = "llm", "lora", "vae"

# Globals DeepSpeed's checkpoint files reference besides tensors and plain containers (those are on torch's
# weights_only allowlist and never reported), all in the optimizer states: the ZeRO stage enum, the loss scaler,
# and (ZeRO-1/2) the offsets of each parameter's fragment in the flat partition. Seen in ZeRO-2 and ZeRO-3
# checkpoints, fp32 and bf16, of DeepSpeed 0.19.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})

LORA_A, LORA_B, BASE_LAYER = ".lora_A.", ".lora_B.", ".base_layer."
PEFT_ADAPTER = "default"  # the adapter name lance_ds.model.lora injects (peft's default)


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported or loaded for inference; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# the model's directories on this machine

# The directories a run's model section names, as the machine that trained had them. A checkpoint or export read
# elsewhere (copied off the cluster) finds them where these flags of export_checkpoint, generate and evaluate say.
MODEL_DIR_FLAGS = {key: "--model-path" if key == "path" else "--" + key.replace("_", "-") for key in MODEL_DIRS}


def add_model_dir_flags(parser) -> None:
    for key, flag in MODEL_DIR_FLAGS.items():
        parser.add_argument(flag, dest=f"moved_{key}", metavar="DIR",
                            help=f"where this machine has model.{key} (default: where the run's config names it)")


def moved_dirs(args) -> dict[str, str]:
    """model key -> directory, for the flags add_model_dir_flags added that were given."""
    return {key: value for key in MODEL_DIR_FLAGS if (value := getattr(args, f"moved_{key}", None))}


def relocated(model: ModelConfig, moved: dict[str, str] | None, named_in: Path) -> ModelConfig:
    """`model` with the directories `moved` gives, checked as training checks them before any weights are read: a
    part this machine cannot load is refused in seconds, with the flag that points at where it is here, instead of
    after consolidating every rank's partitions."""
    from .model.build import model_problems

    model = dataclasses.replace(model, **{key: str(Path(path).resolve()) for key, path in (moved or {}).items()})
    problems = Problems()
    model.check(problems, "model")
    if not problems:
        for key, problem in model_problems(model):
            problems.add(key, problem)
    if problems:
        flags = {f"model.{key}": flag for key, flag in MODEL_DIR_FLAGS.items()}
        lines = [item + (f" (moved? give {flags[key]} DIR)" if (key := item.split(":")[0]) in flags else "")
                 for item in problems.items]
        raise ExportError(f"{named_in} names model parts this machine cannot load:\n  " + "\n  ".join(lines))
    return model


# ----------------------------------------------------------------------------------------------------------------
# finding checkpoints


def find_checkpoint(path: str | Path) -> Path:
    """A step directory from a step dir, a checkpoints dir or a run dir (the last two: the one `latest` names)."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    if not path.exists():
        steps = Checkpointer(path.parent, keep_last=0, rank=0, world_size=1).complete_steps()
        kept = f" (complete steps there: {steps}; older ones were removed by checkpoint.keep_last)" if steps else ""
        raise ExportError(f"{path} does not exist{kept}")
    for root in (path, path / CHECKPOINTS):
        name = latest_name(root)
        if name is not None:
            step_dir = root / name
            if not (step_dir / TRAINER_STATE).is_file():
                raise ExportError(f"{root / LATEST} names {step_dir.name}, which is not a complete checkpoint (no "
                                  f"{TRAINER_STATE}); pass a complete step directory instead")
            return step_dir
        # a first save ended between its rename and `latest`: the newest complete step, as a resume takes it
        newest = Checkpointer(root, keep_last=0, rank=0, world_size=1).complete_steps()
        if newest:
            return root / step_name(newest[-1])
    raise ExportError(f"{path} is not a training checkpoint: expected a step directory (with {TRAINER_STATE}), a "
                      f"checkpoints directory or a run directory (with {CHECKPOINTS}/{LATEST})")


def is_export_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / EXPORT_CONFIG).is_file() and (path / "model.safetensors").is_file()


def read_run_config(step_dir: Path) -> RunConfig:
    """The resolved run config saved in the checkpoint (not checked again: its data paths may be gone)."""
    config_file = step_dir / RUN_CONFIG
    if not config_file.is_file():
        raise ExportError(f"{config_file} is missing; lance_ds writes it with every checkpoint, so {step_dir} was "
                          "not written by lance_ds (or is damaged)")
    try:
        data = yaml.safe_load(config_file.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise damaged(config_file, step_dir, e) from e
    if not isinstance(data, dict):
        raise damaged(config_file, step_dir, ValueError(f"a {type(data).__name__}, not a mapping of sections"))
    problems = Problems()
    config = from_dict(RunConfig, data, problems)
    if problems:
        raise ExportError(f"{config_file} does not match this lance_ds version's config: {'; '.join(problems.items)}")
    return config


def checked_trainer_state(step_dir: Path) -> dict:
    """The checkpoint's trainer_state.json (its step and world size)."""
    state_file = step_dir / TRAINER_STATE
    try:
        state = read_trainer_state(step_dir)
        step = int(state["step"])  # every lance_ds checkpoint has it; anything else is a damaged file
    except (ValueError, TypeError, KeyError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError, int()
        raise damaged(state_file, step_dir, e) from e
    return {**state, "step": step}


def damaged(file: Path, step_dir: Path, error: Exception) -> ExportError:
    """The error for a checkpoint file that cannot be read: it names the file, and the steps to export instead."""
    checkpoints = Checkpointer(step_dir.parent, keep_last=0, rank=0, world_size=1)
    others = [step_name(s) for s in checkpoints.complete_steps() if step_name(s) != step_dir.name]
    reason = str(error).splitlines()[0] if str(error) else ""
    reason = reason if len(reason) <= 200 else reason[:200] + "..."
    instead = (f"another step instead (complete in {step_dir.parent}: {', '.join(others)})" if others else
               f"another checkpoint ({step_dir.parent} holds no other complete step)")
    return ExportError(f"{file} is damaged ({type(error).__name__}: {reason}); the save that wrote it was probably "
                       f"cut short (a killed job, a full disk). Export {instead}")


# ----------------------------------------------------------------------------------------------------------------
# weights


@dataclass
class TrainedWeights:
    """A checkpoint's model weights, full size, under LanceModel's parameter names."""

    step_dir: Path
    config: RunConfig
    step: int
    state: dict[str, Tensor]  # fp32; LoRA merged into the base weights
    adapters: dict[str, Tensor] | None  # LoRA runs: the adapters under peft's names (PeftModel prefix)
    ema: bool  # the EMA weights instead of the trained ones
    cuts: dict = dataclasses.field(default_factory=dict)  # task -> image / video options training cut with


def relocated_run_config(step_dir: Path, moved: dict[str, str] | None) -> RunConfig:
    """A checkpoint's run config with its model directories where this machine has them (see relocated())."""
    config = read_run_config(step_dir)
    return dataclasses.replace(config, model=relocated(config.model, moved, step_dir / RUN_CONFIG))


def load_trained_weights(path: str | Path, ema: bool = False, moved: dict[str, str] | None = None) -> TrainedWeights:
    """Consolidate a training checkpoint (step, checkpoints or run dir) on CPU; `moved`: see relocated()."""
    step_dir = find_checkpoint(path)
    config = relocated_run_config(step_dir, moved)
    trainer_state = checked_trainer_state(step_dir)
    shards = ema_shards(step_dir, int(trainer_state.get("world_size", 1))) if ema else []  # (before the long part)
    state = zero_consolidated_state(step_dir)
    if ema:
        state = with_ema(state, step_dir, shards)
    adapters = None
    if config.model.training_type == "lora":
        state, adapters = merge_lora(state, config.model.lora, trained_parameter_names(step_dir))
    return TrainedWeights(step_dir, config, int(trainer_state["step"]), state, adapters, ema,
                          trainer_state.get("cuts", {}))


def check_deepspeed_files(step_dir: Path) -> list[Path]:
    """DeepSpeed's pickled files of a checkpoint, after checking that they reference only DeepSpeed's own types."""
    files = sorted(step_dir.glob("*.pt"))
    if not files:
        raise ExportError(f"{step_dir} holds no DeepSpeed files (*.pt); it is not a complete DeepSpeed checkpoint")
    for f in files:
        try:
            referenced = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except (RuntimeError, ValueError, EOFError, OSError) as e:  # a truncated zip (torch's reader raises
            # RuntimeError or EINVAL, by where it ends), a cut pickle
            raise damaged(f, step_dir, e) from e
        unexpected = sorted(set(referenced) - DEEPSPEED_GLOBALS)
        if unexpected:
            raise ExportError(f"{f} references {unexpected}, which DeepSpeed checkpoints do not hold; refusing to "
                              "unpickle it (it may run code). If you trust the file, consolidate it with the "
                              "zero_to_fp32.py script DeepSpeed saved next to it.")
    return files


def zero_consolidated_state(step_dir: Path) -> dict[str, Tensor]:
    """Full fp32 weights from the ZeRO partitions of every rank (deepspeed.utils.zero_to_fp32, on CPU)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files = check_deepspeed_files(step_dir)
    if not any("zero_pp_rank_" in f.name for f in files):
        raise ExportError(f"{step_dir} is not a ZeRO checkpoint (no *zero_pp_rank_* files); lance_ds trains with "
                          "ds_configs/zero2.json or zero3.json, whose checkpoints this exporter reads")
    chatter = io.StringIO()  # the library prints its progress; keep it for the error message only
    try:
        with contextlib.redirect_stdout(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ExportError(f"DeepSpeed could not consolidate {step_dir}: {e}\n{chatter.getvalue()[-2000:]}") from e
    return {k: v.float() for k, v in state.items()}


def ema_shards(step_dir: Path, world_size: int) -> list[Path]:
    """Every rank's EMA shard of a checkpoint, or the error that says why there are none to export."""
    shards = [rank_dir(step_dir, r) / EMA_WEIGHTS for r in range(world_size)]
    present = [f for f in shards if f.is_file()]
    if not present:
        raise ExportError(f"{step_dir} has no EMA weights (rank_*/ema.safetensors): the run trained with "
                          "train.ema_decay=0. Drop --ema (its trained weights), or train with train.ema_decay > 0 "
                          "(Lance: 0.9999)")
    if len(present) != len(shards):
        missing = sorted(str(f.relative_to(step_dir)) for f in set(shards) - set(present))
        raise ExportError(f"{step_dir} lacks EMA shards {missing} of its {world_size} ranks; the checkpoint is "
                          "incomplete, export another step")
    return shards


def with_ema(state: dict[str, Tensor], step_dir: Path, shards: list[Path]) -> dict[str, Tensor]:
    """`state` with every EMA-tracked parameter replaced by its EMA (rebuilt from ema_shards)."""
    from .ema import consolidate
    from .model.weights import WeightsFileError

    try:
        averaged = consolidate(shards)
    except WeightsFileError as e:
        raise damaged(e.path, step_dir, e.error) from None
    unknown = sorted(set(averaged) - set(state))
    if unknown:
        raise ExportError(f"the EMA of {step_dir} tracks parameters the model does not have, e.g. {unknown[:3]}")
    return {**state, **{k: v.float() for k, v in averaged.items()}}


def trained_parameter_names(step_dir: Path) -> set[str]:
    """The parameters the run trained: DeepSpeed records their names by optimizer group, the frozen ones apart
    (rank 0's model states, read memory-mapped; check_deepspeed_files has vetted its pickle)."""
    states = sorted(step_dir.glob("*model_states.pt"))
    if not states:
        raise ExportError(f"{step_dir} holds no DeepSpeed model states (*model_states.pt); the checkpoint is "
                          "incomplete, export another step")
    saved = torch.load(states[0], map_location="cpu", mmap=True, weights_only=False)
    return {name for group in saved["param_shapes"] for name in group}


def merge_lora(state: dict[str, Tensor], lora: LoraConfig,
               trained: set[str] = frozenset()) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """LoRA-wrapped weights -> (plain weights with W + alpha / r * B @ A, the adapters under peft's names). The
    `trained` parameters that are not adapters (a trainable ViT, layers model.path lacked: see add_lora) go with
    the adapters too, so that they hold the whole of what the run changed."""
    from .model.lora import PEFT_PREFIX, is_lora_param

    scale = lora.alpha / lora.r  # peft's scaling without rank-stabilisation, as lance_ds.model.lora configures it
    merged: dict[str, Tensor] = {}
    adapters: dict[str, Tensor] = {}
    for name, value in state.items():
        if LORA_A in name or LORA_B in name:
            adapters[PEFT_PREFIX + name.replace(f".{PEFT_ADAPTER}.", ".")] = value
        else:
            merged[name.replace(BASE_LAYER, ".")] = value
    for name in [n for n in state if LORA_A in n and n.endswith(f".{PEFT_ADAPTER}.weight")]:
        module = name.split(LORA_A)[0]
        down, up = state[name].float(), state[f"{module}{LORA_B}{PEFT_ADAPTER}.weight"].float()
        merged[f"{module}.weight"] = merged[f"{module}.weight"] + scale * (up @ down)
    if state and not adapters:
        raise ExportError("model.training_type is lora but the checkpoint holds no lora_A / lora_B tensors")
    adapters.update({PEFT_PREFIX + n: merged[n] for n in sorted(trained) if not is_lora_param(n) and n in merged})
    return merged, adapters


# ----------------------------------------------------------------------------------------------------------------
# building an inference model


@dataclass
class InferenceParts:
    """Everything inference needs, built outside DeepSpeed (lance_ds.generate.Generator takes these)."""

    bundle: object  # lance_ds.model.ModelBundle with the weights loaded, in eval mode
    tokenizer: object  # lance_ds.data.tokenizer.TextTokenizer
    model_config: ModelConfig  # as built (LoRA merged: training_type full; ViT frozen)
    objective: ObjectiveConfig
    source: str  # where the weights came from, for messages and export.json
    cuts: dict = dataclasses.field(default_factory=dict)  # task -> image / video options of training (trainer)


def inference_model_config(model: ModelConfig, dtype: str, device: torch.device | None = None) -> ModelConfig:
    """A run's model section rebuilt for inference: merged LoRA, frozen ViT, no gradient checkpointing, weights in
    `dtype` (a ViT trained with the model too: it was trained in full precision, not in model.vit_dtype). Off CUDA
    the attention backend is sdpa: flash needs CUDA and flex has no fast CPU kernel (all three compute the same);
    so is a flash-trained model's on a machine without flash_attn, or in fp32."""
    vit_dtype = dtype if model.vit_trainable else model.vit_dtype
    attention = model.attention
    flash_here = dtype != "fp32" and importlib.util.find_spec("flash_attn") is not None
    if device is not None and (device.type != "cuda" or (attention == "flash" and not flash_here)):
        attention = "sdpa"
    return dataclasses.replace(model, training_type="full", vit_trainable=False, gradient_checkpointing=False,
                               freeze_modules=[], dtype=dtype, vit_dtype=vit_dtype, attention=attention)


def build_untrained(config: RunConfig, dtype: str, device: torch.device, num_text_classes: int):
    """(the model as training built it before its first step, its inference model config): seeded with
    train.seed, as the trainer seeds right before build_model, so that random frozen parts (debug sizes) come out
    as the trained model's."""
    from .model import build_model

    model_cfg = inference_model_config(config.model, dtype, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        return build_model(model_cfg, num_text_classes, None, device=device), model_cfg


def build_from_trained(weights: TrainedWeights, dtype: str = "fp32",
                       device: torch.device | str | None = None) -> InferenceParts:
    """Rebuild the trained model from a checkpoint's weights.

    The frozen parts that are not in the checkpoint (ViT, VAE) are rebuilt as the trainer built them: from their
    paths, or, with random weights (debug sizes), from the same seed (the trainer seeds with train.seed right
    before build_model), so they equal the ones the model was trained with.
    """
    from .data.tokenizer import load_tokenizer
    from .model.build import default_device, load_state
    from .model.weights import LANCE_VIT_PREFIX

    device = torch.device(device) if device is not None else default_device()
    cfg = weights.config
    tokenizer = load_tokenizer(cfg.model.tokenizer_path)
    bundle, model_cfg = build_untrained(cfg, dtype, device, len(tokenizer))
    state = dict(weights.state)
    vit_state = {k[len(LANCE_VIT_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(LANCE_VIT_PREFIX)}
    if vit_state:  # trained with model.vit_trainable: the tower's weights are in the checkpoint
        bundle.vit.load_state_dict({k: v.to(bundle.vit.dtype) for k, v in vit_state.items()}, strict=True)
    loaded = load_state(bundle.model, state, str(weights.step_dir))
    missing = sorted(set(dict(bundle.model.named_parameters())) - loaded)
    unused = sorted(set(state) - loaded)
    if missing or unused:
        raise ExportError(f"{weights.step_dir} does not match the model its config.yaml describes: missing "
                          f"{missing[:4]}, unused {unused[:4]}")
    bundle.model.to(device).eval()
    return InferenceParts(bundle, tokenizer, model_cfg, cfg.objective,
                          f"{weights.step_dir} ({'EMA' if weights.ema else 'trained'} weights, step {weights.step})",
                          weights.cuts)


def load_export(path: str | Path, dtype: str = "fp32", device: torch.device | str | None = None,
                moved: dict[str, str] | None = None) -> InferenceParts:
    """Build the model of an export directory (its lance_ds.yaml, with model.path and the tokenizer there);
    `moved`: see relocated() (an export names the VAE where the training machine had it)."""
    from .data.tokenizer import load_tokenizer
    from .model import build_model
    from .model.build import default_device

    device = torch.device(device) if device is not None else default_device()
    path = Path(path).resolve()
    model, objective, cuts = read_export_config(path, moved)
    model_cfg = inference_model_config(model, dtype, device)
    tokenizer = load_tokenizer(model_cfg.tokenizer_path)
    bundle = build_model(model_cfg, len(tokenizer), None, device=device)
    bundle.model.to(device).eval()
    return InferenceParts(bundle, tokenizer, model_cfg, objective, str(path), cuts)


def read_export_config(path: Path, moved: dict[str, str] | None) -> tuple[ModelConfig, ObjectiveConfig, dict]:
    """An export's lance_ds.yaml: (model section, relocated, objective section, cuts)."""
    problems = Problems()
    data = load_yaml(path / EXPORT_CONFIG, problems, EXPORT_CONFIG)
    if problems:
        raise ExportError(f"{path} is not a readable export ({'; '.join(problems.items)}); export the checkpoint "
                          "again with tools/export_checkpoint.py")
    model_data = {**data.get("model", {})}
    for key in MODEL_DIR_FLAGS:  # (relative to the export)
        if isinstance(model_data.get(key), str) and not Path(model_data[key]).is_absolute():
            model_data[key] = str(path / model_data[key])
    model = from_dict(ModelConfig, model_data, problems, "model")
    objective = from_dict(ObjectiveConfig, data.get("objective", {}), problems, "objective")
    if problems:
        raise ExportError(f"{path / EXPORT_CONFIG} does not match this lance_ds version: {'; '.join(problems.items)}")
    cuts = data.get("cuts") if isinstance(data.get("cuts"), dict) else {}
    return relocated(model, moved, path / EXPORT_CONFIG), objective, cuts


def saved_model_config(path: str | Path, moved: dict[str, str] | None = None) -> ModelConfig:
    """The model section an export or a training checkpoint was made with, from its config file alone: what
    arguments are checked against before the weights load (minutes for a 3B checkpoint's partitions)."""
    if is_export_dir(path):
        return read_export_config(Path(path).resolve(), moved)[0]
    return relocated_run_config(find_checkpoint(path), moved).model


def load_inference_parts(path: str | Path, ema: bool = False, dtype: str = "fp32",
                         device: torch.device | str | None = None,
                         moved: dict[str, str] | None = None) -> InferenceParts:
    """An export directory, or a training checkpoint (step, checkpoints or run dir) consolidated on the fly;
    `moved`: see relocated()."""
    if is_export_dir(path):
        if ema:
            raise ExportError(f"{path} is an export; its weights were chosen when it was exported (export.json says "
                              "which). Drop --ema, or export the training checkpoint again with --ema")
        return load_export(path, dtype, device, moved)
    return build_from_trained(load_trained_weights(path, ema, moved), dtype, device)


# ----------------------------------------------------------------------------------------------------------------
# writing an export directory


def export_checkpoint(checkpoint: str | Path, out: str | Path, ema: bool = False, dtype: str = "fp32",
                      overwrite: bool = False, moved: dict[str, str] | None = None) -> Path:
    """Write EXPORT_DIR (see the module doc) for a training checkpoint; returns it. Written under a temporary name
    and renamed, so an interrupted export leaves no half-written directory behind. `moved`: see relocated(); the
    export names those directories."""
    from .model.build import DTYPES
    from .model.lora import save_adapters

    out = Path(out).resolve() if Path(out).is_symlink() else Path(out)  # a link: the export goes where it points
    if dtype not in PRECISIONS:
        raise ExportError(f"--dtype must be fp32, bf16 or fp16, got {dtype!r}")
    if is_export_dir(checkpoint):
        raise ExportError(f"{checkpoint} is already an export; give a training checkpoint (run, checkpoints or "
                          "step directory)")
    _check_out(out, Path(checkpoint), overwrite)
    weights = load_trained_weights(checkpoint, ema, moved)
    parts = build_from_trained(weights, "fp32", device="cpu")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        torch_dtype = DTYPES[dtype]
        vae_saved = write_lance_dir(tmp, weights.state, parts, torch_dtype)
        parts.tokenizer.hf.save_pretrained(str(tmp))
        write_export_config(tmp, weights.config, dtype, vae_saved, weights.cuts)
        save_transformers_llm(tmp / LLM_DIR, weights.state, parts, torch_dtype)
        if weights.adapters is not None:
            save_adapters(tmp / LORA_DIR, weights.adapters, weights.config.model.lora, weights.config.model.path)
        info = {"source": str(weights.step_dir.resolve()), "step": weights.step,
                "weights": "ema" if weights.ema else "trained", "lora": "merged" if weights.adapters else None,
                "dtype": dtype, "consolidation": "deepspeed.utils.zero_to_fp32" + (" + lance_ds.ema.consolidate"
                                                                                   if weights.ema else "")}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    except BaseException:  # a full disk, no permission, Ctrl-C: nothing half-written stays behind (or looks whole)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # (--overwrite) the earlier export is set aside, not deleted, until the new one is in place
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def _check_out(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """--out must be a new or empty directory, or (with --overwrite) an earlier export: never a file, and never
    the training run it reads from or anything holding it."""
    problem = output_problem("--out", out, directory=True)
    if problem:
        raise ExportError(problem)
    source = checkpoint.resolve()
    if source == out.resolve() or out.resolve() in source.parents:
        raise ExportError(f"--out {out} holds the checkpoint being exported ({checkpoint}); give another directory")
    here = Path.cwd()
    if out.resolve() == here or out.resolve() in here.parents:  # it is replaced whole, under the shell's feet
        raise ExportError(f"--out {out} is the current directory (or holds it); give a new directory, e.g. "
                          "--out exports/NAME")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        if not is_export_dir(out):
            raise ExportError(f"--overwrite replaces only an earlier export, and {out} is not one; "
                              "choose another --out")


def write_lance_dir(directory: Path, state: dict[str, Tensor], parts: InferenceParts, dtype: torch.dtype) -> bool:
    """model.safetensors + llm_config.json in Lance's layout (+ vae/ for a random codec); True when vae/ was written."""
    from .model.weights import LANCE_VIT_PREFIX, save_lance_dir

    bundle = parts.bundle
    model_state = {k: v.to(dtype) for k, v in state.items() if not k.startswith(LANCE_VIT_PREFIX)}
    vit_state = {k: v.to(dtype) for k, v in bundle.vit.state_dict().items()} if bundle.vit is not None else None
    # the fixed sin-cos table stays fp32, exact: loading compares it with the recomputed one (within bf16's rounding)
    table = bundle.model.latent_pos_embed.table().float() if bundle.model.cfg.visual_gen else None
    special = parts.tokenizer.special
    extra = {"max_latent_size": bundle.spec.max_latent_size, "max_num_frames": bundle.spec.max_num_frames,
             "latent_channels": bundle.geometry.latent_channels, "num_text_classes": len(parts.tokenizer),
             "vision_start_token_id": special.vision_start, "vision_end_token_id": special.vision_end,
             "video_token_id": special.video_pad, "eos_token_id": special.im_end}
    save_lance_dir(directory, model_state, bundle.spec.llm, bundle.spec.vit if vit_state is not None else None,
                   vit_state, table, extra)
    random_codec = bundle.vae is not None and parts.model_config.vae_path is None and \
        any(True for _ in bundle.vae.parameters())
    if random_codec:  # a debug codec with random weights: keep it, so the export decodes as the run did
        bundle.vae.vae.save_pretrained(str(directory / VAE_DIR))
    return random_codec


def write_export_config(directory: Path, config: RunConfig, dtype: str, vae_saved: bool, cuts: dict) -> None:
    """lance_ds.yaml: the run's model section pointing at this directory, its objective (sampling settings) and
    the image / video options training cut each task with (inference cuts inputs the same way)."""
    model = to_dict(inference_model_config(config.model, dtype))
    model.update(path=".", tokenizer_path=".", vit_path=None)
    if vae_saved:
        model["vae_path"] = VAE_DIR
    elif model["vae_path"] is not None:
        model["vae_path"] = str(Path(model["vae_path"]).resolve())  # not copied: Lance never ships the VAE
    data = {"model": model, "objective": to_dict(config.objective), "cuts": cuts}
    header = "# Written by lance_ds.export: the model section to rebuild this export (paths relative to this dir).\n"
    (directory / EXPORT_CONFIG).write_text(header + yaml.safe_dump(data, sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# the understanding expert for transformers


def transformers_llm_state(state: dict[str, Tensor], num_layers: int, hidden_size: int) -> dict[str, Tensor]:
    """LanceModel's understanding expert under Qwen3ForCausalLM's names (+ the zero o_proj biases Qwen3 needs)."""
    from .model.llm import gen_to_und_name

    out = {}
    for name, value in state.items():
        if gen_to_und_name(name) is not None:
            continue  # the generation expert only ever sees VAE tokens
        if name.startswith("language_model.model."):
            out["model." + name[len("language_model.model."):]] = value
        elif name == "language_model.lm_head.weight":
            out["lm_head.weight"] = value
    for i in range(num_layers):
        out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(hidden_size)
    return out


def transformers_llm_config(llm, special, dtype: torch.dtype):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_dim, hidden_act="silu", rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta}, attention_bias=True,
        use_sliding_window=False, max_position_embeddings=32768, bos_token_id=None, eos_token_id=special.im_end,
        pad_token_id=special.pad, architectures=["Qwen3ForCausalLM"], dtype=dtype)


# ChatML, the layout lance_ds trains text in (lance_ds.data.sequence: `<|im_start|>ROLE\nTEXT<|im_end|>\n` per turn,
# the answer after `<|im_start|>assistant\n`): given to an llm/ tokenizer that has no chat template of its own (the
# debug tokenizer), so that transformers' apply_chat_template prompts the export as training did.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


def save_transformers_llm(directory: Path, state: dict[str, Tensor], parts: InferenceParts,
                          dtype: torch.dtype) -> Path:
    """EXPORT_DIR/llm: config.json, model.safetensors and the tokenizer, for AutoModelForCausalLM."""
    llm = parts.bundle.spec.llm
    directory.mkdir(parents=True, exist_ok=True)
    transformers_llm_config(llm, parts.tokenizer.special, dtype).save_pretrained(str(directory))
    tensors = transformers_llm_state(state, llm.num_layers, llm.hidden_size)
    save_safetensors({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
                     metadata={"format": "pt"})
    tokenizer = copy.copy(parts.tokenizer.hf)  # (the template is the export's, not the live tokenizer's)
    tokenizer.chat_template = tokenizer.chat_template or CHATML_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return directory


# ----------------------------------------------------------------------------------------------------------------
# command line (tools/export_checkpoint.py)


def parse_args(argv: list[str] | None = None):
    import argparse

    p = argparse.ArgumentParser(prog="export_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="same as --checkpoint")
    p.add_argument("--checkpoint", help="a run dir, its checkpoints dir (both: latest) or a step dir")
    p.add_argument("--out", required=True, help="the export directory to write")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (train.ema_decay > 0 runs)")
    p.add_argument("--dtype", default="fp32", choices=PRECISIONS, help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_model_dir_flags(p)
    args = p.parse_args(argv)
    if (args.source is None) == (args.checkpoint is None):
        p.error("give the checkpoint once: --checkpoint DIR (or DIR as the first argument)")
    args.checkpoint = args.checkpoint or args.source
    return args


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    from .model.weights import WeightsFileError

    args = parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, ema=args.ema, dtype=args.dtype, overwrite=args.overwrite,
                                moved=moved_dirs(args))
    # FileNotFoundError, WeightsFileError: a model path (VAE, ViT) the run names is gone or damaged
    except (ExportError, FileNotFoundError, WeightsFileError) as e:
        print(f"export_checkpoint: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:  # writing it: a full disk, a lost mount (what was written is removed)
        print(f"export_checkpoint: could not write {args.out}: {e}", file=sys.stderr)
        return 1
    info = json.loads((out / EXPORT_INFO).read_text())
    print(f"exported {info['source']} (step {info['step']}, {info['weights']} weights"
          f"{', LoRA merged' if info['lora'] else ''}) to {out}\n"
          f"  lance_ds:     model.path={out} model.tokenizer_path={out}  (or python -m lance_ds.generate "
          f"--checkpoint {out} ...)\n"
          f"  transformers: AutoModelForCausalLM.from_pretrained('{out / LLM_DIR}')")
    return 0


if __name__ == "__main__":  # (python -m lance_ds.export, as generate and evaluate run; tools/export_checkpoint.py too)
    sys.exit(main())
