"""Similarity search over a results folder: the stored images most like given vectors.

Exact cosine similarity, folder by folder, straight from the files: each folder's matrix is a
contiguous dataset that is memory-mapped (not copied through HDF5) and scored in blocks, only
the best ``top`` of each block are kept, and only the images finally found are named. On the
2-core development machine a million stored 512-d vectors in 1,000 files are searched in about
0.5 s once the files are in the page cache (``bench/query.py``); at that size an approximate
index would not pay for its build and its misses.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .layout import folder_file
from .reader import Store

__all__ = ["Hit", "best_rows", "name_hits", "search", "unit_queries"]

#: Rows scored at a time: big enough for BLAS, small enough to stay in cache-friendly memory.
_BLOCK = 65536


@dataclass(frozen=True, order=True)
class Hit:
    """A stored image found by :func:`search`."""

    score: float
    folder: str
    image_id: str
    path: str


def search(
    store: Store,
    queries: np.ndarray,
    *,
    top: int = 10,
    folders: Iterable[str] | None = None,
) -> list[list[Hit]]:
    """The ``top`` stored images most similar to each query vector, best first.

    Args:
        store: an opened results folder.
        queries: ``[Q, D]`` vectors (or ``[D]`` for one), in the store's embedding space, or
            ``[Q, P, D]`` maps. Maps (queries, and stores of ``pool: none``) are compared by
            their mean vector over positions, as the knn head classifies them.
        top: how many hits per query.
        folders: search only these folder keys (default: every folder).

    Returns:
        One list of :class:`Hit` per query, by cosine similarity, highest first. ``path`` is
        absolute where the index records the image root, else relative to it.

    Raises:
        ValueError: when the queries' size is not the store's, or a folder is unknown.

    Example:
        >>> store = open_store("results")  # doctest: +SKIP
        >>> query = store["animals"]["chelsea.jpg"].embedding  # doctest: +SKIP
        >>> search(store, query, top=1)[0][0].image_id  # doctest: +SKIP
        'chelsea.jpg'
    """
    queries = unit_queries(queries)
    keys = list(store) if folders is None else list(folders)
    return [name_hits(store, found) for found in best_rows(store, queries, keys, top)]


def unit_queries(queries: np.ndarray) -> np.ndarray:
    """``[Q, D]`` unit vectors of :func:`search`'s queries (a map: its mean over positions)."""
    queries = np.asarray(queries, np.float32)
    queries = queries.mean(axis=1) if queries.ndim == 3 else np.atleast_2d(queries)
    return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)


def best_rows(
    store: Store, queries: np.ndarray, keys: list[str], top: int
) -> list[list[tuple[float, str, int]]]:
    """The ``top`` best ``(score, folder, row)`` of each of the unit ``queries`` among the
    folders ``keys``, best first, in one total order (score, then folder, then row): the best of
    a union of folders is the best of the best of each part, whatever order they are read in.

    Args:
        store: an opened results folder.
        queries: ``[Q, D]`` unit vectors (see :func:`unit_queries`).
        keys: the folders searched.
        top: how many per query.

    Returns:
        One list per query, highest first.

    Raises:
        ValueError: when a folder is unknown or its embeddings are not of the queries' size.

    Example:
        >>> best_rows(store, unit_queries(vectors), ["animals"], 3)  # doctest: +SKIP
        [[(1.0, 'animals', 4), (0.91, 'animals', 0), (0.87, 'animals', 2)]]
    """
    unknown = [key for key in keys if key not in store]
    if unknown:
        raise ValueError(f"no folder {unknown[0]!r} in {store.results}; see `snakembed info`")
    best: list[list[tuple[float, str, int]]] = [[] for _ in queries]
    for key in keys:
        matrix = store.view(key)
        if len(matrix) and matrix.shape[-1] != queries.shape[1]:
            raise ValueError(
                f"{folder_file(store.results, key)} holds {matrix.shape[-1]}-d embeddings; the "
                f"queries are {queries.shape[1]}-d (embedded with another model?)"
            )
        for start in range(0, len(matrix), _BLOCK):
            block = np.asarray(matrix[start : start + _BLOCK], np.float32)
            if block.ndim == 3:  # a map per image (pool: none): its mean vector
                block = block.mean(axis=1)
            norms = np.maximum(np.sqrt(np.einsum("ij,ij->i", block, block)), 1e-12)
            scores = (block @ queries.T) / norms[:, None]
            k = min(top, len(block))
            for q, column in enumerate(scores.T):
                # every row tied with the k-th best too: which of equal scores are kept is
                # then decided by the total order, not by where a partition put them
                kth = np.partition(column, len(column) - k)[len(column) - k]
                for row in np.flatnonzero(column >= kth):
                    _keep(best[q], (float(column[row]), key, start + int(row)), top)
    return [sorted(found, reverse=True) for found in best]


def name_hits(store: Store, found: list[tuple[float, str, int]]) -> list[Hit]:
    """The :class:`Hit` of each ``(score, folder, row)`` found by :func:`best_rows` (only
    these are named: reading every id of a big store costs more than the search).

    Args:
        store: the results folder searched.
        found: rows found, in the order wanted.

    Returns:
        One hit per row, in that order.

    Example:
        >>> name_hits(store, [(0.93, "animals", 4)])[0].image_id  # doctest: +SKIP
        'chelsea.jpg'
    """
    hits = []
    for score, key, row in found:
        with store[key] as folder:
            image_id, source = folder.row(row)
        path = str(store.images_root / source) if store.images_root else source
        hits.append(Hit(score, key, image_id, path))
    return hits


def _keep(heap: list, item: tuple, top: int) -> None:
    if len(heap) < top:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)
