"""`snakembed export`: the stored images as one table, in every format, equal to the store."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

import snakembed
from snakembed.cli import main
from snakembed.export import FORMATS, export


def _expected(results) -> pd.DataFrame:
    store = snakembed.open_store(results)
    frame = store.to_dataframe()
    frame["path"] = [str(store.images_root / s) for s in frame["source"]]
    return frame


def _read(path, fmt: str) -> pd.DataFrame:
    if fmt == "parquet":
        frame = pd.read_parquet(path)
        frame["embedding"] = [np.asarray(v, np.float32) for v in frame["embedding"]]
        return frame
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as data:
            columns = {k: data[k] for k in ("path", "folder", "image_id", "label", "score")}
            frame = pd.DataFrame(columns)
            frame["embedding"] = list(data["embedding"])
        return frame
    frame = pd.read_csv(path, keep_default_na=False)
    dims = [c for c in frame.columns if c.startswith("e") and c[1:].isdigit()]
    columns = {c: frame[c] for c in ("path", "folder", "image_id", "label", "score")}
    return pd.DataFrame({**columns, "embedding": list(frame[dims].to_numpy(np.float32))})


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_holds_every_stored_image_exactly(workflow_run, tmp_path, fmt):
    results = workflow_run["results"]
    out = tmp_path / f"all.{fmt}"
    assert export(results, out, fmt) == sum(len(v) for v in workflow_run["folders"].values())
    got, want = _read(out, fmt), _expected(results)
    assert list(got.columns[:5]) == ["path", "folder", "image_id", "label", "score"]
    assert got["path"].tolist() == want["path"].tolist()
    assert all((workflow_run["images"] / p).is_file() for p in got["path"])
    for column in ("folder", "image_id", "label"):
        assert got[column].tolist() == want[column].tolist(), column
    assert np.allclose(got["score"].astype(np.float32), want["score"], rtol=0, atol=0)
    assert np.array_equal(np.stack(got["embedding"]), np.stack(want["embedding"]))


def test_export_command_writes_beside_the_results_by_default(workflow_run, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(workflow_run["results"], results)
    n = sum(len(names) for names in workflow_run["folders"].values())
    assert main(["export", "-r", str(results), "--format", "csv"]) == 0
    assert f"{results / 'export.csv'}: {n} images" in capsys.readouterr().err
    assert len(pd.read_csv(results / "export.csv")) == n


def test_an_unknown_format_names_the_ones_there_are(workflow_run, tmp_path):
    with pytest.raises(ValueError, match="parquet, npz, csv"):
        export(workflow_run["results"], tmp_path / "x.xlsx", "xlsx")
    assert not (tmp_path / "x.xlsx").exists()
