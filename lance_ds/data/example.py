"""Synthetic but real example data for all six Lance tasks, and the judges that score a model trained on it.

The world is one large, flat-coloured shape near the middle of a dark grey background: 4 colours x 3 shapes x
7 sizes x 9 x 9 places, and in videos a motion in one of 4 directions across the middle. (Near the middle, so that
the README's few-minute CPU run can learn to draw it; the judges read a shape anywhere.) Captions are templated
from a 13-word vocabulary, so a very small model can learn
the mapping and a program can check it:
  t2i  caption "a red circle"                     -> image
  t2v  caption "a red circle moving left"         -> video (the shape crosses ~30% of the frame)
  i2i  "make it blue" | "turn it into a square"   -> input image, output image (same place and size)
  v2v  "make it blue"                             -> input video, output video (same motion, recoloured)
  i2t  image, question ("What is in the image?", "What colour is the shape?", "What shape is it?" or "")
       -> answer ("a red circle", "red", "circle")
  v2t  video, question ("What happens in the video?", "Which way does the shape move?" or "")
       -> answer ("a red circle moving left", "left")
Media are really encoded: images alternate PNG / JPEG by row, videos are H.264 mp4 made with PyAV.

Held-out data: `--split val` draws from its own random stream AND only from scenes whose place, size and motion hash
to the val bucket (1 in 5), while train draws only from the other buckets; edits keep those, so no val image or
video, source or target, ever occurs in training. (Captions do: the world has 12 image and 48 video captions.)

Judges (for generated pixels, uint8 [T, H, W, 3] or [H, W, 3]): `read_frame` finds the shape (dominant colour by
hue over saturated pixels, shape by mask geometry), `read_video` adds the direction (centroid motion across frames);
`judge_generation(task, caption, output, source)` says whether colour / shape / direction / the requested edit are
right; `parse_answer` maps an answer string to (colour, shape, direction) and `judge_answer` compares it with the
reference answer for understanding accuracy.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from lance_ds.config.data import EDIT_TASKS, TASKS, TEXT_TO_MEDIA_TASKS, VIDEO_TASKS
from lance_ds.data.media import decode_image, encode_image, encode_video
from lance_ds.data.schemas import SCHEMAS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),  # hue 0
    "yellow": (230, 210, 40),  # hue 54
    "green": (40, 180, 60),  # hue 129
    "blue": (50, 80, 230),  # hue 230
}
SHAPES = ("circle", "square", "triangle")  # triangles point up
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (40, 40, 40)  # grey: no hue, so the judges' saturation mask ignores it
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image axes: y grows downwards

GRID = 64  # scenes are laid out on a 64 x 64 grid and scaled to the requested pixel size
JITTER = 4  # a shape's centre (a video's at mid-clip) lies within 4 cells of the grid's centre
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: smooth, deterministic edges
VAL_BUCKETS = 5  # one scene hash bucket in 5 is held out for the val split

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_QUESTIONS = ("What is in the image?", "What colour is the shape?", "What shape is it?", "")
VIDEO_QUESTIONS = ("What happens in the video?", "Which way does the shape move?", "")


# ----------------------------------------------------------------------------------------------------------------
# scenes and rendering


@dataclass(frozen=True)
class Scene:
    """One shape on the grid; `direction` and `travel` (grid cells, whole clip) only for videos."""

    colour: str
    shape: str
    radius: int  # half the side of the shape's bounding box, grid cells
    cx: int  # centre, grid cells (for a video: the centre at mid-clip)
    cy: int
    direction: str | None = None
    travel: int = 0

    def caption(self) -> str:
        text = f"a {self.colour} {self.shape}"
        return f"{text} moving {self.direction}" if self.direction else text

    def held_out(self) -> bool:
        """True for scenes of the val split; every other scene belongs to train. By place, size and motion alone:
        an edit (another colour or shape) stays in its source's split."""
        geometry = (self.radius, self.cx, self.cy, self.direction, self.travel)
        return zlib.crc32(repr(geometry).encode()) % VAL_BUCKETS == 0


