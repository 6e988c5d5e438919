"""The HDF5 results: one file per image folder, an index of external links, and a reader.

A folder file holds a group per embedded image (``f[image_id]["embedding"]``, attributes
``label``, ``score``, ``source``, ``width``, ``height``, ``sha256``), provenance in root
attributes, and bulk datasets whose names start with ``_`` (``_embeddings`` ``[N, D]`` in
``_ids`` order) for fast reading. Image ids always end in an image extension, so they never
clash with those names. Every file is written under a temporary name and renamed, so readers
never see a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ._files import atomic_path
from .classify import Predictions
from .config import library_versions
from .embed import Embeddings
from .images import ROOT_FOLDER

__all__ = [
    "FORMAT_VERSION",
    "Folder",
    "ImageRecord",
    "Patches",
    "Store",
    "folder_file",
    "folder_stem",
    "open_store",
    "store_folder",
    "write_folder",
    "write_index",
]

FORMAT_VERSION = 1
_ROOT_STEM = "_root"
_STR = h5py.string_dtype()


def folder_stem(folder: str) -> str:
    """The file stem of a folder key: the key itself, or ``_root`` for the image root.

    Example:
        >>> folder_stem("a/b"), folder_stem(".")
        ('a/b', '_root')
    """
    return _ROOT_STEM if folder == ROOT_FOLDER else folder


def folder_file(results: str | Path, folder: str) -> Path:
    """Where a folder's HDF5 file lives: ``{results}/embeddings/{folder}.h5``."""
    return Path(results) / "embeddings" / f"{folder_stem(folder)}.h5"


@contextlib.contextmanager
def _atomic_h5(path: str | Path) -> Iterator[h5py.File]:
    """An HDF5 file written under a temporary name and renamed into place on success."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver="latest") as f:
        yield f


def write_folder(
    embeddings: Embeddings,
    predictions: Predictions | None,
    output: str | Path,
    folder: str,
) -> None:
    """Write one folder's final HDF5 file.

    Args:
        embeddings: the folder's embeddings (with failures and provenance in ``meta``).
        predictions: the head's predictions for the same ids, or None without classification.
        output: the ``.h5`` path.
        folder: the folder's key.
    """
    n = len(embeddings.ids)
    if predictions is not None and list(predictions.ids) != list(embeddings.ids):
        raise ValueError(f"predictions and embeddings of folder {folder!r} list different images")
    meta = embeddings.meta
    with _atomic_h5(output) as f:
        attrs = {
            "format_version": FORMAT_VERSION,
            "snakembed_version": library_versions()["snakembed"],
            "folder": folder,
            "model": meta["model"],
            "weights": meta["weights"],
            "weights_sha256": meta["weights_sha256"],
            "layer": meta["layer"],
            "embedding_dim": int(meta["embedding_dim"]),
            "preprocess": json.dumps(meta["preprocess"]),
            "patches": json.dumps(meta["patches"]),
            "precision": meta["precision"],
            "config_hash": meta["config_hash"],
            "versions": json.dumps(library_versions()),
            "classify": json.dumps(predictions.head if predictions is not None else None),
            "num_images": n,
            "num_failed": len(embeddings.failed),
            "failed": json.dumps(embeddings.failed, ensure_ascii=False),
        }
        f.attrs.update(attrs)

        f.create_dataset("_ids", data=np.asarray(embeddings.ids, dtype=object), dtype=_STR)
        f.create_dataset("_sources", data=np.asarray(embeddings.sources, dtype=object), dtype=_STR)
        f.create_dataset("_sha256", data=np.asarray(embeddings.sha256, dtype=object), dtype=_STR)
        f.create_dataset("_width", data=embeddings.width)
        f.create_dataset("_height", data=embeddings.height)
        f.create_dataset("_embeddings", data=embeddings.vectors.astype(np.float32))
        if predictions is not None:
            f.create_dataset(
                "_labels", data=np.asarray(predictions.label, dtype=object), dtype=_STR
            )
            f.create_dataset("_scores", data=predictions.score.astype(np.float32))
        offsets = None
        if embeddings.patch_vectors is not None:
            offsets = np.concatenate([[0], np.cumsum(embeddings.patch_counts)]).astype(np.int64)
            f.create_dataset("_patch_embeddings", data=embeddings.patch_vectors.astype(np.float32))
            f.create_dataset("_patch_boxes", data=embeddings.patch_boxes)
            f.create_dataset("_patch_offsets", data=offsets)

        for i, image_id in enumerate(embeddings.ids):
            group = f.create_group(image_id)
            group.create_dataset("embedding", data=embeddings.vectors[i].astype(np.float32))
            group.attrs.update(
                {
                    "source": embeddings.sources[i],
                    "width": int(embeddings.width[i]),
                    "height": int(embeddings.height[i]),
                    "sha256": embeddings.sha256[i],
                }
            )
            if predictions is not None:
                group.attrs["label"] = str(predictions.labels[i, 0])
                group.attrs["score"] = float(predictions.scores[i, 0])
                group.create_dataset(
                    "topk_labels", data=np.asarray(predictions.labels[i], dtype=object), dtype=_STR
                )
                group.create_dataset("topk_scores", data=predictions.scores[i].astype(np.float32))
            if offsets is not None:
                lo, hi = offsets[i], offsets[i + 1]
                group.create_dataset("patch_embeddings", data=embeddings.patch_vectors[lo:hi])
                group.create_dataset("patch_boxes", data=embeddings.patch_boxes[lo:hi])


def write_index(folders: list[str], images_root: str | Path, output: str | Path) -> None:
    """Write the index: nested groups that mirror the image tree, linking every folder file.

    A folder without image folders below it is one external link to its file's root; a folder
    with image folders below it (or the image root itself) is a group with one link per image
    beside the groups of those below. Links are relative, so a results folder can be moved whole.

    Args:
        folders: every folder key.
        images_root: the image root, recorded for lookups by absolute path.
        output: the index file, ``{results}/index.h5``.
    """
    results = index_dir = Path(output).parent
    keys = set(folders)
    parents = {ROOT_FOLDER}  # the root is always a group, never a link
    for key in keys - {ROOT_FOLDER}:
        parts = key.split("/")
        parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
    with _atomic_h5(output) as f:
        f.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "snakembed_version": library_versions()["snakembed"],
                "images_root": os.path.abspath(images_root),
                "folders": json.dumps(sorted(keys), ensure_ascii=False),
            }
        )
        for key in sorted(keys):
            target = os.path.relpath(folder_file(results, key), index_dir)
            if key not in parents:
                parent, _, name = key.rpartition("/")
                (f.require_group(parent) if parent else f)[name] = h5py.ExternalLink(target, "/")
                continue
            group = f if key == ROOT_FOLDER else f.require_group(key)
            with h5py.File(folder_file(results, key), "r") as source:
                ids = [v.decode() if isinstance(v, bytes) else v for v in source["_ids"][()]]
            for image_id in ids:
                group[image_id] = h5py.ExternalLink(target, "/" + image_id)


# --------------------------------------------------------------------------- reading


@dataclass
class Patches:
    """An image's patch embeddings ``[P, D]`` and boxes ``[P, 4]`` (x0, y0, x1, y1)."""

    embeddings: np.ndarray
    boxes: np.ndarray


