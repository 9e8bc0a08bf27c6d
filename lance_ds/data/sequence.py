"""One `Sample` -> a `SequencePlan`: token ids, attention splits, multimodal RoPE ids, loss targets, and how each
vision block cuts its pixels from the sample's media (`FrameCut`), laid out as reference/LANCE_FACTS.md "Sequence
layout per task" says. Planning reads only the media's sizes: the stream plans from KEY.json's sizes (media as
meta-device tensors) and decodes when it packs; `collate` cuts the pixels.

Chat template: `<|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n...`
Every vision block is its own split: <|vision_start|>, one <|video_pad|> per token, <|vision_end|>.

  t2i / t2v   header | caption | <|im_end|>\\n<|im_start|>assistant\\n | [VS vae target VE] noise | <|im_end|>
  i2i / v2v   header | [VS vit VE] full | [VS vae source VE] full (t = 0) | instruction | assistant prefix |
              [VS vae target VE] noise | <|im_end|>
  i2t / v2t   header | [VS vit VE] full | question <|im_end|>\\n<|im_start|>assistant\\n answer <|im_end|>  (CE: answer + <|im_end|>)

(header = `<|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n`; text pieces are causal splits.)

Multimodal RoPE ids (temporal, height, width): text is sequential; a vision block whose <|vision_start|> sits at
position p gets (p+1+t*tokens_per_second, p+1+h, p+1+w) over its merged grid, <|vision_end|> takes max+1 and the
next text continues from there. Then every ViT block (vision_start..vision_end) has its temporal ids moved to start
at REFERENCE_TEMPORAL_START, and an edit target's latent tokens reuse its source latents' ids.

Inference (`SequencePlanner.prompt`): the same layouts cut where generation starts. i2t / v2t end with
`<|im_start|>assistant\n` (nothing scored); generation tasks keep the whole layout with a blank target block of the
requested size (the sampler writes its latents), and `drop_caption=True` gives the unconditional twin for
classifier-free guidance (the caption replaced by <|endoftext|>, as caption dropout does in training).

Pixels: ViT input is resized/cropped to sides that are multiples of patch*merge (28), images repeated to
temporal_patch (2) frames, and cut into patches in Qwen2.5-VL order; VAE input is resized/cropped to multiples of the
VAE's spatial factor and trimmed to 4k+1 frames (for a temporal factor 4). Both pick the aspect-ratio bucket closest to
the source and stay uint8 until the device (the ViT normalises with the CLIP mean/std as Qwen2.5-VL's processor does,
the VAE scales to [-1, 1]): a quarter of the bytes through the loader.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config.data import EDIT_TASKS, GEN_TASKS, TEXT_TO_MEDIA_TASKS, UND_TASKS, VIDEO_TASKS, GroupConfig
from .batch import AttnMode, Sample
from .schemas import SCHEMAS
from .tokenizer import SpecialTokenIds, TextTokenizer

# Lance moves the temporal RoPE ids of understanding (ViT) blocks here, away from the text and latent ids.
REFERENCE_TEMPORAL_START = 1000

_GEN_SYSTEM = ("Describe the {m} by detailing the color, quantity, visible text, shape, size, texture, spatial "
               "relationships and motion/camera movements of the objects and background:")
_EDIT_SYSTEM = ("Describe the key features of the input {m} (color, shape, size, texture, objects, background), then "
                "explain how the user’s instruction should alter or modify the {m}. Generate a new {m} that meets "
                "the user’s requirements while maintaining consistency with the original input where appropriate.")
_UND_SYSTEM = ("You are a helpful assistant. Answer the question about the {m} with a detailed and accurate "
               "description, including all moments and visual details.")

# System prompts when neither the group (GroupConfig.system_prompt) nor the sample (caption_i) gives one.
# t2i's is Lance's (reference/lance_tiny/case_min.json); the others follow its wording.
DEFAULT_SYSTEM_PROMPTS = {
    "t2i": _GEN_SYSTEM.format(m="image"),
    "t2v": _GEN_SYSTEM.format(m="video"),
    "i2i": _EDIT_SYSTEM.format(m="image"),
    "v2v": _EDIT_SYSTEM.format(m="video"),
    "i2t": _UND_SYSTEM.format(m="image"),
    "v2t": _UND_SYSTEM.format(m="video"),
}

# The media each task needs, by Sample.media key (the parquet column without `_bytes`).
TASK_MEDIA = {task: tuple(column.member for column in schema.media) for task, schema in SCHEMAS.items()}
TASK_TEXTS = {
    "t2i": ("caption",), "t2v": ("caption",), "i2i": ("caption",), "v2v": ("caption",),
    "i2t": ("caption_a",), "v2t": ("caption_a",),  # caption_i and caption_q may be absent or empty
}

# Inference prompts: the media a prompt conditions on, and the media key of the target (its size, when given).
PROMPT_MEDIA = {"t2i": (), "t2v": (), "i2i": ("input_image",), "v2v": ("input_video",), "i2t": ("image",),
                "v2t": ("video",)}
TARGET_MEDIA = {"t2i": "image", "t2v": "video", "i2i": "output_image", "v2v": "output_video"}
SOURCE_MEDIA = {"i2i": "input_image", "v2v": "input_video"}  # an edit's source: what it keeps of the target's size

PLACEHOLDER_TASK = "placeholder"  # the zero-weight sample the packer adds so every branch runs (DESIGN rule 3)


class PlanError(ValueError):
    """A sample that cannot become a sequence (missing media or text, unknown task); the stream counts and skips it."""


@dataclass(frozen=True)
class VisionGeometry:
    """What the planner needs to know about the model's encoders; build_model returns it filled (model.Geometry).

    Wan2.2's VAE: spatial 16, temporal 4; Qwen2.5-VL's ViT: patch 14, temporal patch 2, merge 2, 2 tokens/second.
    """

    vae_spatial_factor: int = 16  # pixels per latent row/column
    vae_temporal_factor: int = 4  # frames per latent frame after the first (VAE clips have 4k + 1 frames)
    vit_patch_size: int = 14  # pixels per ViT patch side
    vit_temporal_patch: int = 2  # frames per ViT patch (images are repeated to this many frames)
    vit_merge_size: int = 2  # ViT patches merged per side into one LLM token
    tokens_per_second: float = 2.0  # temporal RoPE step per grid frame (Qwen2.5-VL's vision_config.tokens_per_second)
    max_latent_size: int = 64  # S: latent rows/columns the position table holds (latent h, w <= S)
    max_latent_frames: int = 31  # latent frames the position table holds (max_num_frames // 4 + 1)

    @property
    def vit_multiple(self) -> int:
        """ViT image sides must be multiples of this many pixels (28 for Qwen2.5-VL)."""
        return self.vit_patch_size * self.vit_merge_size

    @property
    def max_vae_side(self) -> int:
        """The largest pixel side the latent position table holds."""
        return self.max_latent_size * self.vae_spatial_factor

    @property
    def max_vae_frames(self) -> int:
        """The most pixel frames the latent position table holds."""
        return (self.max_latent_frames - 1) * self.vae_temporal_factor + 1

    def vae_num_frames(self, num_frames: int) -> int:
        """Frames a clip is trimmed to: the most of the form k * temporal_factor + 1 that fit (and fit the table)."""
        f = self.vae_temporal_factor
        return min((num_frames - 1) // f * f + 1, self.max_vae_frames)


@dataclass(frozen=True)
class FrameCut:
    """The pixels a vision block sees: the first `count` frames of the sample's media `media` (None: blank frames),
    scaled and centre-cropped to height x width. A plan holds this recipe rather than pixels, so it can be made from
    the media's sizes alone (KEY.json) and its pixels made only when it is packed."""

    media: str | None
    count: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.count, self.height, self.width

    def frames(self, media: dict[str, Tensor]) -> Tensor:
        """uint8 [count, height, width, 3]."""
        if self.media is None:
            return blank_frames(self.shape)
        return resize_crop(media[self.media][:self.count], self.height, self.width)


