"""Typed run configuration: dataclasses per component, YAML with `extends:`, dotted overrides, one error report."""

from __future__ import annotations

from .core import ConfigError, Problems, doc
from .deepspeed import load_ds_json, resolve_ds_config
from .run import Run, RunConfig, config_warnings, load_run

__all__ = ["ConfigError", "Problems", "Run", "RunConfig", "config_warnings", "doc", "load_and_check", "load_ds_json",
           "load_run", "resolve_ds_config"]


def load_and_check(config_path: str | None, overrides: list[str], ds_path: str, world_size: int,
                   on_gpu: bool | None = None, devices_here: bool = True) -> tuple[Run, dict]:
    """Everything a rank needs to know before it starts: the run, its datasets and the resolved DeepSpeed JSON.

    Raises one ConfigError listing every problem found (unknown keys, bad values, missing files, switches that do
    not match the data, model files the build would fail on, DeepSpeed conflicts; what needs a GPU unless
    `devices_here` is false: the ranks run on other machines, launched from a login node). model.tokenizer_path left
    unset becomes model.path's own tokenizer when it has one.
    """
    import torch

    from lance_ds.model.build import default_tokenizer_path, model_problems
    from lance_ds.model.registry import hidden_size_of

    problems = Problems()
    run = load_run(config_path, overrides, problems)
    raw = load_ds_json(ds_path, problems)
    problems.raise_if_any()
    on_gpu = (torch.cuda.is_available() if on_gpu is None else on_gpu) if devices_here else None
    try:  # model.path's config files are read here first
        hidden_size = hidden_size_of(run.config.model)
    except (OSError, ValueError) as e:
        problems.add("model.path", str(e))
        problems.raise_if_any()
    run.config.model.tokenizer_path = default_tokenizer_path(run.config.model)
    for key, problem in model_problems(run.config.model):
        problems.add(key, problem)
    ds = resolve_ds_config(raw, run.config, world_size, hidden_size, on_gpu, problems)
    problems.raise_if_any()
    return run, ds
