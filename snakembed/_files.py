"""Files: written so that no reader ever sees a half-written one; strings read back."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["SCRATCH_SETTINGS", "atomic_path", "save_npz", "scratch_folder", "texts"]

#: The values of the ``scratch`` config key (see :func:`scratch_folder`).
SCRATCH_SETTINGS = ("auto", "tmpdir", "results")


@contextlib.contextmanager
def atomic_path(path: str | Path, scratch: str | Path | None = None) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed to ``path`` when the block succeeds.

    The parent folder is created; on failure the temporary file is removed and ``path`` is
    left as it was. Temporary files of earlier writers of ``path`` that were killed are removed.
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
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def texts(dataset) -> list[str]:
    """An HDF5 string dataset as Python strings (h5py gives bytes or str by version)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]
