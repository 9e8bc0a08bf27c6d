"""Parquet (one of the six Lance task schemas) -> webdataset tar shards + manifest.json + rejects.jsonl.

    python tools/parquet_to_wds.py --input PATH [PATH ...] --output DIR [--task auto|t2i|...]
        [--samples-per-shard N | --shard-size-mb M] [--workers N] [--verify full|none]

How the work is planned (so that the output never depends on --workers, and a re-run can resume):
  1. Inputs are expanded (directories: every *.parquet below, sorted) and only their footers are read: row-group
     row counts and byte sizes. One conversion holds one task; a mix of tasks is refused (Lance keeps one task per
     directory, and a dataset group in the loader is one task): convert each task directory into its own DIR.
  2. Row groups, in input order, are gathered into work units of at most 4 shards' worth of rows (or bytes); a row
     group larger than that is a unit of its own. Each unit is cut into the fewest shards of at most the requested
     size, of equal weight (--shard-size-mb: a row weighs its parquet bytes and an estimate of its tar overhead,
     ~1.5-2.5 kB of headers, padding and KEY.json: most of a small image's row). Shards never span units, so every
     row group is read exactly once, by one worker, one record batch at a time. Parallelism is over units: a file
     written as one huge row group is one worker's job.
  3. Workers convert whole units, each on three threads: one decodes the next record batch, one converts rows, one
     writes (and CRCs) the tar. A shard is written as `NAME.tar.tmp` and renamed when complete; then its record
     (samples, bytes, crc32, media stats, rejects) lands in `DIR/.convert_state/NAME.json`. A re-run skips every
     shard whose record matches the plan and whose tar still has the recorded size and CRC-32, and redoes the rest.
     (CRC-32 rather than SHA-256: it catches accidental damage and costs about half as much.)
     `--verify none` skips the CRC (on a 2-core machine it costs as much as writing the bytes) and resumes by size.
     Stopping (Ctrl-C; SIGTERM, which the CLI turns into the same) kills the workers and removes what they were
     writing; workers also exit when their parent dies (-9), so that none writes into DIR under a re-run.
  4. manifest.json and rejects.jsonl are assembled from the records in plan order (deterministic), each written under
     a temporary name and renamed. manifest.json exists only after a complete run. A DIR holding a manifest.json,
     rejects.jsonl or shard-*.tar but no .convert_state/ is not this converter's and is refused; other files in DIR
     are left alone (only the converter's own temporary files are ever removed).

Shard layout: sample KEY = "{file index:05d}-{file stem, sanitised}-{row:09d}" (only [A-Za-z0-9_-]: no dots, no
slashes, unique across the inputs) has `KEY.json` and one member per media column, `KEY.{column without _bytes}.{ext}`
with the extension sniffed from the bytes (jpg, png, mp4, ...; "bin" when unknown). Media bytes are stored as they
came. Tar headers are fixed (lance_ds/data/tar.py), so the same input gives the same bytes.

KEY.json:
    {"key": KEY, "task": "t2i", "caption": "...",                       # every text column of the task, exact
     "source": {"file": "data/part-0.parquet", "row": 12},              # row index within the file
     "media": {"image": {"format": "jpg", "bytes": 51234, "width": 512, "height": 384},
               "video": {"format": "mp4", "bytes": 912345, "width": 848, "height": 480,
                         "frames": 121, "fps": 24.0, "duration": 5.04}}}

manifest.json:
    {"format": "lance_ds.shards/1", "task": "t2i", "num_samples": N, "num_rejects": R, "num_rows": N + R,
     "verify": "full", "media_columns": {"image": "image"},            # member -> kind
     "text_columns": ["caption"],
     "shards": [{"name": "shard-000000.tar", "num_samples": n, "bytes": b, "crc32": "8 hex digits" | null,
                 "media": {"image": {"count": n, "width": {"min", "max", "mean"}, "height": {...},
                                     ["frames", "fps", "duration": {...} for videos]}}}, ...],
     "system_prompts": {"You are a helpful assistant.": n, "": m}}  # i2t / v2t: caption_i -> rows, the commonest 8
Shards whose rows were all rejected are not written and not listed.

rejects.jsonl, one line per rejected row: {"file": ..., "row": ..., "column": ..., "reason": ...} (+ "more": further
problems of the same row). `--verify full` decodes every image (JPEGs at 1/8 scale: all their compressed data is
still checked) and probes every video (container, first frame, every packet); `--verify none` only reads headers
for the metadata (fast; unreadable headers are still rejected).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lance_ds.config.core import ConfigError, Problems, doc, output_problem
from lance_ds.data import media
from lance_ds.data.manifest import MANIFEST, parse_manifest
from lance_ds.data.schemas import SCHEMAS, PathOnly, RowProblem, SchemaError, TaskSchema, resolve_task, validate_row
from lance_ds.data.tar import TarShardWriter, file_crc32
from lance_ds.files import write_atomic
from lance_ds.processes import die_with_parent

log = logging.getLogger(__name__)

FORMAT = "lance_ds.shards/1"
STATE_DIR = ".convert_state"  # per-shard records that make a re-run resumable
SHARD_NAME = "shard-{:06d}.tar"
_SHARD_PATTERN = re.compile(r"^shard-\d{6,}\.tar$")  # SHARD_NAME's: 7 digits from the millionth shard on
_BATCH_BYTES = 32 << 20  # ~bytes of one record batch read from parquet: bounds a worker's memory
_SHARDS_PER_UNIT = 4  # shards' worth of row groups per work unit: fuller shards when row groups are small
_STEM_CHARS = 40  # longest file-stem part of a key (keeps member names under USTAR's 100 characters)
_OUTPUT_FILES = (MANIFEST, "rejects.jsonl")  # besides the shards, what a conversion writes into DIR
# what a row adds to its shard besides its parquet bytes (weights of --shard-size-mb's plan): per tar member (KEY.json
# and one per media column) a 512-byte header and on average half a block of padding; KEY.json's fields besides the
# texts (key, task, source file and row) and, per media column, its metadata. Small media are mostly this: 1 kB PNGs
# made shards 2.5x the size asked for when it was left out.
_TAR_MEMBER_BYTES = 512 + 256
_JSON_FIXED_BYTES = 96
_JSON_MEDIA_BYTES = 96


class ConvertError(ValueError):
    """The conversion cannot start (bad inputs, options, mixed tasks) or go on (a worker died); the message says
    how to fix it."""


@dataclass
class ConvertOptions:
    """The converter's command line as a config (tools/parquet_to_wds.py maps flags 1:1 onto these fields)."""

    inputs: list[str] = doc(factory=list, text="parquet files or directories holding them (searched recursively)")
    output: str = doc("", "output directory for shards, manifest.json and rejects.jsonl")
    task: str = doc("auto", "auto (detect from the columns) or one of t2i, t2v, i2i, v2v, i2t, v2t")
    samples_per_shard: int | None = doc(None, "rows per shard (fewer when rows are rejected)")
    shard_size_mb: float | None = doc(None, "approximate shard size in MB (1e6 bytes); default 256 when neither is set")
    workers: int = doc(1, "converter processes; the output is the same for any number")
    verify: str = doc("full", "full: decode every image, probe every video; none: headers only, no CRC (trusted data)")
    progress: bool = doc(True, "show a tqdm progress bar on stderr")

    def check(self, problems: Problems, key: str = "") -> None:
        problems.require(bool(self.inputs), "--input", "give at least one parquet file or directory")
        if problems.require(bool(self.output), "--output", "give the output directory"):
            if problem := output_problem("--output", self.output, directory=True):  # a file at DIR or above it
                problems.add("", problem)
        problems.one_of(self.task, ("auto", *SCHEMAS), "--task")
        problems.one_of(self.verify, ("full", "none"), "--verify")
        problems.positive(self.workers, "--workers")
        if self.samples_per_shard is not None and self.shard_size_mb is not None:
            problems.add("--samples-per-shard", "give either --samples-per-shard or --shard-size-mb, not both")
        if self.samples_per_shard is not None:
            problems.positive(self.samples_per_shard, "--samples-per-shard")
        if self.shard_size_mb is not None:
            problems.positive(self.shard_size_mb, "--shard-size-mb", float)


