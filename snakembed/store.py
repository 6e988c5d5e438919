"""Writing the HDF5 results: one file per image folder and an index of external links.

The layout (a group per embedded image, provenance in root attributes, bulk ``_`` datasets for
fast reading) and its names are in :mod:`snakembed.layout`, shared with the readers. Every file
is written under a temporary name and renamed, so readers never see a half-written file.
:mod:`snakembed.reader` reads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from ._files import atomic_path, checked_size, texts
from .buckets import absolute_root
from .classify import Predictions
from .config import library_versions
from .embed import Embeddings
from .layout import (
    EMBEDDINGS,
    FORMAT_VERSION,
    HEIGHT,
    IDS,
    IMAGE_EMBEDDING,
    IMAGE_PATCH_BOXES,
    IMAGE_PATCH_EMBEDDINGS,
    IMAGE_TOPK_LABELS,
    IMAGE_TOPK_SCORES,
    LABELS,
    PATCH_BOXES,
    PATCH_EMBEDDINGS,
    PATCH_OFFSETS,
    ROOT_FOLDER,
    SCORES,
    SHA256,
    SOURCES,
    WIDTH,
    folder_file,
)
from .shards import read_record

__all__ = [
    "computed_from",
    "index_shards",
    "stored_state",
    "read_earlier",
    "update_index",
    "write_folder",
    "write_index",
]

_STR = h5py.string_dtype()


def computed_from(path: str | Path) -> str | None:
    """What a folder file was computed from (see :func:`snakembed.shards.job_key`), or None (a
    file written before snakembed recorded it, or one that cannot be read)."""
    return stored_state(path)[0]


def stored_state(path: str | Path) -> tuple[str | None, int]:
    """What a folder file was computed from (see :func:`computed_from`), and how many of its
    images failed; ``(None, 0)`` for a file that cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("manifest_sha256")
            failed = int(f.attrs.get("num_failed", 0))
    except (OSError, ValueError, TypeError):
        return None, 0
    return (value.decode() if isinstance(value, bytes) else value), failed


@contextlib.contextmanager
def _atomic_h5(path: str | Path, scratch: str | Path | None = None) -> Iterator[h5py.File]:
    """An HDF5 file written under a temporary name (in ``scratch``, when given) and renamed into
    place on success."""
    with (
        atomic_path(path, scratch) as tmp,
        h5py.File(tmp, "w", libver="latest") as f,
    ):
        yield f


def write_folder(
    embeddings: Embeddings,
    predictions: Predictions | None,
    output: str | Path,
    folder: str,
    *,
    scratch: str | Path | None = None,
    manifest_sha256: str | None = None,
) -> None:
    """Write one folder's final HDF5 file.

    Args:
        embeddings: the folder's embeddings (with failures and provenance in ``meta``).
        predictions: the head's predictions for the same ids, or None without classification.
        output: the ``.h5`` path.
        folder: the folder's key.
        scratch: a folder on a fast local disk to build the file in before it is copied to
            ``output`` (see :func:`snakembed._files.scratch_folder`); None builds it beside.
        manifest_sha256: the checksum of the folder's manifest, which the file records: the
            plan checks it against the folder's current manifest (see :func:`computed_from`).
    """
    n = len(embeddings.ids)
    if predictions is not None and list(predictions.ids) != list(embeddings.ids):
        raise ValueError(f"predictions and embeddings of folder {folder!r} list different images")
    meta = embeddings.meta
    with _atomic_h5(output, scratch) as f:
        attrs = {
            "format_version": FORMAT_VERSION,
            "snakembed_version": library_versions()["snakembed"],
            "folder": folder,
            "model": meta["model"],
            "weights": meta["weights"],
            "weights_sha256": meta["weights_sha256"],
            "module_sha256": meta.get("module_sha256", ""),
            "layer": meta["layer"],
            "pool": meta["pool"],
            "embedding_dim": int(meta["embedding_dim"]),
            "preprocess": json.dumps(meta["preprocess"]),
            "patches": json.dumps(meta["patches"]),
            "device": meta["device"],
            "precision": meta["precision"],
            "compiled": int(meta.get("compiled", 0)),
            "decode": meta.get("decode", ""),
            "config_hash": meta["config_hash"],
            # the config's keys that made these numbers, for `snakembed predict --results`
            "settings": json.dumps(meta.get("settings")),
            "versions": json.dumps(library_versions()),
            "classify": json.dumps(predictions.head if predictions is not None else None),
            "num_images": n,
            "num_failed": len(embeddings.failed),
            "failed": json.dumps(embeddings.failed, ensure_ascii=False),
        }
        if manifest_sha256 is not None:
            attrs["manifest_sha256"] = manifest_sha256
        f.attrs.update(attrs)

        f.create_dataset(IDS, data=np.asarray(embeddings.ids, dtype=object), dtype=_STR)
        f.create_dataset(SOURCES, data=np.asarray(embeddings.sources, dtype=object), dtype=_STR)
        f.create_dataset(SHA256, data=np.asarray(embeddings.sha256, dtype=object), dtype=_STR)
        f.create_dataset(WIDTH, data=embeddings.width)
        f.create_dataset(HEIGHT, data=embeddings.height)
        f.create_dataset(EMBEDDINGS, data=embeddings.vectors.astype(np.float32))
        if predictions is not None:
            f.create_dataset(LABELS, data=np.asarray(predictions.label, dtype=object), dtype=_STR)
            f.create_dataset(SCORES, data=predictions.score.astype(np.float32))
        offsets = None
        if embeddings.patch_vectors is not None:
            offsets = np.concatenate([[0], np.cumsum(embeddings.patch_counts)]).astype(np.int64)
            f.create_dataset(PATCH_EMBEDDINGS, data=embeddings.patch_vectors.astype(np.float32))
            f.create_dataset(PATCH_BOXES, data=embeddings.patch_boxes)
            f.create_dataset(PATCH_OFFSETS, data=offsets)

        _write_image_groups(f, embeddings, predictions, offsets)


