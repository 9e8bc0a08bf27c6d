"""manifest.json: the index of a finished conversion (written by data/convert.py) - its task and its shards with their
sample counts. One reader for the config check, the loader and the tests, so that all refuse the same files in the
same words."""

from __future__ import annotations

import json
from pathlib import Path

from lance_ds.config.data import TASKS

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest.json that is not a finished converter output's; the message names the file and the fix."""


def parse_manifest(text: str, where: str) -> dict:
    """The manifest in `text` (read from `where`), checked for what the loader relies on: the task, named shards."""
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{where} is not valid JSON ({e}); re-run tools/parquet_to_wds.py") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards):
        raise ManifestError(f"{where} is not a converter manifest (no list of named shards); "
                            "re-run tools/parquet_to_wds.py")
    if manifest.get("task") not in TASKS:
        raise ManifestError(f"{where} is not a converter manifest (task {manifest.get('task')!r}, not one of "
                            f"{', '.join(TASKS)}); re-run tools/parquet_to_wds.py")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    return parse_manifest(path.read_text(encoding="utf-8"), str(path))