@dataclass
class VitBlock:
    """One understanding block: an image or clip as Qwen2.5-VL patches."""

    cut: FrameCut  # sides multiples of patch * merge
    geometry: VisionGeometry
    grid_thw: tuple[int, int, int]  # patch grid (T / temporal_patch, H / patch, W / patch)
    positions: Tensor  # [P / merge**2] long; sample-local positions of the merged tokens

    def patches(self, media: dict[str, Tensor]) -> Tensor:
        """[P, 3 * temporal_patch * patch * patch] uint8 pixels, Qwen2.5-VL patch order (normalised on the device by
        model.vision.encode_vit: a quarter of float32's bytes through shared memory and to the GPU)."""
        frames = pad_frames(self.cut.frames(media), self.geometry.vit_temporal_patch)
        return vit_patch_order(frames.permute(0, 3, 1, 2), self.geometry)[0]


@dataclass
class VaeBlock:
    """One generation block: the pixels the frozen VAE encodes, and where its latent tokens sit."""

    cut: FrameCut  # 4k + 1 frames, sides multiples of the VAE's spatial factor
    grid_thw: tuple[int, int, int]  # latent grid (t, h, w)
    positions: Tensor  # [t * h * w] long; sample-local positions, (t, h, w) raster
    is_target: bool  # noised flow-matching target, or a clean condition (t = 0)
    weight: float  # MSE weight: 1 for a real target, 0 for a condition or a placeholder

    def pixels(self, media: dict[str, Tensor]) -> Tensor:
        """[3, T, H, W] uint8 (scaled to [-1, 1] on the device by the VAE's encode_blocks)."""
        return self.cut.frames(media).permute(3, 0, 1, 2)

    @property
    def coords(self) -> Tensor:
        """[t * h * w, 3] long (t, h, w) latent coordinates in raster order."""
        return grid_coords(*self.grid_thw)


