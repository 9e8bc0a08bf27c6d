"""Typed configs from YAML: dataclasses with a docstring per field, `extends:`, dotted overrides, collected errors.

A config section is a dataclass whose fields carry their documentation in `metadata["doc"]` (use `doc()`), and may
define `check(self, problems, key)` to report invalid values. Every problem found while loading, overriding or
checking is collected in a `Problems` list and raised once as a `ConfigError`, each line naming the dotted key and
the fix, before any heavy work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with documentation: `lr: float = doc(1e-4, "peak learning rate")`."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


class ConfigError(ValueError):
    """Every problem of a config, one per line, each naming the dotted key and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} config problem(s):\n{lines}")


class Problems:
    """Collects config problems so that all of them are reported at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}" if key else message)

    def require(self, ok: bool, key: str, message: str) -> bool:
        if not ok:
            self.add(key, message)
        return ok

    def positive(self, value: Any, key: str, kind: type = int) -> None:
        kinds = (int, float) if kind is float else kind  # 64 is a fine float (YAML and Python write it so)
        ok = isinstance(value, kinds) and not isinstance(value, bool) and value > 0
        self.require(ok, key, f"must be a positive {kind.__name__}, got {value!r}")

    def one_of(self, value: Any, choices: typing.Iterable[Any], key: str) -> None:
        choices = list(choices)
        self.require(value in choices, key, f"must be one of {choices}, got {value!r}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------------------------------------------
# dict -> dataclass


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _in_other_section(cls: type, name: str, value: Any, prefix: str) -> str:
    """A key put in the wrong section (lr=, optim.lr=): the fields deeper in `cls` that have its name, or its keys'."""
    leaves = [str(k) for k in value] if isinstance(value, dict) else [name]
    found = [join(prefix, path) for leaf in leaves for path in _field_paths(cls) if path.rsplit(".", 1)[-1] == leaf]
    return f"; did you mean {' or '.join(repr(p) for p in found[:3])}?" if found else ""


def _field_paths(cls: type) -> list[str]:
    """Dotted names of every field of a config dataclass, its sections' fields included."""
    paths = []
    for name, tp in typing.get_type_hints(cls).items():
        paths.append(name)
        if dataclasses.is_dataclass(tp):
            paths += [f"{name}.{sub}" for sub in _field_paths(tp)]
    return paths


