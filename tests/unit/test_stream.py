"""The streaming loader: shard splits, equal steps on every rank, exact resume, mixing, bad input, HTTP/pipe shards,
placeholders, validation."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import re
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from lance_ds.config.data import DataConfig, DatasetConfig, GroupConfig, ImageOptions, VideoOptions
from lance_ds.data import stream as stream_module
from lance_ds.data.batch import PackedBatch
from lance_ds.data.held_out import build_val_loader, first_samples, within
from lance_ds.data.media import MediaError, encode_image, encode_video
from lance_ds.data.media import describe as describe_bytes
from lance_ds.data.packing import Branches, OverlongSampleError
from lance_ds.data.schemas import SCHEMAS, MediaKind
from lance_ds.data.sequence import SequencePlanner, VisionGeometry, resize_crop
from lance_ds.data.reshard import resharded
from lance_ds.data.stream import (GroupReader, SkipCounter, SlotStream, StreamSpec, build_train_loader, fetch_raws,
                                  resolve_group)
from lance_ds.data.tar import ShardError, TarShardWriter, iter_raw_samples
from lance_ds.data.tokenizer import load_tokenizer

# small buffers and sequences keep each loader cheap; a t2i sample of a 32x32 image is ~45 tokens
DATA = DataConfig(packing_length=192, packing_buffer=4, shuffle_buffer=6, num_workers=0)


# ----------------------------------------------------------------------------------------------------------------
# fixtures: shards in the converter's layout


def _png(seed: int, size: int = 32) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_image(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8), "png")


def write_shards(directory: Path, task: str, num_shards: int, per_shard: int, prefix: str = "s",
                 media=None, manifest: bool = True, describe=True) -> list[str]:
    """Converter-layout shards: KEY.json + media members; manifest.json. Returns every key in order.
    KEY.json has the media's metadata as the converter writes it; describe=False leaves it out (shards of another
    tool), describe=f writes f(seed, metadata) instead (metadata that lies)."""
    directory.mkdir(parents=True, exist_ok=True)
    keys, records = [], []
    for shard in range(num_shards):
        name = f"shard-{shard:06d}.tar"
        writer = TarShardWriter(directory / name)
        for i in range(per_shard):
            key = f"{prefix}{shard:03d}x{i:04d}"
            seed = len(keys)
            texts = ({"caption_i": "", "caption_q": "what is it?", "caption_a": f"answer {seed}"}
                     if task in ("i2t", "v2t") else {"caption": f"a red circle number {seed}"})
            members = media(seed) if media else {"image.png": _png(seed)}
            described = {"media": describe_media(task, members)} if describe else {}
            if callable(describe):
                described = {"media": describe(seed, described["media"])}
            writer.add(f"{key}.json", json.dumps({"key": key, "task": task, **texts, **described}).encode())
            for suffix, data in members.items():
                writer.add(f"{key}.{suffix}", data)
            keys.append(key)
        writer.close()
        records.append({"name": name, "num_samples": per_shard, "bytes": (directory / name).stat().st_size})
    if manifest:
        (directory / "manifest.json").write_text(json.dumps(
            {"format": "lance_ds.shards/1", "task": task, "num_samples": len(keys), "shards": records}))
    return keys


def describe_media(task: str, members: dict[str, bytes]) -> dict:
    """KEY.json's "media" entry, made by the converter's own function (which rejects broken media: they get none)."""
    kinds = {column.member: column.kind for column in SCHEMAS[task].media}
    described = {}
    for suffix, data in members.items():
        member = suffix.partition(".")[0]
        try:
            described[member] = describe_bytes(data, kinds[member])
        except (KeyError, MediaError):
            pass
    return described


@pytest.fixture(scope="module")
def planner():
    return SequencePlanner(load_tokenizer(None), VisionGeometry(), seed=0)


def group(name: str, shards, task: str = "t2i", weight: float = 1.0, **kw) -> GroupConfig:
    return GroupConfig(name=name, shards=[str(s) for s in shards], weight=weight, task=task,
                       image=ImageOptions(resolution=32), **kw)


def batch_signature(batch: PackedBatch) -> list:
    """Every tensor of a batch, for exact comparisons."""
    out = []
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        out.append([x.clone() for x in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else
                   (v.clone() if torch.is_tensor(v) else v))
    return out


def assert_same_batches(a: list[PackedBatch], b: list[PackedBatch]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for f, u, v in zip(dataclasses.fields(PackedBatch), batch_signature(x), batch_signature(y)):
            if torch.is_tensor(u):
                assert u.shape == v.shape and torch.equal(u, v), f"batch {i} differs in {f.name}"
            elif isinstance(u, list) and u and torch.is_tensor(u[0]):
                assert len(u) == len(v) and all(torch.equal(p, q) for p, q in zip(u, v)), f"batch {i}: {f.name}"
            else:
                assert u == v, f"batch {i} differs in {f.name}"


def take(loader, n: int) -> list[PackedBatch]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def take_within(loader, n: int, seconds: float) -> list[PackedBatch]:
    """take() that fails instead of hanging when a rank's stream stalls."""
    out: list = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            out.extend(take(loader, n))
        except BaseException as e:  # handed to the caller's thread
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the loader hung: {len(out)} of {n} batches after {seconds} s"
    if raised:
        raise raised[0]
    return out


# ----------------------------------------------------------------------------------------------------------------
# splitting and equal steps


@pytest.mark.parametrize("num_shards,per_shard,num_slots", [(1, 5, 4), (3, 4, 8), (8, 3, 4), (5, 2, 3), (2, 1, 6)])
def test_split_gives_every_sample_of_an_epoch_to_one_slot(tmp_path, num_shards, per_shard, num_slots):
    keys = write_shards(tmp_path, "t2i", num_shards, per_shard)
    resolved = resolve_group(group("g", [tmp_path]))
    seen = []
    for slot in range(num_slots):
        reader = GroupReader(resolved, slot, num_slots, seed=3, skips=SkipCounter())
        mine = []
        while True:
            raw = reader.next()
            if raw.address[3] > 0:  # the epoch of this sample
                break
            mine.append(raw.key)
        reader.close()
        seen += mine
    assert sorted(seen) == sorted(keys)  # each sample exactly once per epoch, over all slots


def test_a_groups_samples_are_counted_from_the_converter_manifest_beside_its_tars(tmp_path):
    """The banner's count and the task come from manifest.json, for a converter output given as its directory, a
    glob of its tars or one tar; without a manifest the count is unknown (None), not a guess."""
    write_shards(tmp_path / "out", "t2i", 3, 4)
    for sources, count in (([tmp_path / "out"], 12), ([str(tmp_path / "out" / "*.tar")], 12),
                           ([str(tmp_path / "out" / "shard-000001.tar")], 4)):
        resolved = resolve_group(group("g", sources))
        assert (resolved.num_samples, resolved.task) == (count, "t2i"), sources
    write_shards(tmp_path / "bare", "t2i", 2, 4, manifest=False)
    assert resolve_group(group("g", [str(tmp_path / "bare" / "*.tar")], task="t2i")).num_samples is None


def test_shards_written_again_at_the_same_paths_keep_the_order_and_change_the_recorded_contents(tmp_path):
    """A dataset converted again into the same folder keeps its shard names: the data order (fingerprint) is the same,
    but a checkpoint's position points into the old files. data_groups records what tells them apart (the manifest's
    sizes, a bare tar's size), which a resume compares (checkpoint.data_order_differs)."""
    data = DataConfig()

    def order(sources) -> tuple[str, dict]:
        groups = [resolve_group(group("g", sources, task="t2i"))]
        return stream_module.data_fingerprint(groups, data, 0, 1), stream_module.data_groups(groups)["g"]

    for sources, manifest in (([tmp_path / "out"], True), ([str(tmp_path / "out" / "*.tar")], False)):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        write_shards(tmp_path / "out", "t2i", 2, 4, manifest=manifest)
        before = order(sources)
        assert order(sources) == before  # (read twice: the same)
        write_shards(tmp_path / "out", "t2i", 2, 3, manifest=manifest)  # fewer rows: the same two shard names
        after = order(sources)
        assert after[0] == before[0] and after[1]["digest"] == before[1]["digest"]
        assert after[1]["contents"] != before[1]["contents"], sources


def test_a_shard_that_fails_for_one_slot_alone_leaves_the_split_of_the_others_as_it_was(tmp_path, monkeypatch):
    """Fewer shards than slots: every slot reads every shard and keeps its samples of it. One slot failing to open a
    shard once (an object store's 503) loses that slot's samples of it, counted, and nothing else: before, the
    slots' split went out of step for the rest of the run (samples trained twice or never, every epoch)."""
    keys = write_shards(tmp_path, "t2i", 2, 5)
    resolved = resolve_group(group("g", [tmp_path]))
    real, failed = stream_module.iter_raw_samples, []

    def once_unreadable_for_slot_1(url, offset=0):
        if slot == 1 and url.endswith("shard-000001.tar") and not failed:
            failed.append(url)
            return unreadable(url)
        return real(url, offset)

    def unreadable(url):  # (a generator, as iter_raw_samples: it raises when first read)
        raise ShardError("unreadable_shard", f"cannot open {url}: HTTP Error 503: Slow Down", transient=True)
        yield

    monkeypatch.setattr(stream_module, "iter_raw_samples", once_unreadable_for_slot_1)
    trained, skips = Counter(), SkipCounter()
    for slot in range(4):
        reader = GroupReader(resolved, slot, 4, seed=0, skips=skips)
        while (raw := reader.next()).address[3] < 4:
            trained[raw.address[3], raw.key] += 1
        reader.close()
    assert failed
    for epoch in range(4):
        counts = [trained[epoch, key] for key in keys]
        lost = skips.counts["unreadable_shard"] if epoch == 0 else 0  # the failed slot's share of that shard
        assert max(counts) == 1 and counts.count(0) == lost, (epoch, counts)
    assert 1 <= skips.counts["unreadable_shard"] <= 2


