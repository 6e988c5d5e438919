"""Checking a configuration against the image tree and the plugins before any job runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ._files import atomic_path
from ._registry import import_object
from .backbones import (
    BACKBONES,
    PRE_LOGITS,
    LayerError,
    WeightsError,
    backbone_from_config,
    is_local_weights,
    model_file_hashes,
)
from .buckets import (
    BUCKET_FORM,
    BucketError,
    absolute_root,
    is_bucket,
    is_misspelt_bucket,
    list_tree,
    root_path,
)
from .config import RESOLVED_KEYS, ConfigError, numbers_fingerprint, validate_config
from .devices import gpu_visible, precision_warning, resolve_compute
from .heads import HEADS, needs_labels
from .images import Discovery, DiscoveryError, discover_folders
from .labels import LabelError, Labelled, labels_from_config
from .layout import FOLDERS_DIR, ROOT_FOLDER, folder_file, folder_stem
from .manifest import folder_manifest
from .shards import (
    MANIFESTS_DIR,
    RECORDS_DIR,
    ShardManifest,
    assign_shards,
    file_stamp,
    manifest_file,
    parse_shard_name,
    read_record,
    read_shard_manifest,
    record_file,
    shard_count,
)

#: Where the finetune rule writes its checkpoint, under the results folder.
FINETUNE_CHECKPOINT = "finetune/checkpoint.safetensors"

#: The rule of the folder jobs (one job per shard of folders), whose logs and benchmarks are
#: kept per shard.
FOLDER_RULE = "embed_classify_store"

# The errors are re-exported so that callers can catch every planning error from here.
__all__ = [
    "FINETUNE_CHECKPOINT",
    "FOLDER_RULE",
    "ConfigError",
    "DiscoveryError",
    "Changes",
    "Plan",
    "WeightsError",
    "asks_for_gpu",
    "plan_run",
]


@dataclass
class Plan:
    """What the workflow will do.

    Attributes:
        images: the image root.
        results: the results folder.
        discovery: every image folder, with the files refused and the folder links skipped;
            None in a plan read from the manifests (see :func:`plan_run`).
        stems: ``{file stem: folder key}`` of the folder files (empty in a plan read from the
            manifests).
        shards: ``{shard name: its folder keys}`` (see :mod:`snakembed.shards`); in a plan read
            from the manifests, each shard's folders are read when asked for.
        weights_file: the local checkpoint, when ``model.weights`` is one.
        numbers: everything that changes the embeddings (see ``numbers_fingerprint``).
        compute: the resolved ``device`` and ``precision``, with what was configured.
        change_detection: how the manifests identify an image's content.
        settings: what besides its images decides a folder's file (recorded in each
            manifest, see :class:`~snakembed.manifest.FolderManifest`).
        labelled: the labelled images of ``classify.labels``, when set.
        gpu_jobs: whether the folder jobs ask the cluster for a GPU.
        changes: what :meth:`write_manifests` found changed, see :class:`Changes`.
    """

    images: Path  # a BucketPath for a bucket (see snakembed.buckets)
    results: Path
    discovery: Discovery | None
    stems: Mapping[str, str]
    shards: Mapping[str, list[str]]
    weights_file: str | None
    numbers: dict
    compute: dict
    change_detection: str = "stat"
    settings: dict = field(default_factory=dict)
    labelled: Labelled | None = None
    gpu_jobs: bool = False
    changes: Changes = field(default_factory=lambda: Changes())

    @property
    def folders(self) -> dict[str, list[str]]:
        """``{folder key: sorted image file names}``.

        Raises:
            RuntimeError: in a plan read from the manifests, which has only :meth:`image_count`.
        """
        if self.discovery is None:
            raise RuntimeError("a plan read from the manifests has no image tree; read them")
        return self.discovery.folders

    def image_count(self, shard: str) -> int:
        """How many image files the folders of shard ``shard`` hold, refused ones included."""
        return sum(self.folder_sizes(shard))

    def pending_images(self, shard: str) -> int:
        """How many image files the folders of shard ``shard`` to compute hold (see
        :attr:`Changes.pending`; all of its folders when the plan did not compare them)."""
        if self.discovery is None or not self.changes.compared:
            return self.image_count(shard)
        pending = self.changes.pending.get(shard, [])
        return sum(len(self.discovery.folders[key]) for key in pending)

    def folder_sizes(self, shard: str) -> list[int]:
        """How many image files each folder of shard ``shard`` holds, refused ones included."""
        if self.discovery is None:
            folders = read_shard_manifest(self.manifest_file(shard)).folders.values()
            return [len(f["images"]) + len(f["refused"]) for f in folders]
        return [len(self.discovery.folders[key]) for key in self.shards[shard]]

    def manifest_file(self, shard: str) -> Path:
        """Where shard ``shard`` has its manifest (see :mod:`snakembed.shards`)."""
        return manifest_file(self.results, shard)

    def record_file(self, shard: str) -> Path:
        """Where the job of shard ``shard`` records what it stored (its output)."""
        return record_file(self.results, shard)

    def write_manifests(self) -> int:
        """Write each shard's manifest where one of its folders changed, remove the manifests
        of shards that are gone, remove the record of each shard whose folders changed or whose
        files are not those it recorded (a file removed or replaced by hand), so that it runs
        again, and record the resolved device and precision for the cluster jobs' own
        Snakemake (``{results}/compute.json``). What changed is in :attr:`changes`.

        Returns:
            How many manifests were written.
        """
        written = 0
        checksum = self.change_detection == "checksum"
        root = absolute_root(self.images)
        identities = self.discovery.identities  # a bucket's listing, else None
        folder_dir = _manifest_folder(self.results)
        old_texts = _read_texts(folder_dir)
        records = _read_records(self.results / RECORDS_DIR)
        stored = _stored(records, self.results)
        current: dict[str, dict] = {}
        with ThreadPoolExecutor(max_workers=8 if checksum else 1) as pool:
            for shard, keys in self.shards.items():
                folders = {}
                for key in keys:
                    manifest = folder_manifest(
                        root,
                        key,
                        self.folders[key],
                        self.discovery.refused.get(key),
                        change_detection=self.change_detection,
                        map_=pool.map,
                        settings=self.settings,
                        identities=None if identities is None else identities[key],
                    )
                    folders[key] = {
                        "digest": manifest.digest,
                        "images": manifest.images,
                        "refused": manifest.refused,
                    }
                current.update(folders)
                text = ShardManifest(shard, root, self.settings, folders).to_json()
                if old_texts.get(shard) != text:
                    with atomic_path(self.manifest_file(shard)) as tmp:
                        tmp.write_text(text, encoding="utf-8")
                    written += 1
                self._compare(shard, folders, stored, records.get(shard))
        settings = {json.dumps(r.get("settings"), sort_keys=True) for r in records.values()}
        self.changes.describe(
            stored, current, settings != {json.dumps(self.settings, sort_keys=True)}
        )
        counts = {parsed[1] for name in records if (parsed := parse_shard_name(name))}
        now = _shard_count(self.shards)
        if counts and now and counts != {now}:
            self.changes.regrouped = (max(counts), now)
        for path in folder_dir.iterdir() if folder_dir.is_dir() else []:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)  # an earlier version's manifests
            elif path.name.removesuffix(".json") not in self.shards:
                path.unlink(missing_ok=True)
        text = json.dumps(self.compute, indent=1, sort_keys=True) + "\n"
        path = _compute_file(self.results)
        if not path.is_file() or path.read_text() != text:
            with atomic_path(path) as tmp:
                tmp.write_text(text)
        return written

    def _compare(
        self, shard: str, folders: dict[str, dict], stored: dict[str, dict], record: dict | None
    ) -> None:
        """Note in :attr:`changes` the folders of ``shard`` that are not stored as they are
        now (by their manifest's checksum, and their file by size and modification time, as
        the shards' records say), and remove the shard's record unless it holds exactly its
        folders, each stored as it is now: the shard then runs again."""
        pending = [
            key
            for key, folder in folders.items()
            if not isinstance(entry := stored.get(key), dict)
            or entry.get("digest") != folder["digest"]
            or entry.get("file") != file_stamp(folder_file(self.results, key))
        ]
        if pending:
            self.changes.pending[shard] = pending
        if (
            pending
            or record is None
            or record.get(_SET_ASIDE)
            or record["folders"].keys() != folders.keys()
        ):
            # set aside, not removed: Snakemake sees the output missing and runs the shard,
            # and until it succeeds the record still says what is stored
            path = self.record_file(shard)
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, path.with_name(path.name + _OLD))
            self.changes.shards.add(shard)

    def stale_lines(self, stale: list[Path], when: str = "", limit: int = 5) -> list[str]:
        """What :meth:`stale_files` found, in words: the folder files whose folders are gone,
        and the files of shards no longer planned (a line each, a few paths named; ``when``
        follows "when jobs run").

        Example:
            >>> plan.stale_lines([Path("results/embeddings/old.h5")])  # doctest: +SKIP
            ['1 folder file goes when jobs run: results/embeddings/old.h5 (its folder is ...']
        """
        folders_dir = self.results / FOLDERS_DIR
        files = [p for p in stale if p.is_relative_to(folders_dir)]
        others = [p for p in stale if not p.is_relative_to(folders_dir)]
        lines = []
        for paths, noun, why in (
            (files, "folder file", f"no longer in {self.images}"),
            (others, "shard file", f"no longer planned: {_shard_count(self.shards):,} shards now"),
        ):
            if paths:
                named = ", ".join(map(str, paths[:limit]))
                more = f" and {len(paths) - limit:,} more" if len(paths) > limit else ""
                verb, whose = ("goes", "its") if len(paths) == 1 else ("go", "their")
                owner = "folder" if noun == "folder file" else "shard"
                lines.append(
                    f"{_plural(len(paths), noun)} {verb} when jobs run{when}: {named}{more} "
                    f"({whose} {owner}{' is' if len(paths) == 1 else 's are'} {why})"
                )
        return lines

    def stale_files(self) -> list[Path]:
        """The results of folders and shards that are gone: the ``.h5`` files of folders no
        longer in the image tree, the logs, benchmarks and records of shards no longer
        planned, and temporary files that killed writers left there.

        Raises:
            RuntimeError: in a plan read from the manifests, which does not know the tree.
        """
        if self.discovery is None:
            raise RuntimeError("a plan read from the manifests cannot tell which folders are gone")
        stale = []
        for folder, suffix, known in (
            (self.results / FOLDERS_DIR, ".h5", self.stems),
            (self.results / "logs" / FOLDER_RULE, ".log", self.shards),
            (self.results / "benchmarks" / FOLDER_RULE, ".tsv", self.shards),
            (self.results / RECORDS_DIR, ".json", self.shards),
        ):
            for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                target = path
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    # a killed writer's temporary file (.{name}.{pid}.tmp)
                    target = path.with_name(path.name[1:].rsplit(".", 2)[0])
                elif path.name.endswith(_OLD):  # a record set aside (see _compare)
                    target = path.with_name(path.name.removesuffix(_OLD))
                relative = target.relative_to(folder).as_posix()
                if path.name.endswith(".stale"):  # an earlier version's moved-aside file
                    relative = ""
                gone = relative.removesuffix(suffix) not in known
                if path.is_file() and gone and (relative.endswith(suffix) or not relative):
                    stale.append(path)
        return stale

    def prune(self) -> list[Path]:
        """Remove :meth:`stale_files`, and the folders they leave empty.

        Returns:
            What was removed.
        """
        removed = self.stale_files()
        for path in removed:
            path.unlink(missing_ok=True)
        for top in (FOLDERS_DIR, f"logs/{FOLDER_RULE}", f"benchmarks/{FOLDER_RULE}", RECORDS_DIR):
            _remove_empty_folders(self.results / top)
        return removed

    def manifest_digest(self, shard: str) -> str:
        """The sha256 of the shard's manifest file as written (see :meth:`write_manifests`).

        The workflow passes it as a rule parameter: it changes when one of the shard's folders
        does, and Snakemake reruns a job whose parameters changed.
        """
        return hashlib.sha256(self.manifest_file(shard).read_bytes()).hexdigest()

    def labelled_inputs(self) -> list[str]:
        """The labelled images that Snakemake tracks as inputs (which orders the jobs).

        Snakemake reads ``{name}`` in a path as a wildcard, so files whose path holds a brace
        are left out; :meth:`labelled_identity` covers every image.
        """
        return _trackable(str(p) for p in self.labelled.paths) if self.labelled else []

    def labelled_identity(self) -> str:
        """The sha256 of the labelled images and their labels: each image's path, label,
        split, size, modification time, inode and status-change time (see
        :mod:`.manifest`), so that a labels file or image replaced by one with an older
        modification time (``cp -p``, ``mv``), which Snakemake's own check of the inputs'
        times would miss, still trains the head again.

        The workflow passes it as a parameter of the jobs that read the labelled images.
        """
        if self.labelled is None:
            return ""
        rows = []
        for path, label, split in zip(
            self.labelled.paths, self.labelled.labels, self.labelled.splits, strict=True
        ):
            try:
                info = os.stat(path)
                stat = [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]
            except OSError as exc:
                stat = [str(exc.strerror)]
            rows.append([str(path), label, split, stat])
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def warnings(self) -> list[str]:
        """One line per folder link that was not followed, per folder with refused files, for
        bf16 on a CPU without bf16 units, and for a GPU asked for where the jobs will find none
        (none in a plan read from the manifests: the planning process warned)."""
        if self.discovery is None:
            return []
        compute = resolve_compute(**{k: self.compute[k] for k in ("device", "precision")})
        lines = [line for line in [precision_warning(compute)] if line]
        if compute.device_type == "cuda" and not self.gpu_jobs and not gpu_visible():
            lines.append(
                f"device: {compute.device}, but torch sees no GPU on this machine and the folder "
                "jobs do not ask a cluster for one: they will fail unless they run where one is; "
                "set device: cpu (--config device=cpu), or ask for a GPU (the slurm profile's "
                "gpu: 1)"
            )
        lines += [f"not followed: {path}: {why}" for path, why in self.discovery.skipped.items()]
        for folder, refused in self.discovery.refused.items():
            lines.append(f"{folder}: {len(refused)} file(s) will be recorded as failed, not read")
        return lines


def _manifest_folder(results: Path) -> Path:
    return results / MANIFESTS_DIR


def _compute_file(results: Path) -> Path:
    return results / "compute.json"


def _read_texts(folder: Path) -> dict[str, str]:
    """``{shard: manifest text}`` of the shard manifests in ``folder``."""
    texts = {}
    for path in folder.glob("*.json") if folder.is_dir() else []:
        name = path.name.removesuffix(".json")
        if parse_shard_name(name) is not None:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                texts[name] = path.read_text(encoding="utf-8")
    return texts


#: The suffix of a shard's record set aside, to be run again (see ``Plan._compare``).
_OLD = ".old"
#: Marks a record read from a file set aside.
_SET_ASIDE = "set_aside"


def _stored(records: Mapping[str, dict], results: Path) -> dict[str, dict]:
    """What the records say is stored, by folder: where records of several shard counts name
    a folder (a regrouping whose old records are not removed yet), the entry that names its
    file as it is."""
    stored: dict[str, dict] = {}
    for record in records.values():
        for key, entry in record["folders"].items():
            if key in stored and isinstance(entry, dict):
                stamp = file_stamp(folder_file(results, key))
                if stored[key].get("file") == stamp and entry.get("file") != stamp:
                    continue
            stored[key] = entry
    return stored


def _shard_count(names: Iterable[str]) -> int:
    """The shard count of shard names (0 for none): shards without folders are not planned."""
    return max((parsed[1] for name in names if (parsed := parse_shard_name(name))), default=0)


def _read_records(folder: Path) -> dict[str, dict]:
    """``{shard: record}`` of the shards' records in ``folder`` that can be read (a record
    set aside where the shard's job has not written a new one yet)."""
    records = {}
    for suffix in (".json" + _OLD, ".json"):
        for path in folder.glob("*" + suffix) if folder.is_dir() else []:
            record = read_record(path)
            if record is not None:
                records[path.name.removesuffix(suffix)] = {**record, _SET_ASIDE: suffix != ".json"}
    return records


def _previous_count(folder: Path) -> int | None:
    """The shard count of the manifests in ``folder`` (the last plan's), or None."""
    counts = {parse_shard_name(name) for name in _read_names(folder)}
    counts = {parsed[1] for parsed in counts if parsed is not None}
    return counts.pop() if len(counts) == 1 else None


def _read_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(".json") for p in folder.glob("*.json"))


