"""A folder's manifest: the small file that stands for its images in the workflow.

A folder's job reads ``{results}/manifests/{folder}.json``, which names the folder's images with
what identifies their content, and the files that will not be read with why. It is written
when the plan is made, and only when what it holds changed; its checksum is a parameter of the
folder's job, so an image added, removed, rewritten or touched reruns that folder and no other.

What identifies an image's content (the ``change_detection`` setting):

- ``stat`` (the default): its size, modification time, inode and status-change time
  (``st_ctime_ns``). A file rewritten with the same size and modification time (``cp -p``,
  ``rsync -a``, ``tar x``, a fixed-size BMP) still gets a new ctime or inode: neither can be set
  back by ``touch``, ``cp -p`` or ``rsync``. A false alarm (``chmod``, a restore from backup)
  reruns the folder, whose job then reads and hashes its images and reuses every unchanged
  image's embedding: it costs reading, not embedding.
- ``checksum``: its size and sha256, read at every plan, for filesystems whose ctime cannot be
  trusted. A touched or copied but unchanged image reruns nothing.

The images are not the job's inputs: Snakemake checks every input of every ready job each time
it starts one, which costs time in proportion to inputs x folders (on a tree of 1,000 folders of
10 images, 1.3 s per folder with the images as inputs, 0.9 s with the manifest as the only one).
It also spares image paths Snakemake's wildcard syntax: a brace in a file name is just a name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ._files import atomic_path, file_sha256

__all__ = [
    "CHANGE_DETECTION",
    "FolderManifest",
    "failed_job",
    "folder_manifest",
    "job_started",
    "read_manifest",
    "read_manifest_with_digest",
    "started_file",
    "write_manifest",
]

#: The values of the ``change_detection`` config key.
CHANGE_DETECTION = ("stat", "checksum")


@dataclass
class FolderManifest:
    """One image folder, as its job will read it.

    Attributes:
        root: the image root.
        folder: the folder's key (its path under the root; ``.`` for the root itself).
        images: ``{name: identity}`` of the files to read: ``[size in bytes, modification
            time in ns, inode, status-change time in ns]``, or ``[size, sha256]`` with
            ``change_detection: checksum``.
        refused: ``{name: reason}`` of the image files that will be recorded as failed.
        settings: what else decides the folder's file (the fingerprint of the settings that
            change the numbers, the weights' checksum, the classification settings), so that
            the manifest's checksum, which the folder's file records, stands for everything it
            was computed from.
    """

    root: str
    folder: str
    images: dict[str, list]
    refused: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every image file name of the folder, refused ones included, sorted."""
        return sorted([*self.images, *self.refused])

    def to_json(self) -> str:
        return json.dumps(
            {
                "root": self.root,
                "folder": self.folder,
                "images": self.images,
                "refused": self.refused,
                "settings": self.settings,
            },
            indent=0,
            sort_keys=True,
        )


def folder_manifest(
    root: str | Path,
    folder: str,
    names: list[str],
    refused: dict[str, str] | None = None,
    *,
    change_detection: str = "stat",
    map_=map,
    settings: dict | None = None,
) -> FolderManifest:
    """The manifest of one folder, what identifies its readable images' content read now.

    Args:
        root: the image root.
        folder: the folder's key.
        names: the folder's image file names, refused ones included.
        refused: ``{name: reason}`` of the files that will not be read.
        change_detection: ``stat`` or ``checksum`` (see the module's documentation).
        map_: the ``map`` that hashes files with ``checksum`` (a thread pool's, to read
            several at once).
        settings: see :class:`FolderManifest`.

    Returns:
        The manifest. A file that vanished since it was listed, or cannot be read to be
        hashed, is refused, with the reason.

    Example:
        >>> folder_manifest("demo/images", "animals", ["chelsea.jpg"]).names  # doctest: +SKIP
        ['chelsea.jpg']
    """
    if change_detection not in CHANGE_DETECTION:
        raise ValueError(f"change_detection: {change_detection!r} is not one of stat, checksum")
    refused = dict(refused or {})
    images = {}
    directory = Path(root) / folder
    for name in names:
        if name in refused:
            continue
        try:
            stat = os.stat(directory / name)
        except OSError as exc:
            refused[name] = f"cannot read the file: {exc.strerror or exc}"
            continue
        images[name] = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]
    if change_detection == "checksum":
        names = list(images)
        digests = map_(_digest, [directory / name for name in names])
        for name, digest in zip(names, digests, strict=True):
            if isinstance(digest, OSError):
                del images[name]
                refused[name] = f"cannot read the file: {digest.strerror or digest}"
            else:
                images[name] = [images[name][0], digest]
    refused = dict(sorted(refused.items()))
    return FolderManifest(str(root), folder, images, refused, dict(settings or {}))


