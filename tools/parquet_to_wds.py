#!/usr/bin/env python
"""Convert parquet files in a Lance task schema into webdataset tar shards (see lance_ds/data/convert.py).

  python tools/parquet_to_wds.py --input datasets/text2image --output shards/t2i --samples-per-shard 1000 --workers 4

DIR gets shard-*.tar, manifest.json and rejects.jsonl. Re-running the same command resumes: complete shards are kept.
Exit status: 0 done (rejected rows are listed in rejects.jsonl), 2 refused (bad options or inputs), 130 / 143
stopped by Ctrl-C / SIGTERM (the workers are stopped too; re-running the same command resumes). An input cut short
while it is being converted (inputs are memory-mapped) kills the process with SIGBUS: a traceback says where;
re-running the same command resumes.
Memory: a worker holds ~32 MB record batches, and the parquet page it decodes: pages are read whole, so files whose
writer packed many large media values into one page (pyarrow packs up to 1024 values, its write_batch_size, or a
dictionary of them, into a page) need that page's size; write such files with a small write_batch_size.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading

from lance_ds.config.core import ConfigError
from lance_ds.data.convert import ConvertError, ConvertOptions, convert


def parse_args(argv=None) -> ConvertOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="parquet files or directories of them")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--task", default="auto", help="auto (from the columns), t2i, t2v, i2i, v2v, i2t or v2t")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, metavar="N", help="rows per shard")
    size.add_argument("--shard-size-mb", type=float, metavar="M", help="approximate MB per shard (default 256)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel processes (output does not depend on it)")
    p.add_argument("--verify", default="full", choices=["full", "none"],
                   help="full: decode images and probe videos; none: read headers only, no shard CRC (trusted data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return ConvertOptions(inputs=args.input, output=args.output, task=args.task,
                          samples_per_shard=args.samples_per_shard, shard_size_mb=args.shard_size_mb,
                          workers=args.workers, verify=args.verify, progress=not args.no_progress)


_stopped_by: list[int] = []  # the signal that stopped the conversion


def _stop(signum: int, frame) -> None:
    """SIGTERM stops as Ctrl-C does: KeyboardInterrupt in the main thread, where convert() stops its workers, drops the
    shards they were writing and keeps the finished ones. A second SIGTERM is ignored, so that the clean-up is not cut
    short; a second Ctrl-C stops at once (workers die with their parent; the next run removes what they were
    writing)."""
    _stopped_by.append(signum)
    if len(_stopped_by) == 1 or signum == signal.SIGINT:
        raise KeyboardInterrupt


def main(argv=None) -> int:
    faulthandler.enable()  # SIGBUS (an input truncated under its memory map) prints a traceback, not just "Bus error"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    options = parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # (signal handlers can be set there only)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _stop)
    try:
        summary = convert(options)
    except (ConfigError, ConvertError) as e:
        print(f"parquet_to_wds: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signum = _stopped_by[0] if _stopped_by else signal.SIGINT
        how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"parquet_to_wds: stopped by {how}; the shards finished so far are kept: "
              "re-run the same command to resume", file=sys.stderr)
        return 128 + signum
    shown = summary.reject_reasons.most_common(10)
    for reason, count in shown:
        print(f"  rejected {count} x {reason}", file=sys.stderr)
    if len(summary.reject_reasons) > len(shown):
        others = summary.num_rejects - sum(count for _, count in shown)
        print(f"  rejected {others} more, of {len(summary.reject_reasons) - len(shown)} other kinds", file=sys.stderr)
    if summary.num_rejects:
        print(f"  every rejected row is listed in {options.output}/rejects.jsonl", file=sys.stderr)
    if summary.num_samples == 0:
        print("WARNING no sample was written: the inputs hold no rows, or every row was rejected", file=sys.stderr)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