def _write_image_groups(
    f: h5py.File, embeddings: Embeddings, predictions: Predictions | None, offsets
) -> None:
    """One group per image (the output contract's ``f[image_id]``), written through h5py's
    low-level API: its high-level objects cost more than HDF5 itself (1.4-1.7 against
    0.6-0.8 core-ms per image with top-k predictions, measured), and every image pays it."""
    from h5py import h5a, h5d, h5g, h5p, h5s, h5t

    # as h5py's high-level API makes them: ASCII names as ASCII, others as UTF-8; no times
    # stored in the objects (a file is the same bytes for the same content)
    utf8 = h5p.create(h5p.LINK_CREATE)
    utf8.set_char_encoding(h5t.CSET_UTF8)
    groups, datasets = h5p.create(h5p.GROUP_CREATE), h5p.create(h5p.DATASET_CREATE)
    groups.set_obj_track_times(False)
    datasets.set_obj_track_times(False)
    text = h5t.py_create(_STR, logical=True)
    scalar = h5s.create(h5s.SCALAR)
    types = {"str": text}

    def kind(value: np.ndarray):
        if value.dtype == object:
            return types["str"]
        return types.setdefault(value.dtype.str, h5t.py_create(value.dtype))

    def attribute(group, name: str, value) -> None:
        value = np.asarray(value, dtype=object if isinstance(value, str) else None)
        h5a.create(group, name.encode(), kind(value), scalar).write(value)

    def dataset(group, name: str, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value)
        space = h5s.create_simple(value.shape)
        made = h5d.create(group, name.encode(), kind(value), space, dcpl=datasets)
        made.write(h5s.ALL, h5s.ALL, value)

    vectors = embeddings.vectors.astype(np.float32, copy=False)
    for i, image_id in enumerate(embeddings.ids):
        name = image_id.encode("utf-8")
        group = h5g.create(f.id, name, lcpl=None if name.isascii() else utf8, gcpl=groups)
        dataset(group, IMAGE_EMBEDDING, vectors[i])
        attribute(group, "source", embeddings.sources[i])
        attribute(group, "width", np.int64(embeddings.width[i]))
        attribute(group, "height", np.int64(embeddings.height[i]))
        attribute(group, "sha256", embeddings.sha256[i])
        if predictions is not None:
            attribute(group, "label", str(predictions.labels[i, 0]))
            attribute(group, "score", np.float64(predictions.scores[i, 0]))
            dataset(group, IMAGE_TOPK_LABELS, np.asarray(predictions.labels[i], dtype=object))
            dataset(group, IMAGE_TOPK_SCORES, predictions.scores[i].astype(np.float32))
        if offsets is not None:
            lo, hi = offsets[i], offsets[i + 1]
            dataset(
                group, IMAGE_PATCH_EMBEDDINGS, embeddings.patch_vectors[lo:hi].astype(np.float32)
            )
            dataset(group, IMAGE_PATCH_BOXES, embeddings.patch_boxes[lo:hi])


