"""Tar shards: the writer's bytes are what the stock tarfile module writes (so any tar reader reads them), its CRC is
the file's, and short writes are finished."""

import io
import os
import tarfile
import zlib
from pathlib import Path

import pytest

from lance_ds.data import tar as tar_module


@pytest.mark.parametrize("name, size", [("a.json", 0), ("00001-x-000000001.input_image.png", 12345),
                                         ("k" * 100, 8 ** 11 - 1)])
def test_tar_header_is_what_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, tar_module._TAR_MTIME, 0o644, "", ""
    assert tar_module.tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT, encoding="ascii")
    with pytest.raises(ValueError, match="100 characters"):
        tar_module.tar_header("k" * 101, 1)


def tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """What the stock tarfile module writes for these members with the converter's fixed header fields."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), tar_module._TAR_MTIME, 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    writer = tar_module.TarShardWriter(path)
    for name, data in members:
        writer.add(name, memoryview(data) if len(data) % 2 else data)  # arrow hands memoryviews over
    return writer.close()


TAR_MEMBERS = [(f"k{i:03d}.{'json' if i % 2 else 'image.jpg'}", bytes([i]) * (i * 997 % 5000)) for i in range(60)]


@pytest.mark.parametrize("chunk, iov_max", [(4 << 20, 1024), (3000, 1024), (3000, 4)])
def test_tar_writer_writes_what_tarfile_writes(tmp_path, monkeypatch, chunk, iov_max):
    # small chunks and few pieces per writev: many hand-overs to the write thread, each CRC'd over its own span
    monkeypatch.setattr(tar_module, "_CHUNK", chunk)
    monkeypatch.setattr(tar_module, "_IOV_MAX", iov_max)
    crc = write_tar(tmp_path / "a.tar", TAR_MEMBERS)
    data = (tmp_path / "a.tar").read_bytes()
    assert data == tarfile_bytes(TAR_MEMBERS)
    assert crc == f"{zlib.crc32(data):08x}" == tar_module.file_crc32(tmp_path / "a.tar")
    assert not (tmp_path / "a.tar.tmp").exists()


def test_tar_writer_finishes_short_writes(tmp_path, monkeypatch):
    real_writev = os.writev

    def short_writev(fd, pieces):  # as a write interrupted by a signal: only part of the first piece goes out
        return real_writev(fd, [memoryview(pieces[0])[:len(pieces[0]) // 2 + 1]])

    monkeypatch.setattr(os, "writev", short_writev)
    monkeypatch.setattr(tar_module, "_CHUNK", 3000)
    write_tar(tmp_path / "a.tar", TAR_MEMBERS)
    assert (tmp_path / "a.tar").read_bytes() == tarfile_bytes(TAR_MEMBERS)
