"""The streaming loader: webdataset shards -> sequence plans -> packed micro-batches, with an exact, resumable
position and equal steps on every rank.

Order of a slot's pipeline (open_clip's order, made explicit and resumable):
  split by node, then by worker -> mix groups by weight -> shuffle raw bytes -> plan -> pack -> decode.
Plan before decode: KEY.json gives each medium's size (the converter's metadata), which is all the planner needs, so
a sample too long to pack is dropped without being decoded, and the packing buffer holds encoded bytes rather than
pixels (a buffer of 64 decoded 480p clips is gigabytes). A sample is decoded when it is packed; if its media turn out
another size than KEY.json said, it is planned again from them (and waits for the next sequence if it grew past the
room left). Shards whose KEY.json has no sizes (other tools') are planned from the media's headers.

Slots. A slot is one (rank, data-loader worker): slot = rank * num_workers + worker, num_slots = world_size *
num_workers. Each group's shards are split over the slots explicitly (webdataset's split_by_node then split_by_worker,
done here with the slot index so that it does not depend on environment variables):
  - shards >= slots: in epoch e the shards are permuted (seeded by seed, group, e) and slot s reads shards[s::slots];
  - shards <  slots: every slot reads every shard (permuted per epoch) and keeps sample j of the shard at position u
    of epoch e's order when e + u + j is s modulo num_slots (sample-level split: no slot is left without data, each
    sample of an epoch goes to exactly one slot, whatever another slot failed to read).
Equal steps. Every slot loops over its group's data epoch after epoch, so a rank's stream never ends: every rank
yields a batch whenever asked, for any shard/worker/rank counts, and training stops at train.max_steps. (A finite
epoch would give ranks different batch counts and deadlock ZeRO-3.) `stats_scalars()` reports epochs per group.
Exact resume. A slot's position is small JSON-able state: per group (epoch, unit, byte offset of the next sample,
samples read from that shard), the number of mixture and shuffle draws (draws are hashes of (seed, slot, counter):
no RNG state to save), and the addresses (group, shard, byte offset, key) of the raw samples in the shuffle buffer
and of the plans in the packing buffer. Resuming seeks to the byte offsets (HTTP: a Range request; a pipe: shard is
streamed once, up to its last buffered sample) and re-reads only the buffered samples; nothing consumed is decoded
again. Each packed batch travels from its DataLoader worker with the worker's state right after producing it, so the
main process knows the position of what it consumed
(prefetched batches are not counted) and which worker comes next. A resume on another number of slots (other ranks
or workers) cannot be exact: data/reshard.py deals the samples not yet trained to the new slots, the buffered ones
into their shuffle buffers, the rest of each shard and epoch begun as pieces (GroupCursor.pieces) read first.
Bad input is skipped and counted by reason (SKIP_REASONS), never fatal and never silent: the counts come with every
batch (`stats_scalars()` -> `data/skipped`, `data/skipped/<reason>`), and the first few of each reason are logged.
A shard that breaks off counts the samples it still held when its manifest says how many it has (else 1); a remote
one (a dropped connection) is first opened again at its next sample, up to len(RETRY_WAITS_S) times.

Sources of a group (`GroupConfig.shards`): converter output directories (manifest.json lists the shards and their
sample counts), .tar paths, globs, brace patterns (`shard-{000..009}.tar`), http(s) URLs (a `.../manifest.json` URL
expands to its shards), and webdataset's `pipe:COMMAND` URLs (the command writes a tar to stdout).
Shard layout (DESIGN.md): sample KEY has KEY.json (task, text columns, media metadata) and KEY.<column>.<ext> media.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import itertools
import json
import logging
import math
import os
import random
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config.data import DataConfig, DatasetConfig, GroupConfig, VideoOptions
from ..stopping import ignore_stop_signals
from .batch import PackedBatch, Sample
from .manifest import MANIFEST, ManifestError, is_remote, local_shards, parse_manifest
from .media import MediaError, decode_image, decode_video, describe, jpeg_decode_size, sampled_frame_count
from .packing import Branches, TokenBudgetPacker, build_micro_batch, check_length
from .schemas import SCHEMAS, MediaKind
from ..processes import die_with_parent, said_if_slow
from .sequence import PlanError, SequencePlan, SequencePlanner, unit_hash
from .tar import RawSample, ShardError, iter_raw_samples

logger = logging.getLogger(__name__)
FAILING_SHARDS = 32  # shards a group's samples must fail from before it is given up (SlotStream._failed)
RETRY_WAITS_S = (1.0, 4.0, 16.0)  # before each new try of a remote shard that failed to open or read

STATE_VERSION = 1
SKIP_REASONS = (
    "unreadable_shard",  # a shard could not be opened or read (missing file, HTTP error, failing pipe command)
    "truncated_tar",  # a shard ends in the middle of a member or without the end-of-archive blocks
    "corrupt_tar",  # a tar header is damaged (bad checksum); the rest of the shard is skipped
    "bad_json",  # KEY.json is missing or not valid JSON
    "task_mismatch",  # KEY.json names a task other than the group's
    "missing_media",  # a media member the task needs is absent
    "undecodable_media",  # an image or video that does not decode
    "bad_sample",  # decoded but cannot become a sequence (e.g. an empty answer)
    "overlong",  # longer than data.packing_length (data.filter_overlong)
)
_LOGGED_PER_REASON = 5  # log the first few skips of each reason per slot; the rest are only counted


class DataError(RuntimeError):
    """The data cannot feed training at all (no shards, a group with no readable sample, a mismatched resume)."""


class SkipSample(Exception):
    """One sample is unusable; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# shard lists


@dataclass(frozen=True)
class ShardInfo:
    url: str  # local path, http(s) URL or pipe: command
    num_samples: int | None = None  # from manifest.json when known
    # what tells this shard's contents from another's at the same url (a re-conversion into the same folder): the
    # manifest's CRC-32 and size, else a local file's size; None when unknown (a remote shard without a manifest)
    contents: str | None = None


def _with_contents(shard: ShardInfo, entry: dict | None = None) -> ShardInfo:
    parts = [entry.get("crc32"), entry.get("bytes")] if entry else []
    if not any(parts) and not is_remote(shard.url):  # (no stat per shard where the manifest says: start-up I/O)
        with contextlib.suppress(OSError):  # (a missing file is the loader's to report, where it reads it)
            parts = [os.stat(shard.url).st_size]
    parts = [str(p) for p in parts if p is not None]
    return replace(shard, contents=":".join(parts) or None)


@dataclass
class ResolvedGroup:
    """A dataset group with its shard list expanded."""

    config: GroupConfig
    task: str | None  # None: read from each sample's KEY.json
    shards: list[ShardInfo]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_samples(self) -> int | None:
        counts = [s.num_samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)


