#!/usr/bin/env python
"""Convert parquet files in a Lance task schema into webdataset tar shards (see lance_ds/data/convert.py).

  python tools/parquet_to_wds.py --input datasets/text2image --output shards/t2i --samples-per-shard 1000 --workers 4

DIR gets shard-*.tar, manifest.json and rejects.jsonl. Re-running the same command resumes: complete shards are kept.
Exit status: 0 done (rejected rows are listed in rejects.jsonl), 2 refused (bad options or inputs). An input cut
short while it is being converted (inputs are memory-mapped) kills the process with SIGBUS: a traceback says where;
re-running the same command resumes.
Memory: a worker holds ~32 MB record batches, and the parquet page it decodes: pages are read whole, so files whose
writer packed many large media values into one page (pyarrow packs up to 1024 values, its write_batch_size, or a
dictionary of them, into a page) need that page's size; write such files with a small write_batch_size.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys

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


def main(argv=None) -> int:
    faulthandler.enable()  # SIGBUS (an input truncated under its memory map) prints a traceback, not just "Bus error"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    options = parse_args(argv)
    try:
        summary = convert(options)
    except (ConfigError, ConvertError) as e:
        print(f"parquet_to_wds: {e}", file=sys.stderr)
        return 2
    for reason, count in summary.reject_reasons.most_common(10):
        print(f"  rejected {count} x {reason}", file=sys.stderr)
    if summary.num_rejects:
        print(f"  every rejected row is listed in {options.output}/rejects.jsonl", file=sys.stderr)
    if summary.num_samples == 0:
        print("WARNING no sample was written: the inputs hold no rows, or every row was rejected", file=sys.stderr)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
