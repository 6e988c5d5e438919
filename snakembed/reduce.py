"""Reducing the stored embeddings: PCA fitted on every folder, vectors written beside them.

The fit streams the folders (a running sum and a ``D x D`` scatter matrix in float64), so memory
does not grow with the store; the reduced vectors go to ``{results}/reduced.h5``: ``_folders``
(the folder keys), a group ``folders/{i}`` per folder with ``_ids`` and ``_embeddings``
``[N, dim]``, and the fitted ``mean``, ``components`` and ``explained_variance_ratio``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ._files import atomic_path, texts
from .layout import folder_file
from .reader import Store, open_store

__all__ = ["PCA", "Reduced", "fit_pca", "fit_pca_sample", "read_reduced", "reduce_store"]

log = logging.getLogger("snakembed")

_STR = h5py.string_dtype()
_BLOCK = 65536


@dataclass
class PCA:
    """A fitted principal component analysis.

    Attributes:
        mean: ``[D]``, subtracted before projecting.
        components: ``[k, D]`` unit vectors, by decreasing variance; each one's largest
            coordinate is positive, so that refits of the same data agree.
        explained_variance_ratio: ``[k]``, the share of the total variance each explains.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """``[N, D]`` vectors as ``[N, k]`` float32 coordinates."""
        centred = np.asarray(vectors, np.float64) - self.mean
        return (centred @ self.components.T).astype(np.float32)


def fit_pca(matrices: Iterable[np.ndarray], dim: int) -> PCA:
    """Fit PCA on the rows of several matrices, read one block at a time.

    Args:
        matrices: ``[N_i, D]`` arrays (memory maps are read block by block).
        dim: components to keep; fewer when there are fewer dimensions or vectors (logged).

    Returns:
        The fit.

    Raises:
        ValueError: when there are fewer than two vectors.

    Example:
        >>> x = np.random.default_rng(0).standard_normal((100, 8))
        >>> fit_pca([x[:60], x[60:]], 3).components.shape
        (3, 8)
    """
    total, scatter, count = None, None, 0
    for matrix in matrices:
        for start in range(0, len(matrix), _BLOCK):
            block = np.asarray(matrix[start : start + _BLOCK], np.float64)
            if total is None:
                total = np.zeros(block.shape[1])
                scatter = np.zeros((block.shape[1], block.shape[1]))
            total += block.sum(axis=0)
            scatter += block.T @ block
            count += len(block)
    if count < 2:
        raise ValueError(f"PCA needs at least two embedded images; there are {count}")
    mean = total / count
    covariance = (scatter - count * np.outer(mean, mean)) / (count - 1)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    return _kept(mean, values[order], vectors[:, order].T, count, dim)


def fit_pca_sample(vectors: np.ndarray, dim: int) -> PCA:
    """Fit PCA on the rows of one matrix in memory, by its singular values: for a sample of
    fewer rows than dimensions, a fraction of :func:`fit_pca`'s cost (the same fit).

    Args:
        vectors: ``[N, D]``.
        dim: components to keep (as :func:`fit_pca`).

    Returns:
        The fit.

    Raises:
        ValueError: when there are fewer than two vectors.

    Example:
        >>> x = np.random.default_rng(0).standard_normal((100, 8))
        >>> a, b = fit_pca_sample(x, 3), fit_pca([x], 3)
        >>> bool(np.allclose(a.components, b.components))
        True
    """
    rows = np.asarray(vectors, np.float64)
    if len(rows) < 2:
        raise ValueError(f"PCA needs at least two embedded images; there are {len(rows)}")
    mean = rows.mean(axis=0)
    _, singular, components = np.linalg.svd(rows - mean, full_matrices=False)
    return _kept(mean, singular**2 / (len(rows) - 1), components, len(rows), dim)


def _kept(mean: np.ndarray, values: np.ndarray, vectors: np.ndarray, count: int, dim: int) -> PCA:
    """The fit from the variances (decreasing) and their unit vectors (rows)."""
    keep = min(dim, len(mean), count - 1)
    if keep < dim:
        log.warning(
            "PCA: %d components asked for, %d kept (%d-d vectors, %d images)",
            dim,
            keep,
            len(mean),
            count,
        )
    values, vectors = np.clip(values, 0, None), vectors[:keep]
    signs = np.sign(vectors[np.arange(keep), np.abs(vectors).argmax(axis=1)])
    ratio = values[:keep] / values.sum() if values.sum() > 0 else np.zeros(keep)
    return PCA(mean, vectors * signs[:, None], ratio)


