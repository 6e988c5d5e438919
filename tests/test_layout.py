"""The on-disk layout shared by writer and readers, and reading that stays light: opening a
store, its matrices, lookups, search and export import none of the embedding code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from conftest import REPO, embedding_meta

from snakembed import layout
from snakembed.classify import Predictions
from snakembed.embed import Embeddings
from snakembed.store import write_folder, write_index

#: What reading results must never import: the network, image decoding, config validation
#: and the writer. pandas and pyarrow are for parquet and dataframes only.
_HEAVY = ("torch", "torchvision", "timm", "PIL", "jsonschema", "pandas", "pyarrow")
_EMBEDDING_CODE = tuple(
    f"snakembed.{name}" for name in ("embed", "images", "config", "classify", "batches", "store")
)

_READ = """
import json, sys
import numpy as np
import snakembed

results, out = sys.argv[1], sys.argv[2]
store = snakembed.open_store(results)
folders = list(store)
matrix = store["alpha"].matrix()
record = store.lookup("alpha/a2.png")
root = store.lookup("top.jpg")
hits = snakembed.search(store, record.embedding, top=2)[0]
rows = snakembed.export(results, out, "npz")
print(json.dumps({
    "folders": folders,
    "shape": list(matrix.shape),
    "same": bool(np.array_equal(matrix[1], record.embedding)),
    "root": root.folder,
    "best": [hits[0].folder, hits[0].image_id],
    "rows": rows,
    "modules": sorted(sys.modules),
}))
"""


def _write_store(results, images) -> dict[str, list[str]]:
    """A small store written as the workflow writes it, without a network: random vectors."""
    rng = np.random.default_rng(0)
    folders = {
        layout.ROOT_FOLDER: ["top.jpg"],
        "alpha": ["a1.jpg", "a2.png", "a3.jpeg"],
        "alpha/deep": ["x.jpg"],
    }
    for key, ids in folders.items():
        n = len(ids)
        embeddings = Embeddings(
            ids=ids,
            sources=[name if key == layout.ROOT_FOLDER else f"{key}/{name}" for name in ids],
            sha256=["0" * 64] * n,
            width=np.full(n, 64),
            height=np.full(n, 48),
            vectors=rng.normal(size=(n, 8)).astype(np.float32),
            meta=embedding_meta(),
        )
        predictions = Predictions(
            ids=ids, labels=np.array([["x", "y"]] * n), scores=np.full((n, 2), 0.5), head="h"
        )
        output = layout.folder_file(results, key)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_folder(embeddings, predictions, output, key)
    write_index(list(folders), images, results / layout.INDEX_FILE)
    return folders


def test_folder_files_are_named_by_their_keys(tmp_path):
    assert layout.folder_file(tmp_path, "a/b") == tmp_path / "embeddings" / "a" / "b.h5"
    assert layout.folder_file(tmp_path, layout.ROOT_FOLDER) == tmp_path / "embeddings/_root.h5"
    assert layout.folder_file(tmp_path, "x{1}").name == "x%7B1%7D.h5"


def test_reading_results_imports_none_of_the_embedding_code(tmp_path):
    results = tmp_path / "results"
    folders = _write_store(results, tmp_path / "images")
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [sys.executable, "-c", _READ, str(results), str(tmp_path / "all.npz")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["folders"] == sorted(folders)
    assert got["shape"] == [3, 8] and got["same"]
    assert got["root"] == layout.ROOT_FOLDER
    assert got["best"] == ["alpha", "a2.png"]
    assert got["rows"] == sum(len(ids) for ids in folders.values())
    loaded = [
        name
        for name in got["modules"]
        if name.split(".")[0] in _HEAVY
        or any(name == code or name.startswith(f"{code}.") for code in _EMBEDDING_CODE)
    ]
    assert not loaded, f"reading results imported {sorted(loaded)}"
