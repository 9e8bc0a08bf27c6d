"""Webdataset tar shards: written byte-for-byte reproducibly by the converter, read with byte offsets by the loader.

Writing (`TarShardWriter`): USTAR members with fixed headers (mtime 2000-01-01, uid/gid 0, mode 0644), so the same
input gives the same bytes. Headers, member bytes and padding go to the file with os.writev on a thread of its own
(no copy in Python), with a CRC-32 taken as they are written; the tar is written as NAME.tmp and renamed when
complete, so a shard that exists is whole.

Reading (`iter_raw_samples`): a sample is the run of members sharing a key (webdataset's rule: the name up to the
first dot of its file name). Each sample comes with the byte offsets where it starts and ends, so that a resumed
loader seeks to a sample (a file seek, an HTTP Range request) instead of re-reading the shard. Local paths, http(s)
URLs and webdataset's `pipe:COMMAND` URLs are read alike. A damaged shard raises ShardError with a reason the loader
counts; what came before the damage is kept.
"""

from __future__ import annotations

import http.client
import mmap
import os
import queue
import tarfile
import threading
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed so that shards are byte-identical across runs
_TAR_RECORD = 10240  # bytes; tar archives end padded to a whole record, as tarfile and GNU tar write them
_BLOCK = tarfile.BLOCKSIZE  # 512 bytes: headers and member data are padded to whole blocks

# ----------------------------------------------------------------------------------------------------------------
# writing


def _header_template() -> bytes:
    """A USTAR header with our fixed fields (mode, owner, mtime) and blank name, size and checksum."""
    info = tarfile.TarInfo("x")
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = _TAR_MTIME, 0o644, 0, 0, "", ""
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii", errors="strict"))
    header[0:100] = bytes(100)  # name
    header[124:136] = bytes(12)  # size
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    return bytes(header)


_HEADER = _header_template()
_HEADER_SUM = sum(_HEADER)  # the checksum is a plain byte sum: add the name's and the size's bytes to it
# the fixed fields between the ones that vary: mode/uid/gid, mtime, and everything after the checksum
_MODE_TO_SIZE, _MTIME, _AFTER_CHECKSUM = _HEADER[100:124], _HEADER[136:148], _HEADER[156:]
_CHUNK = 4 << 20  # bytes; pieces are handed to the write thread in lists of about this many bytes
_QUEUED_CHUNKS = 4  # chunks waiting for the write thread: bounds a shard's memory beyond one record batch
_IOV_MAX = 1024  # pieces per os.writev call (the POSIX minimum of IOV_MAX on Linux)
_PAGE = mmap.ALLOCATIONGRANULARITY  # mmap offsets are multiples of this
_ZEROS = bytes(_BLOCK)


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file: what tarfile writes for it, ~30x faster."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 characters: {name}")
    if size >= 8 ** 11:
        raise ValueError(f"tar member {name} is {size} bytes; USTAR members must be under 8 GiB")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_HEADER_SUM + sum(encoded) + sum(size_field))
    return b"".join((encoded.ljust(100, b"\0"), _MODE_TO_SIZE, size_field, _MTIME, checksum, _AFTER_CHECKSUM))