@dataclass
class Changes:
    """What a plan found changed since what the results hold, in words (see :meth:`line`).

    Attributes:
        folders: ``{folder key: what changed in it}`` (``new, 3 images``, ``removed``,
            ``+3 images``...).
        settings: whether the settings that decide every folder's file changed.
        first: whether nothing was stored yet.
        shards: the shards whose jobs will run (a folder of theirs is not stored as it is
            now, or their record does not hold exactly their folders).
        pending: ``{shard: its folders to compute}`` (a shard that is not in it has none).
        regrouped: ``(shards before, shards now)`` when the shard count changed (the tree
            outgrew its shards or shrank to a quarter, or ``shards.count`` changed): every
            shard runs once and reads its folders; only changed folders are computed.
        compared: whether the folders were compared with the records.
    """

    folders: dict[str, str] = field(default_factory=dict)
    settings: bool = False
    first: bool = False
    shards: set[str] = field(default_factory=set)
    pending: dict[str, list[str]] = field(default_factory=dict)
    regrouped: tuple[int, int] | None = None
    compared: bool = False

    def describe(self, stored: Mapping[str, dict], current: Mapping[str, dict], settings: bool):
        """Compare the folders as the records hold them (``stored``) with ``current``."""
        self.compared = True
        self.first = not stored
        self.settings = settings and not self.first
        for key, entry in current.items():
            before = stored.get(key)
            if before is None:
                self.folders[key] = f"new, {_plural(len(entry['images']), 'image')}"
            elif before.get("digest") != entry["digest"]:
                self.folders[key] = _difference(before, entry)
        for key in stored.keys() - current.keys():
            self.folders[key] = "removed"
        self.settings = self.settings and bool(self.folders)  # records of an earlier version

    def line(self, limit: int = 8) -> str:
        """One line: the folders that changed and how, and the shards to run.

        Example:
            >>> c = Changes({"animals": "+3 images", "space": "removed"}, shards={"1-of-1"})
            >>> c.line()
            '2 folders changed: animals (+3 images), space (removed); 1 shard to run'
        """
        line = self._line(limit)
        if self.regrouped is not None and not self.first:
            before, now = self.regrouped
            line += (
                f" (the folders regrouped from {before:,} shards into {now:,}: each reads its "
                "folders, and computes only those that changed)"
            )
        return line

    def _line(self, limit: int) -> str:
        shards = _plural(len(self.shards), "shard")
        if self.first:
            return f"{_plural(len(self.folders), 'folder')} to compute; {shards} to run"
        if self.settings:
            return (
                "the settings changed (model, weights, preprocessing, device, precision or "
                f"classification): every folder is computed again; {shards} to run"
            )
        if not self.folders:
            if not self.shards:
                return "nothing changed: every folder is up to date"
            if self.regrouped is not None:
                return f"no folder changed; {shards} to run"
            pending = sum(map(len, self.pending.values()))
            return (
                f"no folder changed; {shards} to run: {_plural(pending, 'folder')} not "
                "stored as they are now (a run stopped before it finished, or files changed "
                "by hand)"
            )
        names = sorted(self.folders)
        listed = ", ".join(f"{key} ({self.folders[key]})" for key in names[:limit])
        more = f" and {len(names) - limit:,} more" if len(names) > limit else ""
        return f"{_plural(len(names), 'folder')} changed: {listed}{more}; {shards} to run"


