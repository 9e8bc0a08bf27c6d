"""Task schemas: detection from column names, refusal messages, row validation."""

import pytest

from lance_ds.data.schemas import SCHEMAS, MediaKind, SchemaError, detect_task, resolve_task, validate_row

LANCE_COLUMNS = {
    "t2i": ["caption", "image_bytes"],
    "t2v": ["caption", "video_bytes"],
    "i2i": ["caption", "input_image_bytes", "output_image_bytes"],
    "v2v": ["caption", "input_video_bytes", "output_video_bytes"],
    "i2t": ["image_bytes", "caption_i", "caption_q", "caption_a"],
    "v2t": ["video_bytes", "caption_i", "caption_q", "caption_a"],
}


@pytest.mark.parametrize("task", list(LANCE_COLUMNS))
def test_detects_each_lance_schema(task):
    assert detect_task(LANCE_COLUMNS[task]) == task
    assert detect_task(list(reversed(LANCE_COLUMNS[task])) + ["row_id"]) == task  # order and extras do not matter
    assert sorted(SCHEMAS[task].columns) == sorted(LANCE_COLUMNS[task])


def test_media_kinds_and_member_names():
    assert [(c.member, c.kind) for c in SCHEMAS["i2i"].media] == [
        ("input_image", MediaKind.IMAGE), ("output_image", MediaKind.IMAGE)]
    assert [(c.member, c.kind) for c in SCHEMAS["v2t"].media] == [("video", MediaKind.VIDEO)]


def test_unknown_columns_are_refused_with_the_columns_and_the_six_schemas():
    with pytest.raises(SchemaError) as err:
        detect_task(["text", "jpg"], source="data/part-0.parquet")
    message = str(err.value)
    assert "data/part-0.parquet" in message and "'jpg'" in message and "'text'" in message
    for task, columns in LANCE_COLUMNS.items():
        assert task in message and all(c in message for c in columns)


def test_ambiguous_columns_ask_for_task():
    columns = LANCE_COLUMNS["t2i"] + LANCE_COLUMNS["i2t"]
    with pytest.raises(SchemaError, match="--task"):
        detect_task(columns)
    assert resolve_task(columns, "i2t").task == "i2t"


def test_resolve_task_given_checks_columns():
    with pytest.raises(SchemaError, match=r"\['output_image_bytes'\] are missing"):
        resolve_task(["caption", "input_image_bytes"], "i2i")
    with pytest.raises(SchemaError, match="unknown task"):
        resolve_task(LANCE_COLUMNS["t2i"], "text2image")
    assert resolve_task(LANCE_COLUMNS["t2v"], "auto").task == "t2v"


def test_valid_row_passes_with_texts_exact():
    caption = "ein roter Kreis \u2014 \U0001F534 " + "x" * 10_000
    row = validate_row(SCHEMAS["t2i"], {"caption": caption, "image_bytes": b"\xff\xd8\xff..."})
    assert row.ok and row.texts == {"caption": caption} and row.media == {"image_bytes": b"\xff\xd8\xff..."}


@pytest.mark.parametrize("row, column, reason", [
    ({"caption": None, "image_bytes": b"x"}, "caption", "null"),
    ({"caption": "a", "image_bytes": None}, "image_bytes", "null"),
    ({"caption": "a", "image_bytes": b""}, "image_bytes", "empty bytes"),
    ({"caption": "", "image_bytes": b"x"}, "caption", "empty string"),
    ({"caption": " \n\t", "image_bytes": b"x"}, "caption", "only whitespace"),  # trained as a blank caption
    ({"caption": 7, "image_bytes": b"x"}, "caption", "expected a string, got int"),
    ({"caption": "a", "image_bytes": "/data/cat.jpg"}, "image_bytes", "got a string"),
    ({"caption": "a", "image_bytes": 3.5}, "image_bytes", "got float"),
    ({"caption": b"\xff\xfe", "image_bytes": b"x"}, "caption", "not valid UTF-8"),
    ({"image_bytes": b"x"}, "caption", "column missing"),
])
def test_bad_rows_name_column_and_reason(row, column, reason):
    checked = validate_row(SCHEMAS["t2i"], row)
    assert not checked.ok
    assert [p.column for p in checked.problems] == [column]
    assert reason in checked.problems[0].reason


def test_understanding_rows_allow_absent_system_prompt_and_question_but_not_answer():
    """A null system prompt or question (pyarrow / pandas write missing values so) is an empty one: the default
    system prompt, no question. The answer is what CE trains on: never empty or null."""
    good = {"image_bytes": b"x", "caption_i": None, "caption_q": None, "caption_a": "a red circle"}
    checked = validate_row(SCHEMAS["i2t"], good)
    assert checked.ok and checked.texts == {"caption_i": "", "caption_q": "", "caption_a": "a red circle"}
    bad = validate_row(SCHEMAS["i2t"], dict(good, caption_a=""))
    assert [(p.column, p.reason) for p in bad.problems] == [("caption_a", "empty string")]
    bad = validate_row(SCHEMAS["i2t"], dict(good, caption_a=None))
    assert [(p.column, p.reason) for p in bad.problems] == [("caption_a", "null value")]


def test_binary_text_column_is_decoded():
    checked = validate_row(SCHEMAS["t2v"], {"caption": "café".encode(), "video_bytes": b"v"})
    assert checked.ok and checked.texts["caption"] == "café"