def reduce_store(results: str | Path, output: str | Path, dim: int) -> PCA:
    """Fit PCA on every stored embedding and write the reduced vectors of every folder.

    Args:
        results: the workflow's results folder.
        output: the file to write (``{results}/reduced.h5``).
        dim: components to keep.

    Returns:
        The fit.

    Raises:
        ValueError: when the store holds maps (``pool: none``) or fewer than two images.
    """
    from .embed import log_to_stderr

    log_to_stderr()
    store = open_store(results)
    pca = fit_pca(_vectors(store), dim)
    with atomic_path(output) as tmp, h5py.File(tmp, "w", libver="latest") as f:
        f.attrs.update({"method": "pca", "dim": len(pca.components), "folders": len(store)})
        f["mean"] = pca.mean
        f["components"] = pca.components
        f["explained_variance_ratio"] = pca.explained_variance_ratio
        keys = list(store)
        f.create_dataset("_folders", data=np.asarray(keys, dtype=object), dtype=_STR)
        for i, key in enumerate(keys):
            with store[key] as folder:
                ids = folder.ids()
            matrix = store.view(key)
            group = f.create_group(f"folders/{i}")
            group.create_dataset("_ids", data=np.asarray(ids, dtype=object), dtype=_STR)
            group["_embeddings"] = (
                pca.transform(matrix) if len(matrix) else np.zeros((0, len(pca.components)))
            ).astype(np.float32)
    log.info(
        "PCA: %d components explain %.1f%% of the variance of %d folders",
        len(pca.components),
        100 * pca.explained_variance_ratio.sum(),
        len(store),
    )
    return pca


def _vectors(store: Store) -> Iterator[np.ndarray]:
    """Each folder's embeddings, memory-mapped; maps (``pool: none``) are refused."""
    for key in store:
        matrix = store.view(key)
        if matrix.ndim != 2:
            raise ValueError(
                f"{folder_file(store.results, key)} holds maps {list(matrix.shape[1:])} per image "
                "(pool: none); reduce works on vectors: set model.pool to avg or max, or "
                "reduce.method to none"
            )
        yield matrix


@dataclass
class Reduced:
    """``{results}/reduced.h5`` as read by :func:`read_reduced`."""

    pca: PCA
    path: Path

    def folders(self) -> list[str]:
        """Every folder key."""
        with h5py.File(self.path, "r") as f:
            return texts(f["_folders"])

    def ids(self, folder: str) -> list[str]:
        """The folder's image ids, in the order of :meth:`matrix`'s rows."""
        with h5py.File(self.path, "r") as f:
            return texts(f[self._group(f, folder) + "/_ids"])

    def matrix(self, folder: str) -> np.ndarray:
        """The folder's reduced vectors ``[N, dim]``."""
        with h5py.File(self.path, "r") as f:
            return f[self._group(f, folder) + "/_embeddings"][()]

    def _group(self, f: h5py.File, folder: str) -> str:
        keys = texts(f["_folders"])
        if folder not in keys:
            raise KeyError(f"no folder {folder!r} in {self.path}; folders: {keys[:20]}")
        return f"folders/{keys.index(folder)}"


def read_reduced(results: str | Path) -> Reduced:
    """The reduced vectors and the fit that the workflow's ``reduce`` rule wrote.

    Raises:
        FileNotFoundError: when there is none, naming the config key that asks for it.

    Example:
        >>> reduced = read_reduced("results")  # doctest: +SKIP
        >>> reduced.matrix("animals").shape  # doctest: +SKIP
        (2, 128)
    """
    path = Path(results) / "reduced.h5"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; set `reduce: {{method: pca, dim: 128}}` in the config and "
            "run the workflow"
        )
    with h5py.File(path, "r") as f:
        pca = PCA(f["mean"][()], f["components"][()], f["explained_variance_ratio"][()])
    return Reduced(pca, path)
