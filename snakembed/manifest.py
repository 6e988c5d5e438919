"""A folder's manifest: the small file that stands for its images in the workflow.

A folder's manifest names its images with what identifies their content, and the files that
will not be read with why. The plan makes it for every folder, and its checksum is what the
folder's file records as computed from: an image added, removed, rewritten or touched
recomputes that folder and no other. The manifests of a shard's folders are kept together in
the shard's manifest (see :mod:`snakembed.shards`), rewritten only when one of them changed.

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

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ._files import file_sha256

__all__ = [
    "CHANGE_DETECTION",
    "FolderManifest",
    "folder_manifest",
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

    @property
    def digest(self) -> str:
        """The sha256 of :meth:`to_json`: what the folder's file records as computed from."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

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
    identities: dict[str, list] | None = None,
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
        identities: ``{name: identity}`` as the listing gave them (a bucket's, see
            :mod:`snakembed.buckets`): used as they are, whatever ``change_detection``.

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
    settings = dict(settings or {})
    if identities is not None:
        images = {name: identities[name] for name in names if name not in refused}
        return FolderManifest(str(root), folder, images, dict(sorted(refused.items())), settings)
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
    return FolderManifest(str(root), folder, images, refused, settings)


def _digest(path: Path) -> str | OSError:
    try:
        return file_sha256(path)
    except OSError as exc:
        return exc