def write_index(
    folders: list[str] | Mapping[str, str], images_root: str | Path, output: str | Path
) -> None:
    """Write the index: nested groups that mirror the image tree, linking every folder file.

    A folder without image folders below it is one external link to its file's root; a folder
    with image folders below it (or the image root itself) is a group with one link per image
    beside the groups of those below. Links are relative, so a results folder can be moved whole.

    Args:
        folders: every folder key, or ``{folder key: the checksum its file was computed
            from}`` (which lets :func:`update_index` redo only what changed).
        images_root: the image root, recorded for lookups by absolute path.
        output: the index file, ``{results}/index.h5``.
    """
    digests = dict(folders) if isinstance(folders, Mapping) else dict.fromkeys(folders, "")
    parents = _parents(digests)
    with _atomic_h5(output) as f:
        _index_attrs(f, digests, parents, images_root)
        for key in sorted(digests):
            _link(f, key, parents, Path(output).parent)


def update_index(folders: Mapping[str, str], images_root: str | Path, output: str | Path) -> str:
    """Bring the index at ``output`` up to date with ``folders``, redoing only what changed:
    the links of folders added or removed, and the image links of changed folders that have
    folders below them (a folder without any is one link to its file, whatever it holds). An
    index of another image root or version, or one that cannot be read, is written anew (see
    :func:`write_index`). The file is updated in a copy that is renamed into place.

    Args:
        folders: ``{folder key: the checksum its file was computed from}``.
        images_root: the image root.
        output: the index file.

    Returns:
        What was done: ``written``, ``updated`` or ``unchanged``.

    Example:
        >>> update_index({"a": "1"}, "images", "results/index.h5")  # doctest: +SKIP
        'written'
    """
    output = Path(output)
    old = _index_digests(output, images_root)
    if old is None:
        write_index(folders, images_root, output)
        return "written"
    new = dict(folders)
    parents, old_parents = _parents(new), _parents(old)

    def role(key: str, among: set[str]) -> bool:
        return key in among

    kept = new.keys() & old.keys()
    redo = {
        key
        for key in kept
        if role(key, parents) != role(key, old_parents) or (key in parents and new[key] != old[key])
    }
    gone, added = old.keys() - new.keys(), new.keys() - old.keys()
    if not (gone or added or redo):
        os.utime(output)  # up to date: newer than the records it was made from
        return "unchanged"
    with atomic_path(output) as tmp:
        shutil.copyfile(output, tmp)
        with h5py.File(tmp, "r+") as f:
            for key in sorted(gone | redo, key=lambda k: -k.count("/")):
                _unlink(f, key, old_parents)
            for key in sorted(gone, key=lambda k: -k.count("/")):
                _prune_groups(f, key, parents)
            for key in sorted(added | redo):
                _link(f, key, parents, output.parent)
            _index_attrs(f, new, parents, images_root)
    return "updated"


def index_shards(records, images_root: str | Path, output: str | Path) -> str:
    """Bring the index up to date with the shards' records (the ``index`` rule; see
    :func:`update_index`).

    Args:
        records: every shard's record (see :mod:`snakembed.shards`).
        images_root: the image root.
        output: the index file.

    Returns:
        What was done (see :func:`update_index`).

    Raises:
        ValueError: for a record that cannot be read, naming it and the fix.
    """
    folders: dict[str, str] = {}
    for path in records:
        record = read_record(path)
        if record is None:
            raise ValueError(
                f"{path}: not a shard record; delete it and run snakemake again, which runs "
                "its shard again"
            )
        folders.update({key: str(e.get("key", "")) for key, e in record["folders"].items()})
    return update_index(folders, images_root, output)


def _parents(keys) -> set[str]:
    """The keys that are groups in the index: the root, and every folder's ancestors."""
    parents = {ROOT_FOLDER}  # the root is always a group, never a link
    for key in set(keys) - {ROOT_FOLDER}:
        parts = key.split("/")
        parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return parents


def _index_attrs(f: h5py.File, digests: Mapping[str, str], parents: set[str], root) -> None:
    f.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "snakembed_version": library_versions()["snakembed"],
            "images_root": absolute_root(root),
            "folders": json.dumps(sorted(digests), ensure_ascii=False),
            # the groups' image links depend on their folders' content: what they were made from
            "parent_digests": json.dumps(
                {key: digests[key] for key in sorted(digests) if key in parents},
                ensure_ascii=False,
            ),
        }
    )


