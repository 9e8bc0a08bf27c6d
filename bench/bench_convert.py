#!/usr/bin/env python
"""Converter throughput, measured side by side in one run and printed as ratios (issue 3 goals):

  1. --verify none against `cp` of the same parquet bytes          goal >= 0.7x cp
  2. --verify full with 2 workers against 1 worker                  goal >= 1.7x

  python bench/bench_convert.py [--rows 2000] [--side 416] [--repeats 3]

Throughput is parquet bytes in / wall seconds. Compared runs are interleaved round by round and each figure is the
best of --repeats rounds (the machine is shared), every run into a fresh output directory (a re-run into the same one
would resume and skip the work). A pure-CPU loop on 1 and 2 processes is timed beside the scaling runs: its ratio is
what 2 workers can reach on this machine at that moment.

The cp comparison's input is what image datasets look like: ~100 kB JPEGs, 50 rows (~5 MB) per row group. Its first
figure is the command a user runs (`--verify none`, default 256 MB shards, 1 worker). Two workers need two work units
(a unit is 4 shards' worth of row groups), so the 2-worker figure, and the 1-worker one it is compared with, use
--small-shard-mb shards. "pyarrow read alone" reads the same record batches and does nothing with them: the part of
the work no converter written on pyarrow avoids. "read + write, no per-row work" runs the converter's read and write
paths (the read-ahead thread, the tar write thread) with nothing between them: its distance from `convert --verify
none` is what the per-row work (checks, header peeks, JSON, tar headers) costs.

Those runs read a parquet file held in the page cache, where cp is an in-kernel copy at memory speed. The last pair
reads it from the disk, as a conversion of a dataset that has not just been written does: the file's pages are
dropped from the cache (posix_fadvise, no root needed) before each cp and each conversion. The disk's readahead
window and largest request are printed beside it: they cap what the converter's read-ahead asks for in one call.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common import noisy_jpeg  # noqa: E402  (puts the repository on the path)
from lance_ds.data.convert import ConvertOptions, _column_values, _read_ahead, convert
from lance_ds.data.media import probe_image
from lance_ds.data.tar import TarShardWriter


def make_t2i_parquet(path: Path, rows: int, side: int, quality: int, row_group_size: int, distinct: int = 64) -> Path:
    """t2i parquet of `rows` rows cycling through `distinct` different JPEGs."""
    rng = np.random.default_rng(0)
    images = [noisy_jpeg(rng, side, quality) for _ in range(distinct)]
    table = pa.table({"caption": [f"photo number {i}" for i in range(rows)],
                      "image_bytes": pa.array([images[i % distinct] for i in range(rows)], pa.binary())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@dataclass
class Timed:
    """One contender: what to run, what to clean (untimed) before each run, and its wall times."""

    name: str
    run: Callable[[], object]
    clean: Callable[[], object] = lambda: None
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process and its finished children

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu)


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have exited (cp, converter workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def race(contenders: list[Timed], repeats: int) -> None:
    """Run the contenders round-robin, `repeats` rounds: a neighbour's load hits all of them alike."""
    for _ in range(repeats):
        for c in contenders:
            c.clean()
            start, start_cpu = time.perf_counter(), cpu_seconds()
            c.run()
            c.times.append(time.perf_counter() - start)
            c.cpu.append(cpu_seconds() - start_cpu)
    for c in contenders:
        c.clean()


def reading(source: Path) -> Timed:
    """The converter's parquet reads alone (same options, same batches), nothing done with the rows."""
    def read() -> None:
        parquet = pq.ParquetFile(source, memory_map=True, pre_buffer=False)
        for group in range(parquet.num_row_groups):
            for _ in parquet.iter_batches(row_groups=[group], use_threads=False):
                pass

    return Timed("pyarrow read alone", read)