def _difference(before: dict, after: dict) -> str:
    """How a folder's images changed, in words: ``+3 images, 1 rewritten, -2``."""
    old, new = before.get("images", {}), after["images"]
    added = len(new.keys() - old.keys())
    removed = len(old.keys() - new.keys())
    rewritten = sum(1 for name in new.keys() & old.keys() if new[name] != old[name])
    parts = []
    if added:
        parts.append(f"+{_plural(added, 'image')}")
    if removed:
        parts.append(f"-{_plural(removed, 'image')}")
    if rewritten:
        parts.append(f"{_plural(rewritten, 'image')} rewritten")
    if before.get("refused") != after["refused"]:
        parts.append("refused files changed")
    return ", ".join(parts) or "changed"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _remove_empty_folders(top: Path) -> None:
    """Remove the empty folders below ``top`` (not ``top`` itself), deepest first."""
    if not top.is_dir():
        return
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


def asks_for_gpu(resources: Mapping[str, object]) -> bool:
    """Whether a rule's resources (Snakemake's ``--set-resources`` for it, as the slurm
    profile gives the folder jobs) ask for a GPU: ``gpu`` or ``gpus`` above 0, or a ``gres``
    naming one.

    Example:
        >>> asks_for_gpu({"gpu": 1}), asks_for_gpu({"gres": "gpu:a100:2"}), asks_for_gpu({})
        (True, True, False)
    """
    for name in ("gpu", "gpus", "gres"):
        value = resources.get(name)
        try:
            value = getattr(value, "value", value)  # Snakemake's Resource
        except Exception:  # noqa: BLE001 - a value computed per job: not known here
            continue
        if name == "gres":
            if value and "gpu" in str(value):
                return True
            continue
        with contextlib.suppress(TypeError, ValueError):
            if value is not None and int(value) > 0:
                return True
    return False