@dataclass
class ImageRecord:
    """Everything stored for one image."""

    folder: str
    image_id: str
    source: str
    embedding: np.ndarray
    width: int
    height: int
    sha256: str
    label: str | None = None
    score: float | None = None
    topk: list[tuple[str, float]] | None = None
    patches: Patches | None = None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Folder:
    """One folder's file: ``ids()``, ``matrix()``, ``failed``, ``folder[image_id]``."""

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key

    def _open(self) -> h5py.File:
        return h5py.File(self.path, "r")

    @property
    def attrs(self) -> dict:
        """The root attributes (provenance), JSON values decoded."""
        with self._open() as f:
            out = {}
            for key, value in f.attrs.items():
                value = _text(value) if isinstance(value, bytes | str) else value
                if key in ("preprocess", "patches", "versions", "classify", "failed"):
                    value = json.loads(value)
                out[key] = value.item() if isinstance(value, np.generic) else value
            return out

    @property
    def failed(self) -> dict[str, str]:
        """``{image_id: reason}`` for the images that could not be embedded."""
        with self._open() as f:
            return json.loads(_text(f.attrs["failed"]))

    def ids(self) -> list[str]:
        """The embedded images' ids, in the order of :meth:`matrix`'s rows."""
        with self._open() as f:
            return [_text(v) for v in f["_ids"][()]]

    def matrix(self) -> np.ndarray:
        """All embeddings as one float32 ``[N, D]`` array, rows in :meth:`ids` order."""
        with self._open() as f:
            return f["_embeddings"][()]

    def table(self) -> dict[str, np.ndarray | list]:
        """The bulk columns: ids, sources, sha256, width, height, labels, scores, embeddings."""
        with self._open() as f:
            n = len(f["_ids"])
            return {
                "image_id": [_text(v) for v in f["_ids"][()]],
                "source": [_text(v) for v in f["_sources"][()]],
                "sha256": [_text(v) for v in f["_sha256"][()]],
                "width": f["_width"][()],
                "height": f["_height"][()],
                "label": [_text(v) for v in f["_labels"][()]] if "_labels" in f else [None] * n,
                "score": f["_scores"][()] if "_scores" in f else np.full(n, np.nan),
                "embedding": f["_embeddings"][()],
            }

    def __len__(self) -> int:
        with self._open() as f:
            return len(f["_ids"])

    def __contains__(self, image_id: str) -> bool:
        with self._open() as f:
            return not image_id.startswith("_") and image_id in f

    def __iter__(self) -> Iterator[ImageRecord]:
        for image_id in self.ids():
            yield self[image_id]

    def __getitem__(self, image_id: str) -> ImageRecord:
        with self._open() as f:
            if image_id.startswith("_") or image_id not in f:
                reason = json.loads(_text(f.attrs["failed"])).get(image_id)
                why = f"it failed: {reason}" if reason else "no such image in this folder"
                raise KeyError(f"image {image_id!r} is not stored in {self.path} ({why})")
            group = f[image_id]
            attrs = group.attrs
            record = ImageRecord(
                folder=self.key,
                image_id=image_id,
                source=_text(attrs["source"]),
                embedding=group["embedding"][()],
                width=int(attrs["width"]),
                height=int(attrs["height"]),
                sha256=_text(attrs["sha256"]),
            )
            if "label" in attrs:
                record.label = _text(attrs["label"])
                record.score = float(attrs["score"])
                record.topk = [
                    (_text(lab), float(s))
                    for lab, s in zip(
                        group["topk_labels"][()], group["topk_scores"][()], strict=True
                    )
                ]
            if "patch_embeddings" in group:
                record.patches = Patches(group["patch_embeddings"][()], group["patch_boxes"][()])
            return record

    def __repr__(self) -> str:
        return f"Folder({self.key!r}, {str(self.path)!r})"


