"""The run config: one section per component, loaded from YAML + dotted overrides and checked as a whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.manifest import ManifestError, is_remote, local_shards, read_manifest
from .core import Problems, apply_overrides, check, doc, from_dict, join, load_yaml, output_problem
from .data import EDIT_TASKS, GEN_TASKS, UND_TASKS, DataConfig, DatasetConfig, GroupConfig
from .model import MODEL_DIRS, PRECISIONS, ModelConfig, ObjectiveConfig


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = doc(1000, "optimizer steps to train for")
    lr: float = doc(1e-4, "peak learning rate")
    min_lr: float = doc(0.0, "learning rate at the end of a cosine schedule")
    lr_schedule: str = doc("constant", "after warmup: constant or cosine")
    warmup_steps: int = doc(500, "linear warmup from 0 to lr over this many steps")
    weight_decay: float = doc(0.0, "AdamW weight decay of weight matrices (biases and norm gains are not decayed)")
    betas: list[float] = doc(factory=lambda: [0.9, 0.95], text="AdamW betas")
    eps: float = doc(1e-15, "AdamW epsilon")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this (0 disables)")
    micro_batch_size: int = doc(1, "packed sequences per rank per micro-step (each of data.packing_length tokens)")
    grad_accum: int = doc(1, "micro-steps per optimizer step (used to simulate larger batch sizes)")
    precision: str = doc("bf16", "mixed precision of the engine: bf16, fp16 or fp32")
    seed: int = doc(42, "seed of everything random (data order, noise, timesteps, init)")
    ema_decay: float = doc(0.0, "decay of an exponential moving average of the weights (0 disables; Lance uses 0.9999)")
    stall_timeout_s: float = doc(600.0, "after the first step, a rank that waits longer than this for another in a "
                                 "collective fails the run (that rank stalled or was lost; the last checkpoint stays "
                                 "usable) instead of hanging; start-up and the first step may take 30 minutes")

    def check(self, problems: Problems, key: str) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum"):
            problems.positive(getattr(self, name), join(key, name))
        if problems.require(self.lr > 0, join(key, "lr"), f"must be > 0, got {self.lr}"):
            problems.require(0 <= self.min_lr <= self.lr, join(key, "min_lr"),
                             f"must be in [0, train.lr], got {self.min_lr}")
        problems.one_of(self.lr_schedule, ("constant", "cosine"), join(key, "lr_schedule"))
        problems.require(self.warmup_steps >= 0, join(key, "warmup_steps"), f"must be >= 0, got {self.warmup_steps}")
        problems.require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), join(key, "betas"),
                         f"must be two numbers in [0, 1), got {self.betas}")
        problems.require(self.grad_clip >= 0, join(key, "grad_clip"), f"must be >= 0, got {self.grad_clip}")
        # torch's AdamW refuses these on every rank, after the model is built; refused here instead
        problems.require(self.eps > 0, join(key, "eps"), f"must be > 0 (e.g. 1e-8), got {self.eps}")
        problems.require(self.weight_decay >= 0, join(key, "weight_decay"),
                         f"must be >= 0 (0: no decay), got {self.weight_decay}")
        problems.one_of(self.precision, PRECISIONS, join(key, "precision"))
        problems.require(0 <= self.ema_decay < 1, join(key, "ema_decay"), f"must be in [0, 1), got {self.ema_decay}")
        problems.require(self.stall_timeout_s > 0, join(key, "stall_timeout_s"),
                         f"must be > 0 seconds, got {self.stall_timeout_s}")
        problems.require(0 <= self.seed < 2**63, join(key, "seed"), f"must be in [0, 2**63), got {self.seed}")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    save_every: int = doc(1000, "save every this many steps (and at the end)")
    keep_last: int = doc(3, "keep this many most recent checkpoints (older ones are deleted after a complete save)")
    debug_step: int = doc(0, "also save once at this early step, to prove saving works before a long run (0: off)")
    data_change: str = doc("refuse", "a resume onto another data order (dataset YAML, train.seed, packing): refuse, "
                                     "or restart: keep the weights, optimizer, EMA and step, and read the new data "
                                     "from its beginning (a resume on the same data order is exact either way)")

    def check(self, problems: Problems, key: str) -> None:
        problems.positive(self.save_every, join(key, "save_every"))
        problems.positive(self.keep_last, join(key, "keep_last"))
        problems.require(self.debug_step >= 0, join(key, "debug_step"), f"must be >= 0, got {self.debug_step}")
        problems.one_of(self.data_change, ("refuse", "restart"), join(key, "data_change"))


@dataclass
class ValidationConfig:
    """Held-out losses per task and generated samples, every few steps."""

    every: int = doc(0, "validate every this many steps, and at step 0 (0: off)")
    dataset_config: str | None = doc(None, "dataset YAML of the held-out set (required when every > 0)")
    max_samples: int = doc(64, "samples per group of the held-out set used for the losses (the same ones every time)")
    num_generations: int = doc(2, "samples per group rendered to TensorBoard (images, videos, or answers)")
    sample_steps: int = doc(30, "Euler steps when generating validation samples")
    max_new_tokens: int = doc(64, "tokens an answer to a held-out question (i2t, v2t) may take; each one is a "
                                  "forward pass of the whole model")
    cfg_scale: float = doc(4.0, "classifier-free guidance scale for validation samples")
    weights: str = doc("trained", "the weights validation scores and samples with: trained (those being trained) or "
                                  "ema (their moving average, train.ema_decay > 0)")

    def check(self, problems: Problems, key: str) -> None:
        problems.require(self.every >= 0, join(key, "every"), f"must be >= 0, got {self.every}")
        if self.every > 0:
            problems.require(self.dataset_config is not None, join(key, "dataset_config"),
                             "set a held-out dataset YAML (or validation.every=0 to turn validation off)")
        problems.positive(self.max_samples, join(key, "max_samples"))
        problems.positive(self.sample_steps, join(key, "sample_steps"))
        problems.positive(self.max_new_tokens, join(key, "max_new_tokens"))
        problems.require(self.num_generations >= 0, join(key, "num_generations"),
                         f"must be >= 0 (0: no samples), got {self.num_generations}")
        problems.require(self.cfg_scale >= 0, join(key, "cfg_scale"),
                         f"must be >= 0 (1: no guidance), got {self.cfg_scale}")
        problems.one_of(self.weights, ("trained", "ema"), join(key, "weights"))


@dataclass
class LogConfig:
    """What is written to the console and TensorBoard."""

    every: int = doc(10, "log scalars every this many steps")
    progress_bar: bool = doc(True, "show a progress bar on rank 0")
    peak_tflops: float | None = doc(None, "one GPU's peak dense TFLOP/s that train/mfu is measured against (None: "
                                          "the bf16 / fp16 peak of known GPUs: H100, H200, A100, L40S, ...)")

    def check(self, problems: Problems, key: str) -> None:
        problems.positive(self.every, join(key, "every"))
        if self.peak_tflops is not None:
            problems.positive(self.peak_tflops, join(key, "peak_tflops"), float)


@dataclass
class RunConfig:
    """Everything one training run needs. `dataset` is loaded from the file named by `dataset_config`."""

    output_dir: str = doc("runs/debug", "where config.yaml, tensorboard/ and checkpoints/ go")
    dataset_config: str | None = doc(None, "dataset YAML (groups of shards mixed by weight)")
    model: ModelConfig = doc(factory=ModelConfig, text="model")
    objective: ObjectiveConfig = doc(factory=ObjectiveConfig, text="losses")
    data: DataConfig = doc(factory=DataConfig, text="streaming and packing")
    train: TrainConfig = doc(factory=TrainConfig, text="optimisation")
    checkpoint: CheckpointConfig = doc(factory=CheckpointConfig, text="checkpoints")
    validation: ValidationConfig = doc(factory=ValidationConfig, text="validation")
    log: LogConfig = doc(factory=LogConfig, text="logging")

    def check(self, problems: Problems, key: str) -> None:
        if self.validation.weights == "ema":
            problems.require(self.train.ema_decay > 0, join(key, "validation.weights"),
                             "ema needs an EMA: set train.ema_decay > 0 (Lance: 0.9999), or validation.weights=trained")
        # An empty output_dir is the working directory: checkpoints and tensorboard/ would land wherever one launches.
        if not self.output_dir.strip():
            problems.add(join(key, "output_dir"), "is empty; give a directory (e.g. output_dir=runs/my_run)")
        elif problem := output_problem(join(key, "output_dir"), self.output_dir, directory=True):
            problems.add("", problem)


@dataclass
class Run:
    """A loaded, checked run: the config and the datasets its YAMLs name."""

    config: RunConfig
    dataset: DatasetConfig
    val_dataset: DatasetConfig | None


# Files a run YAML reads are relative to the YAML (so configs move with their data); output_dir and paths given
# on the command line are relative to where you launch. Both are made absolute as they are read.
INPUT_PATH_KEYS = ("dataset_config", "validation.dataset_config", *(f"model.{key}" for key in MODEL_DIRS))


def resolve_input_paths(data: dict, base: Path) -> dict:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted in INPUT_PATH_KEYS:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = _absolute(node[leaf], base)
    return data


def resolve_shard_paths(data: dict, base: Path) -> dict:
    """Shard paths are relative to the dataset YAML that names them, so a YAML and its data can move together."""
    groups = data.get("groups")
    if not isinstance(groups, list):
        return data
    resolved = [dict(g, shards=_absolute(g["shards"], base)) if isinstance(g, dict) and "shards" in g else g
                for g in groups]
    return dict(data, groups=resolved)


def _absolute(source, base: Path):
    """A path (or a list of them) relative to `base` made absolute; URLs, absolute paths and non-paths as they are."""
    if isinstance(source, list):
        return [_absolute(s, base) for s in source]
    if not isinstance(source, str) or is_remote(source) or Path(source).is_absolute():
        return source
    return str(base / source)


def load_dataset(path: str, problems: Problems, key: str) -> DatasetConfig:
    before = len(problems.items)
    data = load_yaml(path, problems, key, resolve_shard_paths)
    if not data and len(problems.items) > before:  # missing or unreadable: "needs at least one group" would be noise
        return DatasetConfig()
    dataset = from_dict(DatasetConfig, data, problems, key)
    check(dataset, problems, key)
    for i, group in enumerate(dataset.groups):
        check_group_sources(group, problems, f"{key}.groups[{i}]")
    return dataset


def check_group_sources(group: GroupConfig, problems: Problems, key: str) -> None:
    """Local shard sources must exist; the task comes from the converter's manifest.json when not given."""
    tasks = set()
    before = len(problems.items)
    empty = []  # converter outputs that hold no shard: every row was rejected, or the inputs had none
    for source in group.shards:
        if is_remote(source):
            continue
        p = Path(source)
        if p.is_dir():
            try:
                manifest = read_manifest(p)
            except FileNotFoundError:
                problems.add(f"{key}.shards", f"{p} has no manifest.json; point at a converter output dir "
                             "(tools/parquet_to_wds.py) or list its .tar files")
                continue
            except ManifestError as e:
                problems.add(f"{key}.shards", str(e))
                continue
            tasks.add(manifest["task"])
            if not manifest["shards"]:
                empty.append(p)
        else:
            try:
                found, beside = local_shards(source)
            except ManifestError as e:
                problems.add(f"{key}.shards", str(e))
                continue
            if not found:
                problems.add(f"{key}.shards", f"{source} matches no file or directory")
            tasks |= {manifest["task"] for manifest in beside.values()}
    if empty and len(empty) == len(group.shards):
        problems.add(f"{key}.shards", f"{', '.join(map(str, empty))} hold(s) no samples: the conversion wrote none "
                     "(see rejects.jsonl there); fix the inputs and convert again, or remove the group")
    if len(tasks) > 1:
        problems.add(f"{key}.shards", f"mixes tasks {sorted(tasks)}; put each task in its own group")
    elif tasks:
        (found,) = tasks
        if group.task is None:
            group.task = found
        elif group.task != found:
            problems.add(f"{key}.task", f"is {group.task} but the manifest says {found}")
    if group.task is None and len(problems.items) == before:
        problems.add(f"{key}.task", "cannot be read from a manifest for these sources; set it (t2i, t2v, ...)")