class _ManifestShards(Mapping[str, list[str]]):
    """``{shard name: its folder keys}`` of the manifests under ``results``, each read when
    asked for: a cluster job's own Snakemake lists them (one small folder) and reads only its
    own shard's; discovering the image tree again would cost every job far more."""

    def __init__(self, results: Path):
        self._folder = _manifest_folder(results)
        self._names = [n for n in _read_names(self._folder) if parse_shard_name(n) is not None]
        self._known = set(self._names)

    def __getitem__(self, shard: str) -> list[str]:
        if shard not in self._known:
            raise KeyError(shard)
        return sorted(read_shard_manifest(self._folder / f"{shard}.json").folders)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _has_brace(path: str) -> bool:
    return "{" in path or "}" in path


def _trackable(paths) -> list[str]:
    return [p for p in paths if not _has_brace(p)]


def plan_run(
    config: dict, *, discover: bool = True, gpu_jobs: bool = False, cores: int | None = None
) -> Plan:
    """Validate ``config``, resolve its device and precision, discover the image folders and
    check the named plugins.

    ``device: auto`` and ``precision: auto`` are resolved here, once for the whole run, and
    written into ``config`` (so that every job, its worker and the fingerprint of the numbers
    see the same concrete values): ``cuda`` and bf16 when the folder jobs ask for a GPU
    (``gpu_jobs``) or torch sees one on this machine, else ``cpu`` and fp32. Jobs check that
    the device they were planned for exists where they run.

    Args:
        config: the workflow's configuration (defaults are filled in, and device and
            precision resolved, in place).
        discover: walk the image tree; False takes the folders from the manifests that the
            planning process wrote (:meth:`Plan.write_manifests`), as each cluster job's own
            Snakemake does: walking a tree of millions of files on a shared filesystem in every
            job would cost more than the jobs. Such a plan takes the planning process's
            device and precision from ``{results}/compute.json``.
        gpu_jobs: whether the folder jobs ask the cluster for a GPU (see :func:`asks_for_gpu`).
        cores: the cores of a local run: ``shards.count: auto`` makes at least ``cores /
            threads`` shards (rounded up to a power of two), so that every core has work.

    Returns:
        The plan.

    Raises:
        ConfigError: for anything that would make the run fail, naming the key and the fix.
        DiscoveryError: for an image tree that cannot be used.
    """
    validate_config(config)
    _check_plugins(config)
    _check_model(config)
    _check_sizes(config)
    if _has_brace(config["results"]):
        raise ConfigError(
            f"config key 'results': {config['results']!r} holds a brace, which Snakemake reads "
            "as a wildcard; choose a results folder without { or }"
        )
    weights_file = (
        config["model"]["weights"] if is_local_weights(config["model"]["weights"]) else None
    )
    results = Path(config["results"])
    discovery = _discover(config) if discover else None
    images = sum(map(len, discovery.folders.values())) if discovery else None
    compute = _resolve(config, results, planned=not discover, gpu_jobs=gpu_jobs, images=images)
    config.update({key: compute[key] for key in RESOLVED_KEYS})
    numbers = _numbers(config)
    settings = {
        "numbers": hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest(),
        "classify": config["classify"],
    }
    return Plan(
        images=root_path(config["images"]),
        results=results,
        discovery=discovery,
        stems=_stems(discovery, config) if discovery else {},
        shards=_shards(discovery, config, cores) if discovery else _ManifestShards(results),
        weights_file=weights_file,
        numbers=numbers,
        compute=compute,
        change_detection=config["change_detection"],
        settings=settings,
        labelled=_labelled(config),
        gpu_jobs=gpu_jobs,
    )