class Store:
    """A results folder, read through its index: ``store[folder][image_id]``.

    Args:
        results: the workflow's ``results`` folder.
    """

    def __init__(self, results: str | Path) -> None:
        self.results = Path(results)
        index = self.results / "index.h5"
        if index.is_file():
            with h5py.File(index, "r") as f:
                self._folders = json.loads(_text(f.attrs["folders"]))
                self.images_root = Path(_text(f.attrs["images_root"]))
        else:
            root = self.results / "embeddings"
            if not root.is_dir():
                raise FileNotFoundError(
                    f"{self.results} holds no snakembed results (no index.h5, no embeddings/); "
                    "run the workflow first"
                )
            folders = []
            for path in root.rglob("*.h5"):
                with h5py.File(path, "r") as f:
                    folders.append(_text(f.attrs["folder"]))
            self._folders = sorted(folders)
            self.images_root = None

    def folders(self) -> list[str]:
        """Every folder key, sorted."""
        return list(self._folders)

    def __len__(self) -> int:
        return len(self._folders)

    def __contains__(self, folder: str) -> bool:
        return folder in self._folders

    def __iter__(self) -> Iterator[str]:
        return iter(self._folders)

    def __getitem__(self, folder: str) -> Folder:
        if folder not in self._folders:
            raise KeyError(f"no folder {folder!r} in {self.results}; folders: {self._folders[:20]}")
        return Folder(folder_file(self.results, folder), folder)

    def lookup(self, path: str | Path) -> ImageRecord:
        """An image's record by its path: relative to the image root, or absolute.

        Raises:
            KeyError: naming the path, when it is not stored (and why, if it failed).
        """
        path = Path(path)
        if path.is_absolute():
            if self.images_root is None:
                raise KeyError(f"{path}: an absolute path needs the index (run the workflow)")
            try:
                path = Path(os.path.relpath(path, self.images_root))
            except ValueError:
                raise KeyError(f"{path} is not under the image root {self.images_root}") from None
            if path.parts and path.parts[0] == "..":
                raise KeyError(f"{path} is not under the image root {self.images_root}")
        folder = path.parent.as_posix()
        if folder not in self._folders:
            raise KeyError(f"no folder {folder!r} for image {path.as_posix()!r} in {self.results}")
        return self[folder][path.name]

    def to_dataframe(self):
        """One row per stored image: folder, image_id, source, label, score, width, height,
        sha256, embedding (a float32 array per row).

        Returns:
            A ``pandas.DataFrame``.
        """
        import pandas as pd

        frames = []
        for key in self._folders:
            table = self[key].table()
            table["embedding"] = list(table["embedding"])
            frame = pd.DataFrame(table)
            frame.insert(0, "folder", key)
            frames.append(frame)
        columns = ["folder", "image_id", "source", "sha256", "width", "height", "label", "score"]
        if not frames:
            return pd.DataFrame(columns=[*columns, "embedding"])
        return pd.concat(frames, ignore_index=True)

    def __repr__(self) -> str:
        return f"Store({str(self.results)!r}, {len(self)} folders)"


def open_store(results: str | Path) -> Store:
    """Open a results folder for reading.

    Args:
        results: the workflow's ``results`` folder.

    Returns:
        A :class:`Store`.

    Example:
        >>> store = open_store("results")  # doctest: +SKIP
        >>> store["animals"]["chelsea.jpg"].label  # doctest: +SKIP
        'tabby, tabby cat'
    """
    return Store(results)


def store_folder(
    embeddings_path: str | Path,
    predictions_path: str | Path | None,
    output: str | Path,
    folder: str,
) -> None:
    """Write a folder's final file from the embed and classify steps' outputs (the ``store``
    rule).

    Args:
        embeddings_path: the embed step's ``.npz``.
        predictions_path: the classify step's ``.npz``, or None without classification.
        output: the folder's ``.h5`` file.
        folder: the folder's key.
    """
    from .classify import load_predictions
    from .embed import load_embeddings

    predictions = load_predictions(predictions_path) if predictions_path else None
    write_folder(load_embeddings(embeddings_path), predictions, output, folder)