def load_run(config_path: str | None, overrides: list[str], problems: Problems) -> Run | None:
    """Load the run YAML, apply overrides, load the dataset YAMLs, and check it all; problems are collected."""
    before = len(problems.items)
    data = load_yaml(config_path, problems, "--config", resolve_input_paths) if config_path else {}
    unreadable = len(problems.items) > before  # then dataset_config may be in the part that could not be read
    # paths given on the command line are relative to where it runs; recorded absolute, so that the run's
    # config.yaml (read by export and generate) names the same files from anywhere
    data = resolve_input_paths(apply_overrides(data, overrides, problems, RunConfig), Path.cwd())
    config = from_dict(RunConfig, data, problems)
    check(config, problems)
    if not config.dataset_config:
        if not unreadable:
            problems.add("dataset_config", "no dataset YAML: pass --dataset_config FILE")
        return None
    dataset = load_dataset(config.dataset_config, problems, "dataset_config")
    val, val_path = None, config.validation.dataset_config
    if val_path and config.validation.every > 0:
        before = len(problems.items)
        val = load_dataset(val_path, problems, "validation.dataset_config")
        if len(problems.items) > before:  # often the example's held-out YAML, named by a shipped config
            problems.add("validation.dataset_config", f"{val_path} is the held-out data validation.every="
                         f"{config.validation.every} reads: set validation.dataset_config=YOUR_VAL.yaml, or "
                         "validation.every=0 to train without validation")
    elif val_path and not Path(val_path).is_file():  # named while validation is off: there all the same
        problems.add("validation.dataset_config", f"{val_path} is not a file")
    check_switches(config.model, dataset, problems, "dataset_config")
    if val is not None:
        check_switches(config.model, val, problems, "validation.dataset_config")
    return Run(config, dataset, val)