def _parse_manifest(text: str, where: str) -> dict:
    try:
        return parse_manifest(text, where)
    except ManifestError as e:
        raise DataError(str(e)) from None


def _manifest_shards(manifest: dict, base: str, join) -> list[ShardInfo]:
    return [_with_contents(ShardInfo(join(base, s["name"]), s.get("num_samples")), s) for s in manifest["shards"]]


def resolve_sources(sources: list[str], where: str = "shards") -> tuple[list[ShardInfo], set[str]]:
    """Expand a group's sources into shards (in the order given; globs sorted) and the tasks manifests name."""
    shards: list[ShardInfo] = []
    tasks: set[str] = set()
    for source in sources:
        if source.startswith(("http://", "https://")) and source.endswith("manifest.json"):
            with urllib.request.urlopen(source, timeout=60) as response:
                manifest = _parse_manifest(response.read().decode("utf-8"), source)
            shards += _manifest_shards(manifest, source, urllib.parse.urljoin)
            tasks.add(manifest["task"])
        elif is_remote(source):
            shards += [ShardInfo(u) for u in braceexpand.braceexpand(source)]
        elif Path(source).is_dir():
            path = Path(source) / MANIFEST
            if path.is_file():
                manifest = _parse_manifest(path.read_text(encoding="utf-8"), str(path))
                shards += _manifest_shards(manifest, source, lambda base, name: str(Path(base) / name))
                tasks.add(manifest["task"])
            else:
                from .convert import STATE_DIR  # here only: the converter's module imports pyarrow

                if (Path(source) / STATE_DIR).is_dir():
                    raise DataError(f"{where}: {source} is a converter output whose conversion has not finished (it "
                                    "has no manifest.json yet); re-run the converter command to complete it")
                found = sorted(glob.glob(str(Path(source) / "*.tar")))
                if not found:
                    raise DataError(f"{where}: {source} has neither manifest.json nor *.tar files")
                shards += [_with_contents(ShardInfo(p)) for p in found]
        else:
            try:
                expanded, beside = local_shards(source)
            except ManifestError as e:
                raise DataError(f"{where}: {e}") from None
            if not expanded:
                raise DataError(f"{where}: {source} matches no file; give a converter output dir, .tar paths, a glob "
                                "or a URL")
            entries = {folder / s["name"]: s for folder, m in beside.items() for s in m["shards"]}
            shards += [_with_contents(ShardInfo(p, entries.get(Path(p), {}).get("num_samples")), entries.get(Path(p)))
                       for p in expanded]
            tasks |= {manifest["task"] for manifest in beside.values()}
    return shards, tasks


def resolve_group(group: GroupConfig, where: str = "") -> ResolvedGroup:
    where = where or f"group {group.name!r}"
    shards, tasks = resolve_sources(group.shards, f"{where}.shards")
    if not shards:
        raise DataError(f"{where}: no shards (list a converter output dir, .tar files, a glob or URLs)")
    if len(tasks) > 1:
        raise DataError(f"{where}: its manifests mix tasks {sorted(tasks)}; put each task in its own group")
    task = group.task or (next(iter(tasks)) if tasks else None)
    if group.task and tasks and group.task not in tasks:
        raise DataError(f"{where}: task is {group.task} but the manifest says {next(iter(tasks))}")
    return ResolvedGroup(group, task, shards)


def fetch_raws(wanted: list[tuple[str, int, str]]) -> list[RawSample]:
    """Re-read the samples at these (url, byte offset, key) addresses (resume), in that order; refuse if a shard
    changed since. A file or an http(s) URL seeks to each sample. A pipe: command cannot seek: it would stream its
    shard up to each sample again (a full shuffle buffer: the shard's first part ~256 times over, from object
    storage), so each of its shards is read once, forward through every sample wanted from it."""
    found: dict[tuple[str, int], RawSample] = {}
    from_pipes: dict[str, set[int]] = {}
    for url, offset, _ in wanted:
        if url.startswith("pipe:"):
            from_pipes.setdefault(url, set()).add(offset)
        elif (url, offset) not in found:
            found[url, offset] = _first_sample(url, offset)
    for url, offsets in from_pipes.items():
        last = max(offsets)
        samples = read_shard(url, min(offsets))
        try:
            for raw in samples:
                if raw.start in offsets:
                    found[url, raw.start] = raw
                if raw.start >= last:
                    break
        except ShardError:
            pass  # the samples it still held are found; any other is refused below
        finally:
            samples.close()
    for url, offset, key in wanted:
        raw = found.get((url, offset))
        if raw is None:
            raise DataError(f"cannot re-read sample {key!r} at byte {offset} of {url}; the shards changed since the "
                            "checkpoint was written: resume with the same data, or read the new data from its beginning "
                            "(checkpoint.data_change=restart)")
        if raw.key != key:
            raise DataError(f"{url} holds {raw.key!r} at byte {offset}, not {key!r} as when the checkpoint was "
                            "written; the shards changed: resume with the same data, or read the new data from its "
                            "beginning (checkpoint.data_change=restart)")
    return [found[url, offset] for url, offset, _ in wanted]


def _first_sample(url: str, offset: int) -> RawSample | None:
    samples = read_shard(url, offset)
    try:
        return next(samples)
    except (StopIteration, ShardError):
        return None
    finally:
        samples.close()


def read_shard(url: str, offset: int = 0) -> Iterator[RawSample]:
    """A shard's samples from byte `offset`, as iter_raw_samples; a remote one that fails (a dropped connection, an
    object store's 503) is opened again at its next sample, len(RETRY_WAITS_S) times at most in a row. For the reads
    every rank makes alike (validation, its prompts, a resume's buffered samples): one rank that alone gave up on a
    shard would see other data than the others (the training reader, GroupReader, has its own retries)."""
    failures = 0
    while True:
        samples = iter_raw_samples(url, offset)
        try:
            for raw in samples:
                failures, offset = 0, raw.end
                yield raw
            return
        except ShardError as e:
            if not e.transient or failures == len(RETRY_WAITS_S):
                raise
            logger.warning("data: %s; opening it again at byte %d in %g s (try %d of %d)", e, offset,
                           RETRY_WAITS_S[failures], failures + 1, len(RETRY_WAITS_S))
            time.sleep(RETRY_WAITS_S[failures])
            failures += 1
        finally:
            samples.close()


# ----------------------------------------------------------------------------------------------------------------
# decoding