@pytest.mark.parametrize("num_shards", [1, 3, 8])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 3])
def test_every_rank_takes_the_same_number_of_steps(tmp_path_factory, planner, num_shards, num_workers, world_size):
    """Any shard/worker/rank counts, fewer shards than ranks x workers included: every rank yields as many batches as
    asked, each with real samples, and every worker contributes (no hang, no error, no idle rank)."""
    root = tmp_path_factory.mktemp(f"steps{num_shards}")
    write_shards(root, "t2i", num_shards, 4)
    dataset = DatasetConfig(groups=[group("g", [root])])
    data = dataclasses.replace(DATA, num_workers=num_workers)
    num_steps = max(2, num_workers) * 2
    for rank in range(world_size):
        loader = build_train_loader(dataset, data, planner, rank=rank, world_size=world_size, seed=1,
                                    micro_batch_size=1)
        batches = take_within(loader, num_steps, seconds=60)
        assert all(b.num_real_tokens > 0 for b in batches)
        assert all(s is not None for s in loader.worker_states)  # every worker produced batches
        assert loader.stats()["batches"] == num_steps
        loader.close()


def test_fewer_shards_than_loader_slots_is_said_with_the_shard_count_that_reads_each_sample_once(tmp_path, planner):
    """With fewer shards than slots every slot reads every shard to keep 1 sample in `slots` (no slot idles, but the
    reads multiply by the slot count): the banner says so, and how many shards read each sample once."""
    write_shards(tmp_path, "t2i", 3, 4)
    dataset = DatasetConfig(groups=[group("g", [tmp_path])])
    loader = build_train_loader(dataset, dataclasses.replace(DATA, num_workers=2), planner, rank=0, world_size=2,
                                seed=0, micro_batch_size=1)
    assert loader.under_sharded() == [
        "g: 3 shard(s) for 4 loader slots (2 rank(s) x 2 worker(s)): each slot reads all of them to keep 1 sample in "
        "4; 4 or more shards (tools/parquet_to_wds.py --samples-per-shard) read each sample once"]
    enough = build_train_loader(dataset, DATA, planner, rank=0, world_size=3, seed=0, micro_batch_size=1)
    assert enough.under_sharded() == []


# ----------------------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(tmp_path, planner, num_workers):
    write_shards(tmp_path / "a", "t2i", 3, 5, prefix="a")
    write_shards(tmp_path / "b", "i2t", 2, 4, prefix="b")
    dataset = DatasetConfig(groups=[group("a", [tmp_path / "a"], weight=2.0, caption_dropout=0.3),
                                    group("b", [tmp_path / "b"], task="i2t")])
    data = dataclasses.replace(DATA, num_workers=num_workers)
    build = functools.partial(build_train_loader, dataset, data, planner, rank=1, world_size=2, seed=5,
                              micro_batch_size=2)
    loader = build()
    it = iter(loader)
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(loader.state_dict()))  # the position survives a JSON round trip
    rest = [next(it) for _ in range(6)]  # crosses an epoch of both groups
    loader.close()

    resumed = build()
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 6), rest)
    resumed.close()
    assert_same_batches(take(build(), 5), first)  # and a fresh loader starts over


def test_resume_rereads_only_the_buffered_samples(tmp_path, planner, monkeypatch):
    write_shards(tmp_path, "t2i", 1, 60)
    resolved = [resolve_group(group("g", [tmp_path]))]
    spec = StreamSpec(resolved, planner, DATA, Branches(), 1, 0, 0, 1)
    slot = SlotStream(spec, 0, 1)
    for _ in range(4):
        slot.next_batch()
    state = slot.state()
    cursor = state["groups"]["g"]
    assert cursor["epoch"] == 0 and cursor["offset"] > 0  # mid-shard
    decoded, opened = [], []
    real_decode, real_iter = stream_module.decode_sample, stream_module.iter_raw_samples
    monkeypatch.setattr(stream_module, "decode_sample", lambda raw, *a, **k: decoded.append(raw.key) or
                        real_decode(raw, *a, **k))
    monkeypatch.setattr(stream_module, "iter_raw_samples", lambda url, offset=0: opened.append(offset) or
                        real_iter(url, offset))
    resumed = SlotStream(spec, 0, 1)
    resumed.load(state)
    # only the samples waiting in the buffers are read again, each at its own offset; only the packer's are planned
    # (from KEY.json's sizes: none is decoded before it is packed)
    assert len(opened) == len(state["shuffle_buffer"]) + len(state["packing_buffer"])
    assert sorted(opened) == sorted(a[2] for a in state["shuffle_buffer"] + state["packing_buffer"])
    assert len(decoded) == len(state["packing_buffer"])
    assert all(plan.needs_media for plan in resumed.packer.buffer)
    assert resumed.state() == state
    opened.clear()
    assert_same_batches([resumed.next_batch()], [slot.next_batch()])
    assert opened[0] == cursor["offset"]  # the stream continues where it was, without re-reading the consumed part
    older = SlotStream(spec, 0, 1)  # a position saved by a lance_ds that kept a running index per group
    older.load({**state, "groups": {"g": {**cursor, "index": 7}}})
    assert older.state() == state


def test_large_samples_are_buffered_up_to_buffer_mb_and_still_shuffle_and_resume_exactly(tmp_path, planner):
    """A buffer of 256 long videos held GBs per loader worker: by count alone, each buffer held every sample here."""
    keys = write_shards(tmp_path, "t2i", 2, 40, media=lambda seed: {"image.png": _png(seed, size=96)})  # ~28 kB each
    resolved = [resolve_group(group("g", [tmp_path]))]
    data = dataclasses.replace(DATA, shuffle_buffer=64, packing_buffer=32, buffer_mb=0.2)
    spec = StreamSpec(resolved, planner, data, Branches(), 1, 0, 0, 1)
    slot, largest = SlotStream(spec, 0, 1), 0
    for _ in range(12):
        slot.next_batch()
        largest = max([largest] + [raw.nbytes for raw in slot.shuffle])
        assert slot.shuffle_bytes == sum(raw.nbytes for raw in slot.shuffle) <= 0.2e6 + largest
        assert slot.packer.held_bytes() <= 0.2e6 + largest and len(slot.packer.buffer) < 32
        assert 3 <= len(slot.shuffle) < 12
    drawn = [slot._next_shuffled().key for _ in range(20)]
    assert drawn != sorted(drawn, key=keys.index)  # still out of order
    state = slot.state()
    resumed = SlotStream(spec, 0, 1)
    resumed.load(state)
    assert resumed.shuffle_bytes == slot.shuffle_bytes
    assert_same_batches([resumed.next_batch() for _ in range(3)], [slot.next_batch() for _ in range(3)])
    unbounded = SlotStream(dataclasses.replace(spec, data=dataclasses.replace(data, buffer_mb=1024.0)), 0, 1)
    unbounded.next_batch()
    assert len(unbounded.shuffle) == 64 and len(unbounded.packer.buffer) >= 32 - 8  # (a sequence taken out of 32)
    assert unbounded.spec.fingerprint() != spec.fingerprint()  # another data order: a resume says so


def test_a_resume_from_pipe_shards_runs_each_command_once(tmp_path, planner, monkeypatch):
    """A pipe: command (`pipe:aws s3 cp s3://... -`) cannot seek: re-reading each buffered sample ran it again up to
    that sample (a full shuffle buffer streamed the shard's first part 256 times). Each shard is now read once,
    forward through every buffered sample it holds, and the run goes on as it would have."""
    write_shards(tmp_path, "t2i", 2, 40)
    sources = [f"pipe:cat {path}" for path in sorted(tmp_path.glob("*.tar"))]
    spec = StreamSpec([resolve_group(group("g", sources, task="t2i"))], planner, DATA, Branches(), 1, 0, 0, 1)
    slot = SlotStream(spec, 0, 1)
    for _ in range(6):
        slot.next_batch()
    state = slot.state()
    buffered = state["shuffle_buffer"] + state["packing_buffer"]
    first_wanted = {}
    for _, shard, offset, _, _ in buffered:
        first_wanted[shard] = min(offset, first_wanted.get(shard, offset))
    assert len(buffered) > 2 * len(first_wanted)  # several samples of a shard wanted back
    opened = []
    real_iter = stream_module.iter_raw_samples
    monkeypatch.setattr(stream_module, "iter_raw_samples", lambda url, offset=0: opened.append((url, offset)) or
                        real_iter(url, offset))
    resumed = SlotStream(spec, 0, 1)
    resumed.load(state)
    assert sorted(opened) == sorted((sources[shard], offset) for shard, offset in first_wanted.items())
    assert resumed.state() == state
    assert_same_batches([resumed.next_batch() for _ in range(3)], [slot.next_batch() for _ in range(3)])


