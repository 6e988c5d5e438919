"""Exporting a results folder as one table, for pandas, Arrow and every other tool.

One row per stored image: ``path``, ``folder``, ``image_id``, ``label``, ``score`` and its
``embedding``. The table is written folder by folder, so memory does not grow with the store.
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ._files import atomic_path
from .reader import Store, open_store

__all__ = ["FORMATS", "export"]

#: The formats :func:`export` writes, each with its file extension.
FORMATS = ("parquet", "npz", "csv")

_COLUMNS = ("path", "folder", "image_id", "label", "score")


def export(results: str | Path, output: str | Path, format: str = "parquet") -> int:
    """Write every stored image of a results folder to one file.

    Args:
        results: the workflow's results folder.
        output: the file to write (replaced whole when done: never left half-written).
        format: ``parquet`` (the embedding a fixed-size list column), ``npz`` (``path``,
            ``folder``, ``image_id``, ``label`` string arrays, ``score`` ``[N]`` and
            ``embedding`` ``[N, D]``; no pickles) or ``csv`` (the embedding as columns ``e0`` ...).
            ``path`` is absolute where the index records the image root. Maps stored with
            ``pool: none`` (``[H*W, D]`` per image) are flattened to one row each.

    Returns:
        How many images were written.

    Raises:
        ValueError: for an unknown format.

    Example:
        >>> export("results", "results/export.parquet")  # doctest: +SKIP
        9
        >>> import pandas as pd
        >>> pd.read_parquet("results/export.parquet").columns.tolist()  # doctest: +SKIP
        ['path', 'folder', 'image_id', 'label', 'score', 'embedding']
    """
    writers = {"parquet": _write_parquet, "npz": _write_npz, "csv": _write_csv}
    if format not in writers:
        raise ValueError(f"export format {format!r}: choose one of {', '.join(FORMATS)}")
    store = open_store(results)
    with atomic_path(output) as tmp:
        return writers[format](store, tmp)


def _tables(store: Store) -> Iterator[dict]:
    """Each folder's rows as columns; the embedding ``[n, D]`` (maps flattened)."""
    for key in store:
        with store[key] as folder:
            table = folder.table()
        sources = table["source"]
        if store.images_root is not None:
            sources = [str(store.images_root / s) for s in sources]
        n = len(sources)
        yield {
            "path": sources,
            "folder": [key] * n,
            "image_id": table["image_id"],
            "label": table["label"],
            "score": np.asarray(table["score"], np.float32),
            "embedding": table["embedding"].reshape(n, -1),
        }


def _write_parquet(store: Store, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, writer = 0, None
    try:
        for table in _tables(store):
            vectors = table["embedding"]
            columns = {name: table[name] for name in _COLUMNS}
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1)), vectors.shape[1]
            )
            batch = pa.table(columns)
            if writer is None:
                metadata = {"snakembed": json.dumps({"results": str(store.results)})}
                writer = pq.ParquetWriter(path, batch.schema.with_metadata(metadata))
            writer.write_table(batch.cast(writer.schema))
            rows += len(vectors)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # an empty store: an empty table with the same columns
        empty = {name: pa.array([], pa.string()) for name in _COLUMNS[:4]}
        empty["score"] = pa.array([], pa.float32())
        empty["embedding"] = pa.array([], pa.list_(pa.float32()))
        pq.write_table(pa.table(empty), path)
    return rows


def _write_csv(store: Store, path: Path) -> int:
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        header = False
        for table in _tables(store):
            vectors = table["embedding"]
            if not header:
                out.writerow([*_COLUMNS, *(f"e{i}" for i in range(vectors.shape[1]))])
                header = True
            for i, vector in enumerate(vectors):
                row = [table[name][i] for name in _COLUMNS]
                row[3] = "" if row[3] is None else row[3]
                row[4] = "" if np.isnan(row[4]) else f"{row[4]:.9g}"
                out.writerow([*row, *(f"{v:.9g}" for v in vector)])
            rows += len(vectors)
        if not header:
            out.writerow(_COLUMNS)
    return rows


def _write_npz(store: Store, path: Path) -> int:
    """The embeddings are streamed into the archive folder by folder (their shape is read
    first), so the matrix is never held whole; the other columns are gathered in memory."""
    rows, dims = 0, set()
    for key in store:
        shape = store.view(key).shape
        rows += shape[0]
        if shape[0]:
            dims.add(int(np.prod(shape[1:])))
    if len(dims) > 1:
        raise ValueError(
            f"{store.results}: folders hold embeddings of different sizes {sorted(dims)}; "
            "rerun the workflow so that every folder has the same model"
        )
    columns: dict[str, list] = {name: [] for name in _COLUMNS}
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dims.pop() if dims else 0)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("embedding.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(fh, header)
            for table in _tables(store):
                fh.write(np.ascontiguousarray(table["embedding"], "<f4").tobytes())
                for name in _COLUMNS:
                    columns[name].extend(table[name])
        for name in _COLUMNS:
            values = columns[name]
            if name == "label":
                values = ["" if v is None else v for v in values]
            array = np.asarray(values, np.float32 if name == "score" else str)
            with archive.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, array, allow_pickle=False)
    return rows
