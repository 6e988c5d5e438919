"""Image folders from their files to their HDF5 files: embed, classify, store.

A shard's job (rule ``embed_classify_store``, see :mod:`snakembed.shards`) computes its folders
that changed (:func:`run_shard`): small folders are embedded together, a group of about
``shards.group`` images at a time, so that the network sees full batches and decoding
overlaps it; the embeddings are then split by folder and each folder's file is written as soon
as its group is done. The three steps run in one process because each is short next to
starting a process: in an embed worker, which keeps the prepared network and the head across
jobs and runs, or in the job itself.

A folder reuses the embeddings of its previous file for images whose content did not
change, when that file was written with the same numbers (model, weights, preprocessing,
patches, library versions): a new head, or a few images added to a folder, costs no decoding of
the rest.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._files import cached_sha256, scratch_folder
from .buckets import BucketUnavailable, absolute_root, root_path
from .classify import Predictions, predict
from .config import resolved
from .devices import compute_from_config, precision_warning
from .embed import Cancelled, Embedder, Embeddings, log_to_stderr
from .heads import Head, create_head, load_head
from .layout import folder_file
from .shards import file_stamp, job_key, read_record, read_shard_manifest, write_record
from .store import read_earlier, stored_state, write_folder

__all__ = [
    "Cancelled",
    "Models",
    "ShardError",
    "compute_folder",
    "compute_folders",
    "compute_images",
    "run_folder",
    "run_shard",
    "store_folder",
    "store_folders",
]

log = logging.getLogger("snakembed")


class Models:
    """The prepared network and the head, kept across folders and rebuilt only when the
    config, the threads or the head file's content change.

    Example:
        >>> from snakembed.config import load_config
        >>> Models().head(load_config(overrides={"classify": {"head": "none"}})) is None
        True
    """

    def __init__(self, hash_cache: Path | None = None) -> None:
        self._hash_cache = hash_cache  # see snakembed._files.cached_sha256
        self._embedder: tuple[str, Embedder] | None = None
        self._head: tuple[tuple, Head] | None = None
        self._lock = threading.Lock()  # a shared worker's jobs ask from their threads

    def embedder(
        self, config: dict, threads: int | None = None, device: str | None = None
    ) -> Embedder:
        """The config's :class:`~snakembed.embed.Embedder` (on ``device`` when given), built
        on first use; a later call without ``device`` gets the same one, whatever its
        ``classify`` settings (which the network does not use)."""
        network = {key: value for key, value in config.items() if key != "classify"}
        key = json.dumps([network, threads], sort_keys=True)
        with self._lock:
            if self._embedder is None or self._embedder[0] != key:
                self._embedder = (key, Embedder(config, threads=threads, device=device))
            return self._embedder[1]

    def head(self, config: dict, path: str | Path | None = None, backbone=None) -> Head | None:
        """The config's head: the one saved at ``path`` (a trained head; reloaded when the
        file changes), else built from the config (``pretrained``: the network's own
        classifier, read from ``backbone`` when given), or None with ``classify.head: none``."""
        name = config["classify"]["head"]
        if name == "none":
            return None
        if path is None:
            key: tuple = ("built", json.dumps(config, sort_keys=True))
        else:
            key = ("file", cached_sha256(path, self._hash_cache))
        with self._lock:
            if self._head is None or self._head[0] != key:
                head = create_head(name, config, backbone) if path is None else load_head(path)
                self._head = (key, head)
            return self._head[1]


def run_folder(
    images_root: str | Path,
    folder: str,
    names: Sequence[str],
    output: str | Path,
    config: dict,
    *,
    head: str | Path | None = None,
    threads: int | None = None,
    refused: dict[str, str] | None = None,
    models: Models | None = None,
    manifest_sha256: str | None = None,
) -> Embeddings:
    """Embed one image folder, classify its images and write its HDF5 file.

    Args:
        images_root: the image root.
        folder: the folder's key (its path relative to the root, ``.`` for the root itself).
        names: the folder's image file names.
        output: the folder's ``.h5`` file; an earlier file there lends its unchanged images'
            embeddings.
        config: a validated configuration.
        head: the trained head's file (the ``train_head`` rule's); None for a head built from
            the config (``pretrained``), or none with ``classify.head: none``.
        threads: CPU threads for this folder.
        refused: ``{name: reason}`` for images that discovery refused to read; they are
            recorded as failed.
        models: the network and head kept across calls (default: built for this call).
        manifest_sha256: the checksum of the folder's manifest, recorded in the file.

    Returns:
        The folder's embeddings.

    Example:
        >>> from snakembed.config import load_config
        >>> run_folder("demo/images", "animals", ["chelsea.jpg"], "/tmp/animals.h5",
        ...            load_config())  # doctest: +SKIP
    """
    log_to_stderr()
    start = time.monotonic()
    result, predictions = compute_folder(
        images_root,
        folder,
        names,
        output,
        config,
        head=head,
        threads=threads,
        refused=refused,
        models=models,
    )
    store_folder(result, predictions, output, folder, config, manifest_sha256, start)
    return result


def compute_folder(
    images_root: str | Path,
    folder: str,
    names: Sequence[str],
    output: str | Path,
    config: dict,
    *,
    head: str | Path | None = None,
    threads: int | None = None,
    refused: dict[str, str] | None = None,
    models: Models | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[Embeddings, Predictions | None]:
    """The embeddings and predictions of one image folder (what :func:`run_folder` stores).

    Args:
        cancelled: asked between batches (a worker: has the job gone?); when it says so,
            :class:`Cancelled` is raised.
        others: as :func:`run_folder`.

    Returns:
        The folder's embeddings (its refused images among the failed), and its predictions
        (None with ``classify.head: none``).

    Raises:
        Cancelled: when ``cancelled`` said so.
    """
    part = {"folder": folder, "names": names, "output": output, "refused": refused}
    return compute_folders(
        images_root,
        [part],
        config,
        head=head,
        threads=threads,
        models=models,
        cancelled=cancelled,
    )[0]


def compute_folders(
    images_root: str | Path,
    parts: Sequence[dict],
    config: dict,
    *,
    head: str | Path | None = None,
    threads: int | None = None,
    models: Models | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[tuple[Embeddings, Predictions | None]]:
    """The embeddings and predictions of several image folders, their images embedded as one
    stream (full batches, and decoding that overlaps the network, even for folders of a few
    images), then split by folder: each folder's are what :func:`compute_folder` gives it.

    Args:
        images_root: the image root.
        parts: the folders, each ``{"folder", "names", "output", "refused"}`` as the
            arguments of :func:`run_folder`.
        others: as :func:`compute_folder`.

    Returns:
        ``(embeddings, predictions)`` of each part, in order.

    Raises:
        Cancelled: when ``cancelled`` said so.

    Example:
        >>> parts = [{"folder": "animals", "names": ["chelsea.jpg"], "output": "a.h5"}]
        >>> compute_folders("demo/images", parts, config)  # doctest: +SKIP
    """
    models = models or Models()
    embedder = models.embedder(config, threads)
    paths, sources, owners, earlier = [], [], [], []
    root = root_path(images_root)
    for n, part in enumerate(parts):
        folder, refused = part["folder"], part.get("refused") or {}
        for name in part["names"]:
            if name in refused:
                log.warning("%s: %s", _source(folder, name), refused[name])
            else:
                paths.append(root / folder / name)
                sources.append(_source(folder, name))
                owners.append(n)
        earlier.append(read_earlier(part["output"], embedder.meta))
    label = parts[0]["folder"]
    if len(parts) > 1:
        label = f"{label} and {len(parts) - 1} more folders"
    reuse = _joined([e for e in earlier if e is not None])
    result = embedder(
        paths, ids=sources, sources=sources, label=label, reuse=reuse, cancelled=cancelled
    )
    owner = dict(zip(sources, owners, strict=True))
    known = frozenset(reuse.sha256) if reuse is not None else frozenset()
    rows: list[list[int]] = [[] for _ in parts]
    for i, source in enumerate(result.ids):
        rows[owner[source]].append(i)
    failed: list[dict[str, str]] = [dict(part.get("refused") or {}) for part in parts]
    for source, why in result.failed.items():
        n = owner[source]
        failed[n][_name(parts[n]["folder"], source)] = why
    classifier = models.head(config, head, embedder.backbone)
    out = []
    for n, part in enumerate(parts):
        folder = part["folder"]
        mine = _rows(result, rows[n], folder, failed[n])
        mine.reused = sum(sha in known for sha in mine.sha256)
        if mine.reused:
            log.info("%s: %d unchanged images reused from the previous run", folder, mine.reused)
        predictions = None
        if classifier is not None:
            settings = config["classify"]
            predictions = predict(
                classifier, settings["head"], mine.ids, mine.vectors, settings["topk"]
            )
        out.append((mine, predictions))
    return out


def compute_images(
    images: Sequence[str | Path],
    config: dict,
    *,
    head: str | Path | None = None,
    threads: int | None = None,
) -> tuple[Embeddings, Predictions | None]:
    """The embeddings and predictions of image files, computed as a run computes a folder's:
    by this machine's worker for ``config`` when workers are on (``worker.enabled``), which is
    started when none runs and then waits ``worker.idle`` seconds for the next call, so that a
    second call costs no model loading; else in this process.

    Args:
        images: image files, named as the caller names them: the ids of the result, one row
            for each (a file named twice, or by two names, is computed once).
        config: a validated configuration; ``classify.head: none`` predicts nothing.
        head: a trained head's file (see :func:`run_folder`).
        threads: CPU threads (default: ``threads``).

    Returns:
        The embeddings of the images that could be read, in the order given (``failed``: the
        others, with the reason, by name; no patch vectors), and their predictions.

    Example:
        >>> result, predictions = compute_images(["demo/images/animals/chelsea.jpg"],
        ...                                      config)  # doctest: +SKIP
        >>> predictions.label  # doctest: +SKIP
        ['tabby, tabby cat']
    """
    from .worker import compute_served

    # each image as (absolute folder, file name); each folder a part with no earlier file
    # (os.devnull holds no embeddings)
    keys = [(image, os.path.split(os.path.abspath(image))) for image in map(str, images)]
    folders: dict[str, dict[str, None]] = {}
    for _, (folder, name) in keys:
        folders.setdefault(folder, {})[name] = None
    parts = [{"folder": f, "names": list(n), "output": os.devnull} for f, n in folders.items()]
    request = {"images_root": "/", "head": str(head) if head else None, "parts": parts}
    computed, _ = compute_served(request, config, threads, job=False)
    row, why = {}, {}
    for part, (embeddings, _) in zip(parts, computed, strict=True):
        row |= {(part["folder"], name): len(row) + i for i, name in enumerate(embeddings.ids)}
        why |= {(part["folder"], name): reason for name, reason in embeddings.failed.items()}
    ids = [image for image, key in keys if key in row]
    rows = np.array([row[key] for _, key in keys if key in row], np.int64)
    joined = _joined([embeddings for embeddings, _ in computed])  # (one part at least)
    result = Embeddings(
        ids=ids,
        sources=[joined.sources[i] for i in rows],
        sha256=[joined.sha256[i] for i in rows],
        width=joined.width[rows],
        height=joined.height[rows],
        vectors=joined.vectors[rows],
        failed={image: why[key] for image, key in keys if key in why},
        meta=computed[0][0].meta,
    )
    predictions = [p for _, p in computed]
    if any(p is None for p in predictions):
        return result, None
    return result, Predictions(
        result.ids,
        np.concatenate([p.labels for p in predictions])[rows],
        np.concatenate([p.scores for p in predictions])[rows],
        predictions[0].head,
    )


def _source(folder: str, name: str) -> str:
    """An image's path relative to the image root."""
    return name if folder == "." else f"{folder}/{name}"