DEFAULT_SHARD_SIZE_MB = 256.0


# ----------------------------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True, eq=False)
class SourceFile:
    """One parquet input, from its footer only."""

    index: int  # position among all inputs: part of every key, so keys are unique across files
    path: str  # as given (or found under a given directory); recorded in KEY.json and rejects.jsonl
    key_prefix: str
    size: int  # bytes on disk
    mtime_ns: int
    group_rows: tuple[int, ...]  # rows per row group
    group_bytes: tuple[int, ...]  # uncompressed bytes of the task's columns per row group
    # where the task's column chunks lie in the file, (offset, length) per chunk, per row group: read ahead from the disk
    group_chunks: tuple[tuple[tuple[int, int], ...], ...] = ()

    @property
    def num_rows(self) -> int:
        return sum(self.group_rows)

    def group_start(self, group: int) -> int:
        """Index within the file of the group's first row."""
        return self._starts[group]

    @functools.cached_property
    def _starts(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate(self.group_rows, initial=0))


def find_parquet_files(inputs: list[str]) -> list[Path]:
    """Files as given; directories expanded to every *.parquet below them, sorted. Duplicates are refused."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                raise ConvertError(f"--input {item}: the directory holds no *.parquet file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConvertError(f"--input {item}: no such file or directory")
    seen: dict[Path, Path] = {}
    for path in files:
        real = path.resolve()
        if real in seen:
            raise ConvertError(f"--input: {path} is given twice (also as {seen[real]}); "
                               "each row must be converted once")
        seen[real] = path
    return files


def sanitize_stem(stem: str) -> str:
    """A file stem reduced to [A-Za-z0-9_-] (no dots: webdataset splits keys at the first dot)."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")
    return clean[:_STEM_CHARS] or "file"


def read_footer(path: Path) -> pq.FileMetaData:
    try:
        return pq.ParquetFile(path).metadata
    except UnicodeEncodeError:
        raise ConvertError(f"--input {path!r}: the file name is not valid UTF-8, which pyarrow cannot open; "
                           "rename the file") from None
    except (pa.ArrowException, OSError, ValueError) as e:  # not parquet, truncated footer, unreadable
        raise ConvertError(f"--input {path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def make_source(index: int, path: Path, meta: pq.FileMetaData, columns: tuple[str, ...]) -> SourceFile:
    """A SourceFile from a footer; row-group sizes count only the columns that are converted."""
    wanted = set(columns) | {f"{c}.bytes" for c in columns}  # (a struct's bytes: Hugging Face's Image feature)
    group_bytes, group_chunks = [], []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        chunks = [group.column(c) for c in range(group.num_columns) if group.column(c).path_in_schema in wanted]
        group_bytes.append(sum(chunk.total_uncompressed_size for chunk in chunks))
        group_chunks.append(tuple((_chunk_offset(chunk), chunk.total_compressed_size) for chunk in chunks))
    stat = path.stat()
    return SourceFile(
        index=index, path=str(path), key_prefix=f"{index:05d}-{sanitize_stem(path.stem)}", size=stat.st_size,
        mtime_ns=stat.st_mtime_ns, group_rows=tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups)),
        group_bytes=tuple(group_bytes), group_chunks=tuple(group_chunks))