def _convert(value: Any, tp: Any, key: str, problems: Problems) -> Any:
    """Convert a YAML value to the annotated type, reporting (not raising) mismatches."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):  # (config fields are `X | None` at most)
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner, key, problems)
    if dataclasses.is_dataclass(tp):
        return _to_section(value, tp, key, problems)
    if origin is list:
        return _to_list(value, tp, key, problems)
    if origin is dict:
        if not isinstance(value, dict):
            problems.add(key, f"expected a mapping, got {value!r}")
        return value
    if tp in _SCALARS:
        return _SCALARS[tp](value, key, problems)
    return value


def _to_section(value: Any, tp: type, key: str, problems: Problems) -> Any:
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        problems.add(key, f"expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return tp()
    return from_dict(tp, value, problems, key)


def _to_list(value: Any, tp: Any, key: str, problems: Problems) -> Any:
    args = typing.get_args(tp)
    if isinstance(value, str) and args and args[0] is str:  # `shards: dir` means `shards: [dir]`
        value = [value]
    if not isinstance(value, (list, tuple)):
        problems.add(key, f"expected a list, got {value!r}")
        return value
    item_tp = args[0] if args else Any
    items = []
    for i, v in enumerate(value):
        out = _convert(v, item_tp, f"{key}[{i}]", problems)
        # a section that is not a mapping is reported above and left out: its defaults would only add noise
        if not dataclasses.is_dataclass(item_tp) or isinstance(v, (dict, item_tp)):
            items.append(out)
    return items


def _to_float(value: Any, key: str, problems: Problems) -> Any:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML reads "1e-4" as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        problems.add(key, f"expected a number, got {value!r}")
        return value
    # inf and nan pass every `> 0` or range check written as a negation, and train to a NaN checkpoint
    if not math.isfinite(number):
        problems.add(key, f"must be a finite number, got {value!r}")
        return value
    return number


def _to_int(value: Any, key: str, problems: Problems) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    problems.add(key, f"expected an integer, got {value!r}")
    return value


def _to_bool(value: Any, key: str, problems: Problems) -> Any:
    if not isinstance(value, bool):
        problems.add(key, f"expected true or false, got {value!r}")
    return value


def _to_str(value: Any, key: str, problems: Problems) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # 0755 -> 493, 2024_01 -> 202401
        problems.add(key, f"YAML reads this as the number {value!r}, not as text; quote it (e.g. '0755')")
    elif not isinstance(value, str):
        problems.add(key, f"expected a string, got {value!r}")
    return value


_SCALARS: dict[type, Callable[[Any, str, Problems], Any]] = {float: _to_float, int: _to_int, bool: _to_bool, str: _to_str}


def from_dict(cls: type[T], data: dict, problems: Problems, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and bad types go to `problems` with the closest name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = join(prefix, str(name))
        if name not in fields:
            hint = _suggest(str(name), fields) or _in_other_section(cls, str(name), value, prefix)
            problems.add(key, f"unknown key{hint} (valid keys: {', '.join(sorted(fields))})")
            continue
        local = Problems()
        converted = _convert(value, hints[name], key, local)
        problems.items.extend(local.items)
        # A value that failed conversion keeps the field's default, so `check()` only ever sees typed values. A
        # section, or a list of sections, is typed even when a key inside was wrong (that key was left out): kept,
        # so that one misspelt key in a dataset group does not also report the dataset as having no groups.
        if not local or _is_sections(converted):
            kwargs[name] = converted
    return cls(**kwargs)


def _is_sections(value: Any) -> bool:
    if isinstance(value, list):
        return all(dataclasses.is_dataclass(v) for v in value)
    return dataclasses.is_dataclass(value)


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check(obj: Any, problems: Problems, prefix: str = "") -> None:
    """Run every nested section's `check(problems, key)`, depth first."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, problems, join(prefix, f.name))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                check(v, problems, f"{join(prefix, f.name)}[{i}]")
    if hasattr(obj, "check"):
        obj.check(problems, prefix)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field (the test that every field is documented reads it)."""
    rows = []
    for f in dataclasses.fields(cls):
        key = join(prefix, f.name)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        rows.append((key, repr(default), f.metadata.get("doc", "")))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# YAML files and overrides


class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, line: int, first: int, mark: Any):
        super().__init__(None, None, f"key {key!r} is given twice (also on line {first}); YAML would keep only "
                         "the last, silently dropping the first: merge them into one", mark)
        self.key, self.line, self.first = key, line, first


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping.

    PyYAML keeps the last of two equal keys: a run YAML with two `train:` blocks would silently lose the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden; that is its purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise DuplicateKeyError(key, line, first_line[key], key_node.start_mark)
                first_line[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, name: str = "<string>") -> Any:
    """yaml.safe_load with StrictLoader; `name` (the file) is what error messages point at."""
    loader = StrictLoader(text)
    loader.name = name  # marks (line and column of an error) name the file rather than "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def output_problem(flag: str, path: str | Path, directory: bool = False) -> str | None:
    """Why `path` cannot be written as a file (directory: made a directory), or None. Missing parent directories
    are fine (they are created); a file standing where one of them must be is not. Tools check it before minutes of
    work, not when they save."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        return (f"{flag}: {path} is a directory; give the path of a file in it" if path.is_dir() else
                f"{flag}: {path} is a file, not a directory; choose another {flag}")
    in_the_way = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        return f"{flag}: {in_the_way} is a file, so {path} cannot be created under it; choose another path"
    # where the writing happens: in the directory itself, else in the nearest folder that exists (a read-only
    # mount, another user's folder)
    folder = path if directory and path.is_dir() else next(p for p in (path.parent, *path.parent.parents)
                                                             if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag}: {folder} is not writable here, so {path} cannot be written; choose another path"
    return None


