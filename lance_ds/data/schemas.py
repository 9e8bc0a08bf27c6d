"""The six Lance parquet task schemas, task detection from column names, and row validation.

| task | text columns                       | media columns                                  |
|------|------------------------------------|------------------------------------------------|
| t2i  | caption                            | image_bytes (image)                            |
| t2v  | caption                            | video_bytes (video)                            |
| i2i  | caption (the edit instruction)     | input_image_bytes, output_image_bytes (image)  |
| v2v  | caption (the edit instruction)     | input_video_bytes, output_video_bytes (video)  |
| i2t  | caption_i, caption_q, caption_a    | image_bytes (image)                            |
| v2t  | caption_i, caption_q, caption_a    | video_bytes (video)                            |

Text columns are parquet strings (binary holding UTF-8 is accepted); media columns are binary holding the encoded
file. Validation here checks presence, nulls and value types only; whether the bytes decode is media.py's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from lance_ds.config.data import TASKS


class MediaKind(str, Enum):
    IMAGE = "image"
    VIDEO = "video"


@dataclass(frozen=True)
class MediaColumn:
    name: str  # parquet column, e.g. "input_image_bytes"
    kind: MediaKind

    @property
    def member(self) -> str:
        """Name used in shards and in `Sample.media`: the column without `_bytes` ("input_image")."""
        return self.name.removesuffix("_bytes")


@dataclass(frozen=True)
class TextColumn:
    name: str
    may_be_empty: bool = False  # "" is a legitimate value (an absent question)
    null_means_empty: bool = False  # a null is read as "" instead of rejecting the row


@dataclass(frozen=True)
class TaskSchema:
    task: str  # t2i, t2v, i2i, v2v, i2t, v2t
    dir_name: str  # Lance's dataset directory for the task: text2image, ...
    texts: tuple[TextColumn, ...]
    media: tuple[MediaColumn, ...]

    @property
    def text_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.texts)

    @property
    def media_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.media)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.text_columns + self.media_columns

    def describe(self) -> str:
        return f"{self.task} ({', '.join(self.columns)})"


_CAPTION = TextColumn("caption")
_UNDERSTANDING_TEXTS = (
    TextColumn("caption_i", may_be_empty=True, null_means_empty=True),  # system prompt; blank: the default one
    TextColumn("caption_q", may_be_empty=True, null_means_empty=True),  # question; "" when the task has none
    TextColumn("caption_a"),  # the answer: what the CE loss trains on, so never empty
)

SCHEMAS: dict[str, TaskSchema] = {
    "t2i": TaskSchema("t2i", "text2image", (_CAPTION,), (MediaColumn("image_bytes", MediaKind.IMAGE),)),
    "t2v": TaskSchema("t2v", "text2video", (_CAPTION,), (MediaColumn("video_bytes", MediaKind.VIDEO),)),
    "i2i": TaskSchema("i2i", "image2image", (_CAPTION,), (
        MediaColumn("input_image_bytes", MediaKind.IMAGE), MediaColumn("output_image_bytes", MediaKind.IMAGE))),
    "v2v": TaskSchema("v2v", "video2video", (_CAPTION,), (
        MediaColumn("input_video_bytes", MediaKind.VIDEO), MediaColumn("output_video_bytes", MediaKind.VIDEO))),
    "i2t": TaskSchema("i2t", "image2text", _UNDERSTANDING_TEXTS, (MediaColumn("image_bytes", MediaKind.IMAGE),)),
    "v2t": TaskSchema("v2t", "video2text", _UNDERSTANDING_TEXTS, (MediaColumn("video_bytes", MediaKind.VIDEO),)),
}
assert tuple(SCHEMAS) == TASKS, "schemas.py and config/data.py must list the same tasks"


class SchemaError(ValueError):
    """A parquet file's columns fit no task (or not the task asked for); the message lists what would."""


def _all_schemas() -> str:
    return "; ".join(s.describe() for s in SCHEMAS.values())