def _draw(scene: Scene, cx: float, cy: float, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the scene's shape centred at (cx, cy) grid cells."""
    big = size * SUPERSAMPLE
    scale = big / GRID
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    x, y, r = cx * scale, cy * scale, scene.radius * scale
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; choose one of {SHAPES}")
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def render_image(scene: Scene, size: int = 64) -> np.ndarray:
    """uint8 [1, size, size, 3]."""
    return _draw(scene, scene.cx, scene.cy, size)[None]


def render_video(scene: Scene, size: int = 64, frames: int = 9) -> np.ndarray:
    """uint8 [frames, size, size, 3]: the shape moves `travel` cells in `direction`, centred on (cx, cy) at mid-clip."""
    return np.stack([render_video_frame(scene, t, size, frames) for t in range(frames)])


def render_video_frame(scene: Scene, index: int, size: int = 64, frames: int = 9) -> np.ndarray:
    """uint8 [size, size, 3]: frame `index` of render_video(scene, size, frames)."""
    dx, dy = _STEP[scene.direction]
    progress = index / (frames - 1) - 0.5 if frames > 1 else 0.0  # -0.5 .. 0.5 of the travel
    return _draw(scene, scene.cx + dx * scene.travel * progress, scene.cy + dy * scene.travel * progress, size)


def _near_centre(rng: np.random.Generator, low: int, high: int) -> int:
    """A grid position within JITTER cells of the centre, clipped to [low, high) (where the shape fits)."""
    return int(rng.integers(max(low, GRID // 2 - JITTER), min(high, GRID // 2 + JITTER + 1)))


def _random_image_scene(rng: np.random.Generator) -> Scene:
    radius = int(rng.integers(14, 21))  # the shape spans 44..64% of the side
    low, high = radius + 2, GRID - radius - 1  # where the whole shape fits
    return Scene(colour=str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)), radius=radius,
                 cx=_near_centre(rng, low, high), cy=_near_centre(rng, low, high))


def _random_video_scene(rng: np.random.Generator) -> Scene:
    radius = int(rng.integers(14, 18))  # 44..53% of the side: smaller squares came back from 32 px as blobs
    travel = int(rng.integers(18, 25))  # 28..38% of the side over the clip
    direction = str(rng.choice(DIRECTIONS))
    along = _near_centre(rng, radius + 1 + travel // 2 + 1, GRID - radius - 1 - travel // 2)  # both ends inside
    across = _near_centre(rng, radius + 2, GRID - radius - 1)
    cx, cy = (along, across) if direction in ("left", "right") else (across, along)
    return Scene(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), radius, cx, cy, direction, travel)


def draw_scene(rng: np.random.Generator, video: bool, split: str) -> Scene:
    """A random scene of the split (rejection sampling on the held-out hash)."""
    while True:
        scene = _random_video_scene(rng) if video else _random_image_scene(rng)
        if scene.held_out() == (split == "val"):
            return scene


def draw_training_frames(count: int, split: str, size: int, seed: int, span: int = 1) -> np.ndarray:
    """uint8 [count, span, size, size, 3]: what the example world's encoders learn from (tools/train_example_*.py).

    Half are images (repeated `span` times), half `span` consecutive frames of a video from a random start; half
    are JPEG-coded and decoded again, as the dataset codes half its images.
    """
    rng = np.random.default_rng([seed, ("train", "val").index(split)])
    items = []
    for _ in range(count):
        video = rng.random() < 0.5
        scene = draw_scene(rng, video, split)
        if video:
            start = int(rng.integers(9))  # render_video's 9 frames; past the last one it repeats, like the loader
            frames = [render_video_frame(scene, min(start + i, 8), size) for i in range(span)]
        else:
            frames = [render_image(scene, size)[0]] * span
        if rng.random() < 0.5:
            frames = [decode_image(encode_image(f, "jpeg")).numpy().reshape(f.shape) for f in frames]
        items.append(np.stack(frames))
    return np.stack(items)


def encoder_learning_rate(peak: float, step: int, steps: int) -> float:
    """The learning rate of the example encoders' step `step` of `steps`: 50 steps of linear warmup, times a cosine
    from the peak down to 5% of it."""
    warmup = min(1.0, (step + 1) / 50)
    return peak * warmup * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


# ----------------------------------------------------------------------------------------------------------------
# rows of the six tasks


# Frame rates the example videos can carry: far below 1/1000 (1e-9) the encoder's rate, a fraction of denominator
# <= 1001, rounds to 0 and the file says 24 fps; far above 1000 (1e6) the stream holds no decodable frame.
FPS_RANGE = (0.001, 1000.0)


@dataclass
class ExampleConfig:
    """Sizes of the example dataset (tools/make_example_dataset.py flags)."""

    num_per_task: int = 256  # rows per task
    seed: int = 0
    size: int = 64  # image and video side, pixels
    frames: int = 9  # frames per video (4k + 1 for the Wan VAE)
    fps: float = 12.0  # video frame rate (FPS_RANGE); the loader samples at 12 fps by default: every frame is kept
    split: str = "train"  # train or val (disjoint scenes)
    rows_per_group: int = 64  # parquet row-group size: several groups per file
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        problems = []
        if self.split not in ("train", "val"):
            problems.append(f"split must be train or val, got {self.split!r}")
        for name in ("num_per_task", "size", "frames", "rows_per_group"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.size < 16:
            problems.append(f"size must be >= 16 pixels for the shapes to be recognisable, got {self.size}")
        if not isinstance(self.seed, int) or self.seed < 0:  # numpy seeds only non-negative integers
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if not FPS_RANGE[0] <= self.fps <= FPS_RANGE[1]:  # also nan; inf cannot be written into the video
            problems.append(f"fps must be a frame rate from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}, got {self.fps}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            problems.append(f"unknown tasks {unknown}; choose from {list(TASKS)}")
        if problems:
            raise ValueError("; ".join(problems))


def _rng(cfg: ExampleConfig, task: str) -> np.random.Generator:
    """Independent, reproducible stream per (seed, task, split)."""
    return np.random.default_rng([cfg.seed, TASKS.index(task), ("train", "val").index(cfg.split)])


def _edited(scene: Scene, rng: np.random.Generator, allow_shape: bool) -> tuple[Scene, str]:
    """The scene after a random edit (half recolour, half reshape when allowed), and the instruction asking for it."""
    if allow_shape and rng.random() < 0.5:
        shape = str(rng.choice([s for s in SHAPES if s != scene.shape]))
        return dataclasses.replace(scene, shape=shape), f"turn it into a {shape}"
    colour = str(rng.choice([c for c in COLOURS if c != scene.colour]))
    return dataclasses.replace(scene, colour=colour), f"make it {colour}"


def _question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) about the scene."""
    questions = VIDEO_QUESTIONS if scene.direction else IMAGE_QUESTIONS
    question = questions[int(rng.integers(len(questions)))]
    answer = {"What colour is the shape?": scene.colour, "What shape is it?": scene.shape,
              "Which way does the shape move?": scene.direction}.get(question, scene.caption())
    return question, answer


def make_row(task: str, row: int, rng: np.random.Generator, cfg: ExampleConfig) -> dict:
    """One row of `task` in its Lance parquet schema (column -> str or encoded bytes)."""
    video = task in VIDEO_TASKS
    kind = "video" if video else "image"
    scene = draw_scene(rng, video, cfg.split)

    def encode(s: Scene) -> bytes:
        if video:
            return encode_video(render_video(s, cfg.size, cfg.frames), cfg.fps)
        return encode_image(render_image(s, cfg.size), "png" if row % 2 == 0 else "jpeg")

    if task in TEXT_TO_MEDIA_TASKS:
        return {"caption": scene.caption(), f"{kind}_bytes": encode(scene)}
    if task in EDIT_TASKS:
        target, instruction = _edited(scene, rng, allow_shape=task == "i2i")
        return {"caption": instruction, f"input_{kind}_bytes": encode(scene), f"output_{kind}_bytes": encode(target)}
    question, answer = _question(scene, rng)
    return {f"{kind}_bytes": encode(scene), "caption_i": SYSTEM_PROMPT, "caption_q": question, "caption_a": answer}


def make_table(task: str, cfg: ExampleConfig) -> pa.Table:
    rng = _rng(cfg, task)
    rows = [make_row(task, i, rng, cfg) for i in range(cfg.num_per_task)]
    schema = SCHEMAS[task]
    types = {**{c: pa.string() for c in schema.text_columns}, **{c: pa.binary() for c in schema.media_columns}}
    return pa.table({name: pa.array([r[name] for r in rows], kind) for name, kind in types.items()})


def write_example_dataset(out: str | Path, cfg: ExampleConfig | None = None) -> dict[str, Path]:
    """Write OUT/{text2image,...}/{split}-00000.parquet for every task; returns task -> file.

    A directory holding other parquet (the other split, a user's data) is refused: converting it would mix them.
    """
    cfg = cfg or ExampleConfig()
    written = {}
    for task in cfg.tasks:
        directory = Path(out) / SCHEMAS[task].dir_name
        path = directory / f"{cfg.split}-00000.parquet"
        clash = sorted(p for p in directory.glob("*.parquet") if p != path) if directory.is_dir() else []
        if clash:
            raise ValueError(f"{directory} already holds other parquet ({clash[0].name}"
                             f"{f' and {len(clash) - 1} more' if len(clash) > 1 else ''}); write the example "
                             f"{cfg.split} split under another --out, or converting the directory would mix them")
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(make_table(task, cfg), tmp, row_group_size=cfg.rows_per_group)
        tmp.replace(path)
        written[task] = path
    return written


# ----------------------------------------------------------------------------------------------------------------
# judges

_SATURATION_MIN = 0.35  # a pixel belongs to the shape when it is this saturated ...
_VALUE_MIN = 0.25  # ... and this bright; the grey background is neither
_MIN_AREA = 0.01  # a frame shows a shape when >= 1% of its pixels are in the mask
_MAX_AREA = 0.6  # the largest shape of this world covers 39% of the frame: a mask over 60% is a fill, not a shape
# bounding-box fill of an ideal shape: square 1.0, circle pi/4 = 0.785 (triangle 0.5, told apart by where its mass
# lies); thresholds halfway, so that soft edges and small shapes still read right
_SQUARE_FILL, _CIRCLE_FILL = 0.89, 0.64
_MIN_TRAVEL = 0.08  # a video moves when its centroid travels >= 8% of the side ...
_AXIS_DOMINANCE = 2.0  # ... at least twice as far along one axis as along the other
# an edit keeps the rest: the shape's box centre within 6% of the side of where it was, its size within 25%, a
# video's travel within 10% of the side (the world's positions all lie within 18% of each other; real edit targets
# measure <= 3% / 11% / 2%)
_EDIT_POSITION_TOL, _EDIT_SIZE_TOL, _EDIT_TRAVEL_TOL = 0.06, 0.25, 0.1


@dataclass
class Reading:
    """What a judge sees in one frame (or a whole video)."""

    colour: str | None = None
    shape: str | None = None
    direction: str | None = None
    centroid: tuple[float, float] | None = None  # (x, y) in pixels
    area: float = 0.0  # fraction of the frame in the shape's mask
    box: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1) of the mask, a stray pixel aside
    travel: tuple[float, float] | None = None  # a video's centroid motion over the clip, (dx, dy) pixels

    def as_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "direction": self.direction}


@dataclass
class Verdict:
    ok: bool
    expected: dict
    found: dict
    reason: str = ""
    details: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok


def _as_frames(pixels) -> np.ndarray:
    """Tensor or array, [H, W, 3] or [T, H, W, 3], uint8 -> uint8 [T, H, W, 3]."""
    array = pixels.detach().cpu().numpy() if hasattr(pixels, "detach") else np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError(f"judges take uint8 pixels (0..255), got {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"judges take [H, W, 3] or [T, H, W, 3] pixels, got shape {array.shape}")
    return array


_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLOURS.items()}


def _colour_labels(frame: np.ndarray) -> np.ndarray:
    """int [H, W]: index into COLOURS of each saturated pixel's nearest hue, -1 for background."""
    rgb = frame.astype(np.float32) / 255
    top, bottom = rgb.max(axis=2), rgb.min(axis=2)
    chroma = top - bottom
    saturation = np.where(top > 0, chroma / np.maximum(top, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(top == r, ((g - b) / safe) % 6, np.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    centres = np.array(list(_HUES.values()), dtype=np.float32)
    distance = np.abs(hue[..., None] - centres)
    distance = np.minimum(distance, 360 - distance)  # hue is circular
    labels = distance.argmin(axis=2)
    return np.where((saturation > _SATURATION_MIN) & (top > _VALUE_MIN), labels, -1)


def _shape_of(mask: np.ndarray) -> str | None:
    """circle / square / triangle from how much of its bounding box the mask fills and where its mass lies."""
    ys, xs = np.nonzero(mask)
    y0, y1 = np.percentile(ys, [0.5, 99.5])  # trimmed box: a few stray pixels do not stretch it
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1, x0, x1 = int(round(y0)), int(round(y1)), int(round(x0)), int(round(x1))
    box = mask[y0:y1 + 1, x0:x1 + 1]
    if box.shape[0] < 3 or box.shape[1] < 3:
        return None
    fill = box.mean()
    rows = box.sum(axis=1).astype(np.float64)
    third = max(1, len(rows) // 3)
    top, bottom = rows[:third].sum(), rows[-third:].sum()
    aspect = box.shape[1] / box.shape[0]
    if not 0.75 <= aspect <= 1.33:
        return None  # every shape of this world fits a square box
    mass_ratio = (bottom + 1) / (top + 1)  # triangle (apex up) ~5, circle and square ~1
    if mass_ratio > 2 and fill < _SQUARE_FILL:
        return "triangle"
    if mass_ratio <= 1.6 and fill >= _SQUARE_FILL:
        return "square"
    if mass_ratio <= 1.6 and fill >= _CIRCLE_FILL:
        return "circle"
    return None


def read_frame(frame) -> Reading:
    """Colour (dominant hue), shape (mask geometry), centroid and area of the shape in one frame."""
    frame = _as_frames(frame)[0]
    labels = _colour_labels(frame)
    shape_pixels = labels >= 0
    if shape_pixels.mean() < _MIN_AREA:
        return Reading(area=float(shape_pixels.mean()))
    counts = np.bincount(labels[shape_pixels], minlength=len(COLOURS))
    index = int(counts.argmax())
    mask = labels == index
    ys, xs = np.nonzero(mask)
    shape = _shape_of(mask) if mask.mean() <= _MAX_AREA else None  # (a frame filled whole fills its box: "square")
    box = tuple(float(v) for v in (*np.percentile(xs, [1, 99]), *np.percentile(ys, [1, 99])))
    return Reading(colour=list(COLOURS)[index], shape=shape, centroid=(float(xs.mean()), float(ys.mean())),
                   area=float(mask.mean()), box=(box[0], box[2], box[1], box[3]))


def read_video(frames) -> Reading:
    """Majority colour and shape over the frames, and the direction of the centroid's motion."""
    frames = _as_frames(frames)
    readings = [read_frame(f) for f in frames]
    seen = [(t, r) for t, r in enumerate(readings) if r.centroid is not None]
    if not seen:
        return Reading()
    colour = Counter(r.colour for _, r in seen).most_common(1)[0][0]
    shapes = Counter(r.shape for _, r in seen if r.colour == colour)
    shape = shapes.most_common(1)[0][0] if shapes else None
    direction, travel = None, (0.0, 0.0)
    if len(seen) >= 2:
        t = np.array([t for t, _ in seen], dtype=np.float64)
        xy = np.array([r.centroid for _, r in seen])
        slope = np.polyfit(t, xy, 1)[0]  # pixels per frame, (x, y)
        travel = tuple(float(v) for v in slope * (len(frames) - 1))
        direction = _direction(travel, side=frames.shape[2])
    middle = seen[len(seen) // 2][1]
    return Reading(colour, shape, direction, middle.centroid, float(np.mean([r.area for _, r in seen])), middle.box,
                   travel if len(seen) >= 2 else None)


def _direction(travel: tuple[float, float], side: int) -> str | None:
    dx, dy = travel
    major, minor = (dx, dy) if abs(dx) >= abs(dy) else (dy, dx)
    if abs(major) < _MIN_TRAVEL * side or abs(major) < _AXIS_DOMINANCE * abs(minor):
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


_WORDS = re.compile(r"[a-z]+")
_SHAPE_SYNONYMS = {"ball": "circle", "disk": "circle", "disc": "circle", "box": "square"}


def parse_answer(text: str) -> dict:
    """An answer or caption -> {"colour", "shape", "direction"}, each the first word of its kind found, else None."""
    found = {"colour": None, "shape": None, "direction": None}
    for word in _WORDS.findall(text.lower()):
        if found["colour"] is None and word in COLOURS:
            found["colour"] = word
        elif found["shape"] is None and (word in SHAPES or word in _SHAPE_SYNONYMS):
            found["shape"] = _SHAPE_SYNONYMS.get(word, word)
        elif found["direction"] is None and word in DIRECTIONS:
            found["direction"] = word
    return found


def judge_answer(answer: str, reference: str) -> bool:
    """Understanding accuracy: every attribute the reference answer names is named, the same, in the answer."""
    want, got = parse_answer(reference), parse_answer(answer)
    named = {k: v for k, v in want.items() if v is not None}
    if not named:
        raise ValueError(f"reference answer {reference!r} names no colour, shape or direction")
    return all(got[k] == v for k, v in named.items())


def _verdict(expected: dict, found: Reading, extra: dict | None = None) -> Verdict:
    got = found.as_dict()
    wrong = [f"{k}: expected {v}, found {got[k]}" for k, v in expected.items() if got[k] != v]
    details = extra or {}
    for name, what, tolerance in (("position_error", "moved", _EDIT_POSITION_TOL),
                                  ("size_error", "resized", _EDIT_SIZE_TOL),
                                  ("travel_error", "motion off by", _EDIT_TRAVEL_TOL)):
        if details.get(name, 0.0) > tolerance:
            wrong.append(f"{name.split('_')[0]}: {what} {details[name]:.1%} (tolerance {tolerance:.0%})")
    return Verdict(ok=not wrong, expected=expected, found=got, reason="; ".join(wrong), details=details)


def judge_image(pixels, caption: str) -> Verdict:
    """t2i: the generated image shows the caption's colour and shape."""
    expected = {k: v for k, v in parse_answer(caption).items() if k in ("colour", "shape") and v}
    return _verdict(expected, read_frame(_as_frames(pixels)[0]))


def judge_video(pixels, caption: str) -> Verdict:
    """t2v: the generated video shows the caption's colour and shape moving in its direction."""
    expected = {k: v for k, v in parse_answer(caption).items() if v}
    return _verdict(expected, read_video(pixels))


def judge_edit(source, output, instruction: str) -> Verdict:
    """i2i / v2v: the output is the source with the instruction's colour or shape applied, in the same place
    (and, for videos, with the same motion)."""
    source, output = _as_frames(source), _as_frames(output)
    video = source.shape[0] > 1
    before = read_video(source) if video else read_frame(source[0])
    after = read_video(output) if video else read_frame(output[0])
    change = {k: v for k, v in parse_answer(instruction).items() if k in ("colour", "shape") and v}
    if not change:
        raise ValueError(f"instruction {instruction!r} names no colour or shape to change to")
    expected = {"colour": before.colour, "shape": before.shape, **change}
    if video:
        expected["direction"] = before.direction
    return _verdict(expected, after, _kept(before, after, side=source.shape[2]))


def _kept(before: Reading, after: Reading, side: int) -> dict[str, float]:
    """How far an edit moved the shape (box centres), resized it (box sides) and changed its motion, as fractions
    (of the side; of the size): a recolour or reshape keeps all three. Boxes, not centroids: a triangle's centroid
    sits low in its box, so a circle turned into a triangle moved its centroid."""
    if before.box is None or after.box is None:
        return {}
    (a0, b0, a1, b1), (c0, d0, c1, d1) = before.box, after.box
    kept = {"position_error": float(np.hypot((c0 + c1 - a0 - a1) / 2, (d0 + d1 - b0 - b1) / 2) / side),
            "size_error": float(abs(math.log(max(c1 - c0, d1 - d0, 1.0) / max(a1 - a0, b1 - b0, 1.0))))}
    if before.travel is not None and after.travel is not None:
        kept["travel_error"] = float(np.hypot(after.travel[0] - before.travel[0], after.travel[1] - before.travel[1])
                                     / side)
    return kept


def judge_generation(task: str, caption: str, output, source=None) -> Verdict:
    """Dispatch on the task: t2i, t2v (caption describes the output), i2i, v2v (caption is the edit; needs source)."""
    if task == "t2i":
        return judge_image(output, caption)
    if task == "t2v":
        return judge_video(output, caption)
    if task in EDIT_TASKS:
        if source is None:
            raise ValueError(f"judging {task} needs the source pixels the edit was applied to")
        return judge_edit(source, output, caption)
    raise ValueError(f"judge_generation takes t2i, t2v, i2i or v2v; score {task} answers with judge_answer")