def decode_sample(raw: RawSample, group: ResolvedGroup, epoch: int = 0, sizes_only: bool = False,
                  at_least: dict[str, tuple[int, int]] | None = None) -> Sample:
    """Raw members -> Sample (media frame-sampled by the group's video options). Raises SkipSample.
    at_least: per image member, the (height, width) its plan needs: a JPEG may be decoded shrunk to it (decode_image).

    sizes_only: media are not decoded but stand in as tensors on the meta device of the size decoding would give them,
    enough to plan the sample (SequencePlanner only reads sizes); its pixels are decoded when the plan is packed.
    The sizes come from KEY.json (the converter's metadata) or, where it has none (another tool's shards), from the
    media's headers; media whose headers say nothing are decoded.
    """
    if "json" not in raw.members:
        raise SkipSample("bad_json", f"{raw.key}: no {raw.key}.json member (members: {sorted(raw.members)})")
    try:
        meta = json.loads(raw.members["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SkipSample("bad_json", f"{raw.key}.json is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"{raw.key}.json holds {type(meta).__name__}, not an object")
    task = meta.get("task") or group.task
    if not isinstance(task, str) or task not in SCHEMAS or (group.task and task != group.task):
        raise SkipSample("task_mismatch", f"{raw.key}: task {task!r} in a group of task {group.task!r}")
    schema = SCHEMAS[task]
    texts = {c: meta[c] for c in schema.text_columns if isinstance(meta.get(c), str)}
    for column, text in texts.items():
        try:  # JSON can spell a lone UTF-16 surrogate (a caption cut inside an emoji); no tokenizer takes one
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SkipSample("bad_json", f"{raw.key}.json: {column} is not valid Unicode ({e.reason} at character "
                                         f"{e.start})") from None
    by_column = {suffix.partition(".")[0]: data for suffix, data in raw.members.items() if suffix != "json"}
    media = {}
    video = group.config.video
    described = meta.get("media") if isinstance(meta.get("media"), dict) else {}
    for column in schema.media:
        data = by_column.get(column.member)
        if data is None:
            raise SkipSample("missing_media", f"{raw.key}: no {column.member} member (members: {sorted(raw.members)})")
        if sizes_only:
            size = media_size(described.get(column.member) or _peek(data, column.kind), column.kind, video)
            if size is not None:
                media[column.member] = torch.empty(size, dtype=torch.uint8, device="meta")
                continue
        try:
            if column.kind == MediaKind.IMAGE:
                media[column.member] = decode_image(data, (at_least or {}).get(column.member))
            else:
                media[column.member] = decode_video(data, sample_fps=video.sample_fps, max_frames=video.max_frames,
                                                    max_duration=video.max_duration)
        except MediaError as e:
            raise SkipSample("undecodable_media", f"{raw.key}.{column.member}: {e}") from None
    return Sample(task=task, texts=texts, media=media, key=raw.key, group=group.name, epoch=epoch)


_MAX_FRAMES = 1_000_000  # ~9 hours at 30 fps
_MAX_FPS = 1000.0


def media_size(info, kind: MediaKind, video: VideoOptions) -> tuple[int, int, int, int] | None:
    """The uint8 [T, H, W, 3] size decoding gives a medium, from its KEY.json entry (width, height; frames and fps
    for a video, frame-sampled as decode_video samples them); None when the entry does not say, or says what no
    decodable medium is (more pixels than PIL decodes, absurd frame counts or rates): the medium is then decoded."""
    if not isinstance(info, dict) or not all(_positive(info.get(k), int) for k in ("width", "height")):
        return None
    if info["width"] * info["height"] > Image.MAX_IMAGE_PIXELS:
        return None
    if kind == MediaKind.IMAGE:
        return 1, info["height"], info["width"], 3
    frames, fps = info.get("frames"), info.get("fps")
    if not (_positive(frames, int) and frames <= _MAX_FRAMES and _positive(fps, (int, float))
            and math.isfinite(fps) and fps <= _MAX_FPS):
        return None
    frames = sampled_frame_count(frames, fps, video.sample_fps, video.max_frames, video.max_duration)
    return frames, info["height"], info["width"], 3


def decode_planned(plan: SequencePlan, raw: RawSample, group: ResolvedGroup, epoch: int,
                   replan: Callable[[Sample], SequencePlan]) -> SequencePlan:
    """A plan made from its media's sizes, with the media decoded (a large JPEG shrunk to what its blocks cut:
    decode_image's at_least); when they are not the size planned (KEY.json said another), replan(the sample decoded
    whole) is returned instead, as a resume plans it again. Raises SkipSample."""
    images = {c.member for c in SCHEMAS[plan.task].media if c.kind == MediaKind.IMAGE}
    covers = {name: size for name, size in plan.cover_sizes().items() if name in images}
    sample = decode_sample(raw, group, epoch=epoch, at_least=covers)
    if all(_as_planned(sample.media[name].shape, size.shape, covers.get(name)) for name, size in plan.media.items()):
        plan.media = {name: sample.media[name] for name in plan.media}
        return plan
    return replan(decode_sample(raw, group, epoch=epoch))


def _as_planned(decoded: torch.Size, planned: torch.Size, cover: tuple[int, int] | None) -> bool:
    """Whether media decoded to `decoded` are those a plan made for `planned` ([T, H, W, 3]) expects: that size, or
    a JPEG shrunk to what its blocks cover (decode_image's at_least)."""
    if decoded == planned:
        return True
    t, height, width, channels = planned
    return cover is not None and tuple(decoded) == (t, *jpeg_decode_size(height, width, cover), channels)


def _peek(data: bytes, kind: MediaKind) -> dict | None:
    """A medium's KEY.json entry from its headers alone (the converter's --verify none); None when unreadable."""
    try:
        return describe(data, kind, full=False)
    except MediaError:
        return None  # decoding says what is wrong, and the sample is counted


def _positive(value, types) -> bool:
    return isinstance(value, types) and not isinstance(value, bool) and value > 0


# ----------------------------------------------------------------------------------------------------------------
# one group's endless stream for one slot


@dataclass
class GroupCursor:
    """Where a slot is in one group's stream."""

    epoch: int = 0
    unit: int = 0  # index into this epoch's shard list of the slot
    offset: int = 0  # byte offset in that shard of the next sample to read
    read_in_unit: int = 0  # raw samples read from the current shard (if it breaks, the rest of it is lost)
    kept_in_epoch: int = 0
    last_epoch_size: int = 0  # samples this slot kept in its last complete epoch
    empty_epochs: int = 0  # consecutive epochs that handed this slot no sample
    # read before the epochs: [epoch, shard, byte offset, samples left (-1: to the shard's end)], what another
    # layout of slots had not trained yet when a run resumed on other ranks / workers (lance_ds.data.reshard)
    pieces: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_state(cls, state: dict) -> "GroupCursor":
        """A saved cursor (copied); fields an older lance_ds saved and this one no longer keeps are left out."""
        known = {f.name for f in fields(cls)} - {"pieces"}
        return cls(**{k: v for k, v in state.items() if k in known},
                   pieces=[list(piece) for piece in state.get("pieces", [])])


class GroupReader:
    """A slot's share of one group, epoch after epoch: raw samples with their addresses."""

    def __init__(self, group: ResolvedGroup, slot: int, num_slots: int, seed: int, skips: "SkipCounter"):
        self.group, self.slot, self.num_slots, self.seed, self.skips = group, slot, num_slots, seed, skips
        self.sample_split = len(group.shards) < num_slots
        self.cursor = GroupCursor()
        self._samples: Iterator[RawSample] | None = None
        self._failures = 0  # consecutive failed reads of a remote shard (see _retried)
        self.unreadable: set[int] = set()  # shards that gave no sample the last time they were opened
        self._units_epoch, self._units = -1, []

    def units(self, epoch: int) -> list[int]:
        """Shard indexes this slot reads in `epoch`."""
        if epoch != self._units_epoch:
            order = list(range(len(self.group.shards)))
            random.Random(int(unit_hash(self.seed, "shards", self.group.name, epoch) * 2 ** 62)).shuffle(order)
            self._units_epoch = epoch
            self._units = order if self.sample_split else order[self.slot::self.num_slots]
        return self._units

    def _owns(self, j: int) -> bool:
        """Whether sample j of the current shard is this slot's. With a sample-level split, by its place in its shard
        and its shard's in the epoch: not by a count over the group, which a shard that broke off for one slot alone
        (a remote read) would have put out of step with the other slots' for the rest of the run."""
        c = self.cursor
        return not self.sample_split or (c.epoch + c.unit + j) % self.num_slots == self.slot

    def next(self) -> RawSample:
        c = self.cursor
        while c.pieces:
            raw = self._next_in_piece()
            if raw is not None:
                return raw
        while True:
            shard = self.units(c.epoch)[c.unit]
            if self._samples is None:
                self._samples = iter_raw_samples(self.group.shards[shard].url, c.offset)
            try:
                raw = next(self._samples)
            except StopIteration:
                self._next_unit()
                continue
            except ShardError as e:
                if self._retried(e):
                    continue
                self._count_lost(shard, e)
                if c.read_in_unit == 0:
                    self.unreadable.add(shard)
                self._next_unit()
                continue
            self._failures = 0
            self.unreadable.discard(shard)
            mine = self._owns(c.read_in_unit)
            c.offset, c.read_in_unit = raw.end, c.read_in_unit + 1
            if not mine:
                continue
            c.kept_in_epoch += 1
            raw.address = [self.group.name, shard, raw.start, c.epoch, raw.key]
            return raw

    def _next_in_piece(self) -> RawSample | None:
        """The next sample of the first piece, or None when that piece ended (it is dropped). Read as a whole by this
        slot, whatever the split; a piece that breaks off loses its rest (counted once, as one sample)."""
        piece = self.cursor.pieces[0]
        epoch, shard, offset, left = piece
        if self._samples is None:
            self._samples = iter_raw_samples(self.group.shards[shard].url, offset)
        try:
            raw = next(self._samples)
            while raw.start < offset:  # a pipe: stream left open by the piece before: read forward to this one
                raw = next(self._samples)
        except StopIteration:
            raw = None
        except ShardError as e:
            self.skips.add(e.reason, str(e))
            raw = None
        if raw is not None:
            piece[2], piece[3] = raw.end, left - 1
            raw.address = [self.group.name, shard, raw.start, epoch, raw.key]
        if raw is None or piece[3] == 0:
            self.cursor.pieces.pop(0)
            if raw is None or not self._next_piece_further_on(piece):
                self.close()
        return raw

    def _next_piece_further_on(self, done: list[int]) -> bool:
        """Whether the next piece lies further on in the pipe: shard that `done` was read from. A pipe: command cannot
        seek (fetch_raws): opened again per piece, it would stream the shard up to each one, which for the one-sample
        pieces of a reshard's overflow (data/reshard.py) means once per sample."""
        pieces = self.cursor.pieces
        return (bool(pieces) and pieces[0][:2] == done[:2] and pieces[0][2] >= done[2]
                and self.group.shards[done[1]].url.startswith("pipe:"))

    def _retried(self, error: ShardError) -> bool:
        """A remote shard that broke off after giving samples (a dropped connection, a pipe: command that failed) is
        opened again at its next sample, a few times with growing waits: object stores fail transiently, and the rest
        of a multi-GB shard would be lost. The samples are the same (resume stays exact). One that gives none (a
        wrong URL, a missing object) is counted at once, as a local one."""
        if not error.transient or self.cursor.read_in_unit == 0 or self._failures == len(RETRY_WAITS_S):
            return False
        wait = RETRY_WAITS_S[self._failures]
        self._failures += 1
        logger.warning("data: %s; opening it again at byte %d in %g s (try %d of %d)", error, self.cursor.offset,
                       wait, self._failures, len(RETRY_WAITS_S))
        self.close()
        time.sleep(wait)
        return True

    def _count_lost(self, shard: int, error: ShardError) -> None:
        """Count what this slot loses of a shard that broke off: the samples it would have kept of the rest, when the
        manifest says how many the shard has (with a sample-level split each slot counts its own share, so a break
        every slot meets is counted once and one a slot meets alone, a remote read, is counted too); else the shard,
        as one sample, counted by one slot."""
        c = self.cursor
        expected = self.group.shards[shard].num_samples
        if expected is None:
            if self._owns(c.read_in_unit):
                self.skips.add(error.reason, str(error))
            return
        lost = sum(map(self._owns, range(c.read_in_unit, expected)))
        if lost:  # (none: the shard ended without its end-of-archive blocks, after all its samples)
            self.skips.add(error.reason, f"{error}; its last {expected - c.read_in_unit} of {expected} samples are "
                                         "lost", lost)

    def _next_unit(self) -> None:
        c = self.cursor
        self.close()
        self._failures = 0
        c.unit, c.offset, c.read_in_unit = c.unit + 1, 0, 0
        if c.unit < len(self.units(c.epoch)):
            return
        c.empty_epochs = c.empty_epochs + 1 if c.kept_in_epoch == 0 else 0
        c.last_epoch_size = c.kept_in_epoch
        # a sample-level split hands a slot a sample at least every num_slots samples, i.e. every num_slots epochs
        if c.empty_epochs > 2 * (self.num_slots + len(self.group.shards)):
            raise DataError(
                f"group {self.group.name!r}: slot {self.slot} of {self.num_slots} read {c.empty_epochs} epochs of its "
                f"{len(self.group.shards)} shard(s) without getting one sample (skips so far: "
                f"{dict(self.skips.counts)}); check the shards ({self.group.shards[0].url}, ...)")
        c.epoch, c.unit, c.kept_in_epoch = c.epoch + 1, 0, 0

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()
            self._samples = None

    def state(self) -> dict:
        return {**vars(self.cursor), "pieces": [list(piece) for piece in self.cursor.pieces]}  # (read on: copied)

    def load(self, state: dict) -> None:
        self.close()
        self.cursor = GroupCursor.from_state(state)


class SkipCounter:
    """Skipped samples by reason; logs the first few of each reason."""

    def __init__(self, where: str = ""):
        self.counts: Counter = Counter()
        self.where = where

    def add(self, reason: str, message: str, count: int = 1) -> None:
        """`count` samples skipped for one `reason` (a shard that breaks off counts what it still held)."""
        reported = self.counts[reason]
        self.counts[reason] += count
        if reported < _LOGGED_PER_REASON:
            more = " (further ones are only counted)" if self.counts[reason] >= _LOGGED_PER_REASON else ""
            lost = f" ({count} samples)" if count > 1 else ""
            logger.warning("data%s: skipped (%s)%s: %s%s", self.where, reason, lost, message, more)


# ----------------------------------------------------------------------------------------------------------------
# one slot: mixture -> shuffle -> plan -> pack -> decode


def data_fingerprint(groups: list[ResolvedGroup], data: DataConfig, seed: int, micro_batch_size: int) -> str:
    """Identifies the data order: the groups, their shards and weights, and the packing that consumes them. A data
    position (and a checkpoint) applies to this order only."""
    identity = [[g.name, g.config.weight, [s.url for s in g.shards]] for g in groups]
    identity += [seed, data.shuffle_buffer, data.packing_length, data.packing, data.packing_buffer, micro_batch_size]
    if data.buffer_mb != DataConfig.buffer_mb:  # (a later setting: at its default, earlier checkpoints still resume)
        identity.append(data.buffer_mb)
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def run_data_order(run) -> tuple[str, dict[str, dict]]:
    """data_fingerprint and data_groups of a run's training data (a config.run.Run), as its loader will have them."""
    train, groups = run.config.train, resolve_groups(run.dataset)
    return data_fingerprint(groups, run.config.data, train.seed, train.micro_batch_size), data_groups(groups)


def data_groups(groups: list[ResolvedGroup]) -> dict[str, dict]:
    """The groups' part of the data order in a form that can be compared: name -> weight, shard count and a digest
    of the shard list (recorded with a checkpoint; a resume on other data names the group that changed)."""
    return {g.name: {"weight": g.config.weight, "shards": len(g.shards),
                     "digest": hashlib.sha256(json.dumps([s.url for s in g.shards]).encode()).hexdigest()[:12],
                     "contents": hashlib.sha256(json.dumps([s.contents for s in g.shards]).encode()).hexdigest()[:12]}
            for g in groups}



def resolve_groups(dataset: DatasetConfig) -> list[ResolvedGroup]:
    groups = [resolve_group(g, f"groups[{i}] ({g.name})") for i, g in enumerate(dataset.groups)]
    if not groups:
        raise DataError("the dataset has no groups")
    return groups


@dataclass
class StreamSpec:
    """Everything a slot needs; copied into each DataLoader worker."""

    groups: list[ResolvedGroup]
    planner: SequencePlanner
    data: DataConfig
    branches: Branches
    micro_batch_size: int
    seed: int
    rank: int
    world_size: int

    def fingerprint(self) -> str:
        return data_fingerprint(self.groups, self.data, self.seed, self.micro_batch_size)

    def options_fingerprint(self) -> str:
        """Identifies how samples are cut (the groups' image / video options, caption dropout, system prompts):
        they may change at a resume (e.g. a higher resolution), which then is not exact."""
        options = [asdict(g.config) for g in self.groups]
        for o in options:
            for key in ("name", "weight", "shards", "task"):
                o.pop(key, None)
        return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SlotStream:
    """The endless stream of packed micro-batches of one slot, with its exact position (`state()` / `load()`)."""

    def __init__(self, spec: StreamSpec, slot: int, num_slots: int):
        self.spec, self.slot, self.num_slots = spec, slot, num_slots
        self.skips = SkipCounter(f" rank {spec.rank} slot {slot}")
        self.readers = {g.name: GroupReader(g, slot, num_slots, spec.seed, self.skips) for g in spec.groups}
        self.groups = {g.name: g for g in spec.groups}
        total = sum(g.config.weight for g in spec.groups)
        self.cumulative = [sum(g.config.weight for g in spec.groups[:i + 1]) / total for i in range(len(spec.groups))]
        self.mix_draws = 0
        self.shuffle_draws = 0
        self.shuffle: list[RawSample] = []
        self.shuffle_bytes = 0  # the encoded bytes it holds
        data = spec.data
        self.packer = TokenBudgetPacker(data.packing_length, data.packing_buffer, data.packing, data.buffer_mb * 1e6)
        self.failing = {g.name: 0 for g in spec.groups}  # consecutive unusable samples per group
        self.failing_since = {g.name: 0 for g in spec.groups}  # the epoch of the first sample of that run
        self.failing_shards = {g.name: [] for g in spec.groups}  # the shards it came from (FAILING_SHARDS at most)
        self.largest_epoch = {g.name: 0 for g in spec.groups}  # most samples this slot kept in one epoch so far
        self.trained_epoch = {g.name: 0 for g in spec.groups}  # epoch of the newest sample put in a batch
        self.num_batches = 0
        self.num_samples = 0  # plans packed into batches
        self.real_tokens = 0
        self.total_tokens = 0

    # -- pipeline ------------------------------------------------------------------------------------------------

    def _draw(self, stream: str, counter: int) -> float:
        return unit_hash(self.spec.seed, stream, self.slot, self.num_slots, counter)

    def _next_mixed(self) -> RawSample:
        u = self._draw("mix", self.mix_draws)
        self.mix_draws += 1
        index = next((i for i, c in enumerate(self.cumulative) if u < c), len(self.cumulative) - 1)
        return self.readers[self.spec.groups[index].name].next()

    def _next_shuffled(self) -> RawSample:
        """The next raw sample out of the shuffle buffer, which holds `shuffle_buffer` samples or, of large ones (long
        videos), `buffer_mb` of them."""
        size, room = self.spec.data.shuffle_buffer, self.spec.data.buffer_mb * 1e6
        while len(self.shuffle) < size and self.shuffle_bytes < room:
            self._hold(self._next_mixed())
        if not self.shuffle:
            return self._next_mixed()
        j = int(self._draw("shuffle", self.shuffle_draws) * len(self.shuffle))
        self.shuffle_draws += 1
        raw = self.shuffle[j]
        self.shuffle_bytes -= raw.nbytes
        # over its size (dealt more by a reshard, data/reshard.py) or its bytes: drawn down first
        if len(self.shuffle) > size or self.shuffle_bytes + raw.nbytes > room:
            self.shuffle.pop(j)
        else:
            self.shuffle[j] = self._next_mixed()
            self.shuffle_bytes += self.shuffle[j].nbytes
        return raw

    def _hold(self, raw: RawSample) -> None:
        self.shuffle.append(raw)
        self.shuffle_bytes += raw.nbytes

    def plan_raw(self, raw: RawSample, sizes_only: bool = False) -> SequencePlan:
        """Plan one raw sample (raises SkipSample). sizes_only: from its media's sizes, without decoding
        (decode_sample); such a plan keeps `raw` and is decoded when packed (`_decoded`)."""
        group = self.groups[raw.address[0]]
        return self._plan(decode_sample(raw, group, epoch=raw.address[3], sizes_only=sizes_only), raw)

    def _plan(self, sample: Sample, raw: RawSample) -> SequencePlan:
        try:
            plan = self.spec.planner.plan(sample, self.groups[raw.address[0]].config)
        except PlanError as e:
            raise SkipSample("bad_sample", str(e)) from None
        plan.address = raw.address
        plan.raw = raw if plan.needs_media else None
        return plan

    def _fits(self, plan: SequencePlan) -> bool:
        """True when the plan fits a packed sequence; counts it as overlong (or raises) when it does not."""
        data = self.spec.data
        if check_length(plan, data.packing_length, data.filter_overlong):
            return True
        self._failed(plan.address, "overlong", f"{plan.key} ({plan.group}, {plan.task}): "
                     f"{plan.tokens_with_caption or plan.num_tokens} tokens > packing_length {data.packing_length}")
        return False

    def _next_plan(self) -> SequencePlan:
        """The next usable plan, made from its media's sizes: the packing buffer holds encoded bytes, not pixels,
        and a sample too long to pack is dropped without being decoded."""
        while True:
            raw = self._next_shuffled()
            try:
                plan = self.plan_raw(raw, sizes_only=True)
            except SkipSample as e:
                self._failed(raw.address, e.reason, str(e))
                continue
            if self._fits(plan):
                return plan

    def _decoded(self, plan: SequencePlan) -> SequencePlan | None:
        """The plan with its media decoded; None when they do not decode (counted). A plan whose media turn out
        another size than KEY.json said is made again from the decoded media."""
        if not plan.needs_media:
            return plan
        raw = plan.raw
        try:
            decoded = decode_planned(plan, raw, self.groups[raw.address[0]], raw.address[3],
                                     lambda sample: self._plan(sample, raw))
        except SkipSample as e:
            self._failed(raw.address, e.reason, str(e))
            return None
        if decoded is plan:  # (as planned: it fits)
            plan.raw = None
            return plan
        return decoded if self._fits(decoded) else None

    def _failed(self, address: list, reason: str, message: str) -> None:
        """Count a skipped sample (at `address`: group, shard, offset, epoch, key). A group cannot feed training when
        its samples fail for two whole epochs in a row, more of them than the shuffle buffer plus two of this slot's
        largest epochs hold (a slot's share of an epoch varies: few shards, many slots, shards of different sizes),
        and from every shard of the group or FAILING_SHARDS of them: a slot's share of a few epochs can be all bad
        shards of a group that has good ones too."""
        group, shard, _, epoch, _ = address
        self.skips.add(reason, message)
        if self.failing[group] == 0:
            self.failing_since[group], self.failing_shards[group] = epoch, []
        self.failing[group] += 1
        shards = self.failing_shards[group]
        if shard not in shards and len(shards) < FAILING_SHARDS:
            shards.append(shard)
        self.largest_epoch[group] = max(self.largest_epoch[group], self.readers[group].cursor.last_epoch_size)
        whole_epochs = epoch - self.failing_since[group] - 1
        limit = self.spec.data.shuffle_buffer + 2 * self.largest_epoch[group]
        every_shard = min(FAILING_SHARDS, len(self.groups[group].shards))
        bad_shards = len(set(shards) | self.readers[group].unreadable)
        if whole_epochs >= 2 and self.failing[group] > limit and bad_shards >= every_shard:
            fix = (f"raise data.packing_length (now {self.spec.data.packing_length}) above the samples' length, or "
                   "lower the group's resolution / max_frames" if set(self.skips.counts) == {"overlong"} else
                   f"fix or remove the group's shards ({self.groups[group].shards[0].url}, ...)")
            raise DataError(
                f"group {group!r}: rank {self.spec.rank} slot {self.slot} got {self.failing[group]} unusable samples "
                f"in a row, two epochs' worth, without one usable sample (skips so far by reason: "
                f"{dict(self.skips.counts)}); {fix}")

    def _next_sequence(self) -> list[SequencePlan]:
        """The plans of one packed sequence, decoded. A plan that grew when decoded (KEY.json understated its size)
        and no longer fits goes back to the front of the packing buffer, for the next sequence."""
        while True:
            while not self.packer.ready():
                self.packer.add(self._next_plan())
            sequence, room = [], self.spec.data.packing_length
            for plan in self.packer.pop_sequence():
                plan = self._decoded(plan)
                if plan is None:
                    continue
                if plan.num_tokens > room:  # (it fits a sequence: _decoded dropped any that does not)
                    self.packer.buffer.insert(0, plan)
                    continue
                sequence.append(plan)
                room -= plan.num_tokens
                self.failing[plan.address[0]] = 0
            if sequence:
                return sequence

    def next_batch(self) -> PackedBatch:
        spec = self.spec
        sequences = [self._next_sequence() for _ in range(spec.micro_batch_size)]
        batch = build_micro_batch(sequences, spec.planner, spec.branches, spec.data.packing_length)
        self.num_batches += 1
        self.num_samples += sum(len(s) for s in sequences)
        for plan in (p for sequence in sequences for p in sequence):  # (the readers run ahead, into buffers)
            self.trained_epoch[plan.address[0]] = max(self.trained_epoch[plan.address[0]], plan.address[3])
        self.real_tokens += batch.num_real_tokens
        self.total_tokens += batch.num_tokens
        return batch

    # -- position --------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "slot": self.slot,
            "num_slots": self.num_slots,
            "groups": {name: r.state() for name, r in self.readers.items()},
            "mix_draws": self.mix_draws,
            "shuffle_draws": self.shuffle_draws,
            "shuffle_buffer": [r.address for r in self.shuffle],
            "failing": dict(self.failing),
            "failing_since": dict(self.failing_since),
            "failing_shards": {name: list(shards) for name, shards in self.failing_shards.items()},
            "largest_epoch": dict(self.largest_epoch),
            "packing_buffer": [p.address for p in self.packer.buffer],
            "packing_buffer_decoded": [not p.needs_media for p in self.packer.buffer],
            "skipped": dict(self.skips.counts),
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
            "real_tokens": self.real_tokens,
            "trained_epoch": dict(self.trained_epoch),
            "total_tokens": self.total_tokens,
        }

    def load(self, state: dict) -> None:
        """Restore a position: cursors and counters, then re-read the buffered samples by address."""
        if (state["slot"], state["num_slots"]) != (self.slot, self.num_slots):
            raise DataError(f"data position of slot {state['slot']}/{state['num_slots']} given to slot "
                            f"{self.slot}/{self.num_slots}")
        for name, cursor in state["groups"].items():
            self.readers[name].load(cursor)
        self.mix_draws, self.shuffle_draws = state["mix_draws"], state["shuffle_draws"]
        self.skips.counts = Counter(state["skipped"])
        self.failing = dict(state["failing"])
        self.failing_since.update(state.get("failing_since", {}))
        self.failing_shards.update({name: list(shards) for name, shards in state.get("failing_shards", {}).items()})
        self.largest_epoch.update(state.get("largest_epoch", {}))
        self.num_batches, self.num_samples = state["num_batches"], state["num_samples"]
        self.real_tokens, self.total_tokens = state["real_tokens"], state["total_tokens"]
        self.trained_epoch.update(state.get("trained_epoch", {}))
        buffered = self._fetch(state["shuffle_buffer"] + state["packing_buffer"])
        self.shuffle = buffered[:len(state["shuffle_buffer"])]
        self.shuffle_bytes = sum(raw.nbytes for raw in self.shuffle)
        # they planned before, so they plan again (deterministic); the decoded ones from their pixels, as then
        decoded = state.get("packing_buffer_decoded", [False] * len(state["packing_buffer"]))
        restored = (self._restored(raw, was_decoded) for raw, was_decoded in zip(buffered[len(self.shuffle):],
                                                                                 decoded))
        self.packer.buffer = [plan for plan in restored if plan is not None]

    def _restored(self, raw: RawSample, was_decoded: bool) -> SequencePlan | None:
        """A packing-buffer plan made again; None (counted) when it no longer decodes or fits, which only the
        groups' image / video options changed since the save can cause (a progressive-resolution resume)."""
        try:
            plan = self.plan_raw(raw, sizes_only=not was_decoded)
        except SkipSample as e:
            self._failed(raw.address, e.reason, str(e))
            return None
        return plan if self._fits(plan) else None

    def _fetch(self, addresses: list[list]) -> list[RawSample]:
        raws = fetch_raws([(self.groups[name].shards[shard].url, offset, key)
                           for name, shard, offset, _, key in addresses])
        # (one sample may be buffered twice, from two epochs of a small group: each its own address)
        return [replace(raw, address=list(address)) for raw, address in zip(raws, addresses)]

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


