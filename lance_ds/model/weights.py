"""Checkpoint names, in one place: reading safetensors directories, and mapping Lance / Qwen2.5-VL keys onto
LanceModel's parameter names.

LanceModel's own names *are* Lance's (`language_model.model.layers.{i}.self_attn.q_proj_moe_gen.weight`, ...), so
a Lance `model.safetensors` maps key for key, with two exceptions stated here:
  - `latent_pos_embed.pos_embed` is a fixed sin-cos table; it is checked against the recomputed one and dropped.
  - `vit_model.*` is the ViT, which lives outside the trainable model when frozen (DESIGN rule 5).
A Qwen2.5-VL checkpoint maps `model.language_model.*` / `model.*` -> `language_model.model.*` and `lm_head.*` ->
`language_model.lm_head.*`; QK-norms start at 1, a tied lm_head is untied by copying the embeddings, and the
generation expert is copied from the understanding weights.
Only safetensors is read (DESIGN rule 10: no pickles from checkpoints).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from lance_ds.config.core import to_dict

LANCE_POS_TABLE = "latent_pos_embed.pos_embed"
LANCE_VIT_PREFIX = "vit_model."
LANCE_LLM_CONFIG = "llm_config.json"
LANCE_WEIGHTS = "model.safetensors"

# Qwen2.5-VL text weights: (prefix in the checkpoint, prefix in LanceModel); transformers >= 4.52 writes the first
QWEN_TEXT_PREFIXES = (("model.language_model.", "language_model.model."), ("model.", "language_model.model."),
                      ("lm_head.", "language_model.lm_head."))


class WeightsFileError(ValueError):
    """A weights file that is not (or no longer) readable safetensors: `path`, and the reader's `error`."""

    def __init__(self, path: Path, error: Exception):
        super().__init__(f"{path} is not a readable safetensors file ({error}): it is damaged or was cut short; "
                         "copy or save it again")
        self.path, self.error = path, error


def open_safetensors(path: str | Path):
    """safe_open(path) (a context manager), naming the file when it is damaged: a copy or download cut short fails
    here with what to do, not deep in the safetensors reader. (Its header covers the whole file, so a truncated file
    is refused on opening.)"""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise WeightsFileError(Path(path), e) from None


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of one safetensors file (safetensors.torch.load_file, with damage reported as by
    open_safetensors)."""
    with open_safetensors(path) as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def safetensors_index(path: str | Path) -> dict[str, Path]:
    """Tensor name -> file, over every *.safetensors file of a directory (or a single file)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}; point the config at a local checkpoint directory "
                                "(pickled .bin/.pt checkpoints are not loaded, convert them to safetensors)")
    index: dict[str, Path] = {}
    for f in files:
        with open_safetensors(f) as handle:
            for name in handle.keys():
                index.setdefault(name, f)
    return index


def read_tensors(index: dict[str, Path], names) -> dict[str, Tensor]:
    """Read only `names` (lazily per file: a 7 GB checkpoint is not loaded to take its ViT)."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(index[name], []).append(name)
    out = {}
    for f, keys in by_file.items():
        with open_safetensors(f) as handle:
            for k in keys:
                out[k] = handle.get_tensor(k)
    return out


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def is_lance_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / LANCE_LLM_CONFIG).is_file() and (path / LANCE_WEIGHTS).is_file()


# ----------------------------------------------------------------------------------------------------------------
# key mapping


def lance_to_model(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None]:
    """Lance checkpoint -> (LanceModel state, ViT state without prefix, the stored sin-cos table or None)."""
    model_state, vit_state, table = {}, {}, None
    for k, v in state.items():
        if k == LANCE_POS_TABLE:
            table = v
        elif k.startswith(LANCE_VIT_PREFIX):
            vit_state[k[len(LANCE_VIT_PREFIX):]] = v
        else:
            model_state[k] = v
    return model_state, vit_state, table


def model_to_lance(model_state: dict[str, Tensor], vit_state: dict[str, Tensor] | None = None,
                   pos_table: Tensor | None = None) -> dict[str, Tensor]:
    """The inverse of `lance_to_model`: a state dict Lance's code loads."""
    out = dict(model_state)
    for k, v in (vit_state or {}).items():
        out[LANCE_VIT_PREFIX + k] = v
    if pos_table is not None:
        out[LANCE_POS_TABLE] = pos_table
    return out


def qwen_name(key: str) -> str | None:
    """A Qwen2.5-VL / Qwen2 checkpoint key -> LanceModel name (und expert); None for the ViT and unknown keys."""
    if key.startswith(("visual.", "model.visual.")):
        return None
    for src, dst in QWEN_TEXT_PREFIXES:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


class LazyState(Mapping):
    """Model name -> tensor, read from the checkpoint only when asked for (one module's tensors in memory at a
    time, so N ranks loading a 3B checkpoint do not each hold all of it). A source is a checkpoint key, or a
    function making the tensor (fills for what a checkpoint lacks)."""

    def __init__(self, index: dict[str, Path], sources: dict[str, str | Callable[[], Tensor]]):
        self.index, self.sources = index, sources
        self._handles: dict[Path, object] = {}

    def __getitem__(self, name: str) -> Tensor:
        src = self.sources[name]
        if callable(src):
            return src()
        f = self.index[src]
        if f not in self._handles:
            self._handles[f] = open_safetensors(f)
        return self._handles[f].get_tensor(src)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor to answer
        return name in self.sources

    def __iter__(self):
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