def _chunk_offset(chunk: pq.ColumnChunkMetaData) -> int:
    """Where a column chunk starts in its file: at its dictionary page when it has one (it precedes the data)."""
    if chunk.has_dictionary_page and chunk.dictionary_page_offset:
        return min(chunk.dictionary_page_offset, chunk.data_page_offset)
    return chunk.data_page_offset


def open_sources(inputs: list[str], task: str) -> tuple[TaskSchema, list[SourceFile]]:
    """Read every input's footer, settle the one task of the conversion, refuse mixed tasks."""
    found: list[tuple[Path, pq.FileMetaData, TaskSchema]] = []
    errors = []
    for path in find_parquet_files(inputs):
        meta = read_footer(path)
        try:
            found.append((path, meta, resolve_task(meta.schema.to_arrow_schema().names, task, source=str(path))))
        except SchemaError as e:
            errors.append(str(e))
    if errors:
        raise ConvertError("\n".join(errors))
    by_task: dict[str, list[str]] = {}
    for path, _, schema in found:
        by_task.setdefault(schema.task, []).append(str(path))
    if len(by_task) > 1:
        listing = "\n".join(f"  {t} ({SCHEMAS[t].dir_name}): {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}"
                            for t, files in by_task.items())
        raise ConvertError(
            "the inputs hold more than one task; one conversion makes one task's shards (a dataset group is one task). "
            f"Convert each task into its own --output directory:\n{listing}")
    schema = found[0][2]
    sources = []
    for index, (path, meta, _) in enumerate(found):
        extra = sorted(set(meta.schema.to_arrow_schema().names) - set(schema.columns))
        if extra:
            log.warning("%s: columns %s are not part of the %s schema and are not converted", path, extra, schema.task)
        sources.append(make_source(index, path, meta, schema.columns))
    return schema, sources


# ----------------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class RowSpan:
    """Rows [start, stop) of one file (indexes within the file)."""

    file: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    index: int
    spans: tuple[RowSpan, ...]
    fingerprint: str  # hash of everything the shard's bytes depend on; a record with another one is stale

    @property
    def name(self) -> str:
        return SHARD_NAME.format(self.index)

    @property
    def num_rows(self) -> int:
        return sum(s.stop - s.start for s in self.spans)


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive row groups converted by one worker, and the shards cut from them."""

    groups: tuple[tuple[int, int], ...]  # (file index, row group)
    shards: tuple[ShardPlan, ...]


def _row_overhead(source: SourceFile, schema: TaskSchema) -> float:
    """Estimated bytes a row of `source` takes in a shard beyond its parquet bytes (tar headers and padding, KEY.json's
    fields besides the texts); within ~25% of the truth for small media, and a small part of a large medium's row."""
    members = 1 + len(schema.media)
    json_fields = (_JSON_FIXED_BYTES + len(source.path.encode("utf-8")) + len(source.key_prefix)
                   + _JSON_MEDIA_BYTES * len(schema.media))
    return members * _TAR_MEMBER_BYTES + json_fields


def _row_weights(sources: list[SourceFile], schema: TaskSchema, by_bytes: bool) -> list[tuple[int, int, float]]:
    """(file, group, weight of one row of that group): 1 per row, or the row's estimated bytes in a shard (the
    group's parquet bytes per row and the row's tar overhead)."""
    out = []
    for src in sources:
        overhead = _row_overhead(src, schema) if by_bytes else 0.0
        for g, rows in enumerate(src.group_rows):
            if rows:
                out.append((src.index, g, src.group_bytes[g] / rows + overhead if by_bytes else 1.0))
    return out


def plan_work(sources: list[SourceFile], schema: TaskSchema, options: ConvertOptions) -> list[WorkUnit]:
    """Row groups -> work units -> shards. Depends only on the inputs and the shard size, never on --workers."""
    by_bytes = options.samples_per_shard is None
    target = (options.shard_size_mb or DEFAULT_SHARD_SIZE_MB) * 1e6 if by_bytes else float(options.samples_per_shard)
    groups = _row_weights(sources, schema, by_bytes)
    # gather row groups into units of at most _SHARDS_PER_UNIT shards' weight (a bigger group is a unit of its own)
    unit_groups: list[list[tuple[int, int, float]]] = []
    unit_weight = 0.0
    for file, g, row_weight in groups:
        weight = row_weight * sources[file].group_rows[g]
        if not unit_groups or unit_weight + weight > target * _SHARDS_PER_UNIT:
            unit_groups.append([])
            unit_weight = 0.0
        unit_groups[-1].append((file, g, row_weight))
        unit_weight += weight
    units = []
    shard_index = 0
    for members in unit_groups:
        shards = _cut_shards(members, sources, target, shard_index, schema, options)
        shard_index += len(shards)
        units.append(WorkUnit(groups=tuple((f, g) for f, g, _ in members), shards=tuple(shards)))
    return units