# ----------------------------------------------------------------------------------------------------------------
# the per-rank training loader


@dataclass
class WorkerReport:
    """Travels with each batch from its worker: which logical worker made it, and its position right after."""

    worker: int
    state: dict


class _TrainStream(IterableDataset):
    def __init__(self, spec: StreamSpec, num_workers: int, states: list[dict | None], rotation: int,
                 slow_batch_s: float):
        self.spec, self.num_workers, self.states, self.rotation = spec, num_workers, states, rotation
        self.slow_batch_s = slow_batch_s

    def __iter__(self) -> Iterator[tuple[PackedBatch, WorkerReport]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # DataLoader asks workers 0, 1, ... in turn; worker 0 plays the logical worker whose batch is due next
        worker = (physical + self.rotation) % self.num_workers
        slot = SlotStream(self.spec, self.spec.rank * self.num_workers + worker, self.spec.world_size * self.num_workers)
        # a worker that sends nothing holds its rank, and so every rank, up: it says where it is (a pipe: command
        # or a file system read that does not return), as the trainer does about its step
        why = "half of train.stall_timeout_s"
        if self.states[worker] is not None:
            with said_if_slow(f"loader worker {worker}'s resume", self.slow_batch_s, why):
                slot.load(self.states[worker])
        try:
            while True:
                with said_if_slow(f"loader worker {worker}'s next batch", self.slow_batch_s, why):
                    batch = slot.next_batch()
                yield batch, WorkerReport(worker, slot.state())
        finally:
            slot.close()


def _keep(item):
    return item


def _init_worker(_: int, rank_pid: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize; the trainer's threads stay with the trainer
    ignore_stop_signals()  # the rank stops at a step boundary, with a checkpoint; its workers exit with it
    die_with_parent(rank_pid)  # (given: a rank run as a container's pid 1 would look like a dead parent)


class TrainLoader:
    """This rank's endless iterable of PackedBatch, with a resumable position.

    for batch in loader: ...            # never ends; every rank yields a batch whenever asked
    loader.state_dict() / load_state_dict(state)   # the position of the batches consumed so far (JSON-able)
    loader.stats_scalars()              # TensorBoard scalars: data/skipped, data/skipped/<reason>, data/epoch/<group>, ...
    A new `iter(loader)` continues from the current position (load_state_dict before iterating to resume).
    """

    def __init__(self, spec: StreamSpec, num_workers: int, prefetch_factor: int = 2, slow_batch_s: float = 300.0):
        self.spec = spec
        self.slow_batch_s = slow_batch_s  # a worker's batch that takes longer says where the worker is
        self.num_workers = max(1, num_workers)
        self.use_processes = num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.worker_states: list[dict | None] = [None] * self.num_workers
        self.next_worker = 0
        self._iterator = None

    def __iter__(self) -> Iterator[PackedBatch]:
        self.close()
        dataset = _TrainStream(self.spec, self.num_workers, list(self.worker_states), self.next_worker,
                               self.slow_batch_s)
        if self.use_processes:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers + fork: no thread pool
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_keep,
                                     prefetch_factor=self.prefetch_factor,
                                     worker_init_fn=functools.partial(_init_worker, rank_pid=os.getpid()),
                                     persistent_workers=False, pin_memory=torch.cuda.is_available()))
        else:
            source = iter(dataset)
        self._iterator = source
        return self._consume(source)

    def _consume(self, source) -> Iterator[PackedBatch]:
        for batch, report in source:
            self.worker_states[report.worker] = report.state
            self.next_worker = (report.worker + 1) % self.num_workers
            yield batch

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": self.spec.rank,
            "world_size": self.spec.world_size,
            "num_workers": self.num_workers,
            "fingerprint": self.spec.fingerprint(),
            "options": self.spec.options_fingerprint(),
            "next_worker": self.next_worker,
            "workers": list(self.worker_states),
        }

    def load_state_dict(self, state: dict) -> None:
        expected = (STATE_VERSION, self.spec.world_size, self.num_workers, self.spec.rank)
        saved = (state.get("version"), state.get("world_size"), state.get("num_workers"), state.get("rank"))
        if saved != expected:
            raise DataError(
                f"the saved data position is for (version, world_size, num_workers, rank) = {saved}, this run is "
                f"{expected}: the position is per rank and per worker; on another layout load every rank's with "
                "load_resharded")
        if state.get("fingerprint") != self.spec.fingerprint():
            raise DataError("the dataset (groups, shards, weights), train.seed or the packing settings changed since "
                            "the checkpoint: its data position does not apply. Resume with the same dataset YAML and "
                            "data settings, or start a new output_dir")
        if state.get("options", self.spec.options_fingerprint()) != self.spec.options_fingerprint():
            logger.warning("the groups' image / video / caption options changed since the checkpoint: the data "
                           "position is kept, and samples are cut with the new options from here (not an exact "
                           "resume; samples that no longer fit a packed sequence are skipped as overlong)")
        self.close()
        self.worker_states = list(state["workers"])
        self.next_worker = int(state["next_worker"])

    def load_resharded(self, rank_states: list[dict]) -> None:
        """Go on from the data position of a checkpoint saved by another number of ranks or workers (every rank's
        data.json, in rank order): the samples its slots had not trained are dealt to this run's (data/reshard.py)."""
        from .reshard import old_slot_states, resharded

        slots = resharded(old_slot_states(rank_states, self.spec.fingerprint()), self.spec,
                          self.spec.world_size * self.num_workers)
        self.close()
        first = self.spec.rank * self.num_workers
        self.worker_states = slots[first:first + self.num_workers]
        self.next_worker = 0

    # -- reporting -------------------------------------------------------------------------------------------------

    def under_sharded(self) -> list[str]:
        """Groups with fewer shards than loader slots, as a user can act on it: each slot then reads all of their
        shards and keeps one sample in `slots` (no slot goes without data, but every byte is read `slots` times:
        with 32 ranks x 4 workers on 10 shards, 128 times)."""
        slots = self.spec.world_size * self.num_workers
        return [f"{g.name}: {len(g.shards)} shard(s) for {slots} loader slots ({self.spec.world_size} rank(s) x "
                f"{self.num_workers} worker(s)): each slot reads all of them to keep 1 sample in {slots}; {slots} or "
                "more shards (tools/parquet_to_wds.py --samples-per-shard) read each sample once"
                for g in self.spec.groups if len(g.shards) < slots]

    def stats(self) -> dict:
        """Totals over this rank's workers, for the batches consumed so far."""
        skipped: Counter = Counter()
        out = {"batches": 0, "samples": 0, "real_tokens": 0, "total_tokens": 0}
        epochs: dict[str, float] = {}
        for state in self.worker_states:
            if state is None:
                continue
            skipped.update(state["skipped"])
            out["batches"] += state["num_batches"]
            out["samples"] += state["num_samples"]
            out["real_tokens"] += state["real_tokens"]
            out["total_tokens"] += state["total_tokens"]
            trained = state.get("trained_epoch") or {n: c["epoch"] for n, c in state["groups"].items()}  # (older)
            for name, epoch in trained.items():
                epochs[name] = max(epochs.get(name, 0), epoch)
        out["skipped"] = dict(skipped)
        out["epochs"] = epochs
        return out

    def stats_scalars(self) -> dict[str, float]:
        """data/skipped (all reasons), data/skipped/<reason>, data/epoch/<group>, data/samples: cumulative for this
        rank (sum over ranks for the run's totals)."""
        stats = self.stats()
        scalars = {**skip_scalars("data", stats["skipped"]), "data/samples": float(stats["samples"])}
        for name, epoch in stats["epochs"].items():
            scalars[f"data/epoch/{name}"] = float(epoch)
        return scalars

    def num_samples(self, group: str) -> int | None:
        """Samples in a group according to its manifests (None when a source has no manifest)."""
        return next(g.num_samples for g in self.spec.groups if g.name == group)

    def close(self) -> None:
        """Stop the worker processes (a later iter() restarts them from the saved position)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def build_train_loader(dataset: DatasetConfig, data: DataConfig, planner: SequencePlanner, *, rank: int,
                       world_size: int, seed: int, micro_batch_size: int, branches: Branches | None = None,
                       slow_batch_s: float = 300.0) -> TrainLoader:
    """The training loader of one rank. See the module docstring for the split, equal steps and resume. A worker
    whose batch takes longer than `slow_batch_s` says where it is."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    groups = resolve_groups(dataset)
    spec = StreamSpec(groups, planner, data, branches or Branches(), micro_batch_size, seed, rank, world_size)
    return TrainLoader(spec, data.num_workers, data.prefetch_factor, slow_batch_s)