def lance_sources(index: dict[str, Path], model_shapes: dict[str, torch.Size]) -> dict[str, str]:
    """Lance's checkpoint names are the model's: identity, minus the fixed table and the ViT (build.load_vit's).
    One trained without the generation path (a model.visual_gen=false export) lends its gen expert as Qwen2.5-VL
    does: the und twin's weights."""
    from .llm import gen_to_und_name

    sources = {k: k for k in index if k != LANCE_POS_TABLE and not k.startswith(LANCE_VIT_PREFIX)}
    if not any(gen_to_und_name(k) for k in sources):
        _gen_expert_from_und(sources, model_shapes)
    return sources


def _gen_expert_from_und(sources: dict, model_shapes: dict[str, torch.Size]) -> None:
    from .llm import gen_to_und_name

    for name in model_shapes:
        und = gen_to_und_name(name)
        if und is not None and name not in sources and und in sources:
            sources[name] = sources[und]


def qwen_sources(index: dict[str, Path], model_shapes: dict[str, torch.Size]) -> dict[str, str | Callable[[], Tensor]]:
    """Qwen2.5-VL / Qwen2 text weights for LanceModel, plus what they lack: an untied lm_head (the embeddings,
    when the checkpoint ties them, as Qwen2.5-VL-3B does), QK-norms (ones) and the gen expert (its und twin)."""
    from .llm import gen_to_und_name

    sources: dict = {}
    for key in index:
        name = qwen_name(key)
        if name is not None:
            sources[name] = key
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if head not in sources and embed in sources:
        sources[head] = sources[embed]
    for name, shape in model_shapes.items():  # Qwen2.5-VL has no QK-norms: ones (no scaling)
        und = gen_to_und_name(name) or name
        if name not in sources and und.endswith(("q_norm.weight", "k_norm.weight")):
            sources[name] = lambda shape=shape: torch.ones(shape)
    _gen_expert_from_und(sources, model_shapes)
    return sources


def llm_config_json(llm, vit=None, extra: dict | None = None) -> dict:
    """Lance's llm_config.json for a decoder geometry (Qwen2 fields + mrope section + the ViT's config)."""
    data = {
        "model_type": "qwen2", "layer_module": "Qwen2MoTDecoderLayer", "qk_norm": True, "tie_word_embeddings": False,
        "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "rope_scaling": {"type": "mrope", "rope_type": "mrope", "mrope_section": list(llm.mrope_section)},
    }
    if vit is not None:
        data["vision_config"] = to_dict(vit)
    data.update(extra or {})
    return data


FRAME_VAE_DIR = "a frame VAE (tools/train_example_vae.py)"
EXAMPLE_VIT_DIR = "a ViT (tools/train_example_vit.py)"


def describe_model_dir(directory: str | Path) -> str | None:
    """What the config.json in `directory` says lives there (FRAME_VAE_DIR, EXAMPLE_VIT_DIR, "a AutoencoderKLWan
    model", "a qwen2_5_vl model", ...), or None without one: the example tools refuse to save over another model."""
    cfg_file = Path(directory) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return "a config.json that is not readable JSON"
    if not isinstance(cfg, dict):
        return "a config.json that is not a JSON object"
    if cfg.get("_class_name") == "FrameVAE":  # lance_ds.model.vae.FrameAutoencoder.CONFIG_NAME
        return FRAME_VAE_DIR
    if "_class_name" in cfg:
        return f"a {cfg['_class_name']} model"
    if set(cfg) == {"vision_config"}:  # what tools/train_example_vit.py writes
        return EXAMPLE_VIT_DIR
    return f"a {cfg['model_type']} model" if "model_type" in cfg else "another model's config.json"


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, leaving the file with the permissions any new file gets (save_file writes 0600:
    other users of a shared machine could not load an export or a checkpoint's EMA)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # read, not set: os.umask() would change it for every thread for a moment
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def save_lance_dir(directory: str | Path, model_state: dict[str, Tensor], llm, vit=None,
                   vit_state: dict[str, Tensor] | None = None, pos_table: Tensor | None = None,
                   extra_config: dict | None = None) -> Path:
    """Write a Lance checkpoint directory (model.safetensors under Lance's names + llm_config.json).

    model_state: a full (on ZeRO-3: consolidated) LanceModel state dict; LoRA-wrapped names lose `.base_layer`.
    extra_config: more llm_config.json fields (e.g. max_latent_size / max_num_frames, read back on load).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k.replace(".base_layer.", "."): v for k, v in model_state.items() if ".lora_" not in k}
    state = model_to_lance(state, vit_state, pos_table)
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, directory / LANCE_WEIGHTS)
    (directory / LANCE_LLM_CONFIG).write_text(json.dumps(llm_config_json(llm, vit, extra_config), indent=1))
    return directory