def _cut_shards(members, sources, target, first_index, schema, options) -> list[ShardPlan]:
    """Cut a unit's rows into ceil(weight / target) shards of equal weight; all rows of a row group weigh the same,
    so the cuts are found group by group, without a list of rows."""
    total = sum(w * sources[f].group_rows[g] for f, g, w in members)
    rows = sum(sources[f].group_rows[g] for f, g, _ in members)
    num_shards = max(1, min(rows, math.ceil(total / target - 1e-9)))  # (a tiny --shard-size-mb: a row per shard)
    shards: list[list[RowSpan]] = [[] for _ in range(num_shards)]
    shard, placed = 0, 0.0  # current shard, weight of the rows placed so far
    for file, g, row_weight in members:
        row, stop = sources[file].group_start(g), sources[file].group_start(g + 1)
        while row < stop:
            take = stop - row
            if shard < num_shards - 1:
                boundary = total * (shard + 1) / num_shards
                take = min(take, max(1, math.ceil((boundary - placed) / row_weight - 1e-9)))
            shards[shard].append(RowSpan(file, row, row + take))
            row += take
            placed += take * row_weight
            if shard < num_shards - 1 and placed >= total * (shard + 1) / num_shards - 1e-9:
                shard += 1
    plans = []
    for spans in (s for s in shards if s):  # very heavy rows can leave trailing shards empty
        index = first_index + len(plans)
        spans = _merge_spans(spans)
        plans.append(ShardPlan(index, spans, _fingerprint(index, spans, sources, schema, options)))
    return plans


def _merge_spans(spans: list[RowSpan]) -> tuple[RowSpan, ...]:
    merged: list[RowSpan] = []
    for span in spans:
        if merged and merged[-1].file == span.file and merged[-1].stop == span.start:
            merged[-1] = RowSpan(span.file, merged[-1].start, span.stop)
        else:
            merged.append(span)
    return tuple(merged)


def _fingerprint(index, spans, sources, schema, options) -> str:
    files = sorted({s.file for s in spans})
    identity = {
        "format": FORMAT, "shard": index, "task": schema.task, "verify": options.verify,
        "spans": [dataclasses.astuple(s) for s in spans],
        "files": [(sources[f].path, sources[f].key_prefix, sources[f].size, sources[f].mtime_ns) for f in files],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------------------------
# converting one row

_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps(ensure_ascii=False) builds one per call


@dataclass
class MediaStats:
    """Media metadata of a shard's samples, summarised (min / max / mean) when the shard is finished."""

    metas: list[dict] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.metas)

    def add(self, meta: dict) -> None:
        self.metas.append(meta)

    def to_json(self) -> dict:
        out: dict = {"count": self.count}
        for name in ("width", "height", "frames", "fps", "duration"):
            values = [float(meta[name]) for meta in self.metas if name in meta]
            if values:
                out[name] = {"min": min(values), "max": max(values), "mean": round(math.fsum(values) / self.count, 6)}
        return out


@dataclass
class ShardRecord:
    """What a finished shard holds; saved under STATE_DIR so that a re-run can skip it."""

    name: str
    fingerprint: str
    num_rows: int
    num_samples: int = 0
    bytes: int = 0
    crc32: str | None = None  # None: written by --verify none, which skips the checksum
    media: dict = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)
    system_prompts: dict | None = None  # i2t / v2t: caption_i -> rows ("": blank), the commonest (None: a record
    # written before the count, whose shard is reused)


SYSTEM_PROMPTS_KEPT = 8  # distinct caption_i values a shard record and the manifest keep (the commonest): rows may
# each carry their own, and inference needs only the one most rows trained with


def commonest(counts: Counter, keep: int = SYSTEM_PROMPTS_KEPT) -> dict[str, int]:
    return dict(counts.most_common(keep))


class ShardBuilder:
    """Validates, verifies and writes the rows of one planned shard."""

    def __init__(self, plan: ShardPlan, schema: TaskSchema, sources: list[SourceFile], output: Path, verify: str):
        self.plan, self.schema, self.sources, self.verify = plan, schema, sources, verify
        self.record = ShardRecord(plan.name, plan.fingerprint, plan.num_rows)
        self.stats = {c.member: MediaStats() for c in schema.media}
        self.media_columns = [(c.name, c.member, c.kind) for c in schema.media]  # looked up once, used every row
        self.system_prompts: Counter | None = Counter() if "caption_i" in schema.text_columns else None
        self.writer: TarShardWriter | None = None
        self.output = output

    def add_row(self, file: int, row: int, values: dict) -> int:
        """Convert one row; returns the bytes it added to the shard (0 when rejected)."""
        source = self.sources[file]
        checked = validate_row(self.schema, values)
        metas = {}
        for name, member, kind in self.media_columns:
            if name in checked.media:
                try:
                    metas[member] = media.describe(checked.media[name], kind, full=self.verify == "full")
                except media.MediaError as e:
                    checked.problems.append(RowProblem(name, str(e)))
        if checked.problems:
            self.record.rejects.append(_reject_line(source.path, row, checked.problems))
            return 0
        key = f"{source.key_prefix}-{row:09d}"
        sample = {"key": key, "task": self.schema.task, **checked.texts,
                  "source": {"file": source.path, "row": row}, "media": metas}
        if self.writer is None:
            self.writer = TarShardWriter(self.output / self.plan.name, checksum=self.verify == "full")
        before = self.writer.bytes
        self.writer.add(f"{key}.json", _JSON.encode(sample).encode("utf-8"))
        for name, member, _ in self.media_columns:
            self.writer.add(f"{key}.{member}.{metas[member]['format']}", checked.media[name])
            self.stats[member].add(metas[member])
        if self.system_prompts is not None:
            self.system_prompts[checked.texts.get("caption_i") or ""] += 1
        self.record.num_samples += 1
        return self.writer.bytes - before

    def end(self) -> None:
        """The shard has all its rows: its tar is completed in the background (finish() waits for it)."""
        if self.writer is not None:
            self.writer.end()

    def finish(self) -> ShardRecord:
        if self.writer is not None:
            self.record.crc32 = self.writer.close()
            self.record.bytes = self.writer.bytes
        self.record.media = {m: s.to_json() for m, s in self.stats.items() if s.count}
        self.record.system_prompts = commonest(self.system_prompts) if self.system_prompts else {}
        return self.record

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _reject_line(path: str, row: int, problems) -> dict:
    line = {"file": path, "row": row, "column": problems[0].column, "reason": problems[0].reason}
    if len(problems) > 1:
        line["more"] = [{"column": p.column, "reason": p.reason} for p in problems[1:]]
    return line


