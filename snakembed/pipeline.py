"""One image folder from its files to its HDF5 file: embed, classify, store.

This is the workflow's per-folder job (rule ``embed_classify_store``). The three steps run in
one process because each is short next to starting a process: in an embed worker, which keeps
the prepared network and the head for every folder it serves, or in the job itself.

A folder's job reuses the embeddings of its previous file for images whose content did not
change, when that file was written with the same numbers (model, weights, preprocessing,
patches, library versions): a new head, or a few images added to a folder, costs no decoding of
the rest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._files import cached_sha256, scratch_folder
from .classify import Predictions, predict
from .embed import Cancelled, Embedder, Embeddings, log_to_stderr
from .heads import Head, create_head, load_head
from .store import read_earlier, stale_copy, write_folder

__all__ = ["Cancelled", "Models", "compute_folder", "run_folder", "store_folder"]

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
        output: the folder's ``.h5`` file; an earlier file there (or moved aside by the plan,
            see :func:`~snakembed.store.stale_copy`) lends its unchanged images' embeddings.
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
        reuse=read_earlier(output, embedder.meta)
        or read_earlier(stale_copy(output), embedder.meta),
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
    """Write a folder's file (in scratch first where the config says so), drop the copy the
    plan moved aside, and log what was stored since ``start`` (``time.monotonic()``)."""
    scratch = scratch_folder(config["scratch"], output)
    if scratch is not None:
        log.info(
            "%s: building its file in %s (scratch), then copying it to %s", folder, scratch, output
        )
    write_folder(
        result, predictions, output, folder, scratch=scratch, manifest_sha256=manifest_sha256
    )
    stale_copy(output).unlink(missing_ok=True)
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