class _ChunkWriteThread:
    """Writes chunks (lists of pieces) to a file descriptor and CRCs them, in order, on a thread of its own.

    Neither step copies in Python or holds the GIL: os.writev gathers the pieces (arrow buffers included) straight
    into the page cache, and the CRC is taken over a read-only map of the bytes just written, one zlib.crc32 call
    per chunk. So they run beside the threads that read and convert the next rows. Without `checksum` the CRC is
    skipped (it costs as much as the write) and finish() returns None.
    An error (disk full) is raised by the next put() or by finish().
    """

    def __init__(self, fd: int, checksum: bool):
        self._fd = fd
        self._checksum = checksum
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._error: BaseException | None = None
        self._written = 0  # bytes of the file written so far
        self._ended = False
        self.crc: int | None = 0 if checksum else None
        self._thread = threading.Thread(target=self._run, name="tar-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (pieces := self._queue.get()) is not None:
            if self._error is None:  # after an error keep draining, so that put() never blocks forever
                try:
                    self._write(pieces)
                except BaseException as e:  # handed to the caller's thread
                    self._error = e

    def _write(self, pieces: list) -> None:
        start = self._written
        for first in range(0, len(pieces), _IOV_MAX):
            self._written += _writev_all(self._fd, pieces[first:first + _IOV_MAX])
        if not self._checksum:
            return
        mapped_from = start - start % _PAGE
        with mmap.mmap(self._fd, self._written - mapped_from, offset=mapped_from, access=mmap.ACCESS_READ) as written:
            with memoryview(written) as view:
                self.crc = zlib.crc32(view[start - mapped_from:], self.crc)

    def put(self, pieces: list) -> None:
        self._raise_error()
        self._queue.put(pieces)

    def end(self) -> None:
        """No more chunks: the thread stops once the queued ones are written (without waiting for that)."""
        if not self._ended:
            self._ended = True
            self._queue.put(None)

    def finish(self) -> int | None:
        """Wait for every chunk to be written; returns the CRC-32 of all of them (None without `checksum`)."""
        self.end()
        self._thread.join()
        self._raise_error()
        return self.crc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def _writev_all(fd: int, pieces: list) -> int:
    """Write the pieces in one os.writev call; returns their bytes. A write that stops short (a signal, a full
    disk) is finished piece by piece, so that an error, if any, is raised."""
    total = sum(len(piece) for piece in pieces)
    skip = os.writev(fd, pieces)
    if skip < total:
        for piece in pieces:
            view = memoryview(piece)[skip:]
            skip = max(0, skip - len(piece))
            while view:
                view = view[os.write(fd, view):]
    return total


class TarShardWriter:
    """A deterministic tar written straight from bytes: fixed headers, CRC-32 computed while writing (unless
    `checksum` is False).

    Headers, members and padding are gathered into lists of ~_CHUNK bytes that a thread writes with one writev
    call: no copy in Python, and the caller goes on converting meanwhile.
    """

    def __init__(self, path: Path, checksum: bool = True):
        self.path = path
        self.tmp_path = path.with_name(path.name + ".tmp")
        # read access too: the write thread maps what it wrote to CRC it
        self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._writes = _ChunkWriteThread(self._fd, checksum)
        self._pending: list[bytes | memoryview] = []  # pieces not yet handed to the write thread
        self._pending_bytes = 0
        self.bytes = 0  # archive bytes so far, pending pieces included
        self._ended = False

    def _flush(self) -> None:
        if self._pending:
            self._writes.put(self._pending)
            self._pending = []
            self._pending_bytes = 0

    def add(self, name: str, data: bytes | memoryview) -> None:
        size = len(data)
        padding = -size % _BLOCK
        self._pending += (tar_header(name, size), data, _ZEROS[:padding])
        self._pending_bytes += _BLOCK + size + padding
        self.bytes += _BLOCK + size + padding
        if self._pending_bytes >= _CHUNK:
            self._flush()

    def end(self) -> None:
        """Add the end of the archive; its thread goes on writing while the caller converts the next rows."""
        if not self._ended:
            self._ended = True
            end = 2 * _BLOCK
            end += -(self.bytes + end) % _TAR_RECORD
            self._pending.append(bytes(end))
            self.bytes += end
            self._flush()
            self._writes.end()

    def close(self) -> str | None:
        """End the archive, wait until it is written, rename it into place; returns its CRC-32 as 8 hex digits
        (None without `checksum`)."""
        self.end()
        crc = self._finish()
        os.replace(self.tmp_path, self.path)
        return None if crc is None else f"{crc:08x}"

    def abort(self) -> None:
        try:
            self._finish()
        except BaseException:  # the shard is thrown away; its first error was raised already
            pass
        self.tmp_path.unlink(missing_ok=True)

    def _finish(self) -> int | None:
        try:
            return self._writes.finish()
        finally:
            os.close(self._fd)


def file_crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


# ----------------------------------------------------------------------------------------------------------------
# reading with byte offsets


class ShardError(Exception):
    """Reading a shard failed; `reason` is unreadable_shard, truncated_tar or corrupt_tar (the loader counts skipped
    shards by it). `transient`: a remote source could not be opened or read (a dropped connection, a 5xx, a pipe:
    command that failed), which a new try may not meet; not a damaged shard."""

    def __init__(self, reason: str, message: str, transient: bool = False):
        super().__init__(message)
        self.reason, self.transient = reason, transient


def _remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:"))


@dataclass
class RawSample:
    """The undecoded members of one sample and where it lies in its shard."""

    key: str
    members: dict[str, bytes]  # suffix after the key ("json", "image.jpg") -> bytes
    start: int  # byte offset of its first tar header
    end: int  # byte offset just past its last member (the next sample's start)
    address: list | None = None  # [group, shard index, start, epoch, key], set by the group reader

    @property
    def nbytes(self) -> int:
        return sum(len(data) for data in self.members.values())


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """A readable binary stream positioned at byte `offset` of the shard. Raises ShardError("unreadable_shard")."""
    try:
        if url.startswith("pipe:"):
            from webdataset.gopen import gopen_pipe

            stream = gopen_pipe(url, "rb", bufsize=1 << 20)
            _discard(stream, offset)
            return stream
        if url.startswith(("http://", "https://")):
            request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
            stream = urllib.request.urlopen(request, timeout=120)
            if offset and stream.status != 206:  # the server ignored Range: read up to the offset
                _discard(stream, offset)
            return stream
        path = url[len("file://"):] if url.startswith("file://") else url
        stream = open(path, "rb", buffering=1 << 20)
        stream.seek(offset)
        return stream
    except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException) as e:  # (a garbled reply)
        raise ShardError("unreadable_shard", f"cannot open {url} at byte {offset}: {e}", _remote(url)) from None


