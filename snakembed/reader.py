"""Reading results: ``open_store(results)[folder][image_id]``.

A :class:`Folder` opens its file once and reads everything from that open file: the workflow
replaces folder files by renaming a finished file over the old one, so a reader holds one
consistent version even while the workflow writes the next. A file that cannot be read as a
snakembed folder file raises :class:`StoreError`, naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ._files import checked_size, texts
from .buckets import is_bucket, root_path
from .layout import (
    EMBEDDINGS,
    FOLDERS_DIR,
    FORMAT_VERSION,
    HEIGHT,
    IDS,
    IMAGE_EMBEDDING,
    IMAGE_PATCH_BOXES,
    IMAGE_PATCH_EMBEDDINGS,
    IMAGE_TOPK_LABELS,
    IMAGE_TOPK_SCORES,
    INDEX_FILE,
    JSON_ATTRS,
    LABELS,
    REQUIRED_DATASETS,
    SCORES,
    SHA256,
    SOURCES,
    WIDTH,
    folder_file,
)
from .shards import (
    MANIFESTS_DIR,
    RECORDS_DIR,
    file_stamp,
    manifest_digest,
    parse_shard_name,
    read_record,
    read_shard_manifest,
)

__all__ = [
    "Folder",
    "ImageRecord",
    "Patches",
    "Store",
    "StoreError",
    "TreeStatus",
    "matrix_view",
    "open_store",
    "tree_status",
]


class StoreError(OSError):
    """A results file that cannot be read; the message names the file and the fix."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure to read ``path`` into a :class:`StoreError` that names it."""
    try:
        yield
    except StoreError:
        raise
    except FileNotFoundError:
        raise StoreError(
            f"{path} does not exist; run the workflow to write it (or open the right results "
            "folder)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - h5py and JSON raise many kinds for a bad file
        raise StoreError(
            f"{path} is not a readable snakembed file ({type(exc).__name__}: {exc}); delete it "
            "and run the workflow again to rebuild it"
        ) from exc


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _array(group: h5py.Group, name: str, shape: tuple) -> np.ndarray:
    """A dataset of an image's group, checked against the shape it must have (None: any length);
    a damaged file raises, and :func:`_reading` names it."""
    value = checked_size(group[name])[()]
    if (
        not isinstance(value, np.ndarray)
        or len(value.shape) != len(shape)
        or any(
            want is not None and got != want for got, want in zip(value.shape, shape, strict=True)
        )
    ):
        raise ValueError(f"{group.name}/{name} has shape {np.shape(value)}, not {shape}")
    return value


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


class Folder:
    """One folder's file, opened once: ``ids()``, ``matrix()``, ``failed``, ``folder[image_id]``.

    Use it in a ``with`` block (or call :meth:`close`) to release the file early.

    Args:
        path: the folder's ``.h5`` file.
        key: the folder's key.

    Raises:
        StoreError: when the file is missing, corrupt, or not a snakembed folder file.
    """

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        with _reading(self.path):
            self._file = h5py.File(self.path, "r")
            try:
                self._check()
            except BaseException:
                self._file.close()
                raise

    def _check(self) -> None:
        f = self._file
        version = f.attrs.get("format_version")
        if version is None or any(name not in f for name in REQUIRED_DATASETS):
            raise StoreError(
                f"{self.path} is not a snakembed folder file; delete it and run the workflow again"
            )
        if int(version) > FORMAT_VERSION:
            raise StoreError(
                f"{self.path} has format version {int(version)}, newer than this snakembed "
                f"reads ({FORMAT_VERSION}); upgrade snakembed"
            )
        n = len(f[IDS])
        columns = [name for name in (*REQUIRED_DATASETS, LABELS, SCORES) if name in f]
        for name in columns:  # every read of them stays within the file
            checked_size(f[name])
        if (
            f[EMBEDDINGS].ndim not in (2, 3)
            or any(f[name].ndim != 1 for name in columns if name != EMBEDDINGS)
            or any(len(f[name]) != n for name in columns)
        ):
            raise StoreError(f"{self.path} has bulk datasets of different lengths; rebuild it")

    def close(self) -> None:
        """Release the file."""
        self._file.close()

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def attrs(self) -> dict:
        """The root attributes (provenance), JSON values decoded."""
        with _reading(self.path):
            out = {}
            for key, value in self._file.attrs.items():
                value = _text(value) if isinstance(value, bytes | str) else value
                if key in JSON_ATTRS:
                    value = json.loads(value)
                out[key] = value.item() if isinstance(value, np.generic) else value
            return out

    @property
    def failed(self) -> dict[str, str]:
        """``{image_id: reason}`` for the images that could not be embedded."""
        with _reading(self.path):
            failed = json.loads(_text(self._file.attrs["failed"]))
            if not isinstance(failed, dict):
                raise ValueError("the `failed` attribute is not a mapping")
            return {str(k): str(v) for k, v in failed.items()}

    def ids(self) -> list[str]:
        """The embedded images' ids, in the order of :meth:`matrix`'s rows."""
        with _reading(self.path):
            return texts(self._file[IDS])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of :meth:`matrix`, read without reading the embeddings."""
        with _reading(self.path):
            return tuple(self._file[EMBEDDINGS].shape)

    def matrix(self) -> np.ndarray:
        """All embeddings as one float32 array, rows in :meth:`ids` order: ``[N, D]``, or
        ``[N, H*W, D]`` for a layer stored with ``pool: none``."""
        with _reading(self.path):
            return np.asarray(self._file[EMBEDDINGS][()], np.float32)

    def view(self) -> np.ndarray:
        """:meth:`matrix` without reading it (see :func:`matrix_view`)."""
        return matrix_view(self.path)

    def row(self, index: int) -> tuple[str, str]:
        """The image id and source path of row ``index`` of :meth:`matrix`."""
        index = operator.index(index)  # TypeError for anything but an integer
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {self.key!r}: it has {len(self)} rows")
        with _reading(self.path):
            return _text(self._file[IDS][index]), _text(self._file[SOURCES][index])

    def table(self, *, embeddings: bool = True) -> dict[str, np.ndarray | list]:
        """The bulk columns: ids, sources, sha256, width, height, labels, scores, and unless
        ``embeddings`` is false the embeddings."""
        f = self._file
        with _reading(self.path):
            n = len(f[IDS])
            table = {
                "image_id": texts(f[IDS]),
                "source": texts(f[SOURCES]),
                "sha256": texts(f[SHA256]),
                "width": f[WIDTH][()],
                "height": f[HEIGHT][()],
                "label": texts(f[LABELS]) if LABELS in f else [None] * n,
                "score": f[SCORES][()] if SCORES in f else np.full(n, np.nan),
            }
        if embeddings:
            table["embedding"] = self.matrix()
        return table

    def __len__(self) -> int:
        with _reading(self.path):
            return len(self._file[IDS])

    def __contains__(self, image_id: str) -> bool:
        with _reading(self.path):
            # an image's group, never a bulk dataset (an image may be named `_x.jpg`)
            return isinstance(self._file.get(image_id), h5py.Group)

    def __iter__(self) -> Iterator[ImageRecord]:
        for image_id in self.ids():
            if image_id not in self:
                raise StoreError(
                    f"{self.path} lists image {image_id!r} but holds no group for it; delete "
                    "the file and run the workflow again to rebuild it"
                )
            yield self[image_id]

    def __getitem__(self, image_id: str) -> ImageRecord:
        if image_id not in self:
            reason = self.failed.get(image_id)
            why = f"it failed: {reason}" if reason else "no such image in this folder"
            raise KeyError(f"image {image_id!r} is not stored in {self.path} ({why})")
        with _reading(self.path):
            group = self._file[image_id]
            attrs = group.attrs
            row_shape = self._file[EMBEDDINGS].shape[1:]
            record = ImageRecord(
                folder=self.key,
                image_id=image_id,
                source=_text(attrs["source"]),
                embedding=_array(group, IMAGE_EMBEDDING, row_shape),
                width=int(attrs["width"]),
                height=int(attrs["height"]),
                sha256=_text(attrs["sha256"]),
            )
            if "label" in attrs:
                record.label = _text(attrs["label"])
                record.score = float(attrs["score"])
                record.topk = [
                    (_text(label), float(score))
                    for label, score in zip(
                        _array(group, IMAGE_TOPK_LABELS, (None,)),
                        _array(group, IMAGE_TOPK_SCORES, (None,)),
                        strict=True,
                    )
                ]
            if IMAGE_PATCH_EMBEDDINGS in group or IMAGE_PATCH_BOXES in group:
                vectors = _array(group, IMAGE_PATCH_EMBEDDINGS, (None, row_shape[-1]))
                boxes = _array(group, IMAGE_PATCH_BOXES, (len(vectors), 4))
                record.patches = Patches(vectors, boxes)
            return record

    def __repr__(self) -> str:
        return f"Folder({self.key!r}, {str(self.path)!r})"


@dataclass
class TreeStatus:
    """The image tree as the last plan saw it, against what the results folder holds.

    Attributes:
        root: the image root the plan saw (None without manifests).
        folders: every folder of the last plan, sorted.
        done: the folders whose file was computed from them as they are now.
        pending: ``{folder: why}`` of the others (no file yet; a file computed from other
            images or settings).
        index_behind: whether ``index.h5`` does not link exactly the folders done, as they
            are now (a run stopped before it updated the index).
        shards: ``{folder: shard}`` of the last plan (its job's log is
            ``logs/embed_classify_store/{shard}.log``).
    """

    root: Path | None
    folders: list[str]
    done: list[str]
    pending: dict[str, str]
    index_behind: bool
    shards: dict[str, str] = field(default_factory=dict)


#: Why a folder is pending.
NO_FILE = "no file yet"
OLD_FILE = "its file was computed from other images or settings"


def tree_status(results: str | Path) -> TreeStatus:
    """Which folders of the last plan the results folder holds as they are now, and which
    are pending, from the shards' manifests and records (see :mod:`snakembed.shards`): a
    folder whose file is not the one its shard's record names is checked in the file itself.

    Args:
        results: the workflow's ``results`` folder.

    Returns:
        The status; without manifests (results of an earlier version, or copied without
        them), every folder file present counts as done.

    Example:
        >>> tree_status("results").pending  # doctest: +SKIP
        {'new_camera/day2': 'no file yet'}
    """
    results = Path(results)
    planned: dict[str, str] = {}
    shards: dict[str, str] = {}
    root = None
    for path in sorted((results / MANIFESTS_DIR).glob("*.json")):
        if parse_shard_name(path.name.removesuffix(".json")) is None:
            continue
        with contextlib.suppress(ValueError):
            manifest = read_shard_manifest(path)
            planned.update({key: entry["digest"] for key, entry in manifest.folders.items()})
            shards.update(dict.fromkeys(manifest.folders, manifest.shard))
            root = root_path(manifest.root)
    stored: dict[str, dict] = {}
    for pattern in ("*.json.old", "*.json"):
        for path in (results / RECORDS_DIR).glob(pattern):
            stored.update((read_record(path) or {}).get("folders", {}))
    done, pending = [], {}
    for key, digest in sorted(planned.items()):
        path = folder_file(results, key)
        stamp = file_stamp(path)
        entry = stored.get(key)
        recorded = isinstance(entry, dict) and [entry.get("digest"), entry.get("file")]
        if stamp is None:
            pending[key] = NO_FILE
        elif recorded == [digest, stamp] or manifest_digest(_computed_from(path)) == digest:
            done.append(key)
        else:
            pending[key] = OLD_FILE
    if not planned:
        done = sorted(_file_folders(results)) if (results / FOLDERS_DIR).is_dir() else []
    behind = _index_behind(results, done)
    return TreeStatus(root, sorted(planned) or done, done, pending, behind, shards)


def _computed_from(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError), h5py.File(path, "r") as f:
        value = f.attrs.get("manifest_sha256")
        return value.decode() if isinstance(value, bytes) else value
    return None


def _index_behind(results: Path, done: list[str]) -> bool:
    index = results / INDEX_FILE
    try:
        with h5py.File(index, "r") as f:
            linked = json.loads(_text(f.attrs["folders"]))
        made = index.stat().st_mtime_ns
    except (OSError, KeyError, ValueError):
        return True
    records = (results / RECORDS_DIR).glob("*.json")
    return sorted(linked) != sorted(done) or any(p.stat().st_mtime_ns > made for p in records)


def _file_folders(results: Path) -> list[str]:
    """The folder keys of the folder files under ``results``, read from each file."""
    folders = []
    for path in (results / FOLDERS_DIR).rglob("*.h5"):
        with _reading(path), h5py.File(path, "r") as f:
            folders.append(_text(f.attrs["folder"]))
    return folders


class Store:
    """A results folder: ``store[folder][image_id]``.

    Its folders are those of the last plan (the shards' manifests) that have a file, whether
    or not a run got to update the index since; :attr:`status` says which are pending. Results
    without manifests list the index's folders, else the folder files present.

    Args:
        results: the workflow's ``results`` folder.

    Raises:
        FileNotFoundError: when ``results`` holds no results at all.
        StoreError: when the index or a folder file cannot be read.
    """

    def __init__(self, results: str | Path) -> None:
        self.results = Path(results)
        if not self.results.exists():
            raise FileNotFoundError(
                f"{self.results} does not exist; open the results folder that a run wrote "
                "(snakembed: --results R)"
            )
        index = self.results / INDEX_FILE
        if not (self.results / FOLDERS_DIR).is_dir() and not index.is_file():
            raise FileNotFoundError(
                f"{self.results} holds no snakembed results (no index.h5, no embeddings/); "
                "run the workflow first"
            )
        #: The folders of the last plan against the files (see :func:`tree_status`).
        self.status = tree_status(self.results)
        #: The image root (a :class:`~snakembed.buckets.BucketPath` for a bucket).
        self.images_root: Path | None = self.status.root
        if index.is_file():
            with _reading(index), h5py.File(index, "r") as f:
                self.images_root = self.images_root or root_path(_text(f.attrs["images_root"]))
                linked = [str(k) for k in json.loads(_text(f.attrs["folders"]))]
        else:
            linked = []
        if self.status.root is not None:  # the folders of the last plan that have a file
            files = set(self.status.done) | {
                k for k, why in self.status.pending.items() if why != NO_FILE
            }
            self._folders = sorted(files)
        else:  # results without manifests: the index, else the files
            self._folders = sorted(linked) if index.is_file() else self.status.done

    def folders(self) -> list[str]:
        """Every folder key, sorted."""
        return list(self._folders)

    def settings(self) -> dict:
        """The config's keys that made the stored numbers (``model``, ``preprocess``,
        ``patches``, ``max_pixels``, ``precision``, ``decode``, ``device``) and the head that
        labelled them (``classify``: its name, None without classification), as the first
        folder file records them: what embeds a new image as the run would have.

        Raises:
            ValueError: when no folder file records them (none yet, or all written before
                snakembed recorded them), naming the fix.
        """
        for key in self._folders:
            with self[key] as folder:
                attrs = folder.attrs
            if attrs.get("settings"):
                return {**attrs["settings"], "classify": attrs.get("classify")}
            break
        raise ValueError(
            f"{self.results} holds no folder file that records the settings of its run (none "
            "yet, or written by an older snakembed); run the workflow again, or give the "
            "run's config with --configfile instead of --results"
        )

    def __len__(self) -> int:
        return len(self._folders)

    @functools.cached_property
    def _known(self) -> frozenset[str]:
        return frozenset(self._folders)

    def __contains__(self, folder: str) -> bool:
        return folder in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._folders)

    def __getitem__(self, folder: str) -> Folder:
        return Folder(self._file(folder), folder)

    def view(self, folder: str) -> np.ndarray:
        """A folder's embeddings memory-mapped from its file (see :func:`matrix_view`), without
        opening it as a :class:`Folder`: the way to run over every vector of a big store."""
        return matrix_view(self._file(folder))

    def _file(self, folder: str) -> Path:
        if folder not in self._known:
            if folder in self.status.pending:
                raise KeyError(
                    f"folder {folder!r} is pending in {self.results} "
                    f"({self.status.pending[folder]}): run the workflow to compute it"
                )
            raise KeyError(f"no folder {folder!r} in {self.results}; folders: {self._folders[:20]}")
        return folder_file(self.results, folder)

    def lookup(self, path: str | Path) -> ImageRecord:
        """An image's record by its path: relative to the image root, or absolute.

        Raises:
            KeyError: naming the path, when it is not stored (and why, if it failed).
        """
        if is_bucket(path):  # an object of a bucket's tree, by its s3:// location
            root = self.images_root
            key = root.relative(str(root_path(path))) if is_bucket(root) else None
            if key is None:
                raise KeyError(f"{path} is not under the image root {root}")
            path = key
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
        if folder not in self._known:
            raise KeyError(f"no folder {folder!r} for image {path.as_posix()!r} in {self.results}")
        with self[folder] as record_folder:
            return record_folder[path.name]

    def to_dataframe(self):
        """One row per stored image: folder, image_id, source, label, score, width, height,
        sha256, embedding (a float32 array per row).

        Returns:
            A ``pandas.DataFrame``.
        """
        import pandas as pd

        frames = []
        for key in self._folders:
            with self[key] as folder:
                table = folder.table()
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


def matrix_view(path: str | Path) -> np.ndarray:
    """A folder file's embeddings ``[N, D]`` as a read-only memory map: pages are read as they
    are touched, nothing is copied. Where the dataset is chunked or compressed (no single place
    in the file) it is read whole instead.

    The map stays valid after the workflow replaces the file (it renames a new file over the
    old one, whose data the map keeps). Cheaper than opening a :class:`Folder`: only the
    embeddings are looked at.

    Raises:
        StoreError: when the file cannot be read, naming it and the fix.

    Example:
        >>> matrix_view("results/embeddings/animals.h5").shape  # doctest: +SKIP
        (2, 1280)
    """
    path = Path(path)
    with _reading(path), h5py.File(path, "r") as f:
        dataset = checked_size(f[EMBEDDINGS])
        offset = dataset.id.get_offset()
        if offset is None or dataset.chunks is not None or dataset.compression:
            return np.asarray(dataset[()], np.float32)
        return np.memmap(path, dataset.dtype, "r", offset, dataset.shape)


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
