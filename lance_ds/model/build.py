"""`build_model`: the one entry point the trainer calls. It builds the three parts where DESIGN rule 5 wants them:

  frozen VAE and frozen ViT   plain modules, outside zero.Init and outside the engine, never checkpointed
  trainable LanceModel        under deepspeed.zero.Init when the DeepSpeed config is ZeRO-3 (and a trainable ViT
                              inside it, built by transformers under a kept-alive HfDeepSpeedConfig)

then loads weights (model.path / vit_path / vae_path), initialises the generation expert as a copy of the
understanding weights, applies freeze_modules / LoRA / gradient checkpointing, and reports the geometry the data
side needs to cut inputs for this model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from lance_ds.config.core import ConfigError
from lance_ds.config.deepspeed import zero_stage
from lance_ds.config.model import ModelConfig
from lance_ds.data.sequence import VisionGeometry

from .attention import import_flash_varlen
from .lance import LanceConfig, LanceModel
from .llm import RMSNorm, copy_und_to_gen, gen_to_und_name
from .lora import add_lora, is_lora_param
from .positions import LearnablePositions, lape_cost
from .registry import ModelSpec, resolve_spec
from .vae import FrozenVAE, VaeConfig, build_vae, codec_shape, detect_kind
from .vision import build_vision_tower, freeze, load_vision_weights, vit_prefix
from .weights import (LANCE_POS_TABLE, LANCE_VIT_PREFIX, LANCE_WEIGHTS, LazyState, is_lance_dir, lance_sources,
                      qwen_sources, read_tensors, safetensors_index)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# codecs that `model.vae` can ask for without a directory (tiny, built from a config)
TINY_CODECS = {
    "patch": VaeConfig(kind="patch", latent_channels=3 * 4 * 8 * 8, spatial_factor=8, temporal_factor=4),
    "kl": VaeConfig(kind="kl", latent_channels=4, spatial_factor=4, temporal_factor=1, diffusers_config=dict(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], latent_channels=4,
        norm_num_groups=4, layers_per_block=1)),
}


@dataclass(frozen=True)
class Geometry(VisionGeometry):
    """The built model's encoders as the data side's planner needs them (a VisionGeometry), and its widths."""

    latent_channels: int = 0  # z: channels of one latent token
    hidden_size: int = 0
    frame_size: int | None = None  # a frame VAE's one frame side (it makes no other size)


@dataclass
class ModelBundle:
    """What `build_model` returns."""

    model: LanceModel  # the trainable part (give it to deepspeed.initialize)
    vit: nn.Module | None  # frozen ViT outside the engine (None: visual_und off, or trainable inside model.vit_model)
    vae: FrozenVAE | None  # frozen codec outside the engine (None: visual_gen off)
    geometry: Geometry
    spec: ModelSpec
    lape: dict | None = None  # extra parameters and memory of LAPE when enabled (see positions.lape_cost)
    hf_ds_config: object = None  # transformers' HfDeepSpeedConfig, kept alive while the model lives

    def describe(self) -> str:
        llm = self.spec.llm
        num_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.model.parameters())
        num_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for p in self.model.parameters() if p.requires_grad)
        parts = [f"LLM {llm.num_layers}x{llm.hidden_size} ({llm.num_heads} heads, {llm.num_kv_heads} KV, "
                 f"MoT={llm.mot}), {num_params / 1e6:.1f} M params, {num_train / 1e6:.1f} M trainable"]
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if any(is_lora_param(n) for n in names):  # what trains whole beside the adapters (see add_lora)
            whole = sorted({n.split(".")[0] for n in names if not is_lora_param(n)})
            parts[0] += f" (LoRA adapters{''.join(f' + {m}' for m in whole)})"
        if self.vit is not None:
            parts.append(f"frozen ViT {self.spec.vit.depth}x{self.spec.vit.hidden_size}")
        if self.vae is not None:
            parts.append(f"frozen {type(self.vae).__name__} (z {self.vae.latent_channels}, "
                         f"{self.vae.spatial_factor}x/{self.vae.temporal_factor}x)")
        if self.lape:
            parts.append(f"LAPE +{self.lape['num_params']:,} params ({self.lape['weight_bytes'] / 2**20:.2f} MiB "
                         f"weights, {self.lape['train_bytes'] / 2**20:.2f} MiB with fp32 master + Adam states)")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, num_text_classes: int, ds_config: dict | None = None,
                device: torch.device | str | None = None) -> ModelBundle:
    """Build the model `cfg` describes for a tokenizer of `num_text_classes` tokens.

    ds_config: the resolved DeepSpeed JSON (dict); ZeRO-3 builds the trainable model partitioned under zero.Init.
    None builds a plain module in `model.dtype` (tests, inference). Frozen parts go to `device` (default: cuda
    when available, else cpu); the trainable model stays where the engine will put it.
    """
    spec = resolve_spec(cfg)
    if cfg.attention == "flash":
        import_flash_varlen()  # refuse now, with the fix, rather than at the first forward
    device = torch.device(device) if device is not None else default_device()
    zero3 = ds_config is not None and zero_stage(ds_config) == 3
    vae = build_codec(cfg, spec).to(device) if cfg.visual_gen else None
    hf_ds = None
    vit = None
    if cfg.visual_und:
        if cfg.vit_trainable and zero3:
            hf_ds = keep_hf_deepspeed_config(ds_config)
        # a trainable ViT follows the model: the engine (or zero.Init) sets its dtype, or model.dtype below
        vit = build_vision_tower(spec.vit, None if cfg.vit_trainable else DTYPES[cfg.vit_dtype])
        load_vit(vit, cfg)
    lance_cfg = lance_config(cfg, spec, vae.latent_channels if vae is not None else spec.vae.latent_channels,
                             num_text_classes)
    trainable_vit = vit if cfg.visual_und and cfg.vit_trainable else None
    with zero_init(ds_config) if zero3 else contextlib.nullcontext():
        model = LanceModel(lance_cfg, vit_model=trainable_vit)
    init_weights(model)
    fresh: set[str] = set()  # parameters model.path does not hold: they start from init_weights
    if cfg.path:
        fresh = load_llm_weights(model, Path(cfg.path))
    elif cfg.visual_gen:
        init_gen_expert(model)
    if trainable_vit is not None:
        vit = None  # it lives in the model (and its checkpoint) now
    elif vit is not None:
        vit = freeze(vit).to(device)
    if cfg.training_type == "lora":
        add_lora(model, cfg.lora, ds_config if zero3 else None, fresh=fresh)
    freeze_by_patterns(model, cfg.freeze_modules)  # (after add_lora: a pattern may name adapters)
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    if ds_config is None:
        model.to(DTYPES[cfg.dtype])
    lape = None
    if lance_cfg.lape_spatial:
        lape = lape_cost(lance_cfg.llm.hidden_size, lance_cfg.lape_spatial, lance_cfg.lape_temporal,
                         torch.finfo(DTYPES[cfg.dtype]).bits // 8)
    geometry = geometry_of(spec, lance_cfg, vae)
    return ModelBundle(model=model, vit=vit, vae=vae, geometry=geometry, spec=spec, lape=lape, hf_ds_config=hf_ds)


def lance_config(cfg: ModelConfig, spec: ModelSpec, latent_channels: int, num_text_classes: int) -> LanceConfig:
    return LanceConfig(
        llm=replace(spec.llm, mot=cfg.visual_gen), num_text_classes=num_text_classes, latent_channels=latent_channels,
        max_latent_size=spec.max_latent_size, max_num_frames=spec.max_num_frames,
        visual_und=cfg.visual_und, visual_gen=cfg.visual_gen, attention=cfg.attention,
        lape_spatial=cfg.lape.num_spatial_tokens if cfg.lape.enabled and cfg.visual_gen else 0,
        lape_temporal=cfg.lape.num_temporal_tokens if cfg.lape.enabled and cfg.visual_gen else 0)


def geometry_of(spec: ModelSpec, lance_cfg: LanceConfig, vae: FrozenVAE | VaeConfig | None) -> Geometry:
    codec = vae if vae is not None else spec.vae
    return Geometry(
        vae_spatial_factor=codec.spatial_factor, vae_temporal_factor=codec.temporal_factor,
        vit_patch_size=spec.vit.patch_size, vit_temporal_patch=spec.vit.temporal_patch_size,
        vit_merge_size=spec.vit.spatial_merge_size, tokens_per_second=spec.vit.tokens_per_second,
        max_latent_size=lance_cfg.max_latent_size, max_latent_frames=lance_cfg.max_latent_frames,
        latent_channels=lance_cfg.latent_channels, hidden_size=lance_cfg.llm.hidden_size,
        frame_size=codec.frame_size)


def planned_geometry(cfg: ModelConfig) -> Geometry:
    """The geometry build_model(cfg) reports, from config files alone (no weights loaded): what the config check
    plans samples with."""
    spec = resolve_spec(cfg)
    codec = codec_shape(*codec_source(cfg, spec)) if cfg.visual_gen else spec.vae
    return geometry_of(spec, lance_config(cfg, spec, codec.latent_channels, num_text_classes=1), codec)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def zero_init(ds_config: dict):
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def keep_hf_deepspeed_config(ds_config: dict):
    """transformers builds its models under zero.Init while an HfDeepSpeedConfig object is alive (weak ref)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