# ----------------------------------------------------------------------------------------------------------------
# converting one work unit (runs in a worker process)


def _record_path(output: Path, name: str) -> Path:
    return output / STATE_DIR / (name.removesuffix(".tar") + ".json")


def load_done_record(output: Path, plan: ShardPlan) -> ShardRecord | None:
    """The saved record of a shard if it matches the plan and its tar is intact, else None. Intact: the recorded
    size and CRC-32; without a CRC (--verify none) the size only: a shard gets its name only once it is complete,
    so what a killed run leaves is caught, but not damage that keeps the size."""
    path = _record_path(output, plan.name)
    try:
        record = ShardRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # no record, or a damaged one: convert the shard again
    if record.fingerprint != plan.fingerprint:
        return None
    tar = output / plan.name
    if record.num_samples == 0:
        return record if not tar.exists() else None
    if not tar.is_file() or tar.stat().st_size != record.bytes:
        return None
    if record.crc32 is not None and file_crc32(tar) != record.crc32:
        return None
    return record


def save_record(output: Path, record: ShardRecord) -> None:
    write_atomic(_record_path(output, record.name), json.dumps(dataclasses.asdict(record), ensure_ascii=False))


_AS_BINARY = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}


def _column_values(column: pa.Array) -> list:
    """Python values of one column of a record batch. Binary columns come as memoryviews into the arrow buffer
    (zero-copy slices at the offsets): media bytes are then copied once, into the shard, instead of twice."""
    paths = None
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        if column.type.get_field_index("path") >= 0:
            paths = pc.struct_field(column, "path")
        column = pc.struct_field(column, "bytes")  # Hugging Face datasets' Image / Video features: {bytes, path}
    if pa.types.is_dictionary(column.type):  # categorical text (pandas writes these), or deduplicated media
        column = column.dictionary_decode()
    if column.type in _AS_BINARY:
        try:
            return column.to_pylist()
        except UnicodeDecodeError:  # parquet does not check UTF-8: hand the values over as bytes; the row check
            column = column.view(_AS_BINARY[column.type])
            # decodes each one and rejects the rows that are not UTF-8, naming file, row and column
    large = pa.types.is_large_binary(column.type)
    if not (large or pa.types.is_binary(column.type)):
        return column.to_pylist()
    _, offsets, data = column.buffers()
    bounds = np.frombuffer(offsets, np.int64 if large else np.int32)[column.offset:column.offset + len(column) + 1]
    bounds = bounds.tolist()
    view = memoryview(data).cast("B") if data is not None else memoryview(b"")  # arrow exports signed chars
    values = [view[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
    if column.null_count:
        for i in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)).tolist():
            path = paths[i].as_py() if paths is not None else None
            values[i] = PathOnly(path) if path else None  # (a row's check says which of the two it was)
    return values


def _unit_batches(unit: WorkUnit, sources: list[SourceFile],
                  columns: list[str]) -> Generator[tuple[int, int, pa.RecordBatch], None, None]:
    """(file, row in file of the batch's first row, record batch) for the unit's row groups, in order."""
    by_file: dict[int, list[int]] = {}
    for file, g in unit.groups:
        by_file.setdefault(file, []).append(g)
    for file, groups in by_file.items():
        source = sources[file]
        row_bytes = max(g_bytes / max(rows, 1) for g_bytes, rows in zip(source.group_bytes, source.group_rows))
        batch_rows = max(1, min(65536, int(_BATCH_BYTES / max(row_bytes, 1))))
        # memory-mapped: pages are decompressed straight from the page cache (~20% faster than buffered reads), and
        # only the record batches being converted (and what the write thread has still to write) are held in memory,
        # besides the parquet page being decoded: pyarrow reads a page whole, and a writer that puts many large
        # values in one page (pyarrow writes up to write_batch_size = 1024 values, or a dictionary of them, per
        # page) makes that page as large as they are: 300 values of 1 MB in one page need ~0.5 GB here.
        # An input cut short while it is converted kills the process (SIGBUS) instead of raising; a re-run resumes.
        parquet = pq.ParquetFile(source.path, memory_map=True, pre_buffer=False)
        disk = _DiskReadAhead(source, groups)
        try:
            for g in groups:
                disk.advance()
                row = source.group_start(g)
                for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns,
                                                  use_threads=False):
                    yield file, row, batch
                    row += batch.num_rows
        finally:
            parquet.close()
            disk.close()