def _numbers(config: dict) -> dict:
    """What changes the numbers: the config's fingerprint and, by content, the checkpoint and
    a custom network's source (a checkpoint replaced by ``mv`` or ``cp -p`` keeps an old
    modification time, which Snakemake's own input check would take as unchanged). The
    finetune rule's checkpoint is Snakemake's to track: it is written during the run."""
    from .worker import hash_cache

    model = config["model"]
    if is_local_weights(model["weights"]) and _is_finetune_output(model["weights"], config):
        model = {**model, "weights": "none"}
    return {**numbers_fingerprint(config), **model_file_hashes(model, hash_cache())}


def _resolve(
    config: dict, results: Path, *, planned: bool, gpu_jobs: bool, images: int | None
) -> dict:
    """The run's concrete device, precision, decoder and compile, with what was configured:
    read from what the planning process recorded (``planned``) when it was planned with the
    same settings, else resolved here (``compile: auto`` by the tree's ``images``)."""
    configured = {key: config[key] for key in RESOLVED_KEYS}
    if planned:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            recorded = json.loads(_compute_file(results).read_text())
            if recorded["configured"] == configured:
                return recorded
    compute = resolve_compute(
        config["device"],
        config["precision"],
        config["decode"],
        compile=config["compile"],
        images=images,
        gpu=True if gpu_jobs else None,
    )
    concrete = {key: value for key, value in compute.to_dict().items() if key in RESOLVED_KEYS}
    return {**concrete, "configured": configured}