@contextlib.contextmanager
def without_hf_deepspeed_config():
    """transformers builds every model under zero.Init while any HfDeepSpeedConfig lives in the process (a ZeRO-3
    trainer's with a trainable ViT, when a notebook configures a second run): not a plan on the meta device."""
    from transformers.integrations import deepspeed as hf_deepspeed

    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # (transformers keeps no public getter of the object)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = live


def gathered(params: list[nn.Parameter]):
    """Full parameters inside the block on ZeRO-3 (rank 0's writes are kept and broadcast); a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# parts


def build_codec(cfg: ModelConfig, spec: ModelSpec) -> FrozenVAE:
    return build_vae(*codec_source(cfg, spec), DTYPES[cfg.vae_dtype])


def codec_source(cfg: ModelConfig, spec: ModelSpec) -> tuple[VaeConfig, str | None]:
    """The codec a run builds and the directory of its weights (None: built from the config). Reads config files
    only, so the config check asks it too; ValueError / FileNotFoundError say what is missing."""
    kind = cfg.vae
    if kind == "auto":
        kind = detect_kind(cfg.vae_path) if cfg.vae_path else spec.vae.kind
    if cfg.vae_path is None:
        codec = spec.vae if spec.vae.kind == kind else TINY_CODECS.get(kind)
        if codec is None or (codec.kind != "patch" and not codec.diffusers_config):
            needs = {"wan": "diffusers AutoencoderKLWan", "kl": "diffusers AutoencoderKL",
                     "frame": "frame VAE (tools/train_example_vae.py)"}[kind]
            raise ValueError(f"model.vae={kind} for size '{cfg.size}' needs weights: set model.vae_path to a local "
                             f"{needs} directory")
        return codec, None
    if cfg.vae != "auto" and detect_kind(cfg.vae_path) != cfg.vae:
        raise ValueError(f"model.vae={cfg.vae} but model.vae_path {cfg.vae_path} holds a "
                         f"{detect_kind(cfg.vae_path)} VAE; set model.vae=auto or point vae_path at the right dir")
    return spec.vae, cfg.vae_path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def default_tokenizer_path(cfg: ModelConfig) -> str | None:
    """model.tokenizer_path, else model.path's own tokenizer (Lance, Qwen2.5-VL and lance_ds export directories
    ship theirs: a checkpoint's token ids only mean something with its tokenizer); None: the debug tokenizer."""
    if cfg.tokenizer_path is not None or cfg.path is None:
        return cfg.tokenizer_path
    return cfg.path if any((Path(cfg.path) / name).is_file() for name in TOKENIZER_FILES) else None