class _DiskReadAhead:
    """Asks the kernel to read the next row groups' column chunks from the disk while this one is converted. A memory
    map's page faults read the file a readahead window at a time, each waited for: a file not in the page cache (a
    dataset not written just now) was read at a fraction of the disk's speed. posix_fadvise(WILLNEED) starts the reads
    and returns.

    Linux reads at most the device's readahead window or its largest request, whichever is larger, of one call
    (/sys/block/DEV/queue/read_ahead_kb: 128 kB by default; max_sectors_kb: often 128 kB-1 MB), so a chunk is asked for
    PIECE bytes at a time: one call per chunk read only each chunk's start. `--verify none` from the disk, 196 MB of
    ~100 kB JPEGs in 5 MB row groups, best of 7-11 rounds: with read_ahead_kb 128 and max_sectors_kb 512, 0.185 s in
    pieces, 0.232 s with a call per chunk, 0.194 s with no advice; with an 8 MB window (where a call per chunk reads
    it whole), 0.177 s in pieces, 0.169 s per chunk, 0.251 s with no advice."""

    AHEAD = 2  # row groups asked for beyond the one being read
    PIECE = 128 << 10  # bytes per call: within the cap of any device

    def __init__(self, source: SourceFile, groups: list[int]):
        self.chunks = [source.group_chunks[g] for g in groups] if source.group_chunks else []
        self.asked = 0  # groups asked for so far
        self.read = 0  # groups begun
        self.fd = None
        if self.chunks and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                self.fd = os.open(source.path, os.O_RDONLY)

    def advance(self) -> None:
        """Called as the next row group is begun."""
        self.read += 1
        while self.fd is not None and self.asked < min(len(self.chunks), self.read + self.AHEAD):
            for offset, length in self.chunks[self.asked]:
                for start in range(offset, offset + length, self.PIECE):
                    with contextlib.suppress(OSError):  # (only advice: the read itself reports what is wrong)
                        os.posix_fadvise(self.fd, start, min(self.PIECE, offset + length - start),
                                         os.POSIX_FADV_WILLNEED)
            self.asked += 1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_ahead(items: Generator, depth: int = 2) -> Iterator:
    """The items of `items`, produced on a thread of its own up to `depth` ahead of the consumer: pyarrow decodes the
    next record batch (without the GIL) while the consumer converts the rows of this one. An error in the producer is
    raised to the consumer; a consumer that stops early stops the producer."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()
    end = object()

    def hand_over(item) -> bool:
        while not stopped.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    break
            else:
                hand_over((end, None))
        except BaseException as e:  # raised again in the consumer's thread
            hand_over((end, e))
        finally:
            items.close()

    thread = threading.Thread(target=produce, name="parquet-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stopped.set()
        thread.join()


def _iter_unit_rows(unit: WorkUnit, sources: list[SourceFile], columns: list[str]) -> Iterator[tuple[int, int, dict]]:
    """(file, row in file, column -> value) for every row of the unit, decoded a record batch or two ahead."""
    for file, first_row, batch in _read_ahead(_unit_batches(unit, sources, columns)):
        values = [_column_values(batch.column(name)) for name in columns]
        for offset, row_values in enumerate(zip(*values)):
            yield file, first_row + offset, dict(zip(columns, row_values))


@dataclass
class UnitResult:
    records: list[ShardRecord]
    num_resumed: int


def convert_unit(unit: WorkUnit, schema: TaskSchema, sources: list[SourceFile], output: Path, verify: str,
                 on_progress: Callable[[int, int], None]) -> UnitResult:
    """Convert (or skip, when already done) every shard of one unit. on_progress(rows, bytes) is called as rows go."""
    done = {plan.index: load_done_record(output, plan) for plan in unit.shards}
    todo = [plan for plan in unit.shards if done[plan.index] is None]
    for plan in todo:  # made again from scratch: a tar of that name is an earlier run's, and must not outlive it
        (output / plan.name).unlink(missing_ok=True)  # (when all of this run's rows are rejected, none replaces it)
    resumed_rows = sum(plan.num_rows for plan in unit.shards if done[plan.index] is not None)
    if resumed_rows:
        on_progress(resumed_rows, 0)
    if todo:
        builders = {plan.index: ShardBuilder(plan, schema, sources, output, verify) for plan in todo}
        try:
            _build_shards(unit, schema, sources, output, builders, done, on_progress)
        except BaseException:  # Ctrl-C included: no half-written shard may stay behind
            for index, builder in builders.items():
                if done[index] is None:
                    builder.abort()
            raise
    return UnitResult([done[plan.index] for plan in unit.shards], num_resumed=len(unit.shards) - len(todo))


def _build_shards(unit, schema, sources, output, builders, done, on_progress) -> None:
    """Stream the unit's rows into the builders of the shards still to make, finishing each at its last row."""
    # rows arrive in plan order, so a cursor over the spans finds each row's shard
    spans = [(span, plan) for plan in unit.shards for span in plan.spans]
    cursor = 0
    remaining = {index: builder.plan.num_rows for index, builder in builders.items()}
    pending_rows = pending_bytes = 0
    ended: int | None = None  # the shard whose tar is being completed in the background

    def finish(index: int) -> None:
        done[index] = builders[index].finish()
        save_record(output, done[index])

    for file, row, values in _iter_unit_rows(unit, sources, list(schema.columns)):
        while cursor < len(spans) and not (spans[cursor][0].file == file and row < spans[cursor][0].stop):
            cursor += 1
        if cursor == len(spans) or row < spans[cursor][0].start:
            raise RuntimeError(f"{sources[file].path} row {row} is not where the plan put it; did the file change "
                               "while converting? Re-run the command.")
        plan = spans[cursor][1]
        if plan.index not in builders:
            continue  # its shard is already complete
        pending_bytes += builders[plan.index].add_row(file, row, values)
        pending_rows += 1
        remaining[plan.index] -= 1
        if remaining[plan.index] == 0:  # the shard's last row: finish it now, not at the end of the unit
            builders[plan.index].end()  # written while the next shard's rows are converted ...
            if ended is not None:
                finish(ended)  # ... and finished when that one ends: by then it is written
            ended = plan.index
        if pending_rows >= 64:
            on_progress(pending_rows, pending_bytes)
            pending_rows = pending_bytes = 0
    if ended is not None:
        finish(ended)
    on_progress(pending_rows, pending_bytes)
    missing = [index for index in builders if done[index] is None]
    if missing:
        raise RuntimeError(f"rows of shards {missing} were not found in their parquet files; did an input change "
                           "while converting? Re-run the command.")