def _name(folder: str, source: str) -> str:
    """An image's name in its folder, from its :func:`_source`."""
    return source if folder == "." else source[len(folder) + 1 :]


def _joined(parts: list[Embeddings]) -> Embeddings | None:
    """Embeddings of several folder files as one (earlier embeddings to reuse by content)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    joined = Embeddings(
        ids=[i for e in parts for i in e.ids],
        sources=[s for e in parts for s in e.sources],
        sha256=[h for e in parts for h in e.sha256],
        width=np.concatenate([e.width for e in parts]),
        height=np.concatenate([e.height for e in parts]),
        vectors=np.concatenate([e.vectors for e in parts]),
    )
    if all(e.patch_counts is not None for e in parts):
        joined.patch_vectors = np.concatenate([e.patch_vectors for e in parts])
        joined.patch_boxes = np.concatenate([e.patch_boxes for e in parts])
        joined.patch_counts = np.concatenate([e.patch_counts for e in parts])
    return joined


def _rows(result: Embeddings, rows: list[int], folder: str, failed: dict) -> Embeddings:
    """The rows of ``result`` that are one folder's images, named as in the folder."""
    index = np.asarray(rows, np.int64)
    part = Embeddings(
        ids=[_name(folder, result.ids[i]) for i in rows],
        sources=[result.sources[i] for i in rows],
        sha256=[result.sha256[i] for i in rows],
        width=result.width[index],
        height=result.height[index],
        vectors=result.vectors[index],
        failed=dict(sorted(failed.items())),
        meta=dict(result.meta),
    )
    if result.patch_counts is not None:
        offsets = np.concatenate([[0], np.cumsum(result.patch_counts)])
        slices = [slice(offsets[i], offsets[i + 1]) for i in rows]
        part.patch_counts = result.patch_counts[index]
        part.patch_vectors = _pieces(result.patch_vectors, slices)
        part.patch_boxes = _pieces(result.patch_boxes, slices)
    return part