def model_problems(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(key, problem) for every part of `cfg` that building the model would fail on, or build wrong, found from
    config files and headers before any rank starts work: the codec's weights, the ViT's, the tokenizer (and its
    agreement with model.path's token ids), LoRA targets."""
    from lance_ds.data.tokenizer import load_tokenizer

    try:
        spec = resolve_spec(cfg)
    except (OSError, ValueError) as e:
        return [("model.path", str(e))]
    problems = []
    if cfg.visual_gen:
        try:
            codec_source(cfg, spec)
        except (OSError, ValueError) as e:
            problems.append(("model.vae_path", str(e)))
    if cfg.visual_und and (cfg.vit_path or cfg.path):
        key, source = ("model.vit_path", cfg.vit_path) if cfg.vit_path else ("model.path", cfg.path)
        try:
            vit_prefix(safetensors_index(source), source)
        except (OSError, ValueError) as e:
            fix = "" if cfg.vit_path else "; or model.visual_und=false"
            problems.append((key, f"{e}{fix}"))
    if cfg.path is not None and cfg.tokenizer_path is None:
        problems.append(("model.tokenizer_path", f"model.path {cfg.path} has no tokenizer "
                                                 f"({' / '.join(TOKENIZER_FILES)}): set model.tokenizer_path to the "
                                                 "tokenizer its token ids come from"))
    else:
        try:
            tokenizer = load_tokenizer(cfg.tokenizer_path)
            problems += [("model.tokenizer_path", p) for p in tokenizer_disagreements(cfg, tokenizer)]
        except (OSError, ValueError) as e:
            problems.append(("model.tokenizer_path", str(e)))
    if cfg.training_type == "lora" or cfg.freeze_modules or cfg.path:
        problems += _built_model_problems(cfg, spec)
    return problems


def _built_model_problems(cfg: ModelConfig, spec: ModelSpec) -> list[tuple[str, str]]:
    """What the built model would refuse, found on the meta device (names and shapes: nothing is allocated): LoRA
    targets and freeze patterns that match no layer, model.path weights that do not fit the model's switches."""
    latent_channels = spec.vae.latent_channels
    if cfg.visual_gen:
        with contextlib.suppress(OSError, ValueError):  # (reported above)
            latent_channels = codec_shape(*codec_source(cfg, spec)).latent_channels
    with torch.device("meta"), without_hf_deepspeed_config():
        vit = build_vision_tower(spec.vit, None) if cfg.visual_und and cfg.vit_trainable else None
        with initialisers_off():  # (not around transformers': its first import keeps copies of the initialisers)
            model = LanceModel(lance_config(cfg, spec, latent_channels, num_text_classes=1), vit_model=vit)
    problems = []
    if cfg.path:
        try:
            shapes = _decoder_shapes(model)
            where, _, sources = llm_sources(Path(cfg.path), shapes)
            problem = llm_weights_problem(shapes, sources, where, model)
        except (OSError, ValueError) as e:
            problem = str(e)
        if problem:
            problems.append(("model.path", problem))
    if cfg.training_type == "lora":  # adapters as build_model injects them: freeze patterns may name them
        try:
            with torch.device("meta"):
                add_lora(model, cfg.lora)
        except ValueError as e:
            problems.append(("model.lora.target_modules", str(e).removeprefix("model.lora.target_modules ")))
    problems += [("model.freeze_modules", p) for p in unmatched_patterns(model, cfg.freeze_modules)]
    return problems


@contextlib.contextmanager
def initialisers_off():
    """torch.nn.init's in-place initialisers as no-ops, for a build on the meta device: they change nothing there, and
    normal_ on a meta tensor imports torch._dynamo (~2 s of every config check, on every rank). Not for threads, nor
    around a module's first import that copies them (transformers.initialization does: it kept the no-ops)."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    kept = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in kept.items():
            setattr(nn.init, name, function)


def tokenizer_disagreements(cfg: ModelConfig, tokenizer) -> list[str]:
    """How the tokenizer disagrees with the token ids model.path records (its vocabulary, the vision and chat
    special tokens), in words; none without model.path."""
    from .registry import checkpoint_config_file
    from .weights import read_json

    if cfg.path is None:
        return []
    where = checkpoint_config_file(cfg.path)
    recorded = read_json(where)
    text = recorded.get("text_config") if isinstance(recorded.get("text_config"), dict) else {}
    special = tokenizer.special
    found = []
    if "num_text_classes" in recorded and recorded["num_text_classes"] != len(tokenizer):
        found.append(f"{where} was trained with a tokenizer of {recorded['num_text_classes']} tokens; "
                     f"{tokenizer.source} has {len(tokenizer)}")
    vocab = recorded.get("vocab_size", text.get("vocab_size"))
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        found.append(f"{tokenizer.source} has {len(tokenizer)} tokens, more than the {vocab} rows of {where}'s "
                     "embeddings")
    for key, token, mine in (("vision_start_token_id", "<|vision_start|>", special.vision_start),
                             ("vision_end_token_id", "<|vision_end|>", special.vision_end),
                             ("video_token_id", "<|video_pad|>", special.video_pad)):
        theirs = recorded.get(key, text.get(key))
        if isinstance(theirs, int) and theirs != mine:
            found.append(f"{where} has {token} = {theirs}, {tokenizer.source} has it at {mine}")
    if found:
        found[-1] += ("; set model.tokenizer_path to the tokenizer the checkpoint was trained with (the debug "
                      "tokenizer is used when it is unset and model.path has none)")
    return found


def load_vit(vit: nn.Module, cfg: ModelConfig) -> None:
    """ViT weights from model.vit_path, else from model.path when it holds a ViT; random otherwise (debug sizes)."""
    for key, source in (("model.vit_path", cfg.vit_path), ("model.path", cfg.path)):
        if source is None:
            continue
        try:
            with gathered(list(vit.parameters())):
                load_vision_weights(vit, source)
            return
        except FileNotFoundError as e:
            if key == "model.vit_path":
                raise FileNotFoundError(f"model.vit_path: {e}") from e
    if cfg.path is not None:
        raise FileNotFoundError(f"model.path {cfg.path} holds no ViT weights; set model.vit_path to a Qwen2.5-VL "
                                "or Lance ViT directory, or model.visual_und=false")


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) linears and embeddings, zero biases, unit norms, zero LAPE (Qwen2 / HF conventions).

    Leaves a trainable ViT alone (transformers initialised it); gathers each module under ZeRO-3.
    """
    for name, module in model.named_modules():
        if name.startswith("vit_model"):
            continue
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with gathered(params):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, LearnablePositions):
                module.spatial.zero_()
                module.temporal.zero_()


@torch.no_grad()
def init_gen_expert(model: LanceModel) -> None:
    """The generation expert starts as a copy of the understanding weights (gathered one layer at a time)."""
    decoder = model.language_model.model
    for layer in decoder.layers:
        with gathered(list(layer.parameters())):
            copy_und_to_gen(layer)
    with gathered([decoder.norm.weight, decoder.norm_moe_gen.weight]):
        decoder.norm_moe_gen.weight.copy_(decoder.norm.weight)


@torch.no_grad()
def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> set[str]:
    """Copy `state` into the model's parameters of the same name (shape-checked); returns the names loaded."""
    loaded = set()
    for mod_name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        names = {f"{mod_name}.{p}" if mod_name else p: p for p in params}
        hits = [n for n in names if n in state]
        if not hits:
            continue
        with gathered([params[names[n]] for n in hits]):
            for full in hits:
                p = params[names[full]]
                src = state[full]
                if tuple(p.shape) != tuple(src.shape):
                    raise ValueError(f"{where}: {full} has shape {tuple(src.shape)} but the model expects "
                                     f"{tuple(p.shape)}; the model geometry does not match the checkpoint")
                p.copy_(src.to(p.dtype))
                loaded.add(full)
    return loaded


def model_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: torch.Size(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for n, p in model.named_parameters()}


def load_llm_weights(model: LanceModel, path: Path) -> set[str]:
    """Lance checkpoint key for key, or a Qwen2.5-VL checkpoint's text weights (+ gen expert copied), read lazily.
    Returns the parameters `path` does not hold (LAPE tables, the generation heads of an understanding checkpoint),
    which keep their fresh init."""
    shapes = _decoder_shapes(model)
    where, index, sources = llm_sources(path, shapes)
    problem = llm_weights_problem(shapes, sources, where, model)
    if problem:
        raise ValueError(problem)
    if LANCE_POS_TABLE in index and is_lance_dir(path):
        check_position_table(model, read_tensors(index, [LANCE_POS_TABLE])[LANCE_POS_TABLE], where)
    load_state(model, LazyState(index, sources), where)
    return set(shapes) - set(sources)


def _decoder_shapes(model: LanceModel) -> dict[str, torch.Size]:
    """The parameters model.path gives: all but the ViT's, trainable or not (load_vit's: model.vit_path first)."""
    return {n: shape for n, shape in model_shapes(model).items() if not n.startswith(LANCE_VIT_PREFIX)}


def llm_sources(path: Path, shapes: dict[str, torch.Size]) -> tuple[str, dict[str, Path], dict]:
    """(where, its safetensors index, model parameter -> its source) for model.path: a Lance checkpoint or lance_ds
    export, or a Qwen2.5-VL / Qwen2 one. Reads headers only."""
    if is_lance_dir(path):
        index = safetensors_index(path / LANCE_WEIGHTS)
        return str(path / LANCE_WEIGHTS), index, lance_sources(index, shapes)
    index = safetensors_index(path)
    return f"{path} (Qwen2.5-VL)", index, qwen_sources(index, shapes)


GEN_HEADS = ("time_embedder.", "vae2llm.", "llm2vae.")  # the generation path's own layers, outside the decoder


def llm_weights_problem(shapes: dict[str, torch.Size], sources: dict, where: str, model: LanceModel) -> str | None:
    """What model.path lacks that the model needs, or holds that it does not know, naming the switch to change;
    None when they fit. LAPE tables start fresh when absent; so do the generation heads of a checkpoint trained
    without the generation path (Qwen2.5-VL, or a lance_ds model.visual_gen=false export)."""
    own = set(shapes)
    starts_fresh = ("lape.",) + (() if any(n.startswith(GEN_HEADS) for n in sources) else GEN_HEADS)
    missing = sorted(n for n in own - set(sources) if not n.startswith(starts_fresh))
    if missing:
        return (f"{where} lacks {len(missing)} parameters the model needs, e.g. {missing[:4]}; is this the right "
                "checkpoint for these model switches (visual_und / visual_gen)?")
    unknown = sorted(n for n in set(sources) - own if not _optional_key(n, model))
    if unknown:
        lape = "; it holds LAPE tables: set model.lape.enabled=true" if any(n.startswith("lape.") for n in unknown) \
            else ""
        return (f"{where} has {len(unknown)} tensors the model does not know, e.g. {unknown[:4]}; the model "
                f"geometry or switches do not match the checkpoint{lape}")
    return None


def _optional_key(name: str, model: LanceModel) -> bool:
    """Checkpoint tensors a model built without some branch may leave unused."""
    if not model.cfg.visual_gen and (gen_to_und_name(name) is not None or name.startswith(GEN_HEADS)):
        return True
    return False


def check_position_table(model: LanceModel, table: torch.Tensor, where: str) -> None:
    """A stored sin-cos table must equal the recomputed one: else positions would silently mean something else."""
    if not model.cfg.visual_gen:
        return
    ours = model.latent_pos_embed.table()
    if ours.shape != table.shape:
        raise ValueError(f"{where}: latent_pos_embed.pos_embed has shape {tuple(table.shape)}, this model's table "
                         f"{tuple(ours.shape)}; set model.max_latent_size / model.max_num_frames to the checkpoint's")
    # sin-cos values lie in [-1, 1]; a table stored in bf16 (8 mantissa bits) is off by up to 2^-8 of that, while
    # another position scheme differs by order 1
    err = (ours - table.float()).abs().max().item()
    if not math.isfinite(err) or err > 1e-2:
        raise ValueError(f"{where}: the stored latent position table differs from the sin-cos table by {err:.3g}: "
                         f"this checkpoint covers another latent grid than the {model.cfg.max_latent_size} x "
                         f"{model.cfg.max_latent_size} x {model.cfg.max_latent_frames} assumed (set "
                         "model.max_latent_size and model.max_num_frames to the checkpoint's when its "
                         "llm_config.json does not say), or uses another position scheme")


def freeze_by_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    """requires_grad=False for parameters whose name matches any glob in `patterns`; every pattern must match."""
    unmatched = unmatched_patterns(model, patterns)
    if unmatched:
        raise ConfigError([f"model.freeze_modules: {problem}" for problem in unmatched])
    params = dict(model.named_parameters())
    frozen = [n for n in params if any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns)]
    for n in frozen:
        params[n].requires_grad_(False)
    return frozen


def unmatched_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    """A problem for each glob of `patterns` that matches no parameter name of `model`."""
    names = [n for n, _ in model.named_parameters()]
    return [f"pattern {pattern!r} matches no parameter; names look like {names[:3]} (use globs such as "
            "'language_model.model.embed_tokens*')" for pattern in patterns
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]