def _discard(stream: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise OSError(f"stream ended {count} bytes before the resume offset")
        count -= len(chunk)


def _read_exact(stream: BinaryIO, size: int, url: str, where: int) -> bytes:
    parts, left = [], size
    while left:
        try:
            chunk = stream.read(left)
        except (OSError, http.client.HTTPException) as e:  # I/O error, dropped connection, failing pipe command
            raise ShardError("unreadable_shard", f"{url}: reading at byte {where} failed: {e}", _remote(url)) from None
        if not chunk:
            if getattr(stream, "length", None):  # http.client reads a dropped connection as the end of the body
                raise ShardError("unreadable_shard", f"{url}: the connection dropped at byte {where + size - left}",
                                 transient=True)
            break
        parts.append(chunk)
        left -= len(chunk)
    data = b"".join(parts)
    if len(data) != size and data:
        raise ShardError("truncated_tar", f"{url} is cut short in the tar block at byte {where}")
    return data


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("LEN path=VALUE\\n" records)."""
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return kv[len(b"path="):].decode("utf-8", "surrogateescape")
    return None


def iter_tar_members(stream: BinaryIO, url: str, base: int = 0) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, data, start, end) of every regular file, where start is the offset of its first header (a pax or GNU
    long-name header counts) and end the offset past its padded data. Raises ShardError when the tar is cut short
    (including a missing end-of-archive) or a header is damaged."""
    pos, start, long_name = base, None, None
    while True:
        header = _read_exact(stream, _BLOCK, url, pos)
        if not header:
            raise ShardError("truncated_tar", f"{url} ends at byte {pos} without the end-of-archive blocks")
        if len(header) < _BLOCK:
            raise ShardError("truncated_tar", f"{url} ends inside a header at byte {pos}")
        if header == b"\0" * _BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ShardError("corrupt_tar", f"{url} has a damaged header at byte {pos}: {e}") from None
        start = pos if start is None else start
        padded = info.size + (-info.size % _BLOCK)
        data = _read_exact(stream, padded, url, pos)
        if len(data) != padded:
            raise ShardError("truncated_tar", f"{url} ends inside the member {info.name!r} at byte {pos}")
        pos += _BLOCK + padded
        data = data[:info.size]
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
            long_name = (data.rstrip(b"\0").decode("utf-8", "surrogateescape") if info.type == tarfile.GNUTYPE_LONGNAME
                         else _pax_path(data) or long_name)
            continue
        if info.type == tarfile.XGLTYPE:
            start = None
            continue
        name = long_name or info.name
        member_start, start, long_name = start, None, None
        if info.isreg():
            yield name, data, member_start, pos


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name; the suffix is the rest."""
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix


def iter_raw_samples(url: str, offset: int = 0) -> Iterator[RawSample]:
    """Samples of a shard from byte `offset` (a sample start). A shard cut short yields what it completed (the last
    sample possibly missing members) and then raises ShardError; a transient failure raises it after the last whole
    sample."""
    stream = open_shard(url, offset)
    key, members, start, end = None, {}, offset, offset
    complete = False
    try:
        for name, data, m_start, m_end in iter_tar_members(stream, url, offset):
            member_key, suffix = split_member_name(name)
            if member_key != key:
                if members:
                    yield RawSample(key, members, start, m_start)
                key, members, start = member_key, {}, m_start
            members[suffix] = data
            end = m_end
        complete = True
    except ShardError as e:
        if members and not e.transient:  # (after a dropped connection the sample is read again, whole)
            yield RawSample(key, members, start, end)
        raise
    finally:
        if not complete:  # cut short or abandoned: a pipe's exit status says nothing more
            _close_quietly(stream)
    try:
        stream.close()
    except OSError as e:  # a pipe: command that exited with an error status
        raise ShardError("unreadable_shard", f"{url}: {e}", transient=True) from None
    if members:
        yield RawSample(key, members, start, end)


def _close_quietly(stream: BinaryIO) -> None:
    try:
        stream.close()
    except OSError:
        pass  # the stream is being abandoned (early stop, or an error already reported)