def _pieces(array: np.ndarray, slices: list[slice]) -> np.ndarray:
    if not slices:
        return array[:0]
    return np.concatenate([array[s] for s in slices])


def store_folder(
    result: Embeddings,
    predictions: Predictions | None,
    output: str | Path,
    folder: str,
    config: dict,
    manifest_sha256: str | None,
    start: float | None,
) -> None:
    """Write a folder's file (in scratch first where the config says so), and log what was
    stored, with the time since ``start`` (``time.monotonic()``; None for a folder computed
    with others)."""
    scratch = scratch_folder(config["scratch"], output)
    if scratch is not None:
        log.info(
            "%s: building its file in %s (scratch), then copying it to %s", folder, scratch, output
        )
    write_folder(
        result, predictions, output, folder, scratch=scratch, manifest_sha256=manifest_sha256
    )
    stored = len(result.ids)
    line = f"{folder}: {stored} images stored ({stored - result.reused} embedded, "
    line += f"{result.reused} reused), {len(result.failed)} failed"
    if start is not None:
        seconds = time.monotonic() - start
        rate = (stored + len(result.failed)) / max(seconds, 1e-9)
        line += f", in {seconds:.1f} s ({rate:.1f} images/s)"
    log.info("%s", line)


def store_folders(
    parts: Sequence[dict], computed: Sequence[tuple], config: dict, start: float
) -> dict[str, Exception]:
    """Write the files of folders computed together (see :func:`compute_folders`).

    Args:
        parts: the folders, each ``{"folder", "output", "manifest_sha256", ...}``.
        computed: each part's ``(embeddings, predictions)``.
        config: a validated configuration.
        start: when their computation began (``time.monotonic()``), for the log.

    Returns:
        ``{folder: error}`` of the folders whose file could not be written (the others are
        stored).
    """
    errors: dict[str, Exception] = {}
    alone = len(parts) == 1
    for part, (result, predictions) in zip(parts, computed, strict=True):
        try:
            store_folder(
                result,
                predictions,
                part["output"],
                part["folder"],
                config,
                part["manifest_sha256"],
                start if alone else None,
            )
        except Exception as exc:  # noqa: BLE001 - one folder's file must not lose the others
            errors[part["folder"]] = exc
    return errors


