"""Folder jobs in shards: which folders one Snakemake job computes, and what it recorded.

One Snakemake job per image folder costs a process and Snakemake's bookkeeping per folder
(about 1.3 s each, measured), and Snakemake's plan grows faster than its jobs (30,000 jobs:
80 s). So the workflow's job is a *shard*: a set of folders, each still stored in its own file
(``{results}/embeddings/{folder}.h5``).

How folders are assigned (stable, bounded):

- A folder goes to shard ``sha256(key) mod n``: adding, removing or renaming one folder changes
  at most the shards that hold it (two for a rename), whatever its name sorts next to.
- With ``shards.count: auto``, ``n`` is the least power of two that keeps the shards at most
  ``shards.folders`` folders and ``shards.images`` images each (on average: a hash spreads
  them evenly, and one folder is never split). ``n`` is kept while the tree stays between half
  and twice that size, so it changes only when the tree doubles (or shrinks to a quarter);
  then shards are reshuffled, and each shard job finds its unchanged folders' files up to date
  (they record what they were computed from) and only reads them.

Each shard has a manifest (``{results}/manifests/{shard}.json``: its folders' images, see
:mod:`.manifest`), rewritten only when one of its folders changed, and, once its job
succeeded, a record (``{results}/shards/{shard}.json``: each folder's manifest checksum and its
file's size and modification time), the job's output. The plan removes a record that no longer
matches (a folder changed, a file removed or replaced by hand), so that the shard runs again.

Example:
    >>> shard_count(folders=2_500, images=9_000, max_folders=1_000, max_images=20_000)
    4
    >>> shard_name(2, 4), parse_shard_name("003-of-128")
    ('3-of-4', (2, 128))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ._files import atomic_path

__all__ = [
    "MANIFESTS_DIR",
    "RECORDS_DIR",
    "ShardManifest",
    "assign_shards",
    "failed_images",
    "file_stamp",
    "job_key",
    "manifest_digest",
    "manifest_file",
    "parse_shard_name",
    "read_record",
    "read_shard_manifest",
    "record_file",
    "shard_count",
    "shard_name",
    "shard_of",
    "write_record",
]

#: The shards' manifests, under the results folder.
MANIFESTS_DIR = "manifests"
#: The shard jobs' records (their outputs), under the results folder.
RECORDS_DIR = "shards"

_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def shard_count(
    folders: int,
    images: int,
    *,
    max_folders: int,
    max_images: int,
    least: int = 1,
    previous: int | None = None,
) -> int:
    """How many shards a tree of ``folders`` holding ``images`` takes with ``count: auto``.

    Args:
        folders: the image folders.
        images: their image files.
        max_folders: the most folders a shard should hold (on average).
        max_images: the most images a shard should hold (on average).
        least: the fewest shards (a local run: one per job the cores can run at once).
        previous: the count of the last plan (kept while it still fits, see the module).

    Returns:
        A power of two.

    Example:
        >>> shard_count(10, 50, max_folders=1000, max_images=20000)
        1
        >>> shard_count(2100, 0, max_folders=1000, max_images=20000, previous=8)
        8
    """
    need = max(-(-folders // max_folders), -(-images // max_images), least, 1)
    count = 1 << (need - 1).bit_length()
    if previous and previous & (previous - 1) == 0 and count <= previous <= 2 * count:
        return previous
    return count


def shard_of(key: str, count: int) -> int:
    """The shard (0-based) of folder ``key`` among ``count`` (a hash: the same in every process).

    Example:
        >>> shard_of("animals", 1), 0 <= shard_of("animals", 8) < 8
        (0, True)
    """
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_name(index: int, count: int) -> str:
    """The name of shard ``index`` (0-based) of ``count``, as jobs and files show it (1-based).

    Example:
        >>> shard_name(0, 1), shard_name(9, 128)
        ('1-of-1', '010-of-128')
    """
    return f"{index + 1:0{len(str(count))}d}-of-{count}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """``(index, count)`` of a shard's name, or None for a name that is not one.

    Example:
        >>> parse_shard_name("1-of-1"), parse_shard_name("animals")
        ((0, 1), None)
    """
    match = _NAME.match(name)
    if match is None:
        return None
    index, count = int(match[1]) - 1, int(match[2])
    return (index, count) if 0 <= index < count else None


def assign_shards(keys: Iterable[str], count: int) -> dict[str, list[str]]:
    """``{shard name: its folder keys, sorted}`` of the shards that hold a folder.

    Example:
        >>> assign_shards(["b", "a"], 1)
        {'1-of-1': ['a', 'b']}
    """
    shards: dict[int, list[str]] = {}
    for key in keys:
        shards.setdefault(shard_of(key, count), []).append(key)
    return {shard_name(i, count): sorted(shards[i]) for i in sorted(shards)}


def manifest_file(results: str | Path, shard: str) -> Path:
    """Where shard ``shard`` has its manifest."""
    return Path(results) / MANIFESTS_DIR / f"{shard}.json"


def record_file(results: str | Path, shard: str) -> Path:
    """Where shard ``shard``'s job records what it stored (the job's output)."""
    return Path(results) / RECORDS_DIR / f"{shard}.json"


def job_key(digest: str, head_sha256: str | None) -> str:
    """What a folder file records as computed from (``manifest_sha256``): its manifest's
    checksum, followed by the trained head's when there is one (a head trained again
    reclassifies every folder, though no manifest changed). :func:`manifest_digest` reads the
    manifest's part back.

    Example:
        >>> job_key("abc", None), job_key("abc", "def")
        ('abc', 'abc:def')
    """
    return digest if head_sha256 is None else f"{digest}:{head_sha256}"


def manifest_digest(key: str | None) -> str | None:
    """The manifest's checksum in what a folder file records (see :func:`job_key`).

    Example:
        >>> manifest_digest("abc:def"), manifest_digest(None)
        ('abc', None)
    """
    return None if key is None else key.partition(":")[0]


@dataclass
class ShardManifest:
    """A shard's folders as its job reads them.

    Attributes:
        shard: the shard's name.
        root: the image root.
        settings: what besides its images decides a folder's file (see
            :class:`~snakembed.manifest.FolderManifest`).
        folders: ``{folder key: {"digest": its manifest's checksum, "images": ...,
            "refused": ...}}`` (``images`` and ``refused`` as in
            :class:`~snakembed.manifest.FolderManifest`).
    """

    shard: str
    root: str
    settings: dict
    folders: dict[str, dict]

    def to_json(self) -> str:
        fields = {
            "shard": self.shard,
            "root": self.root,
            "settings": self.settings,
            "folders": self.folders,
        }
        return json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def read_shard_manifest(path: str | Path) -> ShardManifest:
    """The shard manifest at ``path``.

    Raises:
        ValueError: when the file is not one, naming it and the fix.
    """
    try:
        fields = json.loads(Path(path).read_text(encoding="utf-8"))
        return ShardManifest(
            fields["shard"], fields["root"], fields["settings"], dict(fields["folders"])
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a shard manifest ({exc}); delete it and run snakemake again, which "
            "writes it anew"
        ) from exc


def file_stamp(path: str | Path) -> list[int] | None:
    """``[size, modification time in ns]`` of a folder file, or None when there is none (or
    something else than a file is in its place)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns] if stat.S_ISREG(info.st_mode) else None


def read_record(path: str | Path) -> dict | None:
    """A shard's record (see :func:`write_record`), or None (no record, or one that cannot be
    read)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("folders"), dict):
        return None
    return record


def write_record(path: str | Path, settings: dict, folders: Mapping[str, dict]) -> None:
    """Write a shard's record: the settings its folders were computed with, and ``{folder
    key: {"digest": its manifest's checksum, "key": what its file records (see
    :func:`job_key`), "file": the file's :func:`file_stamp`, "images": the images as the
    manifest identified them}}``: what the next plan compares the tree with."""
    record = {"settings": settings, "folders": dict(folders)}
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def failed_images(results: str | Path) -> dict[str, int]:
    """``{folder key: images that failed}`` of the folders with failed images, as the shards'
    records say (see :func:`write_record`).

    Example:
        >>> failed_images("results")  # doctest: +SKIP
        {'broken': 3}
    """
    failed = {}
    for path in (Path(results) / RECORDS_DIR).glob("*.json"):
        for key, entry in ((read_record(path) or {}).get("folders") or {}).items():
            if isinstance(entry, dict) and entry.get("failed"):
                failed[key] = int(entry["failed"])
    return dict(sorted(failed.items()))