@dataclass
class SequencePlan:
    """One sample as a token sequence, ready to pack. Positions are sample-local (0 = its first token)."""

    task: str
    input_ids: Tensor  # [n] long; text ids, <|video_pad|> in vision slots
    position_ids: Tensor  # [3, n] long; multimodal RoPE ids
    split_lens: list[int]  # attention splits, in order, summing to n
    split_modes: list[AttnMode]
    ce_positions: Tensor  # [c] long; positions whose next-token logits are scored
    ce_targets: Tensor  # [c] long
    vit: list[VitBlock] = field(default_factory=list)
    vae: list[VaeBlock] = field(default_factory=list)
    # the sample's media the blocks cut their pixels from: uint8 [T, H, W, 3] decoded frames, or tensors on the meta
    # device with the sizes KEY.json gives (a plan made without decoding: the stream decodes it when it is packed)
    media: dict[str, Tensor] = field(default_factory=dict)
    ce_weight: float = 1.0  # 0 for a placeholder
    key: str = ""
    group: str = ""
    address: object = None  # where the stream read it (used to re-read it on resume)
    # tokens it has with the caption that caption dropout replaced: whether a sample fits a pack is decided on it, so
    # that one too long with its caption never trains without it either (None: num_tokens)
    tokens_with_caption: int | None = None
    raw: object = None  # the stream's undecoded sample, while `media` are sizes only

    @property
    def needs_media(self) -> bool:
        """Made from media sizes alone: decode the media before cutting pixels."""
        return any(m.is_meta for m in self.media.values())

    def cover_sizes(self) -> dict[str, tuple[int, int]]:
        """Per medium, the (height, width) its blocks scale it to before they crop (the largest, where several cut
        it): a decode that gives at least this many pixels loses nothing (a JPEG may then be decoded shrunk)."""
        sizes: dict[str, tuple[int, int]] = {}
        for block in [*self.vit, *self.vae]:
            cut = block.cut
            if cut.media is not None:
                _, height, width = self.media[cut.media].shape[:3]
                cover = cover_size(height, width, cut.height, cut.width)
                old = sizes.get(cut.media, (0, 0))
                sizes[cut.media] = max(old[0], cover[0]), max(old[1], cover[1])
        return sizes

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def is_real(self) -> bool:
        return self.task != PLACEHOLDER_TASK

    @property
    def has_vae_target(self) -> bool:
        return any(b.is_target for b in self.vae)


def grid_coords(t: int, h: int, w: int) -> Tensor:
    """[t*h*w, 3] long (t, h, w) in raster order."""
    grids = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def unit_hash(*keys) -> float:
    """A uniform number in [0, 1) fixed by `keys` (stable across processes, runs and Python versions)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


# ----------------------------------------------------------------------------------------------------------------
# pixels


def fit_size(height: int, width: int, *, resolution: int, buckets, multiple: int,
             max_pixels: int | None = None, max_side: int | None = None) -> tuple[int, int]:
    """(h, w) in pixels for a source of height x width: the bucket (w / h) nearest its aspect ratio, with area
    resolution**2 (capped by max_pixels), each side at most max_side and a multiple of `multiple` (at least one)."""
    ratio = width / height
    bucket = min(buckets, key=lambda b: abs(math.log(b / ratio)))
    area = float(resolution * resolution)
    if max_pixels is not None:
        area = min(area, float(max_pixels))
    w, h = math.sqrt(area * bucket), math.sqrt(area / bucket)
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = w * scale, h * scale
    return max(multiple, int(h // multiple) * multiple), max(multiple, int(w // multiple) * multiple)


def upscale_factor(height: float, width: float, resolution: int, image) -> float:
    """How many times a side a height x width picture is scaled up (< 1: down) when cut to `resolution`'s area with
    these ImageOptions (its bucket covered, then cropped)."""
    h, w = fit_size(height, width, resolution=resolution, buckets=image.buckets, multiple=1, max_pixels=image.max_pixels)
    return max(h / height, w / width)


def cover_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """The size a src_h x src_w picture is scaled to (aspect kept) to cover height x width, before the crop."""
    scale = max(height / src_h, width / src_w)
    return max(height, round(src_h * scale)), max(width, round(src_w * scale))


def resize_crop(frames: Tensor, height: int, width: int) -> Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3]: scale to cover (antialiased bilinear), crop the centre."""
    _, src_h, src_w, _ = frames.shape
    if (src_h, src_w) == (height, width):
        return frames
    cover, scale = cover_size(src_h, src_w, height, width), max(height / src_h, width / src_w)
    # uint8 in channels-last memory (what the permuted view is) takes torch's uint8 resampling kernel: ~12x faster
    # than resizing in float (33 frames of 720p: 70 ms), within 1 of it (rounding)
    x = frames.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=cover, mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (cover[0] - height) // 2, (cover[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].permute(0, 2, 3, 1).contiguous()


