"""Files: written so that no reader ever sees a half-written one; strings read back."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "SCRATCH_SETTINGS",
    "atomic_path",
    "cached_sha256",
    "file_sha256",
    "fsync_path",
    "save_npz",
    "scratch_folder",
    "texts",
]

#: The values of the ``scratch`` config key (see :func:`scratch_folder`).
SCRATCH_SETTINGS = ("auto", "tmpdir", "results")


@contextlib.contextmanager
def atomic_path(path: str | Path, scratch: str | Path | None = None) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed to ``path`` when the block succeeds.

    The parent folder is created; on failure the temporary file is removed and ``path`` is
    left as it was. The file's data reach the disk before the rename, and the rename before
    the block returns (``fsync`` of the file, then of its folder): after a power loss, ``path``
    holds the old file or the whole new one, never an empty or partial one, even where the
    filesystem reorders data and metadata (XFS; ext4 with some mount options). Temporary files
    of earlier writers of ``path`` that were killed are removed.
    With ``scratch`` (a folder on a fast local disk), the file is written there instead, then
    copied beside ``path`` and renamed: a shared filesystem sees one sequential write.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a" / "x.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    if scratch is not None:
        handle, name = tempfile.mkstemp(suffix=path.suffix, dir=scratch)
        os.close(handle)
        built = Path(name)
        try:
            yield built
            with atomic_path(path) as tmp:
                shutil.copyfile(built, tmp)
        finally:
            built.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed before its rename (SIGKILL, power loss) leaves its temporary file behind;
    # one job writes each path, so any such file is stale.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "x"
        >>> _ = path.write_bytes(b"abc")
        >>> file_sha256(path)[:12]
        'ba7816bf8f01'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scratch_folder(setting: str, target: str | Path) -> Path | None:
    """Where to build a result file before it is copied to ``target``, or None for beside it.

    Args:
        setting: ``results`` (beside the target), ``tmpdir`` (``$TMPDIR``), or ``auto``:
            ``$TMPDIR`` inside a SLURM job when it is on another filesystem than the target
            (clusters give jobs node-local scratch there; Snakemake's ``tmpdir`` resource sets
            it), else beside the target.
        target: the result file.

    Returns:
        The folder, or None.

    Example:
        >>> scratch_folder("results", "out/a.h5") is None
        True
    """
    if setting not in SCRATCH_SETTINGS:
        raise ValueError(f"scratch: {setting!r} is not one of {', '.join(SCRATCH_SETTINGS)}")
    if setting == "results":
        return None
    scratch = Path(tempfile.gettempdir())
    if setting == "tmpdir":
        return scratch
    if "SLURM_JOB_ID" not in os.environ:
        return None
    existing = Path(os.path.abspath(target)).parent
    while not existing.exists():
        existing = existing.parent
    return scratch if scratch.stat().st_dev != existing.stat().st_dev else None


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``path`` through :func:`atomic_path` (no pickled objects)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def checked_size(dataset):
    """``dataset`` (h5py), once its declared size is known to fit in its file: a damaged shape
    (a few flipped bytes) can declare billions of rows, which h5py would allocate and read for
    minutes; raises ValueError naming the dataset."""
    declared = dataset.size * dataset.id.get_type().get_size()
    if declared > dataset.file.id.get_filesize():
        raise ValueError(f"{dataset.name} declares {declared:,} bytes, more than the file holds")
    return dataset


def texts(dataset) -> list[str]:
    """An HDF5 string dataset as Python strings (h5py gives bytes or str by version)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


#: A file changed less than this long ago may change again within the same tick of the
#: filesystem's clock, keeping its stat: its checksum is not cached (git's "racy clean" rule).
RACY_NS = 2_000_000_000


def stat_key(info: os.stat_result) -> list[int] | None:
    """What stands for a file's content between two reads: size, modification time, inode and
    status-change time (which ``touch``, ``cp -p`` and ``rsync`` cannot set back); None when
    the file changed so recently that it could change again unseen (see ``RACY_NS``).
    """
    if time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) < RACY_NS:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]


def cached_sha256(path: str | Path, cache: Path | None) -> str:
    """The sha256 of a file, read from ``cache`` (a private folder) when the file's stat key
    (device, inode, size, modification and status-change times) was hashed before.

    A checkpoint of a few hundred MB then costs a ``stat``, not a read, for every job that
    checks it; a file rewritten in place gets another key.

    Args:
        path: the file.
        cache: the folder of cached checksums, or None to always read the file.

    Returns:
        The hex sha256.
    """
    path = Path(path)
    info = path.stat()
    key = stat_key(info)
    if cache is None or key is None:
        return file_sha256(path)
    name = hashlib.sha256(repr((os.path.realpath(path), info.st_dev, *key)).encode()).hexdigest()
    entry = cache / name
    with contextlib.suppress(OSError):
        cached = entry.read_text()
        if len(cached) == 64:
            return cached
    digest = file_sha256(path)
    if stat_key(path.stat()) == key:  # unchanged while it was read
        with contextlib.suppress(OSError):
            cache.mkdir(mode=0o700, exist_ok=True)
            with atomic_path(entry) as tmp:
                tmp.write_text(digest)
    return digest