def detect_task(columns: Iterable[str], source: str = "") -> str:
    """The task whose columns the file has. Extra columns are allowed; none or several matches are refused."""
    have = set(columns)
    matches = [t for t, s in SCHEMAS.items() if set(s.columns) <= have]
    where = f"{source}: " if source else ""
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SchemaError(
            f"{where}the columns {sorted(have)} match no task. The six tasks and their columns are: {_all_schemas()}. "
            "Rename the columns to one of these schemas.")
    raise SchemaError(
        f"{where}the columns {sorted(have)} fit several tasks ({', '.join(matches)}); pass --task to choose one")


def resolve_task(columns: Iterable[str], task: str | None = None, source: str = "") -> TaskSchema:
    """The schema for a file: detected from its columns (task None or "auto"), or checked against the task given."""
    columns = list(columns)
    if task in (None, "auto"):
        return SCHEMAS[detect_task(columns, source)]
    if task not in SCHEMAS:
        raise SchemaError(f"unknown task {task!r}; choose one of {', '.join(SCHEMAS)} or auto")
    missing = [c for c in SCHEMAS[task].columns if c not in columns]
    if missing:
        where = f"{source}: " if source else ""
        raise SchemaError(
            f"{where}task {task} needs the columns {list(SCHEMAS[task].columns)}, but {missing} are missing "
            f"(the file has {sorted(columns)})")
    return SCHEMAS[task]


# ----------------------------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class RowProblem:
    column: str
    reason: str


@dataclass
class CheckedRow:
    """A row's values in the types the rest of the pipeline uses, and everything wrong with it."""

    texts: dict[str, str] = field(default_factory=dict)
    media: dict[str, bytes | memoryview] = field(default_factory=dict)  # by parquet column name
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_text(column: TextColumn, value: object) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    if value is None:
        if column.null_means_empty:
            return "", None
        return None, "null value"
    if isinstance(value, (bytes, bytearray, memoryview)):  # a binary column holding text: must be UTF-8
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"text is not valid UTF-8 ({e.reason} at byte {e.start})"
    if not isinstance(value, str):
        return None, f"expected a string, got {_type_name(value)}: {value!r:.40}"  # the value after ":" (the kind)
    if not value.strip() and not column.may_be_empty:
        return None, "empty string" if not value else f"only whitespace: {value!r:.40}"
    return value, None


@dataclass(frozen=True)
class PathOnly:
    """A media struct ({bytes, path}, as Hugging Face datasets write Image / Video features) whose bytes are null
    and whose path is set: the file was not embedded in the parquet."""

    path: str


def _check_media(value: object) -> tuple[bytes | memoryview | None, str | None]:
    """(the bytes, None) or (None, reason). A memoryview (zero-copy from an arrow buffer) is passed on as is."""
    if value is None:
        return None, "null value"
    if isinstance(value, PathOnly):
        return None, (f"the struct holds only a path ({value.path!r:.80}), no bytes: embed each file's bytes in the "
                      "parquet (the struct's 'bytes' field) before converting")
    if isinstance(value, str):
        return None, (f"expected encoded bytes (a binary column), got a string {value!r:.40}; "
                      "store the file's bytes, not a path or base64")
    if isinstance(value, bytearray):
        value = bytes(value)
    if not isinstance(value, (bytes, memoryview)):
        return None, f"expected encoded bytes (a binary column), got {_type_name(value)} {value!r:.40}"
    if not len(value):
        return None, "empty bytes"
    return value, None


def validate_row(schema: TaskSchema, row: Mapping[str, object]) -> CheckedRow:
    """Check one row (column -> Python value, as pyarrow's `to_pylist` gives) against the task's schema."""
    out = CheckedRow()
    for column in schema.texts:
        if column.name not in row:
            out.problems.append(RowProblem(column.name, "column missing"))
            continue
        text, reason = _check_text(column, row[column.name])
        if reason:
            out.problems.append(RowProblem(column.name, reason))
        else:
            out.texts[column.name] = text
    for column in schema.media:
        if column.name not in row:
            out.problems.append(RowProblem(column.name, "column missing"))
            continue
        data, reason = _check_media(row[column.name])
        if reason:
            out.problems.append(RowProblem(column.name, reason))
        else:
            out.media[column.name] = data
    return out