def vit_patch_order(x: Tensor, geometry: VisionGeometry) -> tuple[Tensor, tuple[int, int, int]]:
    """Pixels [T, 3, H, W] (T a multiple of temporal_patch; H, W of patch * merge) -> (patches [P, 3 * temporal_patch
    * patch**2], patch grid). Qwen2.5-VL order: merge window by merge window (each window's merge**2 patches
    consecutive), windows in (t, h, w) raster; a patch vector is (channel, frame, row, column) flattened."""
    tp, p, m = geometry.vit_temporal_patch, geometry.vit_patch_size, geometry.vit_merge_size
    num_frames, _, height, width = x.shape
    gt, gh, gw = num_frames // tp, height // p, width // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h-window, w-window, h-in-window, w-in-window, C, frame, row, col
    return x.reshape(gt * gh * gw, 3 * tp * p * p).contiguous(), (gt, gh, gw)


def blank_frames(shape: tuple[int, int, int]) -> Tensor:
    """uint8 [T, H, W, 3] zeros: the pixels of a target block that is generated, not encoded."""
    num_frames, height, width = shape
    return torch.zeros(num_frames, height, width, 3, dtype=torch.uint8)


def pad_frames(frames: Tensor, multiple: int) -> Tensor:
    """Repeat the last frame until the frame count is a multiple of `multiple` (an image becomes `multiple` frames)."""
    short = -frames.shape[0] % multiple
    if short == 0:
        return frames
    return torch.cat([frames, frames[-1:].expand(short, *frames.shape[1:])], dim=0)


# ----------------------------------------------------------------------------------------------------------------
# building one sequence


