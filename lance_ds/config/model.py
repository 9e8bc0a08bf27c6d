"""Model section of the run config: which geometry, which weights, which branches, how it is trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .core import Problems, doc, join

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass
class LapeConfig:
    """Learnable absolute position embeddings (spatial and temporal tables) added to visual tokens."""

    enabled: bool = doc(False, "add learnable spatial and temporal position tables to VAE tokens")
    num_spatial_tokens: int = doc(100, "rows of the spatial table (latent rows and columns it can index)")
    num_temporal_tokens: int = doc(100, "rows of the temporal table (latent frames it can index)")

    def check(self, problems: Problems, key: str) -> None:
        problems.positive(self.num_spatial_tokens, join(key, "num_spatial_tokens"))
        problems.positive(self.num_temporal_tokens, join(key, "num_temporal_tokens"))


@dataclass
class LoraConfig:
    """LoRA adapters through peft (used when model.training_type is lora)."""

    r: int = doc(16, "adapter rank")
    alpha: int = doc(32, "adapter scale numerator (scale = alpha / r)")
    dropout: float = doc(0.0, "dropout on the adapter input")
    target_modules: list[str] = doc(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                    text="name suffixes of the LLM's linear layers that get adapters, on both "
                                         "experts (q_proj also adapts the generation expert's q_proj_moe_gen; a "
                                         "*_moe_gen name alone, that expert only); never the ViT's: with "
                                         "model.vit_trainable it trains whole")

    def check(self, problems: Problems, key: str) -> None:
        problems.require(bool(self.target_modules), join(key, "target_modules"),
                         "name at least one linear layer to adapt, e.g. [q_proj, k_proj, v_proj, o_proj]")
        problems.positive(self.r, join(key, "r"))
        problems.positive(self.alpha, join(key, "alpha"))
        problems.require(0.0 <= self.dropout < 1.0, join(key, "dropout"), f"must be in [0, 1), got {self.dropout}")


# Named geometries of lance_ds.model.registry (kept here so that config checks need no torch import).
MODEL_SIZES = ("debug", "tiny", "100m", "3b")
VAE_KINDS = ("auto", "wan", "kl", "patch", "frame")
ATTENTION_BACKENDS = ("sdpa", "flex", "flash")
MODEL_DIRS = ("path", "vit_path", "vae_path", "tokenizer_path")  # the model.* keys that name local directories


@dataclass
class ModelConfig:
    """The unified model: a Qwen2 Mixture-of-Transformers decoder, a ViT for understanding, a frozen VAE for generation."""

    size: str = doc("debug", "named geometry from lance_ds.model.registry (debug, tiny, 100m, 3b); with path set, the "
                             "checkpoint's geometry replaces the decoder's and the size still picks the codec")
    path: str | None = doc(None, "local checkpoint directory to initialise from: Lance (model.safetensors + "
                                 "llm_config.json) or Qwen2.5-VL (config.json + *.safetensors; gen expert copied)")
    vit_path: str | None = doc(None, "local ViT weights (Qwen2.5-VL checkpoint or Lance vit.safetensors dir)")
    vae_path: str | None = doc(None, "local VAE directory: diffusers AutoencoderKLWan for real runs, or a frame VAE "
                                     "(tools/train_example_vae.py) for the example data")
    vae: str = doc("auto", "generation codec: auto (the class in vae_path, else the size's codec), wan, kl, frame, or "
                           "patch (exactly invertible space-to-depth, the debug size's default)")
    tokenizer_path: str | None = doc(None, "local tokenizer directory (Qwen2.5's for real runs); unset: model.path's "
                                           "own tokenizer, or the debug tokenizer without model.path")
    random_init: bool = doc(False, "start from random weights on purpose (a Lance size without model.path is "
                                   "refused otherwise: hours of training a random 3b model by a forgotten path)")
    visual_und: bool = doc(True, "build the understanding path (ViT tokens, CE on answers)")
    visual_gen: bool = doc(True, "build the generation path (VAE tokens, flow-matching MSE)")
    vit_trainable: bool = doc(False, "train the ViT (then it is part of the engine and the checkpoint); frozen by default")
    attention: str = doc("sdpa", "attention backend over packed sequences: sdpa, flex or flash")
    dtype: str = doc("bf16", "dtype of the model built without DeepSpeed (tests, tools); training follows "
                             "train.precision")
    vit_dtype: str = doc("bf16", "dtype of the frozen ViT")
    vae_dtype: str = doc("fp32", "dtype of the frozen VAE")
    max_latent_size: int | None = doc(None, "latent rows/columns the sin-cos position table covers (None: the size's, 64 for 3b)")
    max_num_frames: int | None = doc(None, "pixel frames the position table covers, as num_frames // 4 + 1 latent "
                                           "frames (None: the size's, 121 for 3b)")
    training_type: str = doc("full", "full fine-tuning or lora adapters")
    freeze_modules: list[str] = doc(factory=list, text="glob patterns of parameter names to freeze, e.g. 'language_model.model.embed_tokens*'")
    gradient_checkpointing: bool = doc(False, "recompute each decoder layer in backward to save activation memory")
    lape: LapeConfig = doc(factory=LapeConfig, text="learnable absolute position embeddings")
    lora: LoraConfig = doc(factory=LoraConfig, text="LoRA settings")

    def check(self, problems: Problems, key: str) -> None:
        problems.require(self.visual_und or self.visual_gen, join(key, "visual_und"),
                         "at least one of model.visual_und and model.visual_gen must be true")
        problems.one_of(self.size, MODEL_SIZES, join(key, "size"))  # (with model.path it still picks the codec)
        problems.one_of(self.attention, ATTENTION_BACKENDS, join(key, "attention"))
        problems.one_of(self.vae, VAE_KINDS, join(key, "vae"))
        for name in ("dtype", "vit_dtype", "vae_dtype"):
            problems.one_of(getattr(self, name), PRECISIONS, join(key, name))
        problems.one_of(self.training_type, ("full", "lora"), join(key, "training_type"))
        for name in ("max_latent_size", "max_num_frames"):
            if getattr(self, name) is not None:
                problems.positive(getattr(self, name), join(key, name))
        if self.size == "3b" and self.path is None and not self.random_init:
            problems.add(join(key, "path"), "model.size=3b is Lance's geometry, to fine-tune from its weights: set "
                         "model.path=DIR (a local Lance or Qwen2.5-VL checkpoint; MODEL_PATH in scripts/sft_lance_*.sh)"
                         ", or model.random_init=true to train from random weights on purpose")
        if self.size == "3b" and self.path is None and self.random_init and self.tokenizer_path is None:
            problems.add(join(key, "tokenizer_path"), "a random 3b model without model.path takes its vocabulary "
                         "from the tokenizer, which would be the debug one (a few thousand words): set "
                         "model.tokenizer_path=DIR (Qwen2.5's, 151k tokens)")
        for name in MODEL_DIRS:
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                problems.add(join(key, name), f"{value} is not a directory; point it at a local checkpoint directory")
        if self.vae == "patch" and self.vae_path is not None:
            problems.add(join(key, "vae"), "the patch codec has no weights; unset model.vae_path or choose "
                                           "wan / kl / frame")
        for i, pattern in enumerate(self.freeze_modules):
            problems.require(isinstance(pattern, str) and bool(pattern.strip()), f"{join(key, 'freeze_modules')}[{i}]",
                             "must be a non-empty glob pattern over parameter names")


PREDICTIONS = ("velocity", "data")  # what a flow head may predict (objective.prediction)


@dataclass
class ObjectiveConfig:
    """How predictions become losses: CE on answers, flow matching on noised latents; and how samples are drawn."""

    ce_weight: float = doc(0.25, "weight of the text cross-entropy in the total loss")
    mse_weight: float = doc(1.0, "weight of the flow-matching MSE in the total loss")
    timestep_shift: float = doc(4.0, "shift s of logit-normal timesteps: t' = s t / (1 + (s - 1) t)")
    timestep_mean: float = doc(0.0, "mean of the normal draw z in t = sigmoid(z)")
    timestep_std: float = doc(1.0, "standard deviation of the normal draw z in t = sigmoid(z)")
    sample_shift: float = doc(3.5, "shift of the Euler sampler's linspace(1, 0) schedule")
    cfg_interval: list[float] = doc(factory=lambda: [0.4, 1.0], text="classifier-free guidance applies for t in [lo, hi]")
    prediction: str = doc("velocity", "what the flow head predicts: velocity (Lance) or data (the clean latent x_0; "
                                      "for latents wider than the hidden size, e.g. the debug model's pixel patches)")
    mse_per: str = doc("token", "what weighs the same in the MSE: every latent token (Lance: a video outweighs an "
                                "image by its token count) or every generated block (image or video)")

    def check(self, problems: Problems, key: str) -> None:
        problems.require(self.ce_weight >= 0, join(key, "ce_weight"), f"must be >= 0, got {self.ce_weight}")
        problems.require(self.mse_weight >= 0, join(key, "mse_weight"), f"must be >= 0, got {self.mse_weight}")
        problems.positive(self.timestep_shift, join(key, "timestep_shift"), float)
        problems.positive(self.timestep_std, join(key, "timestep_std"), float)
        problems.positive(self.sample_shift, join(key, "sample_shift"), float)
        problems.one_of(self.prediction, PREDICTIONS, join(key, "prediction"))
        problems.one_of(self.mse_per, ("token", "block"), join(key, "mse_per"))
        lo_hi = self.cfg_interval
        problems.require(len(lo_hi) == 2 and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0, join(key, "cfg_interval"),
                         f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")
