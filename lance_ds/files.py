"""Writing files so that a reader sees the old content or the new, never half of one (DESIGN rule 7)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"  # a file or directory being written; its final name comes only once it is whole


def fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync(path)
    except OSError as e:  # some network and FUSE file systems cannot sync a directory: nothing more to do there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def write_atomic(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Replace `path` whole: written to path.tmp, then renamed (a failed write leaves neither). `durable`: the file and
    then its folder are flushed to disk, so that a power cut cannot publish a file with holes."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # (after the rename there is none)
    if durable:
        fsync_dir(path.parent)