def read_and_write(source: Path, out: Path) -> Timed:
    """The converter's parquet reads and tar writes, with no per-row work between them."""
    def run() -> None:
        out.mkdir(parents=True, exist_ok=True)
        writer = TarShardWriter(out / "media.tar", checksum=False)
        parquet = pq.ParquetFile(source, memory_map=True, pre_buffer=False)
        batches = (batch for group in range(parquet.num_row_groups)
                   for batch in parquet.iter_batches(row_groups=[group], columns=["image_bytes"], use_threads=False))
        for batch in _read_ahead(batches):
            for value in _column_values(batch.column(0)):
                writer.add("sample.image.jpg", value)
        writer.close()

    return Timed("read + write, no per-row work", run, lambda: shutil.rmtree(out, ignore_errors=True))


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (no root needed): the next read comes from the disk. Written
    pages are flushed first; only clean ones can be dropped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def readahead(path: Path) -> str:
    """The readahead window and largest request of the disk holding `path` (what one posix_fadvise call may read)."""
    dev = path.stat().st_dev
    device = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    for queue in (device / "queue", device.parent / "queue"):  # (a partition's queue is its disk's)
        try:
            return ", ".join(f"{n} {(queue / n).read_text().strip()}" for n in ("read_ahead_kb", "max_sectors_kb"))
        except OSError:
            continue
    return "readahead unknown (not a block device)"


def cleaning(out: Path, source: Path, from_disk: bool) -> Callable[[], None]:
    def clean() -> None:
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            out.unlink(missing_ok=True)
        if from_disk:
            evict(source)
    return clean


def converting(name: str, source: Path, out: Path, from_disk: bool = False, **options) -> Timed:
    options = ConvertOptions(inputs=[str(source)], output=str(out), progress=False, **options)
    return Timed(name, lambda: convert(options), cleaning(out, source, from_disk))


def copying(name: str, source: Path, target: Path, from_disk: bool = False) -> Timed:
    return Timed(name, lambda: subprocess.run(["cp", str(source), str(target)], check=True),
                 cleaning(target, source, from_disk))


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def spinning(pool, workers: int, n: int = 2_000_000) -> Timed:
    """Two pure-CPU jobs on 1 or 2 processes: their ratio is the ceiling of any 2-worker figure on this machine right
    now (other tenants' load shows up here too)."""
    if workers == 1:
        return Timed("pure-CPU loop, 1 process", lambda: [_spin(n), _spin(n)])
    return Timed("pure-CPU loop, 2 processes", lambda: pool.map(_spin, [n, n]))


_JPEGS: list[bytes] = []  # the images the probe ceiling probes, in this process and in the pool's


def _set_jpegs(jpegs: list[bytes]) -> None:
    _JPEGS[:] = jpegs


def _probe_half(half: int) -> None:
    for data in _JPEGS[half::2]:
        probe_image(data)


def _decode_all_full_size() -> None:
    for data in _JPEGS:
        Image.open(io.BytesIO(data)).load()