class ShardError(RuntimeError):
    """Folders of a shard that failed (the shard's other folders are stored)."""


#: Seconds between two saves of a shard job's progress (see :func:`run_shard`).
_SAVE_EVERY = 30.0

#: A shard stops after this many failed folders in a row before any succeeded: the cause is
#: then the run's (weights, device, disk), not a folder's, and every folder would fail alike.
_FAILURES_BEFORE_STOP = 3


def run_shard(
    manifest: str | Path,
    output: str | Path,
    config: dict,
    *,
    head: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, str]:
    """The job of one shard: compute its folders whose files were not computed from their
    current manifest (and head), small folders embedded together (``shards.group`` images at
    a time, see :func:`compute_folders`), each file written as soon as its group is done; then
    write the shard's record.

    A folder whose file is up to date is not touched (same bytes, same modification time): a
    shard killed half-way resumes on the next run with the folders it had not finished. A
    folder that fails is logged with its error and the others go on; the job then fails,
    naming it, and the next run computes only what is missing.

    Args:
        manifest: the shard's manifest (see :mod:`snakembed.shards`).
        output: the shard's record, ``{results}/shards/{shard}.json``.
        config: a validated configuration.
        head: the trained head's file, or None (see :func:`run_folder`).
        threads: CPU threads for this job.

    Returns:
        ``{folder key: "computed" or "up to date"}``.

    Raises:
        ShardError: naming the folders that failed.

    Example:
        >>> run_shard("results/manifests/1-of-1.json", "results/shards/1-of-1.json",
        ...           config)  # doctest: +SKIP
    """
    from .worker import compute_served, hash_cache

    log_to_stderr()
    if (warning := precision_warning(compute_from_config(resolved(config)))) is not None:
        log.warning(warning)
    shard = read_shard_manifest(manifest)
    results = Path(output).parent.parent
    head_sha256 = cached_sha256(head, hash_cache()) if head else None
    models = Models(hash_cache())
    record: dict[str, dict] = {}
    outcome: dict[str, str] = {}
    todo = []
    for key, entry in shard.folders.items():
        path = folder_file(results, key)
        wanted = job_key(entry["digest"], head_sha256)
        computed_from, failed_images = stored_state(path)
        if computed_from == wanted:
            record[key] = _recorded(entry, wanted, path, failed_images)
            outcome[key] = "up to date"
        else:
            todo.append((key, entry, wanted, path))
    images = sum(len(entry["images"]) + len(entry["refused"]) for _, entry, _, _ in todo)
    log.info(
        "shard %s: %d folders, %d up to date, %d to compute (%d images)",
        shard.shard,
        len(shard.folders),
        len(record),
        len(todo),
        images,
    )
    failed: dict[str, str] = {}
    # what the plan set aside, updated as folders are stored: a stopped job's progress, which
    # the next plan compares the tree with
    partial = Path(f"{output}.old")
    earlier = {
        key: entry
        for key, entry in (read_record(partial) or {}).get("folders", {}).items()
        if key in shard.folders
    }

    def settle(group: list[tuple], errors: dict[str, BaseException]) -> None:
        for key, entry, wanted, path in group:
            if key in errors:
                exc = errors[key]
                log.error("%s: failed: %s", key, exc, exc_info=exc)
                failed[key] = f"{type(exc).__name__}: {exc}"
            else:
                record[key] = _recorded(entry, wanted, path, stored_state(path)[1])
                outcome[key] = "computed"

    saved = time.monotonic()
    groups = deque(_groups(todo, config["shards"]["group"]))
    # the files of a group a worker computed are written in a thread while the worker computes
    # the next group (a job that computes itself writes between groups: its decoding
    # processes are forked, which a writing thread must not be when they are)
    writing: list[tuple[list[tuple], Future]] = []

    def written() -> None:
        while writing:
            group, future = writing.pop()
            settle(group, future.result())

    unavailable: BucketUnavailable | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="store") as writer:
        while groups:
            if len(failed) >= _FAILURES_BEFORE_STOP and "computed" not in outcome.values():
                break
            group = groups.popleft()
            if time.monotonic() - saved > _SAVE_EVERY:
                write_record(partial, shard.settings, {**earlier, **record})
                saved = time.monotonic()
            request = _request(shard, head, group)
            start = time.monotonic()
            try:
                computed, served = compute_served(
                    request, config, threads, models=models, before_here=written
                )
            except BucketUnavailable as exc:  # not a folder's fault: every folder would fail
                unavailable = exc
                break
            except Exception as exc:  # noqa: BLE001 - one folder's failure must not lose others
                if len(group) > 1:
                    log.warning(
                        "%d folders computed together failed (%s: %s); computing each alone",
                        len(group),
                        type(exc).__name__,
                        exc,
                    )
                    groups.extendleft([item] for item in reversed(group))
                else:
                    settle(group, {group[0][0]: exc})
                continue
            written()
            stored = (request["parts"], computed, config, start)
            if served:
                writing.append((group, writer.submit(store_folders, *stored)))
            else:
                settle(group, store_folders(*stored))
        written()
    if unavailable is not None:
        write_record(partial, shard.settings, {**earlier, **record})
        raise ShardError(
            f"shard {shard.shard}: stopped: {unavailable}. {len(record)} of "
            f"{len(shard.folders)} folders are stored; run snakemake again when the bucket can "
            "be read: it computes what is missing"
        ) from unavailable
    if failed:
        write_record(partial, shard.settings, {**earlier, **record})
        left = len(todo) - len(failed) - sum(v == "computed" for v in outcome.values())
        stopped = (
            f"; stopped before the other {left}, as every folder failed so far" if left else ""
        )
        names = ", ".join(list(failed)[:10]) + (" ..." if len(failed) > 10 else "")
        raise ShardError(
            f"shard {shard.shard}: {len(failed)} of {len(shard.folders)} folders failed "
            f"({names}){stopped}; the error of each is above. {len(record)} of "
            f"{len(shard.folders)} folders are stored; run snakemake again to compute what is "
            "missing"
        )
    write_record(output, shard.settings, record)
    partial.unlink(missing_ok=True)
    return outcome


