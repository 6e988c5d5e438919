"""Image folders from their files to their HDF5 files: embed, classify, store.

A shard's job (rule ``embed_classify_store``, see :mod:`snakembed.shards`) runs its folders
that changed one after another (:func:`run_shard`). The three steps of a folder run in one
process because each is short next to starting a process: in an embed worker, which keeps the
prepared network and the head for every folder it serves, or in the job itself.

A folder's job reuses the embeddings of its previous file for images whose content did not
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
from collections.abc import Callable, Sequence
from pathlib import Path

from ._files import cached_sha256, scratch_folder
from .classify import Predictions, predict
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
    "run_folder",
    "run_shard",
    "store_folder",
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
        on first use; a later call without ``device`` gets the same one."""
        key = json.dumps([config, threads], sort_keys=True)
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
    models = models or Models()
    embedder = models.embedder(config, threads)
    refused = dict(refused or {})
    readable = [name for name in names if name not in refused]
    directory = Path(images_root) / folder
    result = embedder(
        [directory / n for n in readable],
        ids=readable,
        sources=[name if folder == "." else f"{folder}/{name}" for name in readable],
        label=folder,
        reuse=read_earlier(output, embedder.meta),
        cancelled=cancelled,
    )
    for name, reason in refused.items():
        log.warning("%s: %s", name if folder == "." else f"{folder}/{name}", reason)
    result.failed = dict(sorted({**refused, **result.failed}.items()))
    predictions = None
    classifier = models.head(config, head, embedder.backbone)
    if classifier is not None:
        settings = config["classify"]
        predictions = predict(
            classifier, settings["head"], result.ids, result.vectors, settings["topk"]
        )
    return result, predictions


def store_folder(
    result: Embeddings,
    predictions: Predictions | None,
    output: str | Path,
    folder: str,
    config: dict,
    manifest_sha256: str | None,
    start: float,
) -> None:
    """Write a folder's file (in scratch first where the config says so), and log what was
    stored since ``start`` (``time.monotonic()``)."""
    scratch = scratch_folder(config["scratch"], output)
    if scratch is not None:
        log.info(
            "%s: building its file in %s (scratch), then copying it to %s", folder, scratch, output
        )
    write_folder(
        result, predictions, output, folder, scratch=scratch, manifest_sha256=manifest_sha256
    )
    seconds = time.monotonic() - start
    log.info(
        "%s: %d images stored (%d embedded, %d reused), %d failed, in %.1f s (%.1f images/s)",
        folder,
        len(result.ids),
        len(result.ids) - result.reused,
        result.reused,
        len(result.failed),
        seconds,
        (len(result.ids) + len(result.failed)) / max(seconds, 1e-9),
    )


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
    current manifest (and head), one after another, each file written as soon as its folder
    is done; then write the shard's record.

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
    from .worker import hash_cache, run_served

    log_to_stderr()
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
        if stored_state(path)[0] == wanted:
            record[key] = _recorded(entry, wanted, path)
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
    saved = time.monotonic()
    for key, entry, wanted, path in todo:
        if time.monotonic() - saved > _SAVE_EVERY:
            write_record(partial, shard.settings, {**earlier, **record})
            saved = time.monotonic()
        request = {
            "manifest_sha256": wanted,
            "images_root": os.path.abspath(shard.root),
            "folder": key,
            "names": sorted([*entry["images"], *entry["refused"]]),
            "output": os.path.abspath(path),
            "head": os.path.abspath(head) if head else None,
            "refused": entry["refused"],
        }
        try:
            run_served(request, config, threads, models=models)
        except Exception as exc:  # noqa: BLE001 - one folder's failure must not lose the others
            log.exception("%s: failed: %s", key, exc)
            failed[key] = f"{type(exc).__name__}: {exc}"
            if len(failed) >= _FAILURES_BEFORE_STOP and "computed" not in outcome.values():
                break
            continue
        record[key] = _recorded(entry, wanted, path)
        outcome[key] = "computed"
    if failed:
        write_record(partial, shard.settings, {**earlier, **record})
        left = len(todo) - len(failed) - sum(v == "computed" for v in outcome.values())
        stopped = (
            f"; stopped before the other {left}, as every folder failed so far" if left else ""
        )
        names = ", ".join(list(failed)[:10]) + (" ..." if len(failed) > 10 else "")
        raise ShardError(
            f"shard {shard.shard}: {len(failed)} of {len(shard.folders)} folders failed "
            f"({names}){stopped}; the error of each is above. The others are stored; run "
            "snakemake again to compute what is missing"
        )
    write_record(output, shard.settings, record)
    partial.unlink(missing_ok=True)
    return outcome


def _recorded(entry: dict, key: str, path: Path) -> dict:
    """A folder's entry in its shard's record (see :func:`snakembed.shards.write_record`)."""
    fields = ("digest", "images", "refused")
    failed = stored_state(path)[1]
    return {**{k: entry[k] for k in fields}, "key": key, "file": file_stamp(path), "failed": failed}
