"""Example dataset: deterministic, in the Lance schemas, disjoint val split; judges accept right and reject wrong."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from lance_ds.data.example import (
    COLOURS, DIRECTIONS, SHAPES, ExampleConfig, Scene, judge_answer, judge_edit, judge_generation, judge_image,
    judge_video, draw_scene, make_table, parse_answer, read_frame, read_video, render_image, render_video, write_example_dataset,
    encoder_learning_rate)
from lance_ds.data.media import decode_image, decode_video, encode_image, encode_video, probe_video
from lance_ds.data.schemas import SCHEMAS, detect_task, validate_row

TINY = dict(num_per_task=6, rows_per_group=2)


@pytest.fixture(scope="module")
def tables():
    cfg = ExampleConfig(**TINY)
    return {task: make_table(task, cfg).to_pylist() for task in SCHEMAS}


def decode(data: bytes) -> np.ndarray:
    if data[4:8] == b"ftyp":
        return decode_video(data).numpy()
    return decode_image(data).numpy()


def test_writes_all_six_tasks_in_lance_layout_deterministically(tmp_path):
    cfg = ExampleConfig(**TINY)
    first = write_example_dataset(tmp_path / "a", cfg)
    second = write_example_dataset(tmp_path / "b", cfg)
    assert sorted(p.parent.name for p in first.values()) == sorted(
        ["text2image", "text2video", "image2image", "video2video", "image2text", "video2text"])
    for task, path in first.items():
        assert path.read_bytes() == second[task].read_bytes(), f"{task} is not deterministic"
        parquet = pq.ParquetFile(path)
        assert detect_task(parquet.schema_arrow.names) == task
        assert parquet.metadata.num_rows == 6 and parquet.metadata.num_row_groups == 3
    other_seed = write_example_dataset(tmp_path / "c", ExampleConfig(seed=1, **TINY))
    assert other_seed["t2i"].read_bytes() != first["t2i"].read_bytes()


def test_val_split_cannot_share_a_directory_with_train(tmp_path):
    write_example_dataset(tmp_path, ExampleConfig(tasks=("t2i",), **TINY))
    with pytest.raises(ValueError, match="another --out"):
        write_example_dataset(tmp_path, ExampleConfig(split="val", tasks=("t2i",), **TINY))
    # nor with a user's own parquet (it was added beside theirs, and the two converted together)
    mine = tmp_path / "mine"
    (mine / "text2image").mkdir(parents=True)
    (mine / "text2image" / "part-0.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"already holds other parquet \(part-0.parquet\)"):
        write_example_dataset(mine, ExampleConfig(tasks=("t2i",), **TINY))
    write_example_dataset(tmp_path, ExampleConfig(tasks=("t2i",), **TINY))  # its own file: written again


def test_config_errors_are_collected():
    with pytest.raises(ValueError, match="split.*size.*unknown tasks"):
        ExampleConfig(split="test", size=8, tasks=("t2x",))


def test_rows_are_valid_real_media_with_both_image_encodings(tables):
    for task, rows in tables.items():
        schema = SCHEMAS[task]
        for row in rows:
            assert validate_row(schema, row).ok
    formats = {row["image_bytes"][:4] for row in tables["t2i"]}
    assert formats == {b"\x89PNG", b"\xff\xd8\xff\xe0"}  # PNG and JPEG rows
    info = probe_video(tables["t2v"][0]["video_bytes"])
    assert (info.width, info.height, info.num_frames, info.fps) == (64, 64, 9, 12.0)


def test_size_frames_and_fps_flags_shape_the_media():
    cfg = ExampleConfig(num_per_task=2, rows_per_group=2, size=48, frames=5, fps=8.0, tasks=("t2i", "v2v"))
    image = make_table("t2i", cfg).to_pylist()[0]["image_bytes"]
    assert decode_image(image).shape == (1, 48, 48, 3)
    video = make_table("v2v", cfg).to_pylist()[0]
    for column in ("input_video_bytes", "output_video_bytes"):
        info = probe_video(video[column])
        assert (info.width, info.height, info.num_frames, info.fps) == (48, 48, 5, 8.0)


def test_generated_rows_pass_their_own_judges(tables):
    """Every row, decoded from its real encoding, is judged right against its own text."""
    for row in tables["t2i"]:
        assert judge_generation("t2i", row["caption"], decode(row["image_bytes"]))
    for row in tables["t2v"]:
        assert judge_generation("t2v", row["caption"], decode(row["video_bytes"]))
    for task, kind in (("i2i", "image"), ("v2v", "video")):
        for row in tables[task]:
            source, output = decode(row[f"input_{kind}_bytes"]), decode(row[f"output_{kind}_bytes"])
            verdict = judge_generation(task, row["caption"], output, source)
            assert verdict, verdict.reason
            assert not judge_generation(task, row["caption"], source, source)  # the unedited input fails
    for task, column in (("i2t", "image_bytes"), ("v2t", "video_bytes")):
        for row in tables[task]:
            frames = decode(row[column])
            reading = read_video(frames) if task == "v2t" else read_frame(frames)
            described = f"a {reading.colour} {reading.shape} moving {reading.direction}"
            assert judge_answer(described, row["caption_a"]), (row, described)


def test_questions_and_answers_are_templated(tables):
    rows = tables["i2t"] + make_table("i2t", ExampleConfig(num_per_task=30, rows_per_group=30)).to_pylist()
    pairs = {(r["caption_q"], len(r["caption_a"].split())) for r in rows}
    assert ("", 3) in pairs and ("What colour is the shape?", 1) in pairs and ("What shape is it?", 1) in pairs
    assert all(r["caption_i"] for r in rows)


def test_val_scenes_never_occur_in_train():
    """No medium of the val split - of any task, sources and edit targets alike - is one of train's."""
    from lance_ds.data.example import _edited

    def media(split: str) -> set[bytes]:
        cfg = ExampleConfig(num_per_task=30, rows_per_group=30, split=split, size=32)
        return {value for task in SCHEMAS for row in make_table(task, cfg).to_pylist()
                for column, value in row.items() if column.endswith("_bytes")}

    assert not media("train") & media("val")
    rng_train, rng_val = np.random.default_rng(0), np.random.default_rng(0)  # even the same stream cannot collide
    for video in (False, True):
        train = {draw_scene(rng_train, video, "train") for _ in range(300)}
        val = {draw_scene(rng_val, video, "val") for _ in range(300)}
        assert not train & val and all(s.held_out() for s in val) and not any(s.held_out() for s in train)
        # an edit's target (another colour or shape: new scenes) stays in its source's split
        for scene in train | val:
            assert _edited(scene, rng_train, allow_shape=True)[0].held_out() == scene.held_out()