def probing(pool, workers: int) -> Timed:
    """The image probes of the scaling run (what --verify full decodes) and nothing else, on 1 or 2 processes: the
    ceiling of a converter whose work is mostly decoding. It sits below the pure-CPU one where two decoders slow each
    other down (shared caches and memory bandwidth, or two virtual cores on one physical core)."""
    if workers == 1:
        return Timed("image probes only, 1 process", lambda: [_probe_half(0), _probe_half(1)])
    return Timed("image probes only, 2 processes", lambda: pool.map(_probe_half, [0, 1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000, help="rows of the cp comparison (verify none)")
    p.add_argument("--side", type=int, default=416, help="image side in pixels (~100 kB JPEGs at the default)")
    p.add_argument("--verify-rows", type=int, default=1600,
                   help="rows of the worker-scaling run (verify full; enough that starting the pool is ~5%% of it)")
    p.add_argument("--verify-side", type=int, default=256, help="image side of the worker-scaling run")
    p.add_argument("--small-shard-mb", type=float, default=16.0,
                   help="shard size of the 1- vs 2-worker --verify none runs (several work units)")
    p.add_argument("--samples-per-shard", type=int, default=50, help="of the worker-scaling run (verify full)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        big = make_t2i_parquet(work / "big.parquet", args.rows, args.side, 90, row_group_size=50)
        disk = readahead(big)
        small = make_t2i_parquet(work / "small.parquet", args.verify_rows, args.verify_side, 90, row_group_size=25)
        _set_jpegs(pq.read_table(small, columns=["image_bytes"]).column(0).to_pylist())
        with context.Pool(2, initializer=_set_jpegs, initargs=(_JPEGS,)) as pool:
            big_mb, small_mb = big.stat().st_size / 1e6, small.stat().st_size / 1e6
            big.read_bytes(), small.read_bytes()  # into the page cache for everyone alike
            pool.map(_spin, [1, 1])  # workers started before timing

            shards, shard_mb = args.samples_per_shard, args.small_shard_mb
            cp, read, floor = copying("cp", big, work / "copy.parquet"), reading(big), read_and_write(big, work / "out")
            none = converting("convert --verify none", big, work / "out", verify="none")
            cp_disk = copying("cp, input from disk", big, work / "copy.parquet", from_disk=True)
            none_disk = converting("convert --verify none, from disk", big, work / "out", from_disk=True,
                                   verify="none")
            none_1 = converting(f"  {shard_mb:g} MB shards, 1 worker", big, work / "out", verify="none",
                                shard_size_mb=shard_mb)
            none_2 = converting(f"  {shard_mb:g} MB shards, 2 workers", big, work / "out", verify="none",
                                shard_size_mb=shard_mb, workers=2)
            race([cp, read, floor, none, none_1, none_2, cp_disk, none_disk], args.repeats)
            full_1 = converting("convert --verify full, 1 worker", small, work / "out", verify="full",
                                samples_per_shard=shards)
            full_2 = converting("convert --verify full, 2 workers", small, work / "out", verify="full",
                                samples_per_shard=shards, workers=2)
            spin_1, spin_2 = spinning(pool, 1), spinning(pool, 2)
            probe_1, probe_2 = probing(pool, 1), probing(pool, 2)
            full_size = Timed("full-size JPEG decodes, 1 process", _decode_all_full_size)
            race([full_1, full_2, spin_1, spin_2, probe_1, probe_2, full_size], args.repeats)

    print(f"cp comparison: {args.rows} rows of {args.side}px JPEG, {big_mb:.0f} MB parquet; scaling: "
          f"{args.verify_rows} rows of {args.verify_side}px JPEG, {small_mb:.0f} MB; "
          f"best of {args.repeats} interleaved rounds")
    print(f"{'run':34s} {'seconds':>8s} {'MB/s':>8s} {'CPU s':>8s}")
    rows = [(c, big_mb) for c in (cp, read, floor, none, none_1, none_2, cp_disk, none_disk)]
    rows += [(full_1, small_mb), (full_2, small_mb), (spin_1, 0), (spin_2, 0), (probe_1, small_mb), (probe_2, small_mb),
             (full_size, small_mb)]
    for timed, mb in rows:
        rate = f"{mb / timed.best:8.1f}" if mb else f"{'':>8s}"
        in_pool = timed is spin_2 or timed is probe_2  # (the pool's workers are reaped at the end: CPU not counted)
        cpu = f"{timed.best_cpu:8.2f}" if not in_pool else f"{'':>8s}"
        print(f"{timed.name:34s} {timed.best:8.2f} {rate} {cpu}")
    print(f"verify none vs cp: {cp.best / none.best:.2f}x (the default command: 1 worker, 256 MB shards)"
          "   goal >= 0.7x")
    print(f"  {shard_mb:g} MB shards: {cp.best / none_1.best:.2f}x (1 worker), {cp.best / none_2.best:.2f}x "
          f"(2 workers); pyarrow read alone: {cp.best / read.best:.2f}x; read + write, no per-row work: "
          f"{cp.best / floor.best:.2f}x")
    print(f"  input read from the disk (evicted from the page cache before each run): "
          f"{cp_disk.best / none_disk.best:.2f}x ({disk})")
    print(f"verify full, 2 workers vs 1: {full_1.best / full_2.best:.2f}x   goal >= 1.7x "
          f"(ceilings on this machine right now, 2 vs 1 processes: pure-CPU loop {spin_1.best / spin_2.best:.2f}x, "
          f"image probes only {probe_1.best / probe_2.best:.2f}x; "
          f"CPU work 2 workers / 1 worker: {full_2.best_cpu / full_1.best_cpu:.2f})")
    print(f"image probes (JPEGs decoded at 1/8 scale) vs full-size decodes, 1 process: "
          f"{full_size.best / probe_1.best:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