class _SequenceBuilder:
    """Appends text and vision blocks, tracking splits, RoPE ids and loss targets."""

    def __init__(self, special: SpecialTokenIds, tokens_per_second: float):
        self.special = special
        self.tokens_per_second = tokens_per_second
        self.ids: list[int] = []
        self.positions: list[Tensor] = []  # [3, k] pieces
        self.split_lens: list[int] = []
        self.split_modes: list[AttnMode] = []
        self.ce_positions: list[int] = []
        self.ce_targets: list[int] = []
        self.vit_starts: list[tuple[int, int]] = []  # (index of vision_start, index of vision_end) per ViT block
        self.next_position = 0  # RoPE id of the next text token

    def text(self, ids: list[int], *, new_split: bool, ce: bool = False) -> None:
        """Causal text; `ce` scores every one of these tokens (from the logits one position earlier)."""
        if not ids:
            return
        start = len(self.ids)
        if new_split or not self.split_modes or self.split_modes[-1] != AttnMode.CAUSAL:
            self.split_lens.append(0)
            self.split_modes.append(AttnMode.CAUSAL)
        self.split_lens[-1] += len(ids)
        self.ids.extend(ids)
        self.positions.append(torch.arange(self.next_position, self.next_position + len(ids)).expand(3, -1))
        self.next_position += len(ids)
        if ce:
            if start == 0:
                raise PlanError("a CE target cannot be the first token of a sequence")
            self.ce_positions.extend(range(start - 1, start - 1 + len(ids)))
            self.ce_targets.extend(ids)

    def vision(self, grid_thw: tuple[int, int, int], mode: AttnMode) -> Tensor:
        """[VS, t*h*w tokens, VE] as one split over a merged grid; returns the tokens' sample-local positions."""
        t, h, w = grid_thw
        num = t * h * w
        vs_index = len(self.ids)
        p = self.next_position  # RoPE id of <|vision_start|>
        coords = grid_coords(t, h, w)
        token_pos = torch.stack([
            p + 1 + (coords[:, 0].double() * self.tokens_per_second).long(),
            p + 1 + coords[:, 1], p + 1 + coords[:, 2]])
        end = int(token_pos.max()) + 1
        self.positions += [torch.full((3, 1), p), token_pos, torch.full((3, 1), end)]
        self.ids += [self.special.vision_start] + [self.special.video_pad] * num + [self.special.vision_end]
        self.split_lens.append(num + 2)
        self.split_modes.append(mode)
        self.next_position = end + 1
        return torch.arange(vs_index + 1, vs_index + 1 + num)

    def vit(self, block_grid: tuple[int, int, int], merge: int) -> Tensor:
        gt, gh, gw = block_grid
        positions = self.vision((gt, gh // merge, gw // merge), AttnMode.FULL)
        self.vit_starts.append((int(positions[0]) - 1, int(positions[-1]) + 1))
        return positions

    def finish(self) -> tuple[Tensor, Tensor]:
        ids = torch.tensor(self.ids, dtype=torch.long)
        position_ids = torch.cat(self.positions, dim=1).long()
        for vs, ve in self.vit_starts:  # understanding blocks: temporal ids moved to start at 1000
            position_ids[0, vs:ve + 1] += REFERENCE_TEMPORAL_START - position_ids[0, vs]
        return ids, position_ids


# ----------------------------------------------------------------------------------------------------------------
# the planner


def _num_frames(sample: Sample, media: str) -> int:
    return int(sample.media[media].shape[0])


def _paired_frames(sample: Sample, source: str, target: str) -> int:
    """A video edit's clips are cut to the shorter one's frames: their latents share RoPE ids, and the ViT sees the
    source only as far as the target goes (in training and in prompts alike)."""
    return min(_num_frames(sample, source), _num_frames(sample, target))


class SequencePlanner:
    """Sample -> SequencePlan. Deterministic: the same sample (key, epoch) always gives the same plan.

    tokenizer: lance_ds.data.tokenizer.load_tokenizer(...); geometry: from the model; seed: train.seed (it fixes
    which captions are dropped for classifier-free guidance).
    """

    def __init__(self, tokenizer: TextTokenizer, geometry: VisionGeometry | None = None, seed: int = 0):
        self.tokenizer = tokenizer
        self.special = tokenizer.special
        self.geometry = geometry or VisionGeometry()
        self.seed = seed

    # -- public --------------------------------------------------------------------------------------------------

    def plan(self, sample: Sample, group: GroupConfig | None = None) -> SequencePlan:
        group = group or GroupConfig(name=sample.group, task=sample.task)
        for name in TASK_MEDIA.get(sample.task, ()):
            if name not in sample.media:
                raise PlanError(f"{sample.task} sample {sample.key!r} has no {name!r} media "
                                f"(it has {sorted(sample.media)})")
        for name in TASK_TEXTS.get(sample.task, ()):
            if not (sample.texts.get(name) or "").strip():  # "  " would train a blank answer, or an empty caption
                raise PlanError(f"{sample.task} sample {sample.key!r} has no {name!r} text")
        if sample.task in TEXT_TO_MEDIA_TASKS:
            plan = self._plan_generation(sample, group)
        elif sample.task in EDIT_TASKS:
            plan = self._plan_edit(sample, group)
        elif sample.task in UND_TASKS:
            plan = self._plan_understanding(sample, group)
        else:
            raise PlanError(f"sample {sample.key!r} has unknown task {sample.task!r}; expected one of "
                            f"{sorted(TASK_MEDIA)}")
        plan.key, plan.group = sample.key, sample.group
        if sample.task in GEN_TASKS and self.drops_caption(sample, group):
            plan.tokens_with_caption = plan.num_tokens - 1 + len(self.tokenizer.encode(sample.texts["caption"]))
        return plan

    def drops_caption(self, sample: Sample, group: GroupConfig) -> bool:
        """Caption dropout, fixed per (seed, group, key, epoch): a resumed run drops the same captions."""
        if group.caption_dropout <= 0:
            return False
        return unit_hash(self.seed, "caption_dropout", sample.group, sample.key, sample.epoch) < group.caption_dropout

    def placeholder(self, *, vit: bool, vae: bool, ce: bool) -> SequencePlan:
        """A tiny zero-weight sample that makes the missing branches run (DESIGN rule 3): one CE position with
        weight 0, a 2-frame 28x28 ViT block (one merged token), a 1-token VAE target with weight 0."""
        g, s = self.geometry, self.special
        b = _SequenceBuilder(s, g.tokens_per_second)
        b.text([s.im_start], new_split=True)
        vit_blocks, vae_blocks = [], []
        if vit:
            vit_blocks.append(self._vit_block(b, FrameCut(None, g.vit_temporal_patch, g.vit_multiple, g.vit_multiple)))
        if vae:
            vae_blocks.append(self._vae_block(b, FrameCut(None, 1, g.vae_spatial_factor, g.vae_spatial_factor),
                                              is_target=True, weight=0.0))
        if ce:
            b.text([s.im_end], new_split=True, ce=True)
        return self._finish(PLACEHOLDER_TASK, b, vit_blocks, vae_blocks, ce_weight=0.0)

    def prompt(self, sample: Sample, group: GroupConfig | None = None, drop_caption: bool = False,
               target_shape: tuple[int, int, int] | None = None) -> SequencePlan:
        """The sequence up to where generation starts (inference): nothing is scored.

        i2t / v2t: header | [VS vit VE] | question <|im_end|>\\n<|im_start|>assistant\\n  (the answer follows)
        t2i / t2v / i2i / v2v: the training layout, with a target block of blank pixels (the sampler writes its
        latents) whose size, in pixels (frames, height, width), is `target_shape`; else the sample's target media
        cut as training cuts it; else, for edits, the source's; else the group's square resolution and, for video,
        video.max_frames. drop_caption: the caption / instruction replaced by the unconditional token (the CFG twin).
        """
        group = group or GroupConfig(name=sample.group, task=sample.task)
        if sample.task not in PROMPT_MEDIA:
            raise PlanError(f"sample {sample.key!r} has unknown task {sample.task!r}; expected one of "
                            f"{sorted(PROMPT_MEDIA)}")
        for name in PROMPT_MEDIA[sample.task]:
            if name not in sample.media:
                raise PlanError(f"{sample.task} prompt {sample.key!r} needs {name!r} media to condition on "
                                f"(it has {sorted(sample.media)})")
        if sample.task in UND_TASKS:
            plan = self._understanding_layout(sample, group, answer=None)
        else:
            if not drop_caption and not sample.texts.get("caption"):
                raise PlanError(f"{sample.task} prompt {sample.key!r} has no 'caption' text (the prompt or edit "
                                "instruction)")
            shape = self._prompt_target_shape(sample, group, target_shape)
            if sample.task in TEXT_TO_MEDIA_TASKS:
                plan = self._prompt_generation(sample, group, shape, drop_caption)
            else:
                plan = self._prompt_edit(sample, group, shape, drop_caption, asked=target_shape is not None)
        plan.key, plan.group = sample.key, sample.group
        return plan

    def _prompt_generation(self, sample: Sample, group: GroupConfig, shape: tuple[int, int, int],
                           drop_caption: bool) -> SequencePlan:
        return self._generation_layout(sample, group, self._caption(sample, drop_caption),
                                       FrameCut(None, *shape))

    def _prompt_edit(self, sample: Sample, group: GroupConfig, shape: tuple[int, int, int], drop_caption: bool,
                     asked: bool) -> SequencePlan:
        """asked: `shape` is the caller's target_shape, not one cut from the sample's media."""
        source = SOURCE_MEDIA[sample.task]
        seen = _num_frames(sample, source)
        # the ViT sees the source as far as the target goes, as training showed it (_paired_frames)
        if asked:
            seen = min(seen, shape[0])
        elif sample.task == "v2v" and "output_video" in sample.media:
            seen = _paired_frames(sample, source, "output_video")
        return self._edit_layout(sample, group, source, seen, FrameCut(source, *shape),
                                 self._caption(sample, drop_caption), FrameCut(None, *shape))

    def _prompt_target_shape(self, sample: Sample, group: GroupConfig,
                             target_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
        """(frames, height, width) in pixels of the block to generate; see `prompt`."""
        video = sample.task in VIDEO_TASKS
        source, target = SOURCE_MEDIA.get(sample.task), TARGET_MEDIA[sample.task]
        source = source if source in sample.media else None
        if target_shape is not None:
            shape = self._check_target_shape(sample, tuple(int(x) for x in target_shape), video)
        elif target in sample.media:
            frames = _paired_frames(sample, source, target) if source is not None and video else None
            shape = self._vae_cut(sample, target, group, video, frames).shape
        elif source is not None:
            shape = self._vae_cut(sample, source, group, video).shape
        else:
            g = self.geometry
            height, width = fit_size(1, 1, resolution=group.resolution_for(video), buckets=[1.0],
                                     multiple=g.vae_spatial_factor, max_pixels=group.image.max_pixels,
                                     max_side=g.max_vae_side)
            shape = (g.vae_num_frames(group.video.max_frames) if video else 1, height, width)
        if source is not None and _num_frames(sample, source) < shape[0]:
            have = _num_frames(sample, source)
            raise PlanError(f"{sample.task} prompt {sample.key!r}: the target has {shape[0]} frames but the source "
                            f"only {have}; an edit keeps the source's frame count (ask for at most "
                            f"{self.geometry.vae_num_frames(have)} frames)")
        return shape

    def _check_target_shape(self, sample: Sample, shape: tuple[int, int, int], video: bool) -> tuple[int, int, int]:
        g = self.geometry
        num_frames, height, width = shape
        problems = []
        side = g.vae_spatial_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % side or value > g.max_vae_side:
                problems.append(f"{name} {value} must be a positive multiple of {side} (the VAE's spatial factor) "
                                f"and at most {g.max_vae_side} (the latent position table)")
        if not video and num_frames != 1:
            problems.append(f"an image has 1 frame, not {num_frames}")
        if video and (num_frames < 1 or g.vae_num_frames(num_frames) != num_frames):
            problems.append(f"{num_frames} frames: a clip needs k * {g.vae_temporal_factor} + 1 frames, at most "
                            f"{g.max_vae_frames}; e.g. {g.vae_num_frames(max(num_frames, 1))}")
        if problems:
            raise PlanError(f"{sample.task} prompt {sample.key!r}: target size {num_frames}x{height}x{width} "
                            f"(frames x height x width): " + "; ".join(problems))
        return shape

    # -- per task ------------------------------------------------------------------------------------------------

    def _plan_generation(self, sample: Sample, group: GroupConfig) -> SequencePlan:
        target = self._vae_cut(sample, TARGET_MEDIA[sample.task], group, sample.task == "t2v")
        return self._generation_layout(sample, group, self._caption(sample, self.drops_caption(sample, group)), target)

    def _plan_edit(self, sample: Sample, group: GroupConfig) -> SequencePlan:
        source, target = SOURCE_MEDIA[sample.task], TARGET_MEDIA[sample.task]
        seen = _paired_frames(sample, source, target)  # (images: 1)
        target_cut = self._vae_cut(sample, target, group, sample.task == "v2v", seen)
        source_cut = FrameCut(source, target_cut.count, target_cut.height, target_cut.width)
        return self._edit_layout(sample, group, source, seen, source_cut,
                                 self._caption(sample, self.drops_caption(sample, group)), target_cut)

    def _plan_understanding(self, sample: Sample, group: GroupConfig) -> SequencePlan:
        return self._understanding_layout(sample, group, self.tokenizer.encode(sample.texts["caption_a"]))

    # -- layouts, shared by training plans and inference prompts (what differs: the target pixels, the caption) ---

    def _generation_layout(self, sample: Sample, group: GroupConfig, caption: list[int],
                           target: FrameCut) -> SequencePlan:
        """header | caption | assistant prefix | [target latents] <|im_end|>"""
        b = self._header(sample, group)
        b.text(caption, new_split=True)
        b.text(self._assistant_prefix(), new_split=True)
        target_block = self._vae_block(b, target, is_target=True)
        b.text([self.special.im_end], new_split=True)
        return self._finish(sample.task, b, [], [target_block], media=sample.media)

    def _edit_layout(self, sample: Sample, group: GroupConfig, source: str, seen: int, source_vae: FrameCut,
                     caption: list[int], target: FrameCut) -> SequencePlan:
        """header | [ViT source] [source latents] | instruction | assistant prefix | [target latents] <|im_end|>
        (the ViT sees the first `seen` frames of the source)"""
        b = self._header(sample, group)
        vit_block = self._vit_block(b, self._vit_cut(sample, source, group, sample.task == "v2v", seen))
        source_block = self._vae_block(b, source_vae, is_target=False)
        b.text(caption, new_split=True)
        b.text(self._assistant_prefix(), new_split=True)
        target_block = self._vae_block(b, target, is_target=True)
        b.text([self.special.im_end], new_split=True)
        ids, position_ids = b.finish()
        # the edit target reuses the source latents' RoPE ids (same grid by construction)
        position_ids[:, target_block.positions] = position_ids[:, source_block.positions]
        return self._finish(sample.task, b, [vit_block], [source_block, target_block], media=sample.media,
                            finished=(ids, position_ids))

    def _understanding_layout(self, sample: Sample, group: GroupConfig, answer: list[int] | None) -> SequencePlan:
        """header | [ViT media] question | assistant prefix | answer <|im_end|> (scored); a prompt stops before it"""
        video = sample.task == "v2t"
        system = sample.texts.get("caption_i")
        b = self._header(sample, group, system=system if system and system.strip() else None)  # blank: the default
        vit_block = self._vit_block(b, self._vit_cut(sample, "video" if video else "image", group, video))
        b.text(self.tokenizer.encode(sample.texts.get("caption_q", "")) + self._assistant_prefix(), new_split=True)
        if answer is not None:
            b.text(answer + [self.special.im_end], new_split=False, ce=True)
        return self._finish(sample.task, b, [vit_block], [], media=sample.media)

    # -- pieces --------------------------------------------------------------------------------------------------

    def _header(self, sample: Sample, group: GroupConfig, system: str | None = None) -> _SequenceBuilder:
        """`<|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n` as one causal split."""
        system = system or group.system_prompt or DEFAULT_SYSTEM_PROMPTS[sample.task]
        s, enc = self.special, self.tokenizer.encode
        b = _SequenceBuilder(s, self.geometry.tokens_per_second)
        b.text([s.im_start] + enc("system\n" + system) + [s.im_end] + enc("\n") + [s.im_start] + enc("user\n"),
               new_split=True)
        return b

    def _assistant_prefix(self) -> list[int]:
        s, enc = self.special, self.tokenizer.encode
        return [s.im_end] + enc("\n") + [s.im_start] + enc("assistant\n")

    def _caption(self, sample: Sample, drop: bool) -> list[int]:
        """The caption's ids, or the unconditional token that replaces a dropped one (classifier-free guidance)."""
        return [self.special.uncond] if drop else self.tokenizer.encode(sample.texts["caption"])

    def _vae_cut(self, sample: Sample, media: str, group: GroupConfig, video: bool,
                 frames: int | None = None) -> FrameCut:
        """The VAE's view of the media's first `frames` frames (default all): the group's bucket nearest its aspect
        ratio, trimmed to 4k + 1 frames."""
        g = self.geometry
        count, height, width = sample.media[media].shape[:3]
        h, w = fit_size(height, width, resolution=group.resolution_for(video), buckets=group.image.buckets,
                        multiple=g.vae_spatial_factor, max_pixels=group.image.max_pixels, max_side=g.max_vae_side)
        return FrameCut(media, g.vae_num_frames(count if frames is None else frames), h, w)

    def _vit_cut(self, sample: Sample, media: str, group: GroupConfig, video: bool,
                 frames: int | None = None) -> FrameCut:
        """The ViT's view of the media's first `frames` frames (default all): sides multiples of patch * merge."""
        count, height, width = sample.media[media].shape[:3]
        resolution = group.image.vit_resolution or group.resolution_for(video)
        h, w = fit_size(height, width, resolution=resolution, buckets=group.image.buckets,
                        multiple=self.geometry.vit_multiple, max_pixels=group.image.max_pixels)
        return FrameCut(media, count if frames is None else frames, h, w)

    def _vae_block(self, b: _SequenceBuilder, cut: FrameCut, *, is_target: bool,
                   weight: float | None = None) -> VaeBlock:
        g = self.geometry
        grid = ((cut.count - 1) // g.vae_temporal_factor + 1, cut.height // g.vae_spatial_factor,
                cut.width // g.vae_spatial_factor)
        positions = b.vision(grid, AttnMode.NOISE if is_target else AttnMode.FULL)
        return VaeBlock(cut, grid, positions, is_target, float(is_target) if weight is None else weight)

    def _vit_block(self, b: _SequenceBuilder, cut: FrameCut) -> VitBlock:
        g = self.geometry
        frames = cut.count + (-cut.count % g.vit_temporal_patch)  # pad_frames repeats the last one
        grid = (frames // g.vit_temporal_patch, cut.height // g.vit_patch_size, cut.width // g.vit_patch_size)
        return VitBlock(cut, g, grid, b.vit(grid, g.vit_merge_size))

    def _finish(self, task: str, b: _SequenceBuilder, vit: list[VitBlock], vae: list[VaeBlock],
                ce_weight: float = 1.0, media: dict[str, Tensor] | None = None,
                finished: tuple[Tensor, Tensor] | None = None) -> SequencePlan:
        ids, position_ids = finished if finished is not None else b.finish()
        used = {block.cut.media for block in [*vit, *vae]}
        return SequencePlan(
            task=task, input_ids=ids, position_ids=position_ids, split_lens=list(b.split_lens),
            split_modes=list(b.split_modes), ce_positions=torch.tensor(b.ce_positions, dtype=torch.long),
            ce_targets=torch.tensor(b.ce_targets, dtype=torch.long), vit=vit, vae=vae, ce_weight=ce_weight,
            media={name: frames for name, frames in (media or {}).items() if name in used})