def test_a_loader_worker_that_sends_nothing_says_where_it_is(tmp_path, planner, monkeypatch, capfd):
    """A worker stuck in a read holds its rank, and every rank, up: past slow_batch_s it prints its threads' stacks
    (the rank's own report only shows it waiting for the loader)."""
    write_shards(tmp_path, "t2i", 1, 4)
    real_decode = stream_module.decode_sample

    def stuck_read(raw, *args, **kwargs):
        time.sleep(0.2)
        return real_decode(raw, *args, **kwargs)

    monkeypatch.setattr(stream_module, "decode_sample", stuck_read)  # (the worker is forked: it has the patch)
    data = dataclasses.replace(DATA, num_workers=1)
    loader = build_train_loader(DatasetConfig(groups=[group("g", [tmp_path])]), data, planner, rank=0, world_size=1,
                                seed=0, micro_batch_size=1, slow_batch_s=0.1)
    take(loader, 1)
    said = capfd.readouterr().err
    assert "lance_ds: rank 0: loader worker 0's next batch has run 0.1 s (half of train.stall_timeout_s)" in said
    assert "in stuck_read" in said, said


def test_a_resume_with_a_higher_resolution_goes_on_without_what_no_longer_fits(tmp_path, planner, caplog):
    """Progressive resolution: a group's image.resolution raised at a resume. The packing buffer's plans are made
    again with the new options; those now longer than a packed sequence were put back for ever (a silent hang)."""
    write_shards(tmp_path / "a", "t2i", 1, 12, prefix="a")
    write_shards(tmp_path / "b", "t2i", 1, 12, prefix="b")
    groups = [group("a", [tmp_path / "a"]), group("b", [tmp_path / "b"])]
    slot = SlotStream(StreamSpec([resolve_group(g) for g in groups], planner, DATA, Branches(), 1, 0, 0, 1), 0, 1)
    for _ in range(2):
        slot.next_batch()
    state = json.loads(json.dumps(slot.state()))
    assert any(address[0] == "a" for address in state["packing_buffer"])
    bigger = [dataclasses.replace(groups[0], image=ImageOptions(resolution=256)), groups[1]]  # a: overlong now
    spec = StreamSpec([resolve_group(g) for g in bigger], planner, DATA, Branches(), 1, 0, 0, 1)
    resumed = SlotStream(spec, 0, 1)
    resumed.load(state)
    batches = []
    thread = threading.Thread(target=lambda: batches.extend(resumed.next_batch() for _ in range(3)), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert len(batches) == 3, "the stream hung on a buffered plan that fits no packed sequence"
    assert resumed.skips.counts["overlong"] > 0
    # the loader says so: the position is kept, the resume is not exact
    loader = build_train_loader(DatasetConfig(groups=groups), DATA, planner, rank=0, world_size=1, seed=0,
                                micro_batch_size=1)
    take(loader, 1)
    saved = loader.state_dict()
    loader.close()
    other = build_train_loader(DatasetConfig(groups=bigger), DATA, planner, rank=0, world_size=1, seed=0,
                               micro_batch_size=1)
    with caplog.at_level("WARNING", logger="lance_ds.data.stream"):
        other.load_state_dict(saved)
    assert "options changed since the checkpoint" in caplog.text
    other.close()


def test_the_epoch_reported_is_that_of_the_samples_trained_on(tmp_path, planner):
    """data/epoch/<group> followed the readers, which run ahead into the shuffle and packing buffers (epoch 17 of a
    24-sample group after 4 samples trained)."""
    write_shards(tmp_path, "t2i", 1, 3)  # 3 samples: the 6-sample shuffle buffer alone reads two epochs ahead
    loader = build_train_loader(DatasetConfig(groups=[group("g", [tmp_path])]), DATA, planner, rank=0,
                                world_size=1, seed=0, micro_batch_size=1)
    take(loader, 1)
    reader_epoch = loader.worker_states[0]["groups"]["g"]["epoch"]
    stats = loader.stats()
    # what training saw: at most two epochs' samples (the shuffle buffer mixes neighbouring epochs), behind the reader
    assert stats["samples"] <= 3 and stats["epochs"]["g"] <= 1 < reader_epoch
    loader.close()


def test_resume_with_other_world_size_is_resharded_and_with_other_data_refused(tmp_path, planner):
    write_shards(tmp_path, "t2i", 2, 4)
    dataset = DatasetConfig(groups=[group("g", [tmp_path])])
    states = []
    for rank in range(2):
        loader = build_train_loader(dataset, DATA, planner, rank=rank, world_size=2, seed=0, micro_batch_size=1)
        take(loader, 1)
        states.append(loader.state_dict())
    other = build_train_loader(dataset, DATA, planner, rank=2, world_size=3, seed=0, micro_batch_size=1)
    with pytest.raises(stream_module.DataError, match="load_resharded"):
        other.load_state_dict(states[0])
    other.load_resharded(states)  # this rank's slot of the three the old two are dealt to
    assert [(s["slot"], s["num_slots"]) for s in other.worker_states] == [(2, 3)]
    assert len(take(other, 2)) == 2 and other.stats()["batches"] == 2  # (the run's counters went to rank 0's slot)
    other = build_train_loader(dataset, DATA, planner, rank=0, world_size=2, seed=1, micro_batch_size=1)
    with pytest.raises(stream_module.DataError, match="changed since the checkpoint"):
        other.load_state_dict(states[0])
    with pytest.raises(stream_module.DataError, match="another dataset, train.seed"):
        other.load_resharded(states)


def train_slots(spec, num_slots: int, states: list[dict] | None, batches: int, trained: list) -> list[dict]:
    """`batches` batches from slot 0 of `num_slots` slots, one more from each next one (uneven positions), each from
    `states` (else from the start); the (key, epoch) of every sample put in them is appended to `trained`; returns
    the slots' positions."""
    out = []
    for slot in range(num_slots):
        stream = SlotStream(spec, slot, num_slots)
        if states is not None:
            stream.load(json.loads(json.dumps(states[slot])))

        def recorded(next_sequence=stream._next_sequence):
            plans = next_sequence()
            trained.extend((plan.address[4], plan.address[3]) for plan in plans)
            return plans

        stream._next_sequence = recorded
        for _ in range(batches + 3 * slot):
            stream.next_batch()
        out.append(stream.state())
        stream.close()
    return out


@pytest.mark.parametrize("num_shards", [12, 2])  # a shard-level split in every layout; a sample-level one in all
def test_a_resume_on_other_slots_trains_the_rest_of_each_epoch_begun(tmp_path, planner, num_shards):
    """Slots = ranks x workers. 2 slots -> 3 -> 1 (the second reshard before the first one's pieces are read): every
    sample of the epochs begun before the last reshard is trained, with a shard-level split exactly once; and the
    run's counters carry on."""
    keys = write_shards(tmp_path, "t2i", num_shards, 96 // num_shards)
    resolved = resolve_group(group("g", [tmp_path], caption_dropout=0.0))
    spec = StreamSpec([resolved], planner, DATA, Branches(), 1, 7, 0, 1)
    trained: list = []
    states = train_slots(spec, 2, None, 3, trained)
    states = train_slots(spec, 3, resharded(states, spec, 3), 1, trained)
    pieces_left = sum(len(s["groups"]["g"]["pieces"]) for s in states)
    assert pieces_left > 0  # the next reshard also deals pieces of the last one
    begun = max(s["groups"]["g"]["epoch"] for s in states)
    before = len(trained)
    final = resharded(states, spec, 1)
    assert final[0]["num_samples"] == before == sum(s["num_samples"] for s in states)
    # the buffered samples go to the new shuffle buffer, up to twice a slot's buffers; the rest as one-sample pieces
    buffered, room = sum(len(s["shuffle_buffer"]) + len(s["packing_buffer"]) for s in states), 2 * (6 + 4)
    assert buffered > room and len(final[0]["shuffle_buffer"]) == room
    assert sum(piece[3] == 1 for piece in final[0]["groups"]["g"]["pieces"]) == buffered - room
    states = train_slots(spec, 1, final, 80, trained)
    counts = Counter((key, epoch) for key, epoch in trained if epoch <= begun)
    every = {(key, epoch) for key in keys for epoch in range(begun + 1)}
    assert set(counts) == every  # nothing skipped
    if num_shards >= 3:
        assert set(counts.values()) == {1}  # nothing twice
    else:  # every slot read every shard: from the slot furthest behind, a little twice
        assert sum(counts.values()) <= len(every) + 3 * (DATA.shuffle_buffer + 8)
    assert states[0]["num_samples"] == len(trained)
    assert len(states[0]["shuffle_buffer"]) == DATA.shuffle_buffer  # drawn down to its size


def test_a_reshard_reads_a_pipe_shard_once_for_its_samples_beyond_the_new_buffers(tmp_path, planner, monkeypatch):
    """6 slots -> 1: the buffered samples beyond twice the new slot's buffers become one-sample pieces. A pipe: shard
    streamed up to each of them again (a shuffle buffer's worth of `aws s3 cp` runs per old slot); the pieces are now
    in shard order and each shard's are read in one pass, and the samples read are exactly those pieces."""
    write_shards(tmp_path, "t2i", 12, 8)
    sources = [f"pipe:cat {path}" for path in sorted(tmp_path.glob("*.tar"))]
    spec = StreamSpec([resolve_group(group("g", sources, task="t2i", caption_dropout=0.0))], planner, DATA,
                      Branches(), 1, 7, 0, 1)
    final = resharded(train_slots(spec, 6, None, 2, []), spec, 1)
    overflow = [piece for piece in final[0]["groups"]["g"]["pieces"] if piece[3] == 1]
    runs = {(epoch, shard) for epoch, shard, _, _ in overflow}
    assert len(overflow) >= 2 * len(runs)  # several samples of a shard among them
    stream = SlotStream(spec, 0, 1)
    stream.load(final[0])
    opened = []
    real_iter = stream_module.iter_raw_samples
    monkeypatch.setattr(stream_module, "iter_raw_samples", lambda url, offset=0: opened.append((url, offset)) or
                        real_iter(url, offset))
    read = [stream.readers["g"].next() for _ in overflow]
    assert [[address[3], address[1], address[2], 1] for address in (raw.address for raw in read)] == overflow
    assert len(opened) == len(runs)
    stream.close()
    reader = GroupReader(spec.groups[0], 0, 1, 7, SkipCounter())  # pieces of a shard out of order: opened again
    starts = [raw.start for raw in real_iter(sources[0])]
    reader.cursor.pieces = [[0, 0, starts[5], 1], [0, 0, starts[6], 1], [0, 0, starts[2], 1]]
    assert [reader.next().start for _ in range(3)] == [starts[5], starts[6], starts[2]]
    assert len(opened) == len(runs) + 2
    reader.close()


# ----------------------------------------------------------------------------------------------------------------
# mixing


def test_mixture_weights_are_honoured(tmp_path, planner):
    for name in "abc":
        write_shards(tmp_path / name, "t2i", 2, 10, prefix=name)
    weights = {"a": 5.0, "b": 3.0, "c": 2.0}
    resolved = [resolve_group(group(n, [tmp_path / n], weight=w)) for n, w in weights.items()]
    spec = StreamSpec(resolved, planner, DATA, Branches(), 1, 11, 0, 1)
    slot = SlotStream(spec, 0, 1)
    draws = 3000
    counts = Counter(slot._next_mixed().address[0] for _ in range(draws))
    for name, w in weights.items():
        assert abs(counts[name] / draws - w / 10.0) < 0.03, counts
    slot.close()


def test_shards_and_raw_samples_are_shuffled_deterministically(tmp_path, planner):
    """Each epoch reads the shards in another order (the same for the same seed), and the raw-sample buffer hands
    samples out of order before any is decoded; shuffle_buffer=0 keeps the readers' order."""
    keys = write_shards(tmp_path, "t2i", 8, 5)
    resolved = resolve_group(group("g", [tmp_path]))

    def shard_orders(seed: int) -> list[list[int]]:
        return [GroupReader(resolved, 0, 1, seed, SkipCounter()).units(epoch) for epoch in range(4)]

    orders = shard_orders(3)
    assert all(sorted(order) == list(range(8)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4 and orders == shard_orders(3) and orders != shard_orders(4)

    def drawn(shuffle_buffer: int, seed: int = 11) -> list[str]:
        data = dataclasses.replace(DATA, shuffle_buffer=shuffle_buffer)
        stream = SlotStream(StreamSpec([resolved], planner, data, Branches(), 1, seed, 0, 1), 0, 1)
        out = [stream._next_shuffled().key for _ in range(24)]
        stream.close()
        return out

    plain, shuffled = drawn(0), drawn(16)
    in_shard_order = [k for shard in shard_orders(11)[0] for k in keys[shard * 5:(shard + 1) * 5]]
    assert plain == in_shard_order[:24]
    # 16 buffered + 24 drawn = the first 40 raw samples: one whole epoch, each key at most once
    assert len(set(shuffled)) == 24 and set(shuffled) <= set(keys) and shuffled != plain
    assert sum(in_shard_order.index(a) > in_shard_order.index(b) for a, b in zip(shuffled, shuffled[1:])) >= 6
    assert shuffled == drawn(16) and shuffled != drawn(16, seed=12)


# ----------------------------------------------------------------------------------------------------------------
# bad input


def _corrupt_shards(root: Path) -> None:
    write_shards(root / "good", "t2i", 1, 6, prefix="g")
    # a truncated tar: cut inside the third sample's image
    write_shards(root / "trunc", "t2i", 1, 4, prefix="t")
    path = root / "trunc" / "shard-000000.tar"
    data = path.read_bytes()
    third = data.index(b"t000x0002.image.png")
    path.write_bytes(data[:third + 1200])
    # undecodable image, bad json, missing media
    bad = root / "bad"
    bad.mkdir()
    writer = TarShardWriter(bad / "shard-000000.tar")
    writer.add("b1.json", json.dumps({"task": "t2i", "caption": "x"}).encode())
    writer.add("b1.image.png", b"\x89PNG\r\n\x1a\nnot really a png")
    writer.add("b2.json", b"{not json")
    writer.add("b2.image.png", _png(1))
    writer.add("b3.json", json.dumps({"task": "t2i", "caption": "x"}).encode())
    writer.add("b4.json", json.dumps({"task": "t2i", "caption": "ok"}).encode())
    writer.add("b4.image.png", _png(2))
    writer.close()
    # a damaged header: flip bytes of the second member's header (bad checksum)
    write_shards(root / "hdr", "t2i", 1, 3, prefix="h")
    path = root / "hdr" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    second = data.index(b"h000x0001.json")
    data[second:second + 4] = b"XXXX"
    data[second + 148:second + 150] = b"99"
    path.write_bytes(bytes(data))


def test_corrupt_input_is_skipped_and_counted(tmp_path, planner):
    _corrupt_shards(tmp_path)
    dataset = DatasetConfig(groups=[group("g", [tmp_path / "good", tmp_path / "trunc/shard-000000.tar",
                                                tmp_path / "bad/*.tar", tmp_path / "hdr"])])
    loader = build_train_loader(dataset, DATA, planner, rank=0, world_size=1, seed=0, micro_batch_size=1)
    batches = take(loader, 12)  # several epochs over 6 + 2 + 1 + 1 usable samples
    assert all(b.num_real_tokens > 0 for b in batches)
    scalars = loader.stats_scalars()
    for reason in ("truncated_tar", "corrupt_tar", "undecodable_media", "bad_json", "missing_media"):
        assert scalars[f"data/skipped/{reason}"] >= 1, (reason, scalars)
    assert scalars["data/skipped"] == sum(scalars[f"data/skipped/{r}"] for r in stream_module.SKIP_REASONS)
    # the samples before the cut of the truncated shard are read; the one cut in half is not
    keys = [r.key for r in _read_all(tmp_path / "trunc/shard-000000.tar")]
    assert keys == ["t000x0000", "t000x0001", "t000x0002"]
    # a shard whose manifest gives its size counts the samples lost with it: "hdr" breaks after 1 of its 3 samples,
    # so each pass over it loses 2, named by its directory or by its .tar beside the manifest; a .tar without one
    # counts 1 a pass: its size is not known
    sources = ((tmp_path / "hdr", 2), (tmp_path / "hdr" / "shard-000000.tar", 2), (tmp_path / "bare.tar", 1))
    shutil.copy(tmp_path / "hdr" / "shard-000000.tar", tmp_path / "bare.tar")
    for source, lost in sources:
        skips = SkipCounter()
        reader = GroupReader(resolve_group(group("h", [source])), 0, 1, seed=0, skips=skips)
        assert [reader.next().address[3] for _ in range(2)] == [0, 1]  # h000x0000 in epoch 0, then in epoch 1
        assert dict(skips.counts) == {"corrupt_tar": lost}
        reader.close()
    # a shard cut right after its last sample (no end-of-archive blocks) loses nothing: nothing is counted
    keys = write_shards(tmp_path / "ends", "t2i", 1, 3, prefix="e")
    path = tmp_path / "ends" / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:_read_all(path)[-1].end])
    skips = SkipCounter()
    reader = GroupReader(resolve_group(group("e", [tmp_path / "ends"])), 0, 1, seed=0, skips=skips)
    assert sorted(reader.next().key for _ in range(3)) == keys and reader.next().address[3] == 1
    assert not skips.counts
    reader.close()


def test_first_samples_pass_over_damaged_shards_and_samples(tmp_path):
    _corrupt_shards(tmp_path)
    dataset = DatasetConfig(groups=[group("g", [tmp_path / "trunc/shard-000000.tar", tmp_path / "bad/*.tar",
                                                tmp_path / "hdr", tmp_path / "good"])])
    keys = [sample.key for _, sample in first_samples(dataset, per_group=6)]
    # trunc: the two samples before the cut; bad: the one decodable sample; hdr: the first, before the bad header
    assert keys == ["t000x0000", "t000x0001", "b4", "h000x0000", "g000x0000", "g000x0001"]


def test_first_samples_pass_over_samples_longer_than_a_packed_sequence(tmp_path):
    """A held-out caption of millions of characters made validation and evaluation prompts no attention fits in
    memory (a crash of the training run or of the whole evaluation); it is passed over like training drops it."""
    writer = TarShardWriter(tmp_path / "shard-000000.tar")
    for i, caption in enumerate(["a red circle", "red " * 20000, "a blue square"]):
        writer.add(f"k{i}.json", json.dumps({"key": f"k{i}", "task": "t2i", "caption": caption}).encode())
        writer.add(f"k{i}.image.png", _png(i))
    writer.close()
    dataset = DatasetConfig(groups=[group("g", [tmp_path / "shard-000000.tar"])])
    planner = SequencePlanner(load_tokenizer(), VisionGeometry())
    assert [s.key for _, s in first_samples(dataset, 2)] == ["k0", "k1"]
    fits = within(planner, 1024)
    assert [s.key for _, s in first_samples(dataset, 2, fits)] == ["k0", "k2"]
    # prompts keep their captions: a caption training would drop (classifier-free guidance) is measured too
    dropping = DatasetConfig(groups=[group("g", [tmp_path / "shard-000000.tar"], caption_dropout=0.99)])
    assert [s.key for _, s in first_samples(dropping, 2, fits)] == ["k0", "k2"]


def test_an_unfinished_conversion_is_refused_not_read(tmp_path):
    write_shards(tmp_path / "out", "t2i", 2, 2, manifest=False)
    (tmp_path / "out" / ".convert_state").mkdir()  # what the converter leaves until its run completes
    with pytest.raises(stream_module.DataError, match="conversion has not finished"):
        stream_module.resolve_sources([str(tmp_path / "out")])
    shutil.rmtree(tmp_path / "out" / ".convert_state")  # a directory of shards from elsewhere: its *.tar are read
    assert len(stream_module.resolve_sources([str(tmp_path / "out")])[0]) == 2


def _read_all(path) -> list:
    out = []
    try:
        for raw in iter_raw_samples(str(path)):
            out.append(raw)
    except ShardError as e:
        assert e.reason == "truncated_tar"
    return out


def test_a_group_without_any_usable_sample_is_reported(tmp_path, planner):
    bad = tmp_path / "bad"
    bad.mkdir()
    writer = TarShardWriter(bad / "x.tar")
    writer.add("k.json", b"{broken")
    writer.close()
    (bad / "y.tar").write_bytes(b"not a tar at all" * 64)  # a shard that gives no sample: bad too
    for shards in ([bad / "x.tar"], [bad / "x.tar", bad / "y.tar"]):
        dataset = DatasetConfig(groups=[group("g", shards)])
        loader = build_train_loader(dataset, DATA, planner, rank=0, world_size=1, seed=0, micro_batch_size=1)
        with pytest.raises(stream_module.DataError, match="without one usable sample"):
            take_within(loader, 1, seconds=60)
    # samples all longer than packing_length: the fix named is the setting, not the shards
    write_shards(tmp_path / "ok", "t2i", 1, 3, prefix="ok")
    short = dataclasses.replace(DATA, packing_length=8)
    dataset = DatasetConfig(groups=[group("g", [tmp_path / "ok"])])
    loader = build_train_loader(dataset, short, planner, rank=0, world_size=1, seed=0, micro_batch_size=1)
    with pytest.raises(stream_module.DataError, match="raise data.packing_length \\(now 8\\)"):
        take(loader, 1)


@pytest.mark.parametrize("layout", ["fewer shards than slots", "shards of different sizes", "half the shards bad"])
def test_a_group_with_usable_samples_is_never_given_up(tmp_path, planner, layout):
    """Slots whose share of an epoch is tiny or empty, or whose last epoch was small, or all bad shards for a few
    epochs in a row, still read on through bad samples: only a group with nothing usable for two whole epochs, from
    every shard, is refused."""
    broken = {"image.png": b"broken"}
    slots = None
    if layout == "fewer shards than slots":  # one bad sample of 10, 16 slots, no shuffle buffer
        write_shards(tmp_path / "g", "t2i", 1, 10, media=lambda s: broken if s == 3 else {"image.png": _png(s)})
        sources, data, num_slots, seeds = [tmp_path / "g"], dataclasses.replace(DATA, shuffle_buffer=0), 16, [0]
    elif layout == "half the shards bad":  # 8 shards of 5 samples, 4 of them all broken; 8 slots
        write_shards(tmp_path / "g", "t2i", 8, 5, media=lambda s: broken if s < 20 else {"image.png": _png(s)})
        sources, data, num_slots, seeds = [tmp_path / "g"], DATA, 8, [0]
        slots = [7]  # (its share was bad shards for epochs 34-37: given up after 65 batches)
    else:  # a 40-sample shard of bad images, two 1-sample shards, a good 40-sample one; 2 slots
        write_shards(tmp_path / "bad", "t2i", 1, 40, prefix="bad", media=lambda s: broken)
        write_shards(tmp_path / "tiny", "t2i", 2, 1, prefix="tiny")
        write_shards(tmp_path / "big", "t2i", 1, 40, prefix="big")
        sources, data, num_slots = [tmp_path / "bad", tmp_path / "tiny", tmp_path / "big"], DATA, 2
        seeds = [2]  # (seed 2, slot 1 met the bad shard right after an epoch of the two tiny ones)
        data = dataclasses.replace(DATA, shuffle_buffer=8)
    resolved = [resolve_group(group("g", sources))]
    for seed in seeds:
        for slot in slots or range(num_slots):
            stream = SlotStream(StreamSpec(resolved, planner, dataclasses.replace(data, packing_buffer=1), Branches(),
                                           1, seed, 0, 1), slot, num_slots)
            batches = [stream.next_batch() for _ in range(130)]  # raised DataError ("without one usable sample")
            stream.close()
            assert all(b.num_real_tokens > 0 for b in batches)
            assert sum(stream.skips.counts.values()) > 0, (seed, slot)  # it did meet the bad samples


def test_a_group_too_long_to_pack_is_refused_before_training(tmp_path, planner, caplog):
    """A group whose samples are all longer than a packed sequence trained nothing, silently but for skip counts,
    until the loader gave up on it epochs later: it is refused at start, naming the settings; one with some such
    samples is said."""
    write_shards(tmp_path / "small", "t2i", 2, 4, prefix="s")
    write_shards(tmp_path / "big", "t2i", 3, 3, prefix="b", media=lambda i: {"image.png": _png(i, 128)})
    writer = TarShardWriter(tmp_path / "mixed.tar")  # one caption of 400 words among short ones
    for i, caption in enumerate(["a red circle", "red " * 400, "a blue square", "a green star"]):
        writer.add(f"m{i}.json", json.dumps({"key": f"m{i}", "task": "t2i", "caption": caption}).encode())
        writer.add(f"m{i}.image.png", _png(i))
    writer.close()
    big = dataclasses.replace(group("b", [tmp_path / "big"]), image=ImageOptions(resolution=256))
    dataset = DatasetConfig(groups=[group("s", [tmp_path / "small"]), big, group("m", [tmp_path / "mixed.tar"])])
    with caplog.at_level("WARNING"):
        problems = stream_module.overlong_groups(dataset, planner, DATA.packing_length)
    assert len(problems) == 1 and problems[0].startswith("dataset_config.groups[1] (b): the 9 samples read across "
                                                         "its shards are"), problems  # (3 of each of its 3 shards)
    assert "all longer than data.packing_length=192" in problems[0] and "Raise data.packing_length" in problems[0]
    assert "dataset_config.groups[2] (m): 1 of 4 samples read are longer" in caplog.text


def test_overlong_samples_are_dropped_or_refused(tmp_path, planner):
    write_shards(tmp_path / "small", "t2i", 1, 4, prefix="s")
    write_shards(tmp_path / "big", "t2i", 1, 2, prefix="b", media=lambda i: {"image.png": _png(i, 128)})
    groups = [group("s", [tmp_path / "small"]),
              dataclasses.replace(group("b", [tmp_path / "big"]), image=ImageOptions(resolution=256))]
    loader = build_train_loader(DatasetConfig(groups=groups), DATA, planner, rank=0, world_size=1, seed=0,
                                micro_batch_size=1)
    take(loader, 3)
    assert loader.stats_scalars()["data/skipped/overlong"] >= 1
    strict = dataclasses.replace(DATA, filter_overlong=False)
    loader = build_train_loader(DatasetConfig(groups=groups), strict, planner, rank=0, world_size=1, seed=0,
                                micro_batch_size=1)
    with pytest.raises(OverlongSampleError, match="data.packing_length=192"):
        take(loader, 3)


# ----------------------------------------------------------------------------------------------------------------
# planning from KEY.json's media sizes


def _clip(seed: int, frames: int = 14) -> bytes:
    return encode_video(torch.full((frames, 32, 48, 3), 15 * (seed % 12), dtype=torch.uint8), fps=24, codec="mpeg4")


def test_samples_wait_for_packing_undecoded_and_train_as_if_decoded(tmp_path, planner, monkeypatch):
    """Converter shards give their media's sizes in KEY.json: the loader plans from them and decodes a sample only
    when it packs it, so the packing buffer holds encoded bytes, not pixels. Shards without sizes (another tool's)
    are planned from the media's headers, alike. The batches are exactly the same."""
    decoded = []
    real_image, real_video = stream_module.decode_image, stream_module.decode_video
    monkeypatch.setattr(stream_module, "decode_image", lambda data, *a: decoded.append(1) or real_image(data, *a))
    monkeypatch.setattr(stream_module, "decode_video", lambda data, **k: decoded.append(1) or real_video(data, **k))
    batches, media_per_sample = {}, {"i2t": 1, "v2v": 2}
    for describe in (True, False):
        write_shards(tmp_path / f"i{describe}", "i2t", 2, 5, prefix="i", describe=describe)
        write_shards(tmp_path / f"v{describe}", "v2v", 1, 6, prefix="v", describe=describe,
                     media=lambda i: {"input_video.mp4": _clip(i), "output_video.mp4": _clip(i + 1, 11)})
        groups = [group("i", [tmp_path / f"i{describe}"], task="i2t"),
                  dataclasses.replace(group("v", [tmp_path / f"v{describe}"], task="v2v"),
                                      video=VideoOptions(sample_fps=12, max_frames=9, max_duration=10.0))]
        spec = StreamSpec([resolve_group(g) for g in groups], planner, dataclasses.replace(DATA, packing_length=320),
                          Branches(), 2, 0, 0, 1)
        stream = SlotStream(spec, 0, 1)
        decoded.clear()
        batches[describe] = [stream.next_batch() for _ in range(6)]
        buffered = stream.packer.buffer
        assert buffered and all(p.needs_media and p.raw is not None for p in buffered)
        assert all(m.is_meta for p in buffered for m in p.media.values())  # sizes only: no pixels
        tasks = Counter(t for b in batches[describe] for t in b.tasks if t in media_per_sample)
        packed = sum(media_per_sample[t] * n for t, n in tasks.items())
        assert len(decoded) == packed  # each medium is decoded once, when packed
        stream.close()
    assert_same_batches(batches[True], batches[False])
    assert any(t == "v2v" for b in batches[True] for t in b.tasks)


def test_overlong_samples_are_dropped_without_decoding(tmp_path, planner, monkeypatch):
    write_shards(tmp_path / "small", "t2i", 1, 4, prefix="s")
    write_shards(tmp_path / "big", "t2i", 1, 2, prefix="b", media=lambda i: {"image.png": _png(i, 128)})
    groups = [group("s", [tmp_path / "small"]),
              dataclasses.replace(group("b", [tmp_path / "big"]), image=ImageOptions(resolution=256))]
    sizes = []
    real = stream_module.decode_image
    monkeypatch.setattr(stream_module, "decode_image", lambda data, *a: sizes.append(len(data)) or real(data, *a))
    loader = build_train_loader(DatasetConfig(groups=groups), DATA, planner, rank=0, world_size=1, seed=0,
                                micro_batch_size=1)
    take(loader, 3)  # (more, and group "b", whose every sample is too long, would be refused: see above)
    assert loader.stats_scalars()["data/skipped/overlong"] >= 2
    assert sizes and max(sizes) < len(_png(0, 128)) // 4  # only the small images were ever decoded
    sizes.clear()  # validation too
    val = build_val_loader(DatasetConfig(groups=groups), DATA, planner, rank=0, world_size=1)
    assert sorted(p.key for plans in val.iter_plans() for p in plans) == [f"s000x{i:04d}" for i in range(4)]
    assert val.stats_scalars()["val/skipped/overlong"] == 2
    assert len(sizes) == 4 and max(sizes) < len(_png(0, 128)) // 4


def _photo(seed: int, height: int, width: int) -> bytes:
    """A smooth JPEG (gradients and a disc), as photos are: a shrunk decode of it is close to the whole one."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    disc = ((y - 0.5) ** 2 + (x - 0.2 - 0.15 * seed) ** 2 < 0.04).float()
    return encode_image((torch.stack([x, y, disc], -1) * 255).to(torch.uint8), "jpeg")


def test_large_jpegs_are_decoded_shrunk_to_what_their_blocks_cut(tmp_path, planner, monkeypatch):
    """A JPEG several times the size its block is cut to is decoded shrunk (libjpeg's DCT scaling: a fraction of the
    work): the plan made from KEY.json stands, no side is decoded below what the block cuts, and the pixels are the
    whole image's to within rounding. A KEY.json that says another shape has the image decoded whole and the sample
    planned again from it, as without shrinking."""
    photos = {i: _photo(i, 192, 256) for i in range(4)}
    lies = {3: {"width": 256, "height": 256}}  # (another aspect ratio: another bucket than the real one)
    write_shards(tmp_path, "t2i", 1, 4, media=lambda i: {"image.jpg": photos[i]},
                 describe=lambda seed, media: {"image": {**media["image"], **lies.get(seed, {})}})
    decoded = []
    real = stream_module.decode_image
    monkeypatch.setattr(stream_module, "decode_image", lambda data, *a: decoded.append((data, real(data, *a)))
                        or decoded[-1][1])
    spec = StreamSpec([resolve_group(group("p", [tmp_path]))], planner, dataclasses.replace(DATA, shuffle_buffer=0),
                      Branches(vit=False, ce=False), 1, 0, 0, 1)
    stream = SlotStream(spec, 0, 1)
    blocks = [pixels for _ in range(4) for pixels in stream.next_batch().vae_pixels]
    assert stream.skips.counts.total() == 0
    shapes = {i: [tuple(frames.shape[1:3]) for data, frames in decoded if data == photo] for i, photo in photos.items()}
    for i in range(3):
        assert shapes[i] and all(h <= 192 // 2 and w <= 256 // 2 for h, w in shapes[i]), shapes
    assert shapes[3][-1] == (192, 256), shapes  # the lie: shrunk to the wrong shape, then decoded whole
    whole = [real(photo) for photo in photos.values()]
    for pixels in blocks:
        _, _, h, w = pixels.shape
        assert all(dh >= h and dw >= w for i in range(3) for dh, dw in shapes[i])  # cut down, never scaled up
        closest = min((pixels.permute(1, 2, 3, 0).float() - resize_crop(frames, h, w).float()).abs().mean().item()
                      for frames in whole)
        assert closest < 2.0, closest  # (of 255)
    decoded.clear()  # validation decodes alike
    val = build_val_loader(DatasetConfig(groups=[group("p", [tmp_path])]), DATA, planner, rank=0, world_size=1)
    plans = [p for plans in val.iter_plans() for p in plans]
    assert len(plans) == 4 and val.stats_scalars().get("val/skipped", 0) == 0
    assert [tuple(frames.shape[1:3]) for _, frames in decoded] == [(48, 64)] * 4 + [(192, 256)], decoded


def test_key_json_that_understates_a_sample_costs_time_not_samples(tmp_path, planner):
    """KEY.json claiming fewer frames than a clip has (metadata of another tool, shards edited by hand): the sample
    is planned again from its decoded frames when packed; no sequence grows past packing_length (one that no longer
    fits waits for the next sequence), nothing is skipped, and a resume is still exact."""
    def understate(seed, media):
        return {"video": {**media["video"], "frames": 2}} if seed % 2 else media

    write_shards(tmp_path, "t2v", 1, 10, media=lambda i: {"video.mp4": _clip(i)}, describe=understate)
    g = dataclasses.replace(group("v", [tmp_path], task="t2v"), image=ImageOptions(resolution=64),
                            video=VideoOptions(sample_fps=12, max_frames=9, max_duration=10.0))
    data = dataclasses.replace(DATA, packing_length=150, shuffle_buffer=0)
    spec = StreamSpec([resolve_group(g)], planner, data, Branches(vit=False, ce=False), 1, 0, 0, 1)
    stream = SlotStream(spec, 0, 1)
    state = None
    for _ in range(20):
        batch = stream.next_batch()
        assert batch.num_tokens == data.packing_length  # no sequence longer than packing_length
        assert all(grid[0] == 2 for grid in batch.vae_grid_thw.tolist())  # 7 frames kept -> 5 -> 2 latent frames
        if state is None and any(stream.state()["packing_buffer_decoded"]):
            state, after = json.loads(json.dumps(stream.state())), []
        elif state is not None and len(after) < 6:
            after.append(batch)
    assert state is not None and len(after) == 6, "no grown plan ever waited in the packing buffer"
    assert stream.skips.counts.total() == 0
    resumed = SlotStream(spec, 0, 1)
    resumed.load(state)
    assert_same_batches([resumed.next_batch() for _ in range(6)], after)


def test_key_json_sizes_no_medium_has_are_not_believed(tmp_path, planner):
    """Sizes beyond any decodable medium (another tool's bug, a hand edit) would hang or crash the planner (a frame
    count walked frame by frame, a meta tensor of 2**80 pixels): the medium is decoded and measured instead."""
    lies = [{"width": 2**40, "height": 2**40}, {"frames": 10**13, "fps": 1e12}, {"fps": float("inf")},
            {"frames": 10**9}]
    write_shards(tmp_path, "t2v", 1, 4, media=lambda i: {"video.mp4": _clip(i)},
                 describe=lambda seed, media: {"video": {**media["video"], **lies[seed]}})
    options = VideoOptions(sample_fps=12, max_frames=9, max_duration=10.0)
    sizes: list = []
    thread = threading.Thread(target=lambda: sizes.extend(stream_module.media_size(
        {"width": 48, "height": 32, "frames": 14, "fps": 24.0, **lie}, MediaKind.VIDEO, options) for lie in lies),
        daemon=True)
    thread.start()
    thread.join(10)
    assert sizes == [None] * len(lies), "a KEY.json size was believed (or planning it hung)"
    g = dataclasses.replace(group("v", [tmp_path], task="t2v"), video=options)
    loader = build_train_loader(DatasetConfig(groups=[g]), DATA, planner, rank=0, world_size=1, seed=0,
                                micro_batch_size=1)
    take_within(loader, 4, 60)
    assert loader.stats_scalars()["data/skipped"] == 0


@pytest.mark.parametrize("meta, reason", [
    ({"task": ["t2i"], "caption": "a red circle"}, "task_mismatch"),  # valid JSON, not a task name
    ({"task": "t2i", "caption": "cut inside an emoji \ud83d"}, "bad_json"),  # a lone surrogate: no tokenizer takes it
])
def test_odd_key_json_values_skip_their_sample(tmp_path, meta, reason):
    write_shards(tmp_path, "t2i", 1, 1)
    raw = stream_module.RawSample("k", {"json": json.dumps(meta).encode(), "image.png": _png(0)}, 0, 0)
    with pytest.raises(stream_module.SkipSample) as skipped:
        stream_module.decode_sample(raw, resolve_group(group("g", [tmp_path])))
    assert skipped.value.reason == reason


def test_media_that_do_not_decode_despite_their_key_json_are_counted(tmp_path, planner):
    """Damaged after conversion: KEY.json describes an image the bytes no longer hold. It is found when packed,
    counted, and a group with nothing else is still reported instead of looping forever."""
    def claim(seed, media):
        return media or {"image": {"format": "png", "bytes": 6, "width": 32, "height": 32}}

    broken = {"image.png": b"broken"}
    write_shards(tmp_path / "mixed", "t2i", 1, 8, media=lambda s: broken if s % 4 == 1 else {"image.png": _png(s)},
                 describe=claim)
    loader = build_train_loader(DatasetConfig(groups=[group("g", [tmp_path / "mixed"])]), DATA, planner, rank=0,
                                world_size=1, seed=0, micro_batch_size=1)
    take(loader, 8)
    assert loader.stats_scalars()["data/skipped/undecodable_media"] >= 2
    write_shards(tmp_path / "bad", "t2i", 1, 5, prefix="b", media=lambda s: broken, describe=claim)
    loader = build_train_loader(DatasetConfig(groups=[group("g", [tmp_path / "bad"])]), DATA, planner, rank=0,
                                world_size=1, seed=0, micro_batch_size=1)
    with pytest.raises(stream_module.DataError, match="without one usable sample"):
        take(loader, 1)


# ----------------------------------------------------------------------------------------------------------------
# remote shards


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.served, server.honour_range, server.drop = [], False, {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the directory; honours `Range: bytes=N-` on files when the server's honour_range is set (like object
    stores), else ignores it (like http.server). Records the body bytes of every response in server.served. A file
    named in server.drop (name -> times) has its connection dropped half-way through the body that many times."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if self.server.drop.get(path.name):
            self.server.drop[path.name] -= 1
            data = path.read_bytes()[int(wanted.group(1)) if wanted and self.server.honour_range else 0:]
            self.server.served.append(len(data) // 2)
            self.send_response(206 if wanted and self.server.honour_range else 200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops: the client reads a short body
            self.close_connection = True
            return
        if not (wanted and getattr(self.server, "honour_range", False) and path.is_file()):
            self.server.served.append(path.stat().st_size if path.is_file() else 0)
            return super().do_GET()
        data = path.read_bytes()
        start = int(wanted.group(1))
        self.server.served.append(len(data) - start)  # before the body: the client may check as soon as it has it
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


def test_http_and_pipe_shards_stream_like_local_ones(http_root, planner):
    root, url, server = http_root
    write_shards(root / "d", "t2i", 3, 4)
    local = build_train_loader(DatasetConfig(groups=[group("g", [root / "d"])]), DATA, planner, rank=0,
                               world_size=1, seed=2, micro_batch_size=1)
    expected = take(local, 4)
    for sources in ([f"{url}/d/manifest.json"], [f"{url}/d/shard-{{000000..000002}}.tar"],
                    [f"pipe:cat {root}/d/shard-{i:06d}.tar" for i in range(3)]):
        remote = build_train_loader(DatasetConfig(groups=[group("g", sources)]), DATA, planner, rank=0,
                                    world_size=1, seed=2, micro_batch_size=1)
        assert_same_batches(take(remote, 4), expected)
    # resume over HTTP: a Range request from the sample on; a server that ignores Range sends the whole shard and
    # the reader skips up to the sample
    shard = f"{url}/d/shard-000001.tar"
    raws = list(iter_raw_samples(shard))
    size = (root / "d" / "shard-000001.tar").stat().st_size
    for honour_range, served in ((True, size - raws[2].start), (False, size)):
        server.honour_range = honour_range
        server.served.clear()
        assert fetch_raws([(shard, raws[2].start, raws[2].key)])[0].members == raws[2].members
        assert server.served == [served]


def test_a_remote_shard_that_breaks_off_is_opened_again_at_its_next_sample(http_root, planner, monkeypatch):
    """A dropped connection lost the rest of the shard (a multi-GB shard from object storage: thousands of samples).
    It is now opened again at the next sample (a Range request), and training sees what it would have."""
    root, url, server = http_root
    write_shards(root / "d", "t2i", 1, 8)
    monkeypatch.setattr(stream_module, "RETRY_WAITS_S", (0.0, 0.0, 0.0))
    build = functools.partial(build_train_loader, data=DATA, planner=planner, rank=0, world_size=1, seed=2,
                              micro_batch_size=1)
    expected = take(build(DatasetConfig(groups=[group("g", [root / "d"])])), 4)
    server.honour_range, server.drop = True, {"shard-000000.tar": 2}  # twice: a new try may fail too
    remote = build(DatasetConfig(groups=[group("g", [f"{url}/d/shard-000000.tar"])]))
    assert_same_batches(take(remote, 4), expected)
    assert remote.stats_scalars()["data/skipped"] == 0 and server.drop["shard-000000.tar"] == 0
    size = (root / "d" / "shard-000000.tar").stat().st_size
    assert server.served[0] == size // 2 and 0 < server.served[1] < size  # the second try: from a sample on


def test_what_every_rank_reads_alike_tries_a_remote_shard_again(http_root, planner, monkeypatch):
    """Validation, its prompts and a resume's buffered samples are read by every rank: a rank that gave up on a
    shard after one dropped connection evaluated other batches than the others (a ZeRO-3 hang), and a resume failed
    saying the shards had changed."""
    root, url, server = http_root
    keys = write_shards(root / "d", "t2i", 1, 8)
    monkeypatch.setattr(stream_module, "RETRY_WAITS_S", (0.0, 0.0, 0.0))
    shard = f"{url}/d/shard-000000.tar"
    dataset = DatasetConfig(groups=[group("g", [shard])])
    server.honour_range = True
    server.drop = {"shard-000000.tar": 1}
    val = build_val_loader(dataset, DATA, planner, rank=0, world_size=1)
    assert sorted(p.key for plans in val.iter_plans() for p in plans) == keys and not val.skips.counts
    server.drop = {"shard-000000.tar": 1}
    assert [sample.key for _, sample in first_samples(dataset, 8)] == keys
    last = list(iter_raw_samples(str(root / "d" / "shard-000000.tar")))[-1]
    server.drop = {"shard-000000.tar": 1}  # half of the last sample's bytes, then the connection drops
    assert fetch_raws([(shard, last.start, last.key)])[0].members == last.members
    assert server.drop["shard-000000.tar"] == 0


def test_unreachable_shards_are_counted(http_root, planner):
    root, url, _ = http_root
    write_shards(root / "d", "t2i", 1, 4)
    sources = [f"{url}/d/shard-000000.tar", f"{url}/d/missing.tar", "pipe:exit 3"]
    loader = build_train_loader(DatasetConfig(groups=[group("g", sources)]), DATA, planner, rank=0, world_size=1,
                                seed=0, micro_batch_size=1)
    take(loader, 3)
    assert loader.stats_scalars()["data/skipped/unreadable_shard"] >= 2


def test_a_server_that_does_not_speak_http_makes_an_unreadable_shard():
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer_garbage():
            connection, _ = server.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"garbage\r\n\r\n")

        threading.Thread(target=answer_garbage, daemon=True).start()
        with pytest.raises(ShardError) as error:
            list(iter_raw_samples(f"http://127.0.0.1:{server.getsockname()[1]}/shard-000000.tar"))
    assert error.value.reason == "unreadable_shard"


# ----------------------------------------------------------------------------------------------------------------
# placeholders, videos


def test_batches_carry_placeholders_for_missing_branches(tmp_path, planner):
    write_shards(tmp_path, "t2i", 1, 6)
    loader = build_train_loader(DatasetConfig(groups=[group("g", [tmp_path])]), DATA, planner, rank=0,
                                world_size=1, seed=0, micro_batch_size=2)
    for batch in take(loader, 2):
        assert "placeholder" in batch.tasks and batch.tasks[-1] == "pad"
        assert batch.vit_grid_thw.shape[0] == 1 and batch.vit_indexes.numel() == 1  # a ViT block runs
        assert batch.ce_weights.numel() == 1 and batch.ce_weights.sum() == 0  # lm_head runs, weight 0
        assert batch.vae_weights.sum() > 0  # real targets, no VAE placeholder needed
        assert batch.num_tokens == 2 * DATA.packing_length
    only_gen = build_train_loader(DatasetConfig(groups=[group("g", [tmp_path])]), DATA, planner, rank=0,
                                  world_size=1, seed=0, micro_batch_size=1,
                                  branches=Branches(vit=False, vae_target=True, ce=False))
    assert "placeholder" not in take(only_gen, 1)[0].tasks


def test_video_groups_sample_frames(tmp_path, planner):
    def clip(i):
        frames = torch.full((12, 32, 32, 3), 20 * (i % 10), dtype=torch.uint8)
        return {"video.mp4": encode_video(frames, fps=24, codec="mpeg4")}

    write_shards(tmp_path, "t2v", 1, 3, media=clip)
    g = dataclasses.replace(group("v", [tmp_path], task="t2v"),
                            video=VideoOptions(sample_fps=12, max_frames=9, max_duration=10.0))
    loader = build_train_loader(DatasetConfig(groups=[g]), dataclasses.replace(DATA, packing_length=256), planner,
                                rank=0, world_size=1, seed=0, micro_batch_size=1)
    batch = take(loader, 1)[0]
    targets = [p for p, t in zip(batch.vae_pixels, batch.vae_is_target) if t and p.shape[1] > 1]
    assert targets and all(p.shape == (3, 5, 32, 32) for p in targets)  # 12 frames at 24 fps -> 6 at 12 -> 5 = 4k+1


# ----------------------------------------------------------------------------------------------------------------
# validation


def test_validation_covers_every_sample_once_with_equal_batch_counts(tmp_path, planner):
    keys = write_shards(tmp_path / "a", "t2i", 2, 5, prefix="a") + write_shards(tmp_path / "b", "i2t", 1, 4,
                                                                                 prefix="b")
    dataset = DatasetConfig(groups=[group("a", [tmp_path / "a"]), group("b", [tmp_path / "b"], task="i2t")])
    data = dataclasses.replace(DATA, val_samples_per_batch=3)
    batches_by_world = {}
    for world in (1, 2, 4):
        per_rank = []
        for rank in range(world):
            loader = build_val_loader(dataset, data, planner, rank=rank, world_size=world)
            per_rank.append([[p.key for p in plans] for plans in loader.iter_plans()])
            assert len(list(loader)) == len(per_rank[-1])
            assert loader.placeholder().num_real_tokens == 0 and "placeholder" in loader.placeholder().tasks
        # batch j on rank j % world (ranks with fewer go on with placeholders: distributed.until_every_rank_is_done)
        assert [len(b) for b in per_rank] == [len(range(r, 5, world)) for r in range(world)]  # 14 samples: 5 batches
        seen = [k for batches in per_rank for batch in batches for k in batch]
        assert sorted(seen) == sorted(keys)  # every sample exactly once
        batches_by_world[world] = sorted(tuple(b) for batches in per_rank for b in batches if b)
    assert batches_by_world[1] == batches_by_world[2] == batches_by_world[4]  # independent of the rank count
    limited = build_val_loader(dataset, data, planner, rank=0, world_size=1, max_samples=4)
    kept = [k for plans in limited.iter_plans() for k in (p.key for p in plans)]
    assert len([k for k in kept if k.startswith("a")]) == 4 and len([k for k in kept if k.startswith("b")]) == 4  # per group
    # samples training would drop as overlong are skipped and counted, not evaluated (nor an error)
    lengths = {p.key: p.num_tokens for plans in limited.iter_plans() for p in plans}
    cut = min(lengths.values())  # the t2i samples' length: the longer i2t ones go
    assert cut < max(lengths.values())
    for filter_overlong in (True, False):
        short = dataclasses.replace(DATA, val_samples_per_batch=3, packing_length=cut, filter_overlong=filter_overlong)
        loader = build_val_loader(dataset, short, planner, rank=0, world_size=1, max_samples=4)
        kept = {p.key for plans in loader.iter_plans() for p in plans}
        assert kept == {k for k, n in lengths.items() if n <= cut} and kept != set(lengths)
        assert loader.stats_scalars()["val/skipped/overlong"] == len(lengths) - len(kept)


def test_workers_outlive_the_thread_that_started_them(tmp_path, planner):
    """A loader first iterated from a thread (take_within does) keeps its workers when that thread ends. They used
    to be killed with it (PR_SET_PDEATHSIG follows the forking thread), at any point: once holding a lock that
    close() then waited on forever."""
    import time

    write_shards(tmp_path, "t2i", 2, 6)
    loader = build_train_loader(DatasetConfig(groups=[group("g", [tmp_path])]), dataclasses.replace(DATA, num_workers=2),
                                planner, rank=0, world_size=1, seed=0, micro_batch_size=1)
    started = []
    thread = threading.Thread(target=lambda: started.append(iter(loader)) or next(started[0]))
    thread.start()
    thread.join()
    time.sleep(1.0)
    assert len([next(started[0]) for _ in range(4)]) == 4  # served from the main thread by the same workers
    take_within(loader, 1, seconds=60)  # a new iter() closes the old one: this hung when the workers were gone
    loader.close()


def test_a_data_worker_dies_with_its_rank(tmp_path):
    """A rank killed with -9 must not leave its DataLoader workers behind (they hold GBs of decoded media)."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, time\n"
        "from lance_ds.processes import die_with_parent\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    die_with_parent()\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "time.sleep(60)\n")
    rank = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(rank.stdout.readline())
    time.sleep(0.5)  # the worker has armed its signal
    rank.send_signal(signal.SIGKILL)
    rank.wait()
    deadline = time.time() + 5
    while time.time() < deadline and Path(f"/proc/{worker}").exists() and "Z" not in _state(worker):
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists() or "Z" in _state(worker), "the worker outlived its rank"


def test_data_workers_run_under_a_rank_that_is_a_containers_pid_1(tmp_path):
    """`docker run IMAGE python lance_ds/train.py` makes the rank pid 1: its workers' parent is then pid 1, which
    is also what an orphan's parent is; they must not take their rank for dead. (pid 1 is simulated: os.getpid and
    os.getppid answer 1 in the rank and, forked, in its workers.)"""
    import subprocess
    import sys

    write_shards(tmp_path / "shards", "t2i", 2, 4)
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys\n"
        "os.getpid = os.getppid = lambda: 1\n"
        "from lance_ds.config.data import DataConfig, DatasetConfig, GroupConfig, ImageOptions\n"
        "from lance_ds.data.sequence import SequencePlanner, VisionGeometry, resize_crop\n"
        "from lance_ds.data.stream import build_train_loader\n"
        "from lance_ds.data.tokenizer import load_tokenizer\n"
        "planner = SequencePlanner(load_tokenizer(None), VisionGeometry(), seed=0)\n"
        "dataset = DatasetConfig(groups=[GroupConfig(name='g', shards=[sys.argv[1]], task='t2i',\n"
        "                                            image=ImageOptions(resolution=32))])\n"
        "data = DataConfig(packing_length=192, packing_buffer=4, shuffle_buffer=6, num_workers=1)\n"
        "loader = build_train_loader(dataset, data, planner, rank=0, world_size=1, seed=0, micro_batch_size=1)\n"
        "batches = iter(loader)\n"
        "print(sum(next(batches).num_tokens > 0 for _ in range(3)), 'batches')\n"
        "loader.close()\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "shards")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "3 batches" in done.stdout, done.stderr[-2000:]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "gone"



def test_a_shard_lost_with_many_samples_is_said_as_well_as_counted(caplog):
    """A deleted shard of 18 samples counts 18 at once: the first report of a reason was silent when it counted more
    than the few that are logged."""
    skips = SkipCounter(" rank 0")
    with caplog.at_level("WARNING", logger="lance_ds.data.stream"):
        skips.add("unreadable_shard", "shard-000003.tar: no such file", 18)
        skips.add("unreadable_shard", "shard-000004.tar: no such file", 18)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["data rank 0: skipped (unreadable_shard) (18 samples): shard-000003.tar: no such file (further "
                    "ones are only counted)"]
    assert skips.counts["unreadable_shard"] == 36