# worker-process state, set once by the pool initializer (fork shares it without pickling per task)
_WORKER: dict = {}


def _init_worker(schema_task, sources, output, verify, progress_queue, parent: int) -> None:
    # the parent stops its workers (a Ctrl-C reaches the whole process group, a SIGTERM only the parent): workers
    # ignore Ctrl-C, and a SIGTERM ends one at once (not the handler the parent may have installed, inherited by fork)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent, interval_s=0.2)
    _WORKER.update(schema=SCHEMAS[schema_task], sources=sources, output=output, verify=verify, queue=progress_queue)


def _worker_convert(unit: WorkUnit) -> UnitResult:
    q = _WORKER["queue"]
    return convert_unit(unit, _WORKER["schema"], _WORKER["sources"], _WORKER["output"], _WORKER["verify"],
                        lambda rows, nbytes: q.put((rows, nbytes)))


# ----------------------------------------------------------------------------------------------------------------
# the whole conversion


@dataclass
class ConvertSummary:
    task: str
    num_rows: int
    num_samples: int
    num_rejects: int
    num_shards: int
    bytes: int
    seconds: float
    num_resumed: int  # shards found complete from an earlier run
    reject_reasons: Counter

    def line(self) -> str:
        mb = self.bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        resumed = f" ({self.num_resumed} resumed)" if self.num_resumed else ""
        counts = f"read {self.num_rows} rows, wrote {self.num_samples} samples, rejected {self.num_rejects}"
        return (f"{self.task}: {counts}, {self.num_shards} shards{resumed}, {mb:.1f} MB in {self.seconds:.1f} s "
                f"({rate:.1f} MB/s)")


