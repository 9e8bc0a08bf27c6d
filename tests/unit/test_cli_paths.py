"""python -m lance_ds.generate refuses what it could not do before it loads a model (an --out it could not write,
numbers out of range), all at once, and a failed write leaves no half-written file behind. Fast: no checkpoint."""

from __future__ import annotations

import pytest
import torch

from lance_ds.generate import check_args, main, parse_args, write_media


def problems(*argv: str) -> list[str]:
    return check_args(parse_args(["--checkpoint", "unused", *argv]))


def test_an_out_that_cannot_be_written_is_refused_before_generating(tmp_path, capsys):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "afile").write_text("mine")
    t2i = ["--task", "t2i", "--prompt", "a red circle", "--out"]
    assert problems(*t2i, str(tmp_path / "dir.png")) == [
        f"--out: {tmp_path / 'dir.png'} is a directory; give the path of a file in it"]
    for out in (tmp_path / "afile" / "x.png", tmp_path / "afile" / "sub" / "x.png"):
        assert problems(*t2i, str(out)) == [
            f"--out: {tmp_path / 'afile'} is a file, so {out} cannot be created under it; choose another path"]
    assert problems(*t2i, str(tmp_path / "new" / "dir" / "x.png")) == []  # missing directories are created
    assert problems(*t2i, str(tmp_path / "afile.png")) == []
    assert problems("--task", "t2v", "--prompt", "x") == ["--out: t2v writes a video: give its path, ending in .mp4"]
    # the CLI stops there: nothing loaded (the checkpoint does not even exist), nothing touched
    assert main(["--checkpoint", str(tmp_path / "no_run"), *t2i, str(tmp_path / "afile" / "x.png")]) == 2
    assert "afile is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile", "dir.png"]


def test_numbers_out_of_range_are_refused_at_once_with_their_flags(tmp_path):
    got = problems("--task", "t2v", "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--fps", "-5", "--cfg", "-1",
                   "--temperature", "-0.5", "--max-new-tokens", "0")
    assert [p.split(" ")[0] for p in got] == ["--fps", "--cfg", "--temperature", "--max-new-tokens"]
    assert "--fps must be in (0, 1000]" in got[0] and "got -5.0" in got[0]
    assert "--max-new-tokens must be >= 1, got 0" in got[3]
    for fps in ("0", "nan", "inf"):  # 0 was written as 24 fps
        assert problems("--task", "t2v", "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--fps", fps)
    assert problems("--task", "t2i", "--prompt", "x", "--out", str(tmp_path / "a.png"), "--cfg", "0") == []


def test_an_input_for_text_to_image_or_video_is_refused(tmp_path):
    """t2i / t2v generate from the prompt alone: an --input was a crash after the model had loaded."""
    image = tmp_path / "a.png"
    image.write_bytes(b"not read")
    for task, out in (("t2i", "o.png"), ("t2v", "o.mp4")):
        got = problems("--task", task, "--prompt", "x", "--out", str(tmp_path / out), "--input", str(image))
        assert len(got) == 1 and got[0].startswith(f"--input: {task} generates from --prompt alone"), got


def test_a_failed_write_leaves_no_tmp_file(tmp_path):
    frames = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    target = tmp_path / "dir.png"
    target.mkdir()
    with pytest.raises(OSError):
        write_media(frames, target, 12.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png"]
    write_media(frames, tmp_path / "ok.png", 12.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "ok.png"]