def _request(shard, head: str | Path | None, group: list[tuple]) -> dict:
    """What a worker (or the job itself) computes for a group of a shard's folders."""
    return {
        "images_root": absolute_root(shard.root),
        "head": os.path.abspath(head) if head else None,
        "parts": [
            {
                "folder": key,
                "names": sorted([*entry["images"], *entry["refused"]]),
                "output": os.path.abspath(path),
                "refused": entry["refused"],
                "manifest_sha256": wanted,
            }
            for key, entry, wanted, path in group
        ],
    }


def _groups(todo: list[tuple], size: int) -> Iterator[list[tuple]]:
    """A shard's folders to compute, in groups of about ``size`` images embedded together
    (``shards.group``; a folder as large is a group of its own)."""
    group: list[tuple] = []
    images = 0
    for item in todo:
        if group and len(item[1]["images"]) >= size:
            yield group
            group, images = [], 0
        group.append(item)
        images += len(item[1]["images"])
        if images >= size:
            yield group
            group, images = [], 0
    if group:
        yield group


def _recorded(entry: dict, key: str, path: Path, failed: int) -> dict:
    """A folder's entry in its shard's record (see :func:`snakembed.shards.write_record`):
    ``failed`` is how many of its images its file records as failed."""
    fields = ("digest", "images", "refused")
    return {**{k: entry[k] for k in fields}, "key": key, "file": file_stamp(path), "failed": failed}
