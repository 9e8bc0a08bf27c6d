"""LoRA through peft: adapters on chosen projections, only adapters train, saved and loaded in peft's format.

peft's `inject_adapter_in_model` keeps LanceModel's module tree (a wrapped projection becomes
`...q_proj.base_layer` + `...q_proj.lora_A/B.default`), so the engine, ZeRO-3 and the checkpointer see ordinary
parameters. Files: `adapter_config.json` + `adapter_model.safetensors` with PeftModel's key prefix
`base_model.model.`, so `peft.PeftModel.from_pretrained(lance_model, dir)` reads them too.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from lance_ds.config.model import LoraConfig as LoraSettings

from .llm import GEN_SUFFIX
from .weights import LANCE_VIT_PREFIX, load_safetensors, save_safetensors  # a trainable ViT lives under that prefix

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NOT_IN_VIT = r"vit_model\..*"  # peft's exclude_modules: adapters go on the LLM's projections only


def peft_config(settings: LoraSettings, targets: list[str], exclude_modules: str | None = None,
                base: str | None = None, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, exclude_modules=exclude_modules, bias="none",
                      base_model_name_or_path=base, modules_to_save=modules_to_save)


def lora_targets(model: nn.Module, names: list[str]) -> list[str]:
    """The linear layers `model.lora.target_modules` names, on both experts: `q_proj` also names the generation
    expert's `q_proj_moe_gen` (its MLP layers share the understanding expert's names already), so that adapters
    reach the tokens a generation task trains on. A `*_moe_gen` name alone adapts the generation expert only."""
    suffixes = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and not name.startswith(LANCE_VIT_PREFIX)}
    unknown = [t for t in names if t not in suffixes]
    if unknown:
        raise ValueError(f"model.lora.target_modules {unknown} name no linear layer of the model; choose from "
                         f"{sorted(suffixes)}")
    return sorted({t for name in names for t in (name, name + GEN_SUFFIX) if t in suffixes})


def adapted_modules(adapters: dict[str, torch.Tensor]) -> list[str]:
    """The layer names (last component) that hold adapters: what adapter_config.json's target_modules must say."""
    return sorted({key.split(".lora_A.")[0].rsplit(".", 1)[-1] for key in adapters if ".lora_A." in key})


def add_lora(model: nn.Module, settings: LoraSettings, ds_config: dict | None = None,
             fresh: set[str] = frozenset()) -> nn.Module:
    """Inject adapters (in place) into the LLM's projections and freeze everything else but what trains whole beside
    them: a trainable ViT (model.vit_trainable: the ViT's MLP names are the LLM's, so target_modules alone would put
    adapters on it too), and the `fresh` parameters model.path did not hold (the generation heads of a Qwen2.5-VL
    start, LAPE tables), which frozen would stay at their random init. Under ZeRO-3 the adapters are created
    partitioned."""
    from peft import inject_adapter_in_model

    from .build import zero_init

    whole = {n for n, p in model.named_parameters()
             if p.requires_grad and (n.startswith(LANCE_VIT_PREFIX) or n in fresh)}  # (freeze patterns applied)
    targets = lora_targets(model, list(settings.target_modules))
    with zero_init(ds_config) if ds_config is not None else contextlib.nullcontext(), warnings.catch_warnings():
        # (peft's init of zero.Init's empty placeholders, redone below on the gathered tensors)
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        has_vit = any(name.startswith(LANCE_VIT_PREFIX) for name, _ in model.named_modules())
        inject_adapter_in_model(peft_config(settings, targets, NOT_IN_VIT if has_vit else None), model)
    if ds_config is not None:
        _init_partitioned_adapters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name) or name in whole)
    return model


def _init_partitioned_adapters(model: nn.Module) -> None:
    """peft initialises an adapter (lora_B = 0, so the model starts as it was) on tensors that zero.Init has already
    partitioned into empty placeholders: a no-op, which left lora_B at nn.Linear's random init and the model off its
    weights by (alpha / r) B A before the first step. Done again on the gathered tensors (rank 0's, broadcast)."""
    from peft.tuners.lora import LoraLayer

    from .build import gathered

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                with gathered([module.lora_A[adapter].weight, module.lora_B[adapter].weight]):
                    module.reset_lora_parameters(adapter, True)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors, and the parameters that train whole beside them (see add_lora), under peft's names (adapter
    name dropped, PeftModel prefix added).

    state_dict: a full (e.g. ZeRO-3-gathered) state dict of the model; default model.state_dict().
    """
    from peft import get_peft_model_state_dict

    state = state_dict if state_dict is not None else model.state_dict()
    adapters = get_peft_model_state_dict(model, state_dict=state)
    adapters.update({n: state[n] for n, p in model.named_parameters() if p.requires_grad and not is_lora_param(n)})
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in adapters.items()}


def save_lora(model: nn.Module, settings: LoraSettings, directory: str | Path,
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters as peft does (call on one rank with gathered weights)."""
    return save_adapters(directory, lora_state_dict(model, state_dict), settings)


def save_adapters(directory: str | Path, adapters: dict[str, torch.Tensor], settings: LoraSettings,
                  base: str | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors of adapter tensors under peft's names. `base`: the weights
    they go on (the run's model.path; None: random, from the run's seed), and never the ViT's layers of the same
    name (excluded as when they were added). Tensors that are not adapters trained whole: their top-level modules
    are peft's modules_to_save, which replace the base's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    whole = sorted({k.removeprefix(PEFT_PREFIX).split(".")[0] for k in adapters if not is_lora_param(k)})
    peft_config(settings, adapted_modules(adapters), NOT_IN_VIT, base, whole or None).save_pretrained(str(directory))
    save_safetensors({k: v.contiguous() for k, v in adapters.items()}, str(directory / ADAPTER_WEIGHTS))
    return directory


@torch.no_grad()
def load_lora(model: nn.Module, directory: str | Path) -> None:
    """Load adapters saved by `save_lora` into a model that already has them (add_lora with the same settings)."""
    from peft import set_peft_model_state_dict

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a LoRA directory holds adapter_config.json + {ADAPTER_WEIGHTS}")
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in load_safetensors(path).items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{path} holds adapters the model lacks, e.g. {unexpected[:3]}; build the model with the "
                         "same model.lora settings it was trained with")
