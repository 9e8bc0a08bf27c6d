"""Converter: round trip of all six tasks with bad rows mixed in, stock readers, determinism, resumability, refusals."""

import dataclasses
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from lance_ds.config.core import ConfigError, Problems
from lance_ds.data import convert as convert_module
from lance_ds.data.convert import STATE_DIR, ConvertError, ConvertOptions, convert
from lance_ds.data.manifest import read_manifest
from lance_ds.data.media import encode_video
from lance_ds.data.schemas import SCHEMAS, MediaKind

ROOT = Path(__file__).resolve().parents[2]
MEMBER_NAME = re.compile(r"^[0-9]{5}-[A-Za-z0-9_-]+-[0-9]{9}\.(json|[a-z_]+\.[a-z0-9]+)$")


# ----------------------------------------------------------------------------------------------------------------
# test data made on the fly


def pil_bytes(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# (bytes, extension, width, height): grayscale, RGBA, CMYK, odd sizes, PNG / JPEG / TIFF
GOOD_IMAGES = [
    (pil_bytes("RGB", (17, 11), "PNG", 0), "png", 17, 11),
    (pil_bytes("RGB", (16, 16), "JPEG", 1), "jpg", 16, 16),
    (pil_bytes("L", (9, 13), "PNG", 2), "png", 9, 13),
    (pil_bytes("RGBA", (12, 8), "PNG", 3), "png", 12, 8),
    (pil_bytes("CMYK", (10, 10), "JPEG", 4), "jpg", 10, 10),
    (pil_bytes("RGB", (7, 5), "TIFF", 5), "tiff", 7, 5),
]


def video_bytes(frames: int, width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return encode_video(pixels, fps=8, codec="mpeg4")


# (bytes, extension, width, height, frames): a 1-frame video, odd sizes
GOOD_VIDEOS = [
    (video_bytes(3, 16, 12, 0), "mp4", 16, 12, 3),
    (video_bytes(1, 16, 16, 1), "mp4", 16, 16, 1),
    (video_bytes(2, 17, 11, 2), "mp4", 17, 11, 2),
]

TEXTS = ["a red circle", "Größe: 🟥 über 中文 «quoted» \"q\" \\ back\nnew line\ttab", "x" * 200_000, "é" * 3, " lead"]

# (what to put in the media column, reject reason expected)
BAD_MEDIA = {
    MediaKind.IMAGE: [(None, "null value"), (b"", "empty bytes"), (GOOD_IMAGES[0][0][:60], "not a readable image"),
                      (np.random.default_rng(9).bytes(500), "not a readable image")],
    MediaKind.VIDEO: [(None, "null value"), (GOOD_VIDEOS[0][0][: len(GOOD_VIDEOS[0][0]) // 2], "not a readable video"),
                      (np.random.default_rng(9).bytes(500), "not a readable video")],
}


GOOD_INFO = {g[0]: g[1:] for g in GOOD_IMAGES + GOOD_VIDEOS}  # bytes -> (extension, width, height[, frames])


def make_rows(task: str) -> tuple[list[dict], dict[int, tuple[str, str]], dict[int, dict]]:
    """Rows of one task, a bad row after each good one: (rows, row -> (column, reason) of each bad row,
    row -> {member: (extension, width, height[, frames])} of each good row)."""
    schema = SCHEMAS[task]
    good_rows = []
    for i in range(9):
        row = {}
        for j, column in enumerate(schema.texts):  # unicode, 200k-character, and empty (where allowed) texts
            row[column.name] = "" if column.may_be_empty and (i + j) % 3 == 0 else TEXTS[(i + j) % len(TEXTS)]
        for j, column in enumerate(schema.media):
            good = GOOD_IMAGES if column.kind is MediaKind.IMAGE else GOOD_VIDEOS
            row[column.name] = good[(i + j) % len(good)][0]
        good_rows.append(row)
    bad_rows = [(dict(good_rows[0], **{column.name: value}), column.name, reason)
                for column in schema.media for value, reason in BAD_MEDIA[column.kind]]
    text = schema.texts[-1].name  # caption or caption_a: never empty, never null
    bad_rows.append((dict(good_rows[0], **{text: None}), text, "null value"))

    rows, rejects = [], {}
    for good, bad in zip(good_rows, bad_rows + [None] * len(good_rows)):
        rows.append(good)
        if bad is not None:
            rejects[len(rows)] = bad[1:]
            rows.append(bad[0])
    assert len(rejects) == len(bad_rows)
    infos = {i: {c.member: GOOD_INFO[row[c.name]] for c in schema.media}
             for i, row in enumerate(rows) if i not in rejects}
    return rows, rejects, infos


def write_parquet(path: Path, task: str, rows: list[dict], row_group_size: int = 4, types: dict | None = None) -> Path:
    schema = SCHEMAS[task]
    types = types or {}
    arrays = {c: pa.array([r[c] for r in rows], types.get(c, pa.string())) for c in schema.text_columns}
    arrays.update({c: pa.array([r[c] for r in rows], types.get(c, pa.binary())) for c in schema.media_columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)
    return path


def run(inputs, output, **kw) -> convert_module.ConvertSummary:
    return convert(ConvertOptions(inputs=[str(i) for i in inputs], output=str(output), progress=False, **kw))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def read_rejects(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def shard_urls(output: Path) -> list[str]:
    return [str(output / s["name"]) for s in read_manifest(output)["shards"]]


# ----------------------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("task", list(SCHEMAS))
def test_round_trip_good_rows_exact_bad_rows_rejected(task, tmp_path):
    schema = SCHEMAS[task]
    rows, rejects, infos = make_rows(task)
    good_file = write_parquet(tmp_path / "in" / "good.parquet", task, rows)
    # a second file whose text column holds integers, and a third whose media column holds strings (paths)
    typed_rows = [{c: (7 if c in schema.text_columns else rows[0][c]) for c in schema.columns} for _ in range(2)]
    int_file = write_parquet(tmp_path / "in" / "ints.parquet", task, typed_rows,
                             types={c: pa.int64() for c in schema.text_columns})
    path_rows = [{c: ("/data/x.bin" if c in schema.media_columns else rows[0][c]) for c in schema.columns}]
    path_file = write_parquet(tmp_path / "in" / "paths.parquet", task, path_rows,
                              types={c: pa.string() for c in schema.media_columns})
    out = tmp_path / "out"
    summary = run([tmp_path / "in"], out, samples_per_shard=4)

    num_bad = len(rejects) + len(typed_rows) + len(path_rows)
    assert (summary.task, summary.num_samples, summary.num_rejects) == (task, len(infos), num_bad)
    assert summary.num_rows == len(rows) + len(typed_rows) + len(path_rows)
    manifest = read_manifest(out)
    assert manifest["task"] == task and manifest["num_samples"] == len(infos) and manifest["num_rejects"] == num_bad
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(infos)
    assert all(s["bytes"] == (out / s["name"]).stat().st_size for s in manifest["shards"])

    # rejects: file, row, column and reason of every bad row, and nothing else
    lines = read_rejects(out)
    got = {(r["file"], r["row"]): (r["column"], r["reason"]) for r in lines}
    assert len(got) == len(lines) == num_bad
    for row, (column, reason) in rejects.items():
        assert got[(str(good_file), row)][0] == column and reason in got[(str(good_file), row)][1]
    for row in range(len(typed_rows)):
        assert got[(str(int_file), row)][0] == schema.text_columns[0]
        assert "expected a string, got int" in got[(str(int_file), row)][1]
    assert got[(str(path_file), 0)][0] == schema.media_columns[0] and "got a string" in got[(str(path_file), 0)][1]

    # stock webdataset reads every good row back, texts and media byte-exact
    seen = set()
    for sample in wds.WebDataset(shard_urls(out), shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and meta["task"] == task
        assert meta["source"]["file"] == str(good_file)
        row = meta["source"]["row"]
        assert row not in rejects and row not in seen
        seen.add(row)
        for column in schema.text_columns:
            assert meta[column] == rows[row][column]
        for column in schema.media:
            ext, width, height, *frames = infos[row][column.member]
            assert sample[f"{column.member}.{ext}"] == rows[row][column.name]
            media_meta = meta["media"][column.member]
            assert (media_meta["format"], media_meta["width"], media_meta["height"]) == (ext, width, height)
            assert media_meta["bytes"] == len(rows[row][column.name])
            if frames:
                assert media_meta["frames"] == frames[0] and media_meta["fps"] == 8.0
                assert media_meta["duration"] == pytest.approx(frames[0] / 8.0, abs=1e-6)
    assert seen == set(infos)

    # stock tarfile: safe member names; per-shard media stats add up
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            names = tar.getnames()
            assert all(MEMBER_NAME.match(n) and "/" not in n and ".." not in n for n in names), names
            assert len(names) == shard["num_samples"] * (1 + len(schema.media))
        for member, stats in shard["media"].items():
            assert stats["count"] == shard["num_samples"]
            assert stats["width"]["min"] <= stats["width"]["mean"] <= stats["width"]["max"]
    assert manifest["media_columns"] == {c.member: c.kind.value for c in schema.media}
    if "caption_i" in schema.text_columns:  # the system prompts the rows carry, counted ("": blank, the default)
        truth = Counter(rows[row]["caption_i"] or "" for row in infos)
        counted = manifest["system_prompts"]
        assert counted and all(truth[text] == n for text, n in counted.items()), (counted, truth)
        assert max(counted.values()) == max(truth.values())
    else:
        assert "system_prompts" not in manifest


def test_a_rerun_over_shards_converted_before_the_system_prompt_count_leaves_it_out(tmp_path):
    """Shards written before the converter counted caption_i are reused by a re-run: counting only the new ones would
    make a minority's system prompt the task's; the manifest then has no count (inference: the group's or default)."""
    rows, _, infos = make_rows("i2t")
    write_parquet(tmp_path / "in.parquet", "i2t", [rows[row] for row in infos])
    out = tmp_path / "out"
    run([tmp_path / "in.parquet"], out, samples_per_shard=2)
    assert sum(read_manifest(out)["system_prompts"].values()) == len(infos)
    for record in (out / STATE_DIR).glob("*.json"):  # as an older converter wrote them
        saved = json.loads(record.read_text())
        del saved["system_prompts"]
        record.write_text(json.dumps(saved))
    (out / "manifest.json").unlink()
    assert run([tmp_path / "in.parquet"], out, samples_per_shard=2).num_resumed > 0
    assert "system_prompts" not in read_manifest(out)


def test_stock_tar_lists_and_extracts(tmp_path):
    rows, _, infos = make_rows("t2i")
    write_parquet(tmp_path / "in.parquet", "t2i", rows)
    out = tmp_path / "out"
    run([tmp_path / "in.parquet"], out, samples_per_shard=100)
    shard = shard_urls(out)[0]
    listing = subprocess.run(["tar", "-tf", shard], check=True, capture_output=True, text=True).stdout.split()
    assert len(listing) == 2 * len(infos)
    extracted = tmp_path / "x"
    extracted.mkdir()
    subprocess.run(["tar", "-xf", shard, "-C", str(extracted)], check=True, capture_output=True)
    key = listing[1].split(".")[0]
    row = json.loads((extracted / f"{key}.json").read_text(encoding="utf-8"))["source"]["row"]
    assert (extracted / listing[1]).read_bytes() == rows[row]["image_bytes"]


def test_keys_unique_and_sanitised_across_inputs(tmp_path):
    rows = make_rows("t2i")[0][:3]
    a = write_parquet(tmp_path / "a" / "part.0 (copy)..parquet", "t2i", rows)
    b = write_parquet(tmp_path / "b" / "part.0 (copy)..parquet", "t2i", rows)
    c = write_parquet(tmp_path / "../" / tmp_path.name / "c" / "..%2F..%2Fetc.parquet", "t2i", rows)
    out = tmp_path / "out"
    run([a, b, c], out)
    keys = [s["__key__"] for s in wds.WebDataset(shard_urls(out), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 9 - 3  # the first three rows hold one bad row per file
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys), keys
    assert {k.split("-")[0] for k in keys} == {"00000", "00001", "00002"}


def test_write_errors_reach_the_caller_and_leave_no_partial_shard(many_groups, tmp_path, monkeypatch):
    def full_disk(fd, pieces):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        run([many_groups], out, samples_per_shard=5)
    assert not list(out.glob("*.tar*")) and not (out / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# the plan


@pytest.mark.parametrize("seed", range(6))
def test_plan_covers_every_row_once_in_order_within_the_shard_size(seed):
    rng = np.random.default_rng(seed)
    sources = []
    for index in range(int(rng.integers(1, 4))):
        rows = tuple(int(r) for r in rng.integers(0, 40, int(rng.integers(1, 6))))  # empty row groups too
        sizes = tuple(int(r * rng.integers(100, 5000)) for r in rows)
        sources.append(convert_module.SourceFile(index, f"f{index}.parquet", f"{index:05d}-f", 1, 1, rows, sizes))
    samples_per_shard = int(rng.integers(1, 30))
    for options in (ConvertOptions(samples_per_shard=samples_per_shard), ConvertOptions(shard_size_mb=0.02)):
        units = convert_module.plan_work(sources, SCHEMAS["t2i"], options)
        plans = [plan for unit in units for plan in unit.shards]
        assert [p.index for p in plans] == list(range(len(plans)))
        covered = [(span.file, row) for plan in plans for span in plan.spans for row in range(span.start, span.stop)]
        assert covered == [(s.index, r) for s in sources for r in range(s.num_rows)]  # each row once, in order
        grouped = [(f, g) for unit in units for f, g in unit.groups]
        assert grouped == [(s.index, g) for s in sources for g, n in enumerate(s.group_rows) if n]  # each group once
        if options.samples_per_shard:
            assert all(0 < p.num_rows <= samples_per_shard for p in plans)
            # units hold whole groups: only a unit's last shard (or a lone big group's) may be short
            assert sum(p.num_rows for p in plans) == sum(s.num_rows for s in sources)
        assert len({p.fingerprint for p in plans}) == len(plans)


def test_plan_by_bytes_balances_shards():
    source = convert_module.SourceFile(0, "f.parquet", "00000-f", 1, 1, (100, 100), (0, 0))
    overhead = convert_module._row_overhead(source, SCHEMAS["t2i"])  # tar headers, padding, KEY.json's fields
    source = dataclasses.replace(source, group_bytes=(round(100 * (5000 - overhead)), round(100 * (15000 - overhead))))
    units = convert_module.plan_work([source], SCHEMAS["t2i"], ConvertOptions(shard_size_mb=0.5))
    weights = []
    for plan in (p for u in units for p in u.shards):
        rows = (row for span in plan.spans for row in range(span.start, span.stop))
        weights.append(sum(5000 if row < 100 else 15000 for row in rows))  # a row's bytes in the shard
    assert len(weights) == 4 and max(weights) <= 0.5e6 + 15000 and min(weights) >= 0.5e6 - 15000, weights


# ----------------------------------------------------------------------------------------------------------------
# determinism and resumability


@pytest.fixture
def many_groups(tmp_path) -> Path:
    rows, _, _ = make_rows("i2t")
    return write_parquet(tmp_path / "in" / "data.parquet", "i2t", rows * 3, row_group_size=3)


def test_same_output_twice_and_for_any_number_of_workers(many_groups, tmp_path):
    one = run([many_groups], tmp_path / "one", samples_per_shard=5, workers=1)
    two = run([many_groups], tmp_path / "two", samples_per_shard=5, workers=2)
    run([many_groups], tmp_path / "again", samples_per_shard=5, workers=1)
    assert one.num_shards > 4 and one.num_rejects > 0
    reference = snapshot(tmp_path / "one")
    assert snapshot(tmp_path / "two") == reference
    assert snapshot(tmp_path / "again") == reference
    assert (one.num_samples, one.num_rejects, one.num_shards) == (two.num_samples, two.num_rejects, two.num_shards)


def test_resume_redoes_only_damaged_shards_and_gives_identical_output(many_groups, tmp_path):
    reference_dir = tmp_path / "ref"
    first = run([many_groups], reference_dir, samples_per_shard=5)
    reference = snapshot(reference_dir)
    names = [s["name"] for s in read_manifest(reference_dir)["shards"]]

    out = tmp_path / "out"
    run([many_groups], out, samples_per_shard=5, workers=2)
    (out / names[0]).unlink()  # deleted
    data = bytearray((out / names[1]).read_bytes())
    data[700] ^= 0xFF  # corrupted, same size
    (out / names[1]).write_bytes(bytes(data))
    (out / names[2]).write_bytes((out / names[2]).read_bytes()[:1000])  # truncated
    (out / (names[3] + ".tmp")).write_bytes(b"half a shard")  # left by a killed run
    (out / "manifest.json").unlink()
    resumed = run([many_groups], out, samples_per_shard=5, workers=2)
    assert resumed.num_resumed == first.num_shards - 3
    assert snapshot(out) == reference
    for shard in read_manifest(out)["shards"]:
        assert shard["crc32"] == f"{zlib.crc32((out / shard['name']).read_bytes()):08x}"

    untouched = run([many_groups], out, samples_per_shard=5)
    assert untouched.num_resumed == first.num_shards and snapshot(out) == reference


def test_verify_none_skips_the_checksum_and_resumes_by_size(many_groups, tmp_path):
    first = run([many_groups], tmp_path / "ref", samples_per_shard=5, verify="none")
    reference = snapshot(tmp_path / "ref")
    names = [s["name"] for s in read_manifest(tmp_path / "ref")["shards"]]
    assert [s["crc32"] for s in read_manifest(tmp_path / "ref")["shards"]] == [None] * len(names)

    out = tmp_path / "out"
    run([many_groups], out, samples_per_shard=5, verify="none")
    (out / names[0]).unlink()
    (out / names[1]).write_bytes((out / names[1]).read_bytes()[:1000])  # truncated
    resumed = run([many_groups], out, samples_per_shard=5, verify="none")
    assert resumed.num_resumed == first.num_shards - 2
    assert snapshot(out) == reference
    checked = run([many_groups], out, samples_per_shard=5)  # --verify full redoes every shard, with CRCs
    assert checked.num_resumed == 0 and all(s["crc32"] for s in read_manifest(out)["shards"])


def _counting(n: int, closed: list, fail_at: int | None = None):
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError("bad page")
            yield i
    finally:
        closed.append(True)


def test_read_ahead_hands_over_items_and_errors_and_stops_with_its_consumer():
    closed: list = []
    assert list(convert_module._read_ahead(_counting(50, closed))) == list(range(50)) and closed == [True]
    closed.clear()
    with pytest.raises(ValueError, match="bad page"):
        list(convert_module._read_ahead(_counting(50, closed, fail_at=7)))
    assert closed == [True]
    closed.clear()
    reader = convert_module._read_ahead(_counting(10**6, closed), depth=2)
    assert next(reader) == 0
    reader.close()  # the consumer stops early (an error, Ctrl-C): the producer stops and closes its input
    assert closed == [True]
    assert not [t for t in threading.enumerate() if t.name == "parquet-reader"]


def test_the_next_row_groups_are_read_ahead_from_the_disk_and_nothing_else(tmp_path, monkeypatch):
    """Each row group's converted column chunks are asked of the disk (posix_fadvise WILLNEED) before the group is
    read, at most AHEAD groups early, whole, in pieces of at most PIECE bytes (Linux reads at most a readahead
    window per call); a column that is not converted is never asked for."""
    rows = [{"notes": "z" * 5000, "caption": f"c{i}", "image_bytes": GOOD_IMAGES[i % 2][0]} for i in range(12)]
    path = tmp_path / "t2i.parquet"
    pq.write_table(pa.table({"notes": [r["notes"] for r in rows], "caption": [r["caption"] for r in rows],
                             "image_bytes": pa.array([r["image_bytes"] for r in rows], pa.binary())}),
                   path, row_group_size=2, compression="none")
    schema, sources = convert_module.open_sources([str(path)], "auto")
    meta = pq.ParquetFile(path).metadata
    chunks = {}  # (group, column) -> (offset, length)
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            chunks[g, chunk.path_in_schema] = (start, chunk.total_compressed_size)
    piece = 1000  # (the chunks here are a few kB: each is asked for in several pieces)
    monkeypatch.setattr(convert_module._DiskReadAhead, "PIECE", piece)
    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append((offset, length)))

    def asked_groups() -> list[int]:
        return sorted({g for (g, _), (start, length) in chunks.items()
                       if any(start <= offset < start + length for offset, _ in advised)})

    unit = convert_module.WorkUnit(groups=[(0, g) for g in range(1, 6)], shards=[])  # a unit of groups 1..5
    ahead = convert_module._DiskReadAhead.AHEAD
    for _, first_row, _ in convert_module._unit_batches(unit, sources, list(schema.columns)):
        group = first_row // 2
        assert asked_groups() == list(range(1, min(group + ahead, 5) + 1))  # this group and AHEAD more, none past it
    assert all(0 < length <= piece for _, length in advised)
    wanted = sorted(chunks[g, c] for g in range(1, 6) for c in ("caption", "image_bytes"))
    assert any(length > piece for _, length in wanted)
    assert _joined(sorted(advised)) == _joined(wanted)  # the pieces cover the converted chunks exactly


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (offset, length) ranges, those that touch joined into one."""
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def test_interrupted_run_leaves_no_partial_shard_and_resumes(many_groups, tmp_path, monkeypatch):
    reference_dir = tmp_path / "ref"
    run([many_groups], reference_dir, samples_per_shard=5)
    out = tmp_path / "out"
    original = convert_module.ShardBuilder.add_row
    calls = {"n": 0}

    def failing_add_row(self, *args):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-shard
        return original(self, *args)

    monkeypatch.setattr(convert_module.ShardBuilder, "add_row", failing_add_row)
    with pytest.raises(KeyboardInterrupt):
        run([many_groups], out, samples_per_shard=5)
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.glob("shard-*.tar"))  # the shards completed before the interruption
    assert finished and len(finished) == len(list((out / convert_module.STATE_DIR).glob("*.json")))
    monkeypatch.setattr(convert_module.ShardBuilder, "add_row", original)
    resumed = run([many_groups], out, samples_per_shard=5)
    assert resumed.num_resumed == len(finished) < resumed.num_shards
    assert snapshot(out) == snapshot(reference_dir)


def test_a_worker_that_dies_fails_the_run_and_a_rerun_resumes(many_groups, tmp_path, monkeypatch):
    real = convert_module.convert_unit

    def dying(unit, *args, **kwargs):  # runs in a forked worker: stands in for the OOM killer, or SIGBUS
        if unit.shards[0].index > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(unit, *args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_unit", dying)
    out, outcome = tmp_path / "out", {}

    def attempt():
        try:
            run([many_groups], out, samples_per_shard=5, workers=2)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "convert() still waits for a worker that died"
    assert isinstance(outcome.get("error"), ConvertError) and "re-run the same command" in str(outcome["error"])
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    monkeypatch.setattr(convert_module, "convert_unit", real)
    run([many_groups], out, samples_per_shard=5, workers=2)
    run([many_groups], tmp_path / "fresh", samples_per_shard=5)
    assert snapshot(out) == snapshot(tmp_path / "fresh")


# the converter's command line, each row slowed down (sleeping: the CPUs stay free) so that it can be stopped mid-way
_SLOW_CLI = """
import runpy, sys, time
from lance_ds.data import convert
add_row = convert.ShardBuilder.add_row
def slow_add_row(self, *args):
    time.sleep(0.02)
    return add_row(self, *args)
convert.ShardBuilder.add_row = slow_add_row
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _still_running(processes: list, timeout: float) -> list:
    """Those of `processes` that still run after up to `timeout` seconds (zombies waiting to be reaped do not)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C", "SIGKILL"])
def test_a_stopped_or_killed_cli_leaves_no_worker_and_a_rerun_resumes(tmp_path, stop):
    rows, _, _ = make_rows("i2t")
    source = write_parquet(tmp_path / "in.parquet", "i2t", rows * 12, row_group_size=3)
    tool = str(ROOT / "tools" / "parquet_to_wds.py")
    out = tmp_path / "out"
    args = ["--input", str(source), "--output", str(out), "--samples-per-shard", "4", "--workers", "2", "--no-progress"]
    log = tmp_path / "stderr.txt"  # (not a pipe: workers that outlive the converter would hold it open)
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, tool, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)  # its own process group
    try:
        parent, deadline = psutil.Process(proc.pid), time.monotonic() + 60
        while len(parent.children()) < 2 or not list((out / convert_module.STATE_DIR).glob("shard-*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)  # both workers at work, a shard finished
        workers = parent.children(recursive=True)
        if stop == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole group
        else:
            proc.send_signal(getattr(signal, stop))  # the parent alone, as `kill` and schedulers do
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    alive = _still_running(workers, timeout=5)
    for worker in alive:
        worker.kill()
    assert not alive, "workers outlived the converter"
    if stop != "SIGKILL":
        stderr = log.read_text()
        assert proc.returncode == {"SIGTERM": 143, "Ctrl-C": 130}[stop], stderr
        assert f"stopped by {stop}" in stderr and "re-run the same command" in stderr and "Traceback" not in stderr
    assert not (out / "manifest.json").exists()

    again = subprocess.run([sys.executable, tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert re.search(r"\([1-9][0-9]* resumed\)", again.stdout), again.stdout
    run([source], tmp_path / "fresh", samples_per_shard=4)
    assert snapshot(out) == snapshot(tmp_path / "fresh")


def test_a_shard_whose_rows_are_now_all_rejected_leaves_no_old_tar(tmp_path):
    rows = make_rows("t2i")[0][:4]
    source = write_parquet(tmp_path / "in.parquet", "t2i", rows)
    out = tmp_path / "out"
    run([source], out, samples_per_shard=2)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    write_parquet(source, "t2i", [dict(row, image_bytes=None) if i < 2 else row for i, row in enumerate(rows)])
    again = run([source], out, samples_per_shard=2)  # the first shard's rows are all rejected now
    assert [s["name"] for s in read_manifest(out)["shards"]] == ["shard-000001.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar"]  # a glob finds no stale samples
    assert (again.num_samples, again.num_rejects) == (1, 3)
    assert run([source], out, samples_per_shard=2).num_resumed == 2  # both shards, the empty one included


def _unchecked_text(values: list[bytes], kind: str) -> pa.Array:
    """A text column holding `values` as they are, UTF-8 or not (neither arrow nor parquet checks)."""
    binary = {"string": pa.binary(), "large_string": pa.large_binary(), "string_view": pa.binary_view()}
    if kind == "dictionary":  # what pandas' Categorical columns become
        encoded = pa.array(values, pa.binary()).dictionary_encode()
        return pa.DictionaryArray.from_arrays(encoded.indices, encoded.dictionary.view(pa.string()))
    return pa.array(values, binary[kind]).view(getattr(pa, kind)())


@pytest.mark.parametrize("kind", ["string", "large_string", "string_view", "dictionary"])
def test_text_that_is_not_utf8_in_a_string_column_rejects_its_row(tmp_path, kind):
    rows = make_rows("t2i")[0][:3]
    captions = _unchecked_text([b"fine", b"bad \xff\xfe", b"also fine"], kind)
    table = pa.table({"caption": captions, "image_bytes": [r["image_bytes"] for r in rows]})
    pq.write_table(table, tmp_path / "in.parquet")
    assert kind in str(pq.read_schema(tmp_path / "in.parquet").field("caption").type)  # read back as written
    summary = run([tmp_path / "in.parquet"], tmp_path / "out")
    assert (summary.num_samples, summary.num_rejects) == (2, 1)
    [reject] = read_rejects(tmp_path / "out")
    assert (reject["row"], reject["column"]) == (1, "caption") and "not valid UTF-8" in reject["reason"]
    texts = [json.loads(s["json"])["caption"] for s in wds.WebDataset(shard_urls(tmp_path / "out"), shardshuffle=False)]
    assert texts == ["fine", "also fine"]


def test_hugging_face_image_structs_convert_like_binary_columns(tmp_path):
    """Hugging Face datasets store an Image / Video feature as struct<bytes, path>: its bytes are the medium (every
    row was rejected, "got dict"); a row with no bytes (stored by path: said so) or a null struct is rejected."""
    images = [pil_bytes("RGB", (64, 64), "PNG", i) for i in range(12)]  # ~12 kB each
    feature = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    structs = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)] + [{"bytes": None, "path": "x.png"},
                                                                                  None]
    table = pa.table({"caption": [f"noise {i}" for i in range(len(structs))], "image_bytes": pa.array(structs, feature)})
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=5)
    summary = run([tmp_path / "hf.parquet"], tmp_path / "out", shard_size_mb=0.05)
    assert (summary.num_samples, summary.num_rejects) == (12, 2)
    assert [(r["row"], r["column"], r["reason"]) for r in read_rejects(tmp_path / "out")] == [
        (12, "image_bytes", "the struct holds only a path ('x.png'), no bytes: embed each file's bytes in the "
                            "parquet (the struct's 'bytes' field) before converting"),
        (13, "image_bytes", "null value")]
    samples = list(wds.WebDataset(shard_urls(tmp_path / "out"), shardshuffle=False))
    assert [s["image.png"] for s in samples] == images
    assert len(read_manifest(tmp_path / "out")["shards"]) >= 3  # sized by the structs' bytes


def test_changed_options_replace_the_old_plan(many_groups, tmp_path):
    out = tmp_path / "out"
    run([many_groups], out, samples_per_shard=3)
    run([many_groups], out, samples_per_shard=9)
    fresh = tmp_path / "fresh"
    run([many_groups], fresh, samples_per_shard=9)
    assert snapshot(out) == snapshot(fresh)


def test_foreign_shards_in_the_output_are_refused_not_deleted(many_groups, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(ConvertError, match="did not make"):
        run([many_groups], out, samples_per_shard=5)
    assert (out / "shard-000000.tar").read_bytes() == b"someone else's"


def test_a_directory_the_converter_did_not_write_keeps_its_files(many_groups, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "draft.tmp").write_text("a draft")
    (out / "notes.txt").write_text("notes")
    for name in ("manifest.json", "rejects.jsonl"):  # another tool's outputs, or another run's without its state
        (out / name).write_text("someone else's")
        before = snapshot(out)
        with pytest.raises(ConvertError, match=rf"already holds {name}.*did not make.*choose an empty or new"):
            run([many_groups], out, samples_per_shard=5)
        assert snapshot(out) == before
        (out / name).unlink()
    run([many_groups], out, samples_per_shard=5)  # other files may share the directory: they are left alone
    (out / "shard-000000.tar.tmp").write_text("left by a killed run")
    run([many_groups], out, samples_per_shard=5)
    assert (out / "draft.tmp").read_text() == "a draft" and (out / "notes.txt").read_text() == "notes"
    assert not (out / "shard-000000.tar.tmp").exists()


def test_another_tasks_output_is_refused_not_replaced(many_groups, tmp_path):
    out = tmp_path / "out"
    run([many_groups], out, samples_per_shard=5)  # i2t
    before = snapshot(out)
    rows, _, _ = make_rows("t2i")
    other = write_parquet(tmp_path / "t2i.parquet", "t2i", rows)
    with pytest.raises(ConvertError, match="holds a conversion of i2t data and these inputs are t2i"):
        run([other], out)
    assert snapshot(out) == before
    (out / "manifest.json").unlink()  # an unfinished i2t conversion is recognised too
    with pytest.raises(ConvertError, match="conversion of i2t"):
        run([other], out)


def test_small_record_batches_change_nothing(many_groups, tmp_path, monkeypatch):
    run([many_groups], tmp_path / "big", samples_per_shard=6)
    monkeypatch.setattr(convert_module, "_BATCH_BYTES", 1)  # one row per record batch
    run([many_groups], tmp_path / "small", samples_per_shard=6)
    assert snapshot(tmp_path / "big") == snapshot(tmp_path / "small")


def test_shard_size_mb_bounds_shards(tmp_path):
    images = [pil_bytes("RGB", (64, 64), "PNG", i) for i in range(40)]  # ~12 kB each, incompressible
    rows = [{"caption": f"noise {i}", "image_bytes": b} for i, b in enumerate(images)]
    source = write_parquet(tmp_path / "in.parquet", "t2i", rows, row_group_size=7)
    out = tmp_path / "out"
    summary = run([source], out, shard_size_mb=0.1)
    sizes = [s["bytes"] for s in read_manifest(out)["shards"]]
    assert summary.num_samples == 40 and len(sizes) >= 4
    assert max(sizes) < 0.1e6 * 1.5, sizes
    tiny = run([source], tmp_path / "tiny", shard_size_mb=1e-12)  # a shard per row (it planned 10^19 shards)
    assert tiny.num_samples == tiny.num_shards == 40


def test_shard_size_mb_counts_the_tar_overhead_of_small_media(tmp_path):
    images = [pil_bytes("RGB", (16, 16), "PNG", i) for i in range(560)]  # ~850 bytes: a row's tar headers weigh more
    rows = [{"caption": f"noise {i}", "image_bytes": b} for i, b in enumerate(images)]
    source = write_parquet(tmp_path / "in.parquet", "t2i", rows, row_group_size=10)
    out = tmp_path / "out"
    run([source], out, shard_size_mb=0.1)
    sizes = {s["name"]: s["bytes"] for s in read_manifest(out)["shards"]}
    assert len(sizes) >= 10 and max(sizes.values()) <= 1.3 * 0.1e6, sizes
    schema, sources = convert_module.open_sources([str(source)], "auto")
    units = convert_module.plan_work(sources, schema, ConvertOptions(shard_size_mb=0.1))
    filled = [plan.name for unit in units[:-1] for plan in unit.shards]  # the last unit holds the rest: may be small
    assert len(filled) >= 8 and min(sizes[name] for name in filled) >= 0.7 * 0.1e6, sizes


# ----------------------------------------------------------------------------------------------------------------
# verification modes and refusals


def test_verify_none_reads_headers_only(tmp_path):
    png = GOOD_IMAGES[0][0]
    cut_body = png[: len(png) - 40]  # header intact, pixels missing
    rows = [{"caption": "ok", "image_bytes": png}, {"caption": "cut", "image_bytes": cut_body},
            {"caption": "junk", "image_bytes": b"junk" * 50}]
    source = write_parquet(tmp_path / "in.parquet", "t2i", rows)
    full = run([source], tmp_path / "full")
    fast = run([source], tmp_path / "fast", verify="none")
    assert (full.num_samples, full.num_rejects) == (1, 2)
    assert (fast.num_samples, fast.num_rejects) == (2, 1)  # trusted mode keeps the cut file, not the junk
    assert read_rejects(tmp_path / "fast")[0]["row"] == 2
    sample = next(iter(wds.WebDataset(shard_urls(tmp_path / "fast"), shardshuffle=False)))
    assert json.loads(sample["json"])["media"]["image"]["width"] == 17  # metadata without decoding


def test_mixed_tasks_are_refused_with_a_listing(tmp_path):
    write_parquet(tmp_path / "in" / "images.parquet", "t2i", make_rows("t2i")[0])
    write_parquet(tmp_path / "in" / "videos.parquet", "t2v", make_rows("t2v")[0])
    with pytest.raises(ConvertError, match=r"(?s)more than one task.*t2i \(text2image\).*images\.parquet.*t2v"):
        run([tmp_path / "in"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_columns_are_refused_naming_them_and_the_schemas(tmp_path):
    pq.write_table(pa.table({"text": ["a"], "jpg": [b"x"]}), tmp_path / "odd.parquet")
    with pytest.raises(ConvertError) as err:
        run([tmp_path / "odd.parquet"], tmp_path / "out")
    message = str(err.value)
    assert "odd.parquet" in message and "'jpg'" in message and "'text'" in message
    assert all(task in message for task in SCHEMAS) and "caption_q" in message


@pytest.mark.parametrize("change, message", [
    (dict(inputs=["missing.parquet"]), "no such file"),
    (dict(inputs=["empty_dir"]), "no \\*.parquet"),
    (dict(inputs=["data.parquet", "./data.parquet"]), "given twice"),
    (dict(inputs=["notes.parquet"]), "not a readable parquet"),
    (dict(task="i2i"), "are missing"),
    (dict(inputs=["odd_names"]), "not valid UTF-8"),
])
def test_bad_inputs_are_refused(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path / "data.parquet", "t2i", make_rows("t2i")[0][:2])
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.parquet").write_text("not parquet")
    (tmp_path / "odd_names").mkdir()
    os.link(tmp_path / "data.parquet", os.fsencode(tmp_path / "odd_names") + b"/part-\xff.parquet")
    options = dict(inputs=["data.parquet"], output=str(tmp_path / "out"), progress=False)
    with pytest.raises(ConvertError, match=message):
        convert(ConvertOptions(**{**options, **change}))


def test_bad_options_are_collected():
    options = ConvertOptions(inputs=[], output="", task="text2image", samples_per_shard=0, shard_size_mb=5.0,
                             workers=0, verify="some")
    with pytest.raises(ConfigError) as err:
        convert(options)
    for flag in ("--input", "--output", "--task", "--verify", "--workers", "--samples-per-shard"):
        assert flag in str(err.value)
    ConvertOptions(inputs=["x"], output="y", shard_size_mb=64).check(problems := Problems())  # an int is a size too
    assert not problems, problems.items


def test_an_output_at_or_below_a_file_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    source = write_parquet(tmp_path / "data.parquet", "t2i", make_rows("t2i")[0][:2])
    for output in ("a_file", "a_file/sub", "a_file/sub/deeper"):
        with pytest.raises(ConfigError, match="--output: a_file is a file"):
            run([source], output)
    assert [p.name for p in tmp_path.iterdir() if p.name != "data.parquet"] == ["a_file"]
    refused = subprocess.run([sys.executable, str(ROOT / "tools" / "parquet_to_wds.py"), "--input", str(source),
                              "--output", "a_file/sub"], capture_output=True, text=True)
    assert refused.returncode == 2 and "a_file is a file" in refused.stderr and "Traceback" not in refused.stderr


def test_rejects_are_summarised_by_kind_not_by_value(tmp_path):
    rows = [{"caption": i, "image_bytes": GOOD_IMAGES[0][0]} for i in range(20)]
    source = write_parquet(tmp_path / "in.parquet", "t2i", rows, types={"caption": pa.int64()})
    summary = run([source], tmp_path / "out")
    assert summary.reject_reasons == Counter({"caption: expected a string, got int": 20})
    assert [r["reason"] for r in read_rejects(tmp_path / "out")][:2] == ["expected a string, got int: 0",
                                                                         "expected a string, got int: 1"]
    tool = str(ROOT / "tools" / "parquet_to_wds.py")
    done = subprocess.run([sys.executable, tool, "--input", str(source), "--output", str(tmp_path / "cli"),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("  ")] == [
        "  rejected 20 x caption: expected a string, got int",
        f"  every rejected row is listed in {tmp_path / 'cli'}/rejects.jsonl"]


def test_cli_summary_and_refusal(tmp_path):
    write_parquet(tmp_path / "in.parquet", "t2v", make_rows("t2v")[0])
    tool = str(ROOT / "tools" / "parquet_to_wds.py")
    done = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "in.parquet"), "--output",
                           str(tmp_path / "out"), "--samples-per-shard", "4", "--workers", "2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.match(r"t2v: read 13 rows, wrote 9 samples, rejected 4, 4 shards, [0-9.]+ MB in [0-9.]+ s", last), last
    assert "rows/s" in done.stderr and "MB/s" in done.stderr  # the progress bar
    refused = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "no such file or directory" in refused.stderr