def read_text(path: Path, problems: Problems, key: str) -> str | None:
    """A config file's text, or None with the reason (missing, unreadable, not UTF-8) reported under `key`."""
    try:
        if not path.is_file():
            problems.add(key, f"file not found: {path}")
            return None
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        problems.add(key, f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8")
    except OSError as e:
        problems.add(key, f"cannot read {path}: {e.strerror or e}; check it and its permissions")
    return None


def load_yaml(path: str | Path, problems: Problems, key: str = "",
              relative_paths: Callable[[dict, Path], dict] | None = None, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping, following `extends: other.yaml` (relative to the file) recursively.

    relative_paths(data, directory) makes the paths a file names absolute, from its own directory, before the files
    are merged: a parent in another directory keeps its paths right. _chain is the files that extend this one.
    """
    path = Path(os.path.abspath(path))
    if path in _chain:  # would recurse until Python gives up
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(path):], path))
        problems.add(key, f"`extends:` goes round in a circle ({cycle}); remove one of these extends")
        return {}
    text = read_text(path, problems, key)
    if text is None:
        return {}
    try:
        data = parse_yaml(text, str(path)) or {}
    except DuplicateKeyError as e:
        problems.add(key, f"{path}, line {e.line}: {e.problem}")
        return {}
    except yaml.YAMLError as e:
        problems.add(key, f"{path} is not valid YAML: {e}")
        return {}
    if not isinstance(data, dict):
        problems.add(key, f"{path} must hold a mapping at the top level, got {type(data).__name__}")
        return {}
    extends = data.pop("extends", None)
    parents = [] if extends is None else [extends] if isinstance(extends, str) else extends
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        problems.add(f"{path}: extends",
                     f"must be a file name or a list of them (relative to this file), got {extends!r}")
        parents = []
    if relative_paths is not None:
        data = relative_paths(data, path.parent)
    merged: dict = {}
    for parent in parents:
        merged = deep_merge(merged, load_yaml(path.parent / parent, problems, f"{path}: extends", relative_paths,
                                              (*_chain, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def is_text_key(cls: type, dotted: str) -> bool:
    """Whether `dotted` names a string field (str or str | None) of dataclass `cls`."""
    tp: Any = cls
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(tp) and part in {f.name for f in dataclasses.fields(tp)}):
            return False
        tp = typing.get_type_hints(tp)[part]
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                         and set(typing.get_args(tp)) == {str, type(None)})


_NULLS = ("null", "Null", "NULL", "~")


def apply_overrides(data: dict, overrides: list[str], problems: Problems, schema: type | None = None) -> dict:
    """Apply `a.b.c=value` strings; the value is parsed as YAML (`[1, 2]`, `true`, `2e-5`, `null`), except for the
    string keys of dataclass `schema`, which take the text as typed (a path like `/data/run #2` or `0755` would
    read as `/data/run` or the number 493), unless it is YAML-quoted or null."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            problems.add(item, "an override must look like section.key=value (e.g. train.lr=2e-5)")
            continue
        text = raw.strip()
        as_typed = (schema is not None and is_text_key(schema, key) and text not in _NULLS
                    and not (len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""))
        try:
            value = raw if as_typed else parse_yaml(raw, f"override {key}") if text else ""
        except yaml.YAMLError as e:
            if raw.lstrip().startswith(("[", "{")):  # a list or mapping that does not parse: never one string
                problems.add(key, f"cannot read {raw!r} as YAML ({str(e).splitlines()[0]}); quote items that "
                             "start with * or & (e.g. ['*norm*', 'lm_head*'])")
                continue
            value = raw  # a plain word YAML cannot read (e.g. *norm*, which YAML takes for an alias)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                problems.add(key, f"'{part}' is a value, not a section")
                break
            node[part] = child = dict(child)
            node = child
        else:
            node[parts[-1]] = value
    return data
