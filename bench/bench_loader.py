#!/usr/bin/env python
"""Loader benchmark: samples/s per worker (images, videos) and packing efficiency, measured side by side in one run.

    OMP_NUM_THREADS=1 python bench/bench_loader.py [--num-per-task 96] [--size 64] [--packing-length 1024]

Data: the example dataset (lance_ds/data/example.py, all six tasks) converted to shards in a temporary directory.
1. Per worker (one slot in this process, no DataLoader): raw shard reading alone, and read + decode + plan, for the
   image tasks (t2i, i2i, i2t) and the video tasks (t2v, v2v, v2t); then whole packed batches through a DataLoader
   with 1 and 2 worker processes (the ratio shows how decode scales with workers on this machine).
2. Packing efficiency (real tokens / tokens) on the six-task mixture: first-fit from a 64-plan buffer (the default),
   next-fit, and the padded-batch baseline (batches of B samples, each padded to the longest). Goal: >= 95%.
3. Memory of a full packing buffer of video plans: planned from KEY.json's sizes (what the loader holds: encoded
   bytes), the same decoded (uint8 frames), and the model-ready pixels plans held before they were cut at collate
   time (float32).
4. Photos larger than the blocks they are cut to (--photo-side JPEGs at --photo-resolution, t2i and i2t): samples/s
   of one worker decoding, planning and cutting them, with the JPEGs decoded shrunk (libjpeg's DCT scaling, what the
   loader does) and decoded whole (as before it did).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from common import noisy_jpeg  # noqa: E402

from lance_ds.config.data import TASKS, VIDEO_TASKS, DataConfig, DatasetConfig, GroupConfig, ImageOptions  # noqa: E402
from lance_ds.data.convert import ConvertOptions, convert  # noqa: E402
from lance_ds.data.example import ExampleConfig, write_example_dataset  # noqa: E402
from lance_ds.data.packing import Branches, TokenBudgetPacker  # noqa: E402
from lance_ds.data.schemas import SCHEMAS  # noqa: E402
from lance_ds.data.sequence import SequencePlanner, VisionGeometry  # noqa: E402
from lance_ds.data import stream as stream_module  # noqa: E402
from lance_ds.data.stream import SlotStream, StreamSpec, build_train_loader, resolve_group  # noqa: E402
from lance_ds.data.tokenizer import load_tokenizer  # noqa: E402

IMAGE_TASKS = tuple(t for t in TASKS if t not in VIDEO_TASKS)


def make_shards(root: Path, num_per_task: int, size: int) -> dict[str, Path]:
    write_example_dataset(root / "parquet", ExampleConfig(num_per_task=num_per_task, size=size))
    out = {}
    for task in TASKS:
        out[task] = root / "shards" / task
        convert(ConvertOptions(inputs=[str(root / "parquet" / SCHEMAS[task].dir_name)], output=str(out[task]),
                               samples_per_shard=32, verify="none", progress=False))
    return out


def groups_for(shards: dict[str, Path], tasks, size: int) -> list[GroupConfig]:
    return [GroupConfig(name=t, shards=[str(shards[t])], task=t, image=ImageOptions(resolution=size)) for t in tasks]


def slot(groups, planner, data) -> SlotStream:
    spec = StreamSpec([resolve_group(g) for g in groups], planner, data, Branches(), 1, 0, 0, 1)
    return SlotStream(spec, 0, 1)


def per_worker_rates(groups, planner, data, n: int) -> tuple[float, float]:
    """(raw samples/s, decoded+planned samples/s) of one slot."""
    s = slot(groups, planner, data)
    start = time.perf_counter()
    for _ in range(n):
        s._next_mixed()
    raw_rate = n / (time.perf_counter() - start)
    s.close()
    s = slot(groups, planner, data)
    for _ in range(8):  # warm-up: first shard opens, interpolation kernels
        s._decoded(s._next_plan())
    start = time.perf_counter()
    for _ in range(n):
        s._decoded(s._next_plan())  # planned from KEY.json, then decoded (as when packed)
    rate = n / (time.perf_counter() - start)
    s.close()
    return raw_rate, rate


def photo_groups(root: Path, num: int, side: int, resolution: int) -> list[GroupConfig]:
    """t2i and i2t groups of `num` distinct side x side JPEG photos, converted as a user converts theirs."""
    rng = np.random.default_rng(0)
    photos = [noisy_jpeg(rng, side, 90) for _ in range(num)]
    tables = {"t2i": {"caption": [f"photo {i}" for i in range(num)], "image_bytes": photos},
              "i2t": {"image_bytes": photos, "caption_i": [None] * num, "caption_q": ["what is it?"] * num,
                      "caption_a": [f"photo {i}" for i in range(num)]}}
    groups = []
    for task, columns in tables.items():
        pq.write_table(pa.table(columns), root / f"{task}.parquet")
        convert(ConvertOptions(inputs=[str(root / f"{task}.parquet")], output=str(root / task), samples_per_shard=32,
                               verify="none", progress=False))
        groups.append(GroupConfig(name=task, shards=[str(root / task)], task=task,
                                  image=ImageOptions(resolution=resolution)))
    return groups


def cut_rate(groups, planner, data, n: int) -> float:
    """Samples/s of one slot planning, decoding and cutting (the blocks' pixels, as collate cuts them)."""
    s = slot(groups, planner, data)
    for _ in range(4):  # warm-up
        s._decoded(s._next_plan())
    start = time.perf_counter()
    for _ in range(n):
        plan = s._decoded(s._next_plan())
        [b.pixels(plan.media) for b in plan.vae], [b.patches(plan.media) for b in plan.vit]
    rate = n / (time.perf_counter() - start)
    s.close()
    return rate


def loader_rate(groups, planner, data, num_workers: int, num_batches: int) -> float:
    """Samples/s of whole packed batches through the rank's loader with `num_workers` processes."""
    loader = build_train_loader(DatasetConfig(groups=groups), dataclasses.replace(data, num_workers=num_workers),
                                planner, rank=0, world_size=1, seed=0, micro_batch_size=1)
    it = iter(loader)
    for _ in range(max(2, num_workers)):  # warm-up: worker start, buffers filled
        next(it)
    before = loader.stats()["samples"]
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    elapsed = time.perf_counter() - start
    samples = loader.stats()["samples"] - before
    loader.close()
    return samples / elapsed


def packing_efficiencies(lengths: list[int], packing_length: int, buffer: int) -> dict[str, float]:
    class Item:  # the packer only looks at num_tokens (and at the encoded bytes a plan holds: none here)
        raw = None

        def __init__(self, n):
            self.num_tokens = n

    out = {}
    for strategy in ("first_fit", "next_fit"):
        packer = TokenBudgetPacker(packing_length, buffer, strategy)
        used = total = 0
        for n in lengths:
            packer.add(Item(n))
            if packer.ready():
                seq = packer.pop_sequence()
                used, total = used + sum(p.num_tokens for p in seq), total + packing_length
        out[strategy] = used / total
    for b in (8, 32):
        batches = [lengths[i:i + b] for i in range(0, len(lengths) - b + 1, b)]
        out[f"padded_batch_{b}"] = sum(map(sum, batches)) / sum(len(x) * max(x) for x in batches)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-per-task", type=int, default=96)
    p.add_argument("--size", type=int, default=64, help="image / video side of the example data and target resolution")
    p.add_argument("--packing-length", type=int, default=1024)
    p.add_argument("--samples", type=int, default=200, help="samples timed per measurement")
    p.add_argument("--photo-side", type=int, default=1024, help="side of section 4's JPEG photos")
    p.add_argument("--photo-resolution", type=int, default=256, help="resolution section 4's photos are cut to")
    p.add_argument("--photo-samples", type=int, default=40, help="samples timed per round of section 4")
    args = p.parse_args()
    torch.set_num_threads(1)
    planner = SequencePlanner(load_tokenizer(None), VisionGeometry(), seed=0)
    data = DataConfig(packing_length=args.packing_length, shuffle_buffer=64, packing_buffer=64, num_workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards = make_shards(Path(tmp), args.num_per_task, args.size)
        print(f"example data: {args.num_per_task} samples x 6 tasks, {args.size}px, 9-frame videos "
              f"({time.perf_counter() - t0:.1f} s to make and convert)\n")

        print("1. loader throughput (one worker = one slot in this process)")
        print(f"   {'tasks':<22}{'raw read/s':>12}{'decode+plan/s':>15}{'decode+plan / raw':>19}")
        rates = {}
        for name, tasks in (("images (t2i,i2i,i2t)", IMAGE_TASKS), ("videos (t2v,v2v,v2t)", VIDEO_TASKS)):
            raw, full = per_worker_rates(groups_for(shards, tasks, args.size), planner, data, args.samples)
            rates[name] = full
            print(f"   {name:<22}{raw:>12.0f}{full:>15.1f}{full / raw:>19.3f}")
        print(f"   videos / images per worker: {rates['videos (t2v,v2v,v2t)'] / rates['images (t2i,i2i,i2t)']:.3f}")
        mix = groups_for(shards, TASKS, args.size)
        one = loader_rate(mix, planner, data, 1, 12)
        two = loader_rate(mix, planner, data, 2, 24)
        print(f"   six-task mixture, packed batches via DataLoader: 1 worker {one:.1f} samples/s, "
              f"2 workers {two:.1f} samples/s (x{two / one:.2f}; this machine has {torch.get_num_threads()} "
              f"torch thread(s), cores shared)\n")

        print(f"2. packing efficiency, six-task mixture, packing_length {args.packing_length}")
        s = slot(mix, planner, data)
        plans = [s._next_plan() for _ in range(1200)]
        s.close()
        lengths = [p.num_tokens for p in plans]
        by_task = {t: sum(p.num_tokens for p in plans if p.task == t) / max(1, sum(p.task == t for p in plans))
                   for t in TASKS}
        print("   mean tokens per sample: " + ", ".join(f"{t} {n:.0f}" for t, n in by_task.items()))
        eff = packing_efficiencies(lengths, args.packing_length, data.packing_buffer)
        for name, value in eff.items():
            print(f"   {name:<16} {100 * value:6.2f}% real tokens   (x{value / eff['padded_batch_8']:.2f} of padded "
                  f"batches of 8)")
        print(f"   goal >= 95%: {'met' if eff['first_fit'] >= 0.95 else 'NOT met'}\n")

        print(f"3. memory of a full packing buffer ({data.packing_buffer} plans), video tasks")
        s = slot(groups_for(shards, VIDEO_TASKS, args.size), planner, data)
        plans = [s._next_plan() for _ in range(data.packing_buffer)]
        encoded = sum(len(b) for p in plans for b in p.raw.members.values())
        plans = [s._decoded(p) for p in plans]
        s.close()
        frames = sum(m.nbytes for p in plans for m in p.media.values())
        pixels = sum(b.pixels(p.media).nbytes for p in plans for b in p.vae) + \
            sum(b.patches(p.media).nbytes for p in plans for b in p.vit)
        for name, held in (("planned from KEY.json (encoded bytes)", encoded), ("decoded frames (uint8)", frames),
                           ("model-ready pixels (float32)", pixels)):
            print(f"   {name:<40}{held / 1e6:9.2f} MB   (x{held / encoded:.0f})")

        side, resolution = args.photo_side, args.photo_resolution
        print(f"\n4. {side} px JPEG photos cut to resolution {resolution} (t2i, i2t), one worker")
        photos = photo_groups(Path(tmp), 16, side, resolution)
        shrinking, whole_decode = stream_module.decode_image, lambda data, at_least=None: shrinking(data)
        rates = {"shrunk": [], "whole": []}
        for _ in range(3):  # interleaved rounds, best of each
            for name, decode in (("shrunk", shrinking), ("whole", whole_decode)):
                stream_module.decode_image = decode
                rates[name].append(cut_rate(photos, planner, data, args.photo_samples))
        stream_module.decode_image = shrinking
        shrunk, whole = max(rates["shrunk"]), max(rates["whole"])
        print(f"   decoded shrunk (the loader) {shrunk:.1f} samples/s, decoded whole {whole:.1f} samples/s: "
              f"x{shrunk / whole:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