def _discover(config: dict) -> Discovery:
    if is_misspelt_bucket(config["images"]):
        raise DiscoveryError(
            f"images: {config['images']!r} is neither a folder nor a bucket: a bucket is written "
            f"{BUCKET_FORM}"
        )
    if is_bucket(config["images"]):
        try:
            return list_tree(config["images"], config["extensions"])
        except BucketError as exc:
            raise DiscoveryError(str(exc)) from exc
    return discover_folders(
        config["images"],
        config["extensions"],
        exclude=config["results"],
        follow_external_links=config["follow_external_links"],
    )


def _shards(discovery: Discovery, config: dict, cores: int | None) -> dict[str, list[str]]:
    """The folders in shards (see :mod:`snakembed.shards`)."""
    settings = config["shards"]
    if settings["count"] != "auto":
        return assign_shards(discovery.folders, settings["count"])
    least = max(1, (cores or 1) // config["threads"])
    count = shard_count(
        len(discovery.folders),
        sum(len(names) for names in discovery.folders.values()),
        max_folders=settings["folders"],
        max_images=settings["images"],
        least=least,
        previous=_previous_count(_manifest_folder(Path(config["results"]))),
    )
    return assign_shards(discovery.folders, count)


def _stems(discovery: Discovery, config: dict) -> dict[str, str]:
    stems: dict[str, str] = {}
    for key in discovery.folders:
        stem = folder_stem(key)
        if stem in stems:
            raise DiscoveryError(
                f"folders {stems[stem]!r} and {key!r} under {config['images']!r} would share the "
                f"results file {stem}.h5 (images directly in the root are stored as "
                f"{folder_stem(ROOT_FOLDER)!r}, and braces as %7B and %7D); rename one of them"
            )
        stems[stem] = key
    return stems


def _labelled(config: dict) -> Labelled | None:
    settings = config["classify"]
    if settings["labels"] is None:
        if needs_labels(settings["head"]):
            raise ConfigError(
                f"config key 'classify.labels': head {settings['head']!r} is trained on labelled "
                "images; set classify.labels to a CSV of path,label rows or to a folder with "
                "train/ and val/ class folders"
            )
        return None
    try:
        return labels_from_config(config)
    except LabelError as exc:
        raise ConfigError(f"config key 'classify.labels': {exc}") from None


def _check_plugins(config: dict) -> None:
    model = config["model"]
    if model["name"] == "custom":  # module and kwargs without it: see validate_config
        _check_custom(model)
    for registry, name, key in (
        (BACKBONES, model["name"], "model.name"),
        (HEADS, config["classify"]["head"], "classify.head"),
    ):
        if key == "classify.head" and name == "none":
            continue
        try:
            registry.factory(name)
        except LookupError as exc:
            also = ", or none for embeddings only" if key == "classify.head" else ""
            raise ConfigError(f"config key {key!r}: {exc}{also}") from None


def _check_model(config: dict) -> None:
    """Build the network on the CPU when a job could otherwise fail on it: a local checkpoint
    (does it fit?), a layer other than pre_logits (does it exist?), or another pooling."""
    model = config["model"]
    head = config["classify"]["head"]
    if model["layer"] != PRE_LOGITS and head == "pretrained":
        raise ConfigError(
            f"config key 'classify.head': the pretrained head classifies pre_logits features, "
            f"not layer {model['layer']!r}; set classify.head to linear, knn or none"
        )
    local = is_local_weights(model["weights"])
    if local and not Path(model["weights"]).is_file():
        if _is_finetune_output(model["weights"], config):
            return  # the finetune rule writes it first
        raise ConfigError(
            f"config key 'model.weights': checkpoint {model['weights']!r} does not exist; give an "
            "existing file, a weights name, `default` or `none`"
        )
    if not local and model["layer"] == PRE_LOGITS and model["pool"] == "avg":
        return  # nothing a job could trip on that is not checked already; stay fast
    try:
        backbone_from_config({**model, "weights": model["weights"] if local else "none"})
    except LayerError as exc:
        key = "model.pool" if model["layer"] == PRE_LOGITS else "model.layer"
        raise ConfigError(f"config key {key!r}: {exc}") from None
    except WeightsError as exc:
        raise ConfigError(f"config key 'model.weights': {exc}") from None


def _is_finetune_output(weights: str, config: dict) -> bool:
    """Whether ``weights`` is the checkpoint that the finetune rule writes."""
    output = Path(config["results"]) / FINETUNE_CHECKPOINT
    return os.path.normpath(weights) == os.path.normpath(output)


def _check_custom(model: dict) -> None:
    if not model["module"]:
        raise ConfigError(
            "config key 'model.module': name: custom needs your network's class or factory, "
            "as `package.module:Name`"
        )
    try:
        import_object(model["module"])
    except ValueError as exc:
        raise ConfigError(f"config key 'model.module': {exc}") from None


def _check_sizes(config: dict) -> None:
    """Sizes that pass the schema one by one but cannot work together."""
    pre, patches = config["preprocess"], config["patches"]
    if pre["resize"] is not None and pre["crop"] is not None and pre["crop"] > pre["resize"]:
        raise ConfigError(
            f"config key 'preprocess.crop': {pre['crop']} is larger than preprocess.resize "
            f"({pre['resize']}), so every image would be padded with black; lower crop or raise "
            "resize"
        )
    if (
        patches["enabled"]
        and patches["border"] == "drop"
        and patches["resize"] is not None
        and patches["size"] > patches["resize"]
    ):
        raise ConfigError(
            f"config key 'patches.size': {patches['size']} is larger than patches.resize "
            f"({patches['resize']}) with border: drop, so no image would have a patch; lower "
            "patches.size, raise patches.resize, or set patches.border to pad or shift"
        )