# ----------------------------------------------------------------------------------------------------------------
# judges on crafted outputs


SCENE = Scene("red", "circle", radius=16, cx=30, cy=34)
MOVING = Scene("blue", "triangle", radius=10, cx=32, cy=30, direction="left", travel=26)


@pytest.mark.parametrize("colour", list(COLOURS))
@pytest.mark.parametrize("shape", SHAPES)
def test_image_judge_reads_every_colour_and_shape(colour, shape):
    pixels = decode_image(encode_image(render_image(Scene(colour, shape, 15, 33, 31)), "jpeg"))
    assert judge_image(pixels, f"a {colour} {shape}")
    for other in [c for c in COLOURS if c != colour]:
        assert not judge_image(pixels, f"a {other} {shape}")
    for other in [s for s in SHAPES if s != shape]:
        verdict = judge_image(pixels, f"a {colour} {other}")
        assert not verdict and verdict.found["shape"] == shape


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_video_judge_reads_direction(direction):
    scene = Scene("green", "square", 10, 32, 32, direction=direction, travel=26)
    pixels = decode_video(encode_video(render_video(scene), fps=12))
    assert judge_video(pixels, scene.caption())
    for other in [d for d in DIRECTIONS if d != direction]:
        assert not judge_video(pixels, f"a green square moving {other}")
    assert not judge_video(pixels.flip(0), scene.caption())  # played backwards: the opposite direction


