"""manifest.json: the index of a finished conversion (written by data/convert.py) - its task and its shards with their
sample counts. One reader for the config check, the loader and the tests, so that all refuse the same files in the
same words."""

from __future__ import annotations

import glob
import json
from collections import Counter
from pathlib import Path

import braceexpand

from lance_ds.config.data import TASKS

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest.json that is not a finished converter output's; the message names the file and the fix."""


def is_remote(source: str) -> bool:
    """A shard source read over a URL or a pipe: command (no folder beside it to hold a manifest)."""
    return "://" in source or source.startswith("pipe:")


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


def local_shards(source: str) -> tuple[list[str], dict[Path, dict]]:
    """The shards a local .tar path, glob or brace pattern names (sorted per pattern), and the converter manifests
    beside them (by folder). A pattern keeps .tar files only: DIR/* also matches the converter's manifest.json and
    rejects.jsonl, which read as corrupt shards every epoch; one that matches files but no .tar is refused."""
    if Path(source).is_file():
        if not source.endswith(".tar"):  # (the converter's rejects.jsonl or manifest.json read as a corrupt shard)
            raise ManifestError(f"{source} is not a .tar shard; name the .tar files (DIR/*.tar) or give the converter "
                                "output DIR itself")
        return [source], _manifests_beside([source])
    matched = [p for pattern in braceexpand.braceexpand(source) for p in sorted(glob.glob(pattern))]
    shards = [p for p in matched if p.endswith(".tar") and Path(p).is_file()]
    if matched and not shards:
        raise ManifestError(f"{source} matches no .tar shard, only {matched[0]}" +
                            (f" and {len(matched) - 1} more" if len(matched) > 1 else "") +
                            "; match the .tar files (DIR/*.tar) or give the converter output DIR itself")
    return shards, _manifests_beside(shards)


def _manifests_beside(shards: list[str]) -> dict[Path, dict]:
    """The manifest.json files in the shards' folders (a converter output's .tar files listed one by one, or by a
    glob), by folder."""
    folders = {Path(p).parent for p in shards}
    return {f: read_manifest(f) for f in sorted(folders) if (f / MANIFEST).is_file()}


def local_manifests(sources: list[str]) -> list[dict]:
    """The converter manifests of a group's local sources (a converter output dir's, or those beside its .tar
    files); none for URLs, and unreadable ones are left out (the config check said so before training)."""
    manifests: dict[Path, dict] = {}  # by folder: .tar files listed one by one share theirs
    for source in sources:
        try:
            if Path(source).is_dir():
                if (Path(source) / MANIFEST).is_file():
                    manifests[Path(source).resolve()] = read_manifest(source)
            elif not is_remote(source):
                manifests.update({folder.resolve(): m for folder, m in local_shards(source)[1].items()})
        except (OSError, ValueError):  # (ValueError: ManifestError)
            continue
    return list(manifests.values())


def system_prompt_counts(sources: list[str]) -> Counter:
    """caption_i -> rows ("": blank) of the i2t / v2t rows of these sources, as their converter manifests count them
    (the commonest few of each); empty when none does (URLs, conversions before the count)."""
    counts: Counter = Counter()
    for manifest in local_manifests(sources):
        counts.update(manifest.get("system_prompts") or {})
    return counts


def mean_media_sizes(sources: list[str]) -> dict[str, tuple[float, float]]:
    """media member -> (mean height, mean width) of these sources' samples, from their manifests' shard stats."""
    sums: dict[str, list[float]] = {}
    for manifest in local_manifests(sources):
        for shard in manifest["shards"]:
            for member, stats in (shard.get("media") or {}).items():
                if stats.get("count") and "height" in stats and "width" in stats:
                    total = sums.setdefault(member, [0.0, 0.0, 0.0])
                    total[0] += stats["count"]
                    total[1] += stats["count"] * stats["height"]["mean"]
                    total[2] += stats["count"] * stats["width"]["mean"]
    return {member: (h / n, w / n) for member, (n, h, w) in sums.items()}