def _prepare_output(output: Path, planned: set[str], task: str) -> None:
    """Create DIR, drop leftovers of an interrupted run (temp files) and shards of an older, different plan.

    Only a directory this converter made for the same task (it has STATE_DIR) is cleaned; in any other, shard files,
    manifest.json and rejects.jsonl are refused, and other files are left alone: an --output given by mistake must not
    lose another conversion, or anyone's files.
    """
    if output.is_dir() and not (output / STATE_DIR).is_dir():
        foreign = sorted(p.name for p in output.iterdir() if _SHARD_PATTERN.match(p.name) or p.name in _OUTPUT_FILES)
        if foreign:
            listed = ", ".join(foreign[:3]) + (f" (and {len(foreign) - 3} more)" if len(foreign) > 3 else "")
            raise ConvertError(f"--output {output} already holds {listed}, which this converter did not make (it has "
                               f"no {STATE_DIR}/, the converter's record of what it wrote: another tool's files, or "
                               f"a conversion whose {STATE_DIR}/ was removed); choose an empty or new directory, or "
                               "remove those files (shard-*.tar, manifest.json, rejects.jsonl) to convert into it")
    earlier = _output_task(output)
    if earlier is not None and earlier != task:
        raise ConvertError(f"--output {output} holds a conversion of {earlier} data and these inputs are {task}; "
                           f"choose another directory (one per task), or delete {output} to replace it")
    (output / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (output / STATE_DIR / "task").write_text(task)
    (output / MANIFEST).unlink(missing_ok=True)  # present only after a complete run
    _remove_temp_files(output)
    for path in output.iterdir():
        if _SHARD_PATTERN.match(path.name) and path.name not in planned:
            log.warning("removing %s: not part of this conversion's plan (left by an earlier run)", path)
            path.unlink()
            _record_path(output, path.name).unlink(missing_ok=True)


def _output_task(output: Path) -> str | None:
    """The task an earlier conversion into `output` was of (an unfinished one's too), or None."""
    for path, read in ((output / STATE_DIR / "task", lambda text: text.strip()),
                       (output / MANIFEST, lambda text: parse_manifest(text, MANIFEST)["task"])):
        try:
            return read(path.read_text()) or None
        except (OSError, ValueError):
            continue
    return None


def _remove_temp_files(output: Path) -> None:
    """Drop what a killed process was writing: shards, records and outputs under their temporary names (only the
    converter's own: other files in DIR are not its to delete)."""
    for path in output.glob("*.tmp"):
        name = path.name.removesuffix(".tmp")
        if _SHARD_PATTERN.match(name) or name in _OUTPUT_FILES:
            path.unlink(missing_ok=True)
    for path in (output / STATE_DIR).glob("*.tmp"):  # the state directory is the converter's alone
        path.unlink(missing_ok=True)


def _run_units(units, schema, sources, output, options, on_progress) -> list[UnitResult]:
    if options.workers == 1 or len(units) <= 1:
        return [convert_unit(u, schema, sources, output, options.verify, on_progress) for u in units]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")  # fork: no re-import per worker
    progress_queue = context.Queue()
    # an executor, not a multiprocessing.Pool: a worker that dies (out of memory, SIGBUS on an input cut short) breaks
    # it, which raises here; a Pool would quietly start another worker and wait forever for the lost unit
    pool = ProcessPoolExecutor(min(options.workers, len(units)), mp_context=context, initializer=_init_worker,
                               initargs=(schema.task, sources, output, options.verify, progress_queue, os.getpid()))
    try:
        futures = [pool.submit(_worker_convert, unit) for unit in units]
        running = futures
        while running:
            done, running = wait(running, timeout=0.2, return_when=FIRST_EXCEPTION)
            _drain(progress_queue, on_progress)
            for future in done:
                future.result()  # a worker's error is raised here, in the caller, as soon as it happens
    except BrokenProcessPool:  # the executor has killed the other workers too, maybe mid-shard
        pool.shutdown(wait=True, cancel_futures=True)
        _remove_temp_files(output)
        raise ConvertError("a converter worker process died (killed for memory, or an input file changed while "
                           "it was read); the shards finished so far are kept: re-run the same command to resume"
                           ) from None
    except BaseException:  # a worker's error, Ctrl-C, or SIGTERM (the CLI raises KeyboardInterrupt for it)
        _stop_workers(pool)  # now: a unit can take minutes, and a worker may have more units queued
        _remove_temp_files(output)  # the shards they were writing (complete ones, with their records, stay)
        raise
    pool.shutdown()
    _drain(progress_queue, on_progress)
    return [future.result() for future in futures]


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers and wait for them. A shard becomes complete by a rename followed by its record, each
    atomic, so a worker killed anywhere leaves at most temporary files, or a tar without a record (made again)."""
    processes = list((pool._processes or {}).values())  # no public way before Python 3.14's kill_workers()
    for process in processes:
        try:
            process.kill()
        except (ValueError, OSError):  # already closed, or gone
            pass
    pool.shutdown(wait=True, cancel_futures=True)  # the executor finds them dead and cleans up after them


def _drain(progress_queue, on_progress) -> None:
    while True:
        try:
            rows, nbytes = progress_queue.get_nowait()
        except queue.Empty:
            return
        on_progress(rows, nbytes)


def convert(options: ConvertOptions) -> ConvertSummary:
    """Run a conversion (see the module docstring). Raises ConfigError / ConvertError before any work when refused."""
    problems = Problems()
    options.check(problems)
    problems.raise_if_any()
    start = time.perf_counter()
    schema, sources = open_sources(options.inputs, options.task)
    units = plan_work(sources, schema, options)
    output = Path(options.output)
    _prepare_output(output, {plan.name for unit in units for plan in unit.shards}, schema.task)

    total_rows = sum(s.num_rows for s in sources)
    bar = _progress_bar(total_rows, schema.task, options.progress)
    written = [0]

    def on_progress(rows: int, nbytes: int) -> None:
        written[0] += nbytes
        if bar is not None:
            bar.update(rows)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{written[0] / 1e6 / elapsed:.1f} MB/s", refresh=False)

    try:
        results = _run_units(units, schema, sources, output, options, on_progress)
    finally:
        if bar is not None:
            bar.close()
    records = [r for result in results for r in result.records]
    _write_outputs(output, schema, options, records)
    reasons = Counter(f"{line['column']}: {_reason_kind(line['reason'])}" for r in records for line in r.rejects)
    return ConvertSummary(
        task=schema.task, num_rows=total_rows, num_samples=sum(r.num_samples for r in records),
        num_rejects=sum(len(r.rejects) for r in records), num_shards=sum(1 for r in records if r.num_samples),
        bytes=sum(r.bytes for r in records), seconds=time.perf_counter() - start,
        num_resumed=sum(result.num_resumed for result in results), reject_reasons=reasons)


def _reason_kind(reason: str) -> str:
    """The stable head of a reason (before the first '(' or ':'), for counting rejects by kind: reasons put the
    values they quote (a caption's int, a file's first bytes) after it, so that a kind is not one per value."""
    return re.split(r"[(:]", reason, maxsplit=1)[0].strip()


def _progress_bar(total: int, task: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"convert {task}", unit="rows", file=sys.stderr, dynamic_ncols=True)


def _write_outputs(output: Path, schema: TaskSchema, options: ConvertOptions, records: list[ShardRecord]) -> None:
    rejects = "".join(json.dumps(line, ensure_ascii=False) + "\n" for r in records for line in r.rejects)
    write_atomic(output / "rejects.jsonl", rejects)
    shards = [{"name": r.name, "num_samples": r.num_samples, "bytes": r.bytes, "crc32": r.crc32, "media": r.media}
              for r in records if r.num_samples]
    manifest = {
        "format": FORMAT,
        "task": schema.task,
        "num_samples": sum(r.num_samples for r in records),
        "num_rejects": sum(len(r.rejects) for r in records),
        "num_rows": sum(r.num_rows for r in records),
        "verify": options.verify,
        "media_columns": {c.member: c.kind.value for c in schema.media},
        "text_columns": list(schema.text_columns),
        "shards": shards,
    }
    counted = [r.system_prompts for r in records if r.num_samples]
    if "caption_i" in schema.text_columns and None not in counted:  # what inference prompts with (a part uncounted:
        # nothing, rather than a minority's; lance_ds.trainer.trained_system_prompt)
        manifest["system_prompts"] = commonest(sum(map(Counter, counted), Counter()))
    write_atomic(output / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


__all__ = [
    "ConfigError", "ConvertError", "ConvertOptions", "ConvertSummary", "convert", "plan_work",
    "open_sources", "find_parquet_files", "sanitize_stem", "FORMAT", "STATE_DIR",
]  # ConfigError is re-exported: convert() raises it for bad options