def config_warnings(config: RunConfig) -> list[str]:
    """Settings that are allowed but rarely what a user means: said before the run starts, not refused."""
    warnings = []
    train, model = config.train, config.model
    if 0 < train.max_steps <= train.warmup_steps:
        warnings.append(f"train.warmup_steps={train.warmup_steps} is not below train.max_steps={train.max_steps}: the "
                        f"learning rate never reaches train.lr={train.lr:g} (it ends at "
                        f"{train.lr * train.max_steps / train.warmup_steps:.3g}); lower train.warmup_steps")
    if model.visual_und and not model.vit_trainable and model.vit_path is None and model.path is None:
        warnings.append("the ViT is random (no model.vit_path or model.path) and frozen (model.vit_trainable=false): "
                        "understanding and edits would see features that carry nothing; set model.vit_path, or "
                        "model.vit_trainable=true")
    return warnings


def check_switches(model: ModelConfig, dataset: DatasetConfig, problems: Problems, key: str) -> None:
    """Tasks in the data need the model branches that serve them; refused here, never a crash mid-run."""
    for i, group in enumerate(dataset.groups):
        if group.task in GEN_TASKS and not model.visual_gen:
            problems.add(f"{key}.groups[{i}]", f"group '{group.name}' is a {group.task} (generation) task but "
                         "model.visual_gen is false; set model.visual_gen=true or remove the group")
        if group.task in UND_TASKS and not model.visual_und:
            problems.add(f"{key}.groups[{i}]", f"group '{group.name}' is a {group.task} (understanding) task "
                         "but model.visual_und is false; set model.visual_und=true or remove the group")
        elif group.task in EDIT_TASKS and not model.visual_und:
            problems.add(f"{key}.groups[{i}]", f"group '{group.name}' is a {group.task} edit, whose source the "
                         "model sees through the ViT, but model.visual_und is false (no ViT); set "
                         "model.visual_und=true or remove the group")