def _index_digests(path: Path, images_root: str | Path) -> dict[str, str] | None:
    """``{folder key: checksum}`` as the index at ``path`` was made (leaves: ``""``), or None
    when it must be written anew."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: f.attrs[k] for k in ("format_version", "images_root", "folders")}
            parent_digests = json.loads(_attr_text(f.attrs["parent_digests"]))
            folders = json.loads(_attr_text(attrs["folders"]))
    except (OSError, KeyError, ValueError, TypeError):
        return None
    if int(attrs["format_version"]) != FORMAT_VERSION:
        return None
    if _attr_text(attrs["images_root"]) != absolute_root(images_root):
        return None
    return {key: parent_digests.get(key, "") for key in folders}


def _attr_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _link(f: h5py.File, key: str, parents: set[str], index_dir: Path) -> None:
    """Link folder ``key``: one link to its file, or a group of links to its images."""
    results = index_dir
    target = os.path.relpath(folder_file(results, key), index_dir)
    if key not in parents:
        parent, _, name = key.rpartition("/")
        (f.require_group(parent) if parent else f)[name] = h5py.ExternalLink(target, "/")
        return
    group = f if key == ROOT_FOLDER else f.require_group(key)
    with h5py.File(folder_file(results, key), "r") as source:
        ids = texts(source[IDS])
    for image_id in ids:
        group[image_id] = h5py.ExternalLink(target, "/" + image_id)


def _unlink(f: h5py.File, key: str, parents: set[str]) -> None:
    """Remove the links of folder ``key`` as the index holds it (``parents``: its groups)."""
    if key not in parents:
        with contextlib.suppress(KeyError):
            del f[key]
        return
    group = f if key == ROOT_FOLDER else f.get(key)
    if group is None:
        return
    for name in list(group):
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink) and link.path != "/":  # an image's, not a folder's
            del group[name]


def _prune_groups(f: h5py.File, key: str, parents: set[str]) -> None:
    """Remove the groups left empty by the removal of ``key`` that no folder needs now."""
    parts = key.split("/")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i])
        if path in parents:
            break
        node = f.get(path, getlink=True)
        if node is None:
            continue
        if not isinstance(node, h5py.HardLink) or len(f[path]):
            break
        del f[path]


#: What must match for a folder file's embeddings to be reused (with the value of a file that
#: does not record it): the fingerprint of the settings (see ``numbers_fingerprint``), the
#: weights' and a custom network's source file's content (a checkpoint rewritten in place, an
#: edited network), the kind of device and the precision that computed them (never a mix of
#: fp32 and bf16 vectors), and whether the network was compiled (in bf16, compiled and eager
#: vectors differ by bf16's rounding).
_REUSE_KEYS = {
    "config_hash": "",
    "weights_sha256": "",
    "module_sha256": "",
    "device": "",
    "precision": "",
    "compiled": 0,
}


#: What :func:`read_earlier` reads of a folder file (the patches' where it holds them).
_EARLIER_DATASETS = (
    *(IDS, SOURCES, SHA256, WIDTH, HEIGHT, EMBEDDINGS),
    *(PATCH_EMBEDDINGS, PATCH_BOXES, PATCH_OFFSETS),
)


def read_earlier(path: str | Path, meta: dict) -> Embeddings | None:
    """The embeddings a folder file holds, when it was written with the same numbers: the same
    config hash, weights checksum, kind of device, precision and compilation (see
    ``_REUSE_KEYS``).

    A folder's job reads its previous file to reuse the embeddings of unchanged images (a new
    head, or images added to the folder). Anything else (no file, another format, other
    numbers, a damaged file) gives None: every image is embedded again.

    Args:
        path: the folder's ``.h5`` file.
        meta: the current embeddings' ``meta`` (``config_hash``, ``weights_sha256``,
            ``device``, ``precision``).

    Returns:
        The stored embeddings, or None.
    """
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format_version") != FORMAT_VERSION:
                return None
            for key, absent in _REUSE_KEYS.items():
                if f.attrs.get(key, absent) != meta.get(key, absent):
                    return None
            for name in _EARLIER_DATASETS:
                if name in f:
                    checked_size(f[name])  # a damaged shape: embed again, not read for minutes
            earlier = Embeddings(
                ids=texts(f[IDS]),
                sources=texts(f[SOURCES]),
                sha256=texts(f[SHA256]),
                width=f[WIDTH][()],
                height=f[HEIGHT][()],
                vectors=f[EMBEDDINGS][()],
            )
            if PATCH_EMBEDDINGS in f:
                earlier.patch_vectors = f[PATCH_EMBEDDINGS][()]
                earlier.patch_boxes = f[PATCH_BOXES][()]
                earlier.patch_counts = np.diff(f[PATCH_OFFSETS][()])
            return earlier
    except (OSError, KeyError, ValueError):
        return None