# ----------------------------------------------------------------------------------------------------------------
def skip_scalars(prefix: str, counts: dict[str, int]) -> dict[str, float]:
    """PREFIX/skipped (all reasons) and PREFIX/skipped/<reason> for every reason (0 when none: steady curves)."""
    scalars = {f"{prefix}/skipped": float(sum(counts.values()))}
    scalars.update({f"{prefix}/skipped/{reason}": float(counts.get(reason, 0)) for reason in SKIP_REASONS})
    return scalars


def overlong_groups(dataset: DatasetConfig, planner: SequencePlanner, packing_length: int,
                    num_samples: int = 8) -> list[str]:
    """A problem for each group whose samples, `num_samples` of them read across its shards (the first of shards
    spread over the list) and planned from their sizes as training plans them, are all longer than a packed
    sequence: its samples would all be dropped, and the run would train without the group until the loader gave up
    on it epochs later. Some but not all too long: said as a warning (they are dropped and counted)."""
    problems = []
    for i, group in enumerate(resolve_groups(dataset)):
        config = group.config
        lengths = []
        step = max(1, len(group.shards) // num_samples)
        for shard in group.shards[::step]:
            per_shard = max(1, -(-num_samples // len(group.shards)))
            with contextlib.suppress(ShardError):
                for raw in itertools.islice(read_shard(shard.url), per_shard):
                    with contextlib.suppress(SkipSample, PlanError):
                        sample = decode_sample(raw, group, sizes_only=True)  # (captions kept: most are)
                        lengths.append(planner.plan(sample, replace(config, caption_dropout=0.0)).num_tokens)
            if len(lengths) >= num_samples:
                break
        over = [n for n in lengths if n > packing_length]
        where = f"dataset_config.groups[{i}] ({config.name})"
        if over and len(over) == len(lengths):
            problems.append(f"{where}: the {len(lengths)} samples read across its shards are {min(over)}-{max(over)} "
                            f"tokens, all longer than data.packing_length={packing_length}: it would train nothing. "
                            "Raise data.packing_length, or lower the group's image.resolution / video.resolution / "
                            "video.max_frames")
        elif over:
            logger.warning("%s: %d of %d samples read are longer than data.packing_length=%d (up to %d tokens); "
                           "such samples are dropped and counted (data/skipped/overlong)", where, len(over),
                           len(lengths), packing_length, max(over))
    return problems


__all__ = [
    "build_train_loader", "overlong_groups", "data_fingerprint",
    "run_data_order", "data_groups", "resolve_groups", "TrainLoader", "SlotStream", "StreamSpec", "DataError",
    "SKIP_REASONS", "resolve_group", "resolve_sources", "decode_sample", "decode_planned", "ShardInfo",
]
