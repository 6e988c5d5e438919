"""Similarity search over a big store: ``snakembed.search`` against loading every vector first.

Writes a results folder of ``--vectors`` random ``--dim``-d float32 embeddings (a million
512-d by default) in ``--folders`` folder files of the workflow's layout, then times, in one
run, for ``--queries`` query vectors and the top 10:

- **baseline**: what one would write first: read every folder's matrix through h5py
  (``Folder.matrix``), stack them, normalise, multiply, sort;
- **search**: :func:`snakembed.search.search` (memory-mapped matrices, blocks, top-k kept per
  block), once with the files just written (in the page cache, as after a run) and again.

It also times ``snakembed query`` on a stored image end to end (Python's start, the imports,
the lookup and the search). It checks that both find the same images, and prints seconds, the
ratio baseline / search, and the peak resident memory after the searches and after the baseline
(mapped pages of the files count as resident while they are mapped).

Usage::

    python bench/query.py                       # 1,000,000 x 512 in 1,000 folders
    python bench/query.py --vectors 100000 --folders 100
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from snakembed.layout import FORMAT_VERSION, folder_file
from snakembed.reader import open_store
from snakembed.search import search
from snakembed.store import write_index

_STR = h5py.string_dtype()


def _write_store(results: Path, vectors: int, dim: int, folders: int) -> None:
    rng = np.random.default_rng(0)
    per = vectors // folders
    for f in range(folders):
        key = f"f{f:05d}"
        path = folder_file(results, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.asarray([f"{i:07d}.jpg" for i in range(per)], dtype=object)
        with h5py.File(path, "w", libver="latest") as h5:
            h5.attrs.update({"format_version": FORMAT_VERSION, "folder": key, "failed": "{}"})
            h5.create_dataset("_ids", data=ids, dtype=_STR)
            h5.create_dataset("_sources", data=[f"{key}/{i}" for i in ids], dtype=_STR)
            h5.create_dataset("_sha256", data=ids, dtype=_STR)
            h5.create_dataset("_width", data=np.full(per, 500))
            h5.create_dataset("_height", data=np.full(per, 375))
            h5.create_dataset("_embeddings", data=rng.standard_normal((per, dim), np.float32))
            if f == 0:  # the image the command line looks up (Folder reads its group)
                group = h5.create_group(ids[0])
                group["embedding"] = h5["_embeddings"][0]
                group.attrs.update(
                    {"source": f"{key}/{ids[0]}", "width": 500, "height": 375, "sha256": ids[0]}
                )
    write_index(
        [f"f{f:05d}" for f in range(folders)], results.parent / "images", results / "index.h5"
    )


def _baseline(results: Path, queries: np.ndarray, top: int) -> list[list[tuple[str, str]]]:
    store = open_store(results)
    matrices, names = [], []
    for key in store:
        with store[key] as folder:
            matrices.append(folder.matrix())
            names.extend((key, image_id) for image_id in folder.ids())
    matrix = np.concatenate(matrices)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    scores = matrix @ (queries / np.linalg.norm(queries, axis=1, keepdims=True)).T
    return [[names[i] for i in np.argsort(-column)[:top]] for column in scores.T]


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--folders", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results"
        seconds, _ = _timed(_write_store, results, args.vectors, args.dim, args.folders)
        print(f"store: {args.vectors:,} x {args.dim} in {args.folders:,} files ({seconds:.1f} s)")
        queries = np.random.default_rng(1).standard_normal((args.queries, args.dim), np.float32)
        store = open_store(results)
        first, found = _timed(search, store, queries, top=args.top)
        again, _ = _timed(search, store, queries, top=args.top)
        search_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        image = Path(tmp) / "images" / "f00000" / "0000000.jpg"  # stored: looked up
        command = ["snakembed", "query", str(image), "--results", str(results), "--json"]
        cli, proc = _timed(subprocess.run, command, capture_output=True, text=True, check=True)
        assert json.loads(proc.stdout)["hits"][0]["path"] == str(image)
        base, expected = _timed(_baseline, results, queries, args.top)
        same = [[(h.folder, h.image_id) for h in hits] for hits in found] == expected
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report = {
            "vectors": args.vectors,
            "dim": args.dim,
            "folders": args.folders,
            "queries": args.queries,
            "search_s": round(first, 3),
            "search_again_s": round(again, 3),
            "command_line_s": round(cli, 3),
            "baseline_s": round(base, 3),
            "baseline_over_search": round(base / again, 1),
            "same_hits": same,
            "peak_rss_mib_search": round(search_peak),
            "peak_rss_mib_with_baseline": round(peak),
        }
        print(json.dumps(report, indent=1))
        if not same:
            raise SystemExit("search and baseline found different images")


if __name__ == "__main__":
    main()