def _digest(path: Path) -> str | OSError:
    try:
        return file_sha256(path)
    except OSError as exc:
        return exc


def write_manifest(manifest: FolderManifest, path: str | Path) -> bool:
    """Write ``manifest`` to ``path`` unless the file there already holds the same.

    Args:
        manifest: the folder's manifest.
        path: its file.

    Returns:
        Whether the file was (re)written, which makes the folder's job run again.

    Example:
        >>> import tempfile
        >>> m = FolderManifest("images", "a", {"x.jpg": [10, 1]})
        >>> path = Path(tempfile.mkdtemp()) / "a.json"
        >>> write_manifest(m, path), write_manifest(m, path)
        (True, False)
    """
    text = manifest.to_json()
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def read_manifest(path: str | Path) -> FolderManifest:
    """The manifest written at ``path`` by :func:`write_manifest`.

    Raises:
        ValueError: when the file is not a manifest, naming it and how to get a new one.
    """
    return read_manifest_with_digest(path)[0]


def read_manifest_with_digest(path: str | Path) -> tuple[FolderManifest, str]:
    """The manifest at ``path`` and the sha256 of the very bytes it was read from (what the
    folder's file records as ``manifest_sha256``).

    Raises:
        ValueError: when the file is not a manifest, naming it and how to get a new one.
    """
    try:
        data = Path(path).read_bytes()
        fields = json.loads(data)
        manifest = FolderManifest(
            fields["root"],
            fields["folder"],
            fields["images"],
            fields["refused"],
            fields.get("settings", {}),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a folder manifest ({exc}); delete it and run snakemake again, "
            "which writes it anew"
        ) from exc
    return manifest, hashlib.sha256(data).hexdigest()


def started_file(manifest: str | Path) -> Path:
    """Where a folder's job notes the checksum of the manifest it started on (see
    :func:`job_started`).

    Example:
        >>> started_file("results/manifests/a.json").name
        'a.json.started'
    """
    manifest = Path(manifest)
    return manifest.with_name(manifest.name + ".started")


@contextlib.contextmanager
def job_started(manifest: str | Path, digest: str) -> Iterator[None]:
    """Note, for the block, that a job computes the folder of ``manifest`` (whose checksum is
    ``digest``): the note is locked while the job runs, removed when the block succeeds, and
    left behind (unlocked) when the job fails or dies.

    Snakemake restores the previous file of a failed job's ``update()`` output and still
    records the job as done; the note is how the next plan knows (see :func:`failed_job`).
    """
    path = started_file(manifest)
    with open(path, "w") as note:
        note.write(digest)
        note.flush()
        with contextlib.suppress(OSError):  # a filesystem without locks: notes still work
            fcntl.flock(note, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
        path.unlink(missing_ok=True)


def failed_job(manifest: str | Path) -> str | None:
    """The checksum of the manifest that a job started on and did not finish (it failed, or
    was killed), or None: no such job, or one that still runs (its note is locked; a second
    ``snakemake`` started while the first one runs must not take it for a failed one)."""
    try:
        with open(started_file(manifest)) as note:
            fcntl.flock(note, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return note.read() or None
    except OSError:  # no note; a job that runs (BlockingIOError); no locks here: no guess
        return None
