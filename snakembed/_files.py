"""Files: written so that no reader ever sees a half-written one; strings read back."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["atomic_path", "save_npz", "texts"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed to ``path`` when the block succeeds.

    The parent folder is created; on failure the temporary file is removed and ``path`` is
    left as it was. Temporary files of earlier writers of ``path`` that were killed are removed.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a" / "x.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
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


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``path`` through :func:`atomic_path` (no pickled objects)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def texts(dataset) -> list[str]:
    """An HDF5 string dataset as Python strings (h5py gives bytes or str by version)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]
