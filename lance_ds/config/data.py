"""Data section of the run config, and the dataset YAML (groups of shards mixed by weight)."""

from __future__ import annotations

from dataclasses import dataclass

from .core import Problems, doc, join

TASKS = ("t2i", "t2v", "i2i", "v2v", "i2t", "v2t")
GEN_TASKS = ("t2i", "t2v", "i2i", "v2v")
UND_TASKS = ("i2t", "v2t")
TEXT_TO_MEDIA_TASKS = ("t2i", "t2v")  # generation from a caption alone
EDIT_TASKS = ("i2i", "v2v")  # generation from a source (seen through the ViT) and an instruction
VIDEO_TASKS = ("t2v", "v2v", "v2t")  # the tasks whose samples hold videos


@dataclass
class ImageOptions:
    """How images become model inputs."""

    resolution: int = doc(64, "target side in pixels of a square image (buckets keep the area)")
    buckets: list[float] = doc(factory=lambda: [1.0], text="aspect ratios (w / h) an image is resized and cropped to")
    max_pixels: int | None = doc(None, "cap on height x width in pixels after bucketing (None: resolution**2)")
    vit_resolution: int | None = doc(None, "target side of what the ViT sees, images and video frames alike (None: "
                                           "as the VAE; an edit's source can reach the ViT sharper than it is coded)")

    def check(self, problems: Problems, key: str) -> None:
        problems.positive(self.resolution, join(key, "resolution"))
        if self.vit_resolution is not None:
            problems.positive(self.vit_resolution, join(key, "vit_resolution"))
        problems.require(bool(self.buckets) and all(b > 0 for b in self.buckets), join(key, "buckets"),
                         f"list one or more aspect ratios (w / h) > 0, got {self.buckets}")
        if self.max_pixels is not None:
            problems.positive(self.max_pixels, join(key, "max_pixels"))


@dataclass
class VideoOptions:
    """How videos are sampled into frames."""

    sample_fps: float = doc(12.0, "frames per second taken from the video")
    max_frames: int = doc(9, "most frames kept (4k + 1 for the Wan VAE)")
    max_duration: float = doc(10.0, "most seconds read from the start of a video")
    resolution: int | None = doc(None, "target side in pixels of a square frame (None: the group's image.resolution; "
                                       "frames share image.buckets and image.max_pixels)")

    def check(self, problems: Problems, key: str) -> None:
        problems.require(self.sample_fps > 0, join(key, "sample_fps"), f"must be > 0, got {self.sample_fps}")
        problems.positive(self.max_frames, join(key, "max_frames"))
        problems.require(self.max_duration > 0, join(key, "max_duration"), f"must be > 0, got {self.max_duration}")
        if self.resolution is not None:
            problems.positive(self.resolution, join(key, "resolution"))


@dataclass
class GroupConfig:
    """One group of shards in the mixture."""

    name: str = doc("", "unique name (used in logs and in the saved data position)")
    shards: list[str] = doc(factory=list, text="converter output dirs, .tar paths, globs or URLs")
    weight: float = doc(1.0, "sampling weight in the mixture")
    task: str | None = doc(None, "task of the shards; read from manifest.json when not given")
    caption_dropout: float = doc(0.1, "probability of dropping the caption (classifier-free guidance); the same "
                                      "samples are dropped in a resumed run")
    system_prompt: str | None = doc(None, "system prompt of the chat template (None: the task's default from "
                                          "lance_ds.data.sequence; i2t/v2t samples with a caption_i use theirs)")
    image: ImageOptions = doc(factory=ImageOptions, text="image options")
    video: VideoOptions = doc(factory=VideoOptions, text="video options")

    def check(self, problems: Problems, key: str) -> None:
        problems.require(bool(self.name), join(key, "name"), "every group needs a name")
        problems.require(bool(self.shards), join(key, "shards"), "list at least one shard dir, tar, glob or URL")
        problems.require(self.weight > 0, join(key, "weight"), f"must be > 0, got {self.weight}")
        if self.task is not None:
            problems.one_of(self.task, TASKS, join(key, "task"))
        problems.require(0.0 <= self.caption_dropout < 1.0, join(key, "caption_dropout"),
                         f"must be in [0, 1), got {self.caption_dropout}")

    def resolution_for(self, video: bool) -> int:
        """The pixel side this group cuts a task's media to: a video task's video.resolution when set."""
        return (self.video.resolution if video else None) or self.image.resolution

    def input_side(self) -> int:
        """The side of the area this group's media are cut to as the model takes them in: the ViT's for a question
        (i2t, v2t), else resolution_for its task."""
        side = self.resolution_for(self.task in VIDEO_TASKS)
        return (self.image.vit_resolution or side) if self.task in UND_TASKS else side


@dataclass
class DatasetConfig:
    """A dataset YAML: groups of shards mixed by weight."""

    groups: list[GroupConfig] = doc(factory=list, text="the groups of the mixture")

    def check(self, problems: Problems, key: str) -> None:
        problems.require(bool(self.groups), join(key, "groups"), "a dataset needs at least one group")
        names = [g.name for g in self.groups]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.add(join(key, "groups"), f"group name '{name}' is used twice; names must be unique")


@dataclass
class DataConfig:
    """How the mixture is streamed and packed."""

    packing_length: int = doc(2048, "tokens per packed sequence")
    filter_overlong: bool = doc(True, "drop (and count) samples longer than packing_length instead of failing")
    packing: str = doc("first_fit", "how plans fill a packed sequence: first_fit (the oldest plan, then every "
                                    "buffered plan that still fits) or next_fit (arrival order, no reordering)")
    packing_buffer: int = doc(64, "sample plans held for first-fit packing (more: fuller sequences); they hold "
                                  "encoded bytes, decoded when packed")
    num_workers: int = doc(1, "data loader worker processes per rank")
    prefetch_factor: int = doc(2, "packed batches each worker prepares ahead")
    shuffle_buffer: int = doc(256, "raw samples held for shuffling before decode (0: no shuffle)")
    buffer_mb: float = doc(1024.0, "encoded megabytes that each of a loader worker's two buffers (shuffle, packing) "
                                   "holds at most: of long videos they hold fewer samples than shuffle_buffer / "
                                   "packing_buffer, not GBs per worker")
    val_samples_per_batch: int = doc(8, "samples per validation micro-batch (in order; no token budget)")

    def check(self, problems: Problems, key: str) -> None:
        problems.positive(self.packing_length, join(key, "packing_length"))
        problems.one_of(self.packing, ("first_fit", "next_fit"), join(key, "packing"))
        problems.positive(self.packing_buffer, join(key, "packing_buffer"))
        problems.require(self.num_workers >= 0, join(key, "num_workers"), f"must be >= 0, got {self.num_workers}")
        problems.positive(self.prefetch_factor, join(key, "prefetch_factor"))
        problems.require(self.shuffle_buffer >= 0, join(key, "shuffle_buffer"),
                         f"must be >= 0, got {self.shuffle_buffer}")
        problems.positive(self.buffer_mb, join(key, "buffer_mb"), float)
        problems.positive(self.val_samples_per_batch, join(key, "val_samples_per_batch"))