def test_judges_fail_on_bad_outputs():
    blank = np.full((64, 64, 3), 40, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not judge_image(blank, "a red circle") and not judge_image(noise, "a red circle")
    assert judge_image(blank, "a red circle").found == {"colour": None, "shape": None, "direction": None}
    static = np.repeat(render_image(MOVING), 9, axis=0)  # right shape, no motion
    verdict = judge_video(static, MOVING.caption())
    assert not verdict and "direction" in verdict.reason
    assert not judge_video(np.repeat(blank[None], 9, axis=0), MOVING.caption())
    two_circles = np.maximum(render_image(Scene("red", "circle", 8, 14, 32)), render_image(Scene("red", "circle", 8, 50, 32)))
    assert not judge_image(two_circles, "a red circle")  # not one shape
    squashed = render_image(SCENE)[:, 16:48:2].repeat(2, axis=2)[:, :, ::2]  # an ellipse twice as wide as tall
    assert read_frame(squashed).shape is None
    filled = np.zeros((64, 64, 3), np.uint8)
    filled[..., 0] = 230  # a frame of one colour (a collapsed generator): it fills its box as a square would
    assert not judge_image(filled, "a red square") and read_frame(filled).shape is None
    assert not judge_edit(render_image(SCENE), filled, "turn it into a square")
    biggest = Scene("red", "square", 20, 32, 32)  # the largest shape this world draws is still read
    assert judge_image(render_image(biggest), biggest.caption())


def test_edit_judge_checks_the_requested_change_and_the_place():
    source = render_image(SCENE)
    recoloured = render_image(Scene("blue", "circle", 16, 30, 34))
    reshaped = render_image(Scene("red", "square", 16, 30, 34))
    assert judge_edit(source, recoloured, "make it blue")
    assert judge_edit(source, reshaped, "turn it into a square")
    assert not judge_edit(source, recoloured, "make it green")  # wrong colour
    assert not judge_edit(source, reshaped, "make it blue")  # changed the wrong attribute
    assert not judge_edit(source, render_image(Scene("blue", "square", 16, 30, 34)), "make it blue")  # changed both
    moved = judge_edit(source, render_image(Scene("blue", "circle", 14, 50, 16)), "make it blue")
    assert not moved and "position" in moved.reason
    # within the world's places (all within 18% of the side of each other), and resized: both caught
    nearby = judge_edit(render_image(Scene("red", "circle", 16, 28, 28)),
                        render_image(Scene("blue", "circle", 16, 36, 36)), "make it blue")
    assert not nearby and "position" in nearby.reason
    smaller = judge_edit(source, render_image(Scene("blue", "circle", 11, 30, 34)), "make it blue")
    assert not smaller and "size" in smaller.reason
    with pytest.raises(ValueError, match="names no colour or shape"):
        judge_edit(source, recoloured, "make it nicer")


def test_video_edit_judge_keeps_the_motion():
    source = render_video(MOVING)
    target = Scene("yellow", "triangle", 10, 32, 30, direction="left", travel=26)
    assert judge_generation("v2v", "make it yellow", render_video(target), source)
    reversed_motion = render_video(target)[::-1]
    assert not judge_generation("v2v", "make it yellow", reversed_motion, source)
    slower = judge_generation("v2v", "make it yellow", render_video(dataclasses.replace(target, travel=8)), source)
    assert not slower and "travel" in slower.reason  # the right direction, a third of the way
    with pytest.raises(ValueError, match="source"):
        judge_generation("v2v", "make it yellow", render_video(target))


@pytest.mark.parametrize("answer, reference, right", [
    ("a red circle", "a red circle", True),
    ("A red circle.", "a red circle", True),
    ("It is a red ball", "a red circle", True),
    ("a blue circle", "a red circle", False),
    ("a red square", "a red circle", False),
    ("red", "a red circle", False),  # the shape is missing
    ("the circle is red", "red", True),
    ("green", "red", False),
    ("a yellow square moving up", "a yellow square moving up", True),
    ("a yellow square moving down", "a yellow square moving up", False),
    ("left", "left", True),
    ("", "left", False),
])
def test_answer_judge(answer, reference, right):
    assert judge_answer(answer, reference) is right


def test_parse_answer():
    assert parse_answer("A Green Triangle moving RIGHT!") == {"colour": "green", "shape": "triangle", "direction": "right"}
    assert parse_answer("nothing here") == {"colour": None, "shape": None, "direction": None}
    with pytest.raises(ValueError, match="names no colour"):
        judge_answer("a red circle", "I do not know")


def test_example_dataset_converts_cleanly_and_round_trips_to_the_judges(tmp_path):
    """make_example_dataset -> parquet_to_wds: no rejects, and the shards' media still pass the judges."""
    import json

    import webdataset as wds

    from lance_ds.data.convert import ConvertOptions, convert
    from lance_ds.data.manifest import read_manifest

    written = write_example_dataset(tmp_path / "datasets", ExampleConfig(num_per_task=4, rows_per_group=2))
    for task, path in written.items():
        out = tmp_path / "shards" / task
        summary = convert(ConvertOptions(inputs=[str(path.parent)], output=str(out), samples_per_shard=3, progress=False))
        assert (summary.task, summary.num_samples, summary.num_rejects) == (task, 4, 0)
        if task not in ("t2i", "v2v"):
            continue
        urls = [str(out / s["name"]) for s in read_manifest(out)["shards"]]
        for sample in wds.WebDataset(urls, shardshuffle=False):
            meta = json.loads(sample["json"])
            if task == "t2i":
                image = sample.get("image.png") or sample["image.jpg"]
                assert judge_generation("t2i", meta["caption"], decode(image))
            else:
                assert judge_generation("v2v", meta["caption"], decode(sample["output_video.mp4"]),
                                        decode(sample["input_video.mp4"]))


def test_encoder_learning_rate_warms_up_then_decays_to_five_percent():
    rates = [encoder_learning_rate(1e-3, step, 1000) for step in range(1000)]
    assert rates[0] == pytest.approx(1e-3 / 50, rel=1e-3)
    assert max(rates) == rates[49] and rates[49] > 0.99e-3  # the peak, right after the warmup
    assert all(a >= b for a, b in zip(rates[49:], rates[50:]))  # then only down
    assert rates[-1] == pytest.approx(0.05e-3, rel=1e-3)


def test_tool_refuses_an_out_that_is_a_file_with_the_other_problems(tmp_path, capsys):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import make_example_dataset

    (tmp_path / "afile").write_text("mine")
    assert make_example_dataset.main(["--out", str(tmp_path / "afile" / "data"), "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert f"--out: {tmp_path / 'afile'} is a file" in err and "size" in err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("flags, message", [
    (["--fps", "inf"], "--fps must be a frame rate from 0.001 to 1000, got inf"),  # was an OverflowError traceback
    (["--fps", "nan"], "--fps must be a frame rate from 0.001 to 1000, got nan"),
    (["--fps", "1e-9"], "--fps must be a frame rate from 0.001 to 1000, got 1e-09"),  # was written as 24 fps
    (["--fps", "1e6"], "--fps must be a frame rate from 0.001 to 1000, got 1000000.0"),  # undecodable videos
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),  # numpy's message, no flag
    (["--num-per-task", "0"], "--num-per-task must be a positive integer, got 0"),
])
def test_tool_refuses_values_naming_the_flag(tmp_path, capsys, flags, message):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import make_example_dataset

    assert make_example_dataset.main(["--out", str(tmp_path / "data"), "--tasks", "t2v", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_config_refuses_a_negative_seed_and_a_frame_rate_videos_cannot_carry():
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1; fps must be a frame rate"):
        ExampleConfig(seed=-1, fps=float("inf"))
    assert ExampleConfig(fps=0.001).fps == 0.001 and ExampleConfig(fps=1000.0).fps == 1000.0
