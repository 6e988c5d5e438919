"""`reduce: {method: pca}`: PCA fitted on the stored embeddings, reduced vectors beside them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import make_image, run_snakemake, write_config

import snakembed
from snakembed.reduce import fit_pca, read_reduced


def test_streamed_pca_is_the_pca_of_all_the_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))  # correlated columns
    pca = fit_pca([x[:100], x[100:250], x[250:]], 5)
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    for got, want in zip(pca.components, vt[:5], strict=True):
        assert np.allclose(got, want, atol=1e-8) or np.allclose(got, -want, atol=1e-8)
    assert np.allclose(pca.explained_variance_ratio, (singular**2 / (singular**2).sum())[:5])
    reduced = pca.transform(x)
    assert reduced.shape == (300, 5) and reduced.dtype == np.float32
    assert np.allclose(reduced.var(axis=0, ddof=1), singular[:5] ** 2 / 299, rtol=1e-4)


def test_more_components_than_the_data_holds_are_cut_with_a_warning(caplog):
    x = np.random.default_rng(1).standard_normal((4, 8))
    with caplog.at_level(logging.WARNING, logger="snakembed"):
        pca = fit_pca([x], 6)
    assert pca.components.shape == (3, 8)  # 4 images span 3 directions around their mean
    assert "6 components asked for, 3 kept" in caplog.text
    with pytest.raises(ValueError, match="at least two"):
        fit_pca([x[:1]], 2)


def test_the_workflow_writes_reduced_vectors_and_refits_when_a_folder_changes(tmp_path):
    for folder, n in (("a", 3), ("b/c", 4)):
        for i in range(n):
            make_image(tmp_path / "images" / folder / f"{i}.jpg", seed=10 * n + i)
    config = write_config(
        tmp_path / "config.yaml",
        images=str(tmp_path / "images"),
        results="results",
        reduce={"method": "pca", "dim": 4},
    )
    run_snakemake(tmp_path, config)
    store = snakembed.open_store(tmp_path / "results")
    reduced = read_reduced(tmp_path / "results")
    assert reduced.folders() == store.folders() == ["a", "b/c"]
    assert reduced.pca.components.shape[0] == 4
    for key in store:
        with store[key] as folder:
            assert reduced.ids(key) == folder.ids()
            assert np.allclose(reduced.matrix(key), reduced.pca.transform(folder.matrix()))
    all_rows = np.concatenate([reduced.matrix(key) for key in store])
    assert np.allclose(all_rows.mean(axis=0), 0, atol=1e-4)  # centred on the stored mean

    make_image(tmp_path / "images" / "a" / "new.jpg", seed=99)
    run_snakemake(tmp_path, config)
    again = read_reduced(tmp_path / "results")
    assert "new.jpg" in again.ids("a")
    assert not np.allclose(again.pca.mean, reduced.pca.mean)


def test_reduced_vectors_missing_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="reduce: {method: pca"):
        read_reduced(tmp_path)
