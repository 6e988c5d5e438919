"""Similarity search: `snakembed query` and `snakembed.search`, checked against brute force."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import write_config

import snakembed
from snakembed.cli import main
from snakembed.search import search


def _brute_force(store, query: np.ndarray) -> list[tuple[float, str, str]]:
    frame = store.to_dataframe()
    matrix = np.stack(frame["embedding"]).astype(np.float64)
    scores = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    order = np.argsort(-scores)
    return [(scores[i], frame["folder"][i], frame["image_id"][i]) for i in order]


def test_search_ranks_every_stored_image_as_brute_force_does(workflow_run):
    store = snakembed.open_store(workflow_run["results"])
    query = store["alpha"]["a2.png"].embedding
    hits = search(store, query, top=5)[0]
    expected = _brute_force(store, query)[:5]
    assert [(h.folder, h.image_id) for h in hits] == [(f, i) for _, f, i in expected]
    assert np.allclose([h.score for h in hits], [s for s, _, _ in expected], atol=1e-5)
    assert hits[0].image_id == "a2.png" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].path == str(workflow_run["images"] / "alpha" / "a2.png")
    # one search for many queries, and only the folders asked for
    two = search(store, np.stack([query, query]), top=2, folders=["ünï cödé"])
    assert [[h.folder for h in found] for found in two] == [["ünï cödé"] * 2] * 2


def test_a_folder_view_maps_the_file_and_equals_the_matrix(workflow_run):
    store = snakembed.open_store(workflow_run["results"])
    with store["alpha"] as folder:
        view, matrix = folder.view(), folder.matrix()
    assert isinstance(view, np.memmap) and not view.flags.writeable
    assert np.array_equal(view, matrix)


def test_query_command_finds_a_stored_image_and_a_copy_of_it(workflow_run, tmp_path, capsys):
    stored = workflow_run["images"] / "alpha" / "deep" / "b c" / "y.png"
    copy = shutil.copy(stored, tmp_path / "new.png")  # not stored: embedded with the config
    args = ["query", str(stored), str(copy), "--results", str(workflow_run["results"])]
    assert main([*args, "--top", "3", "--json", "--configfile", str(workflow_run["config"])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(stored), str(copy)]
    for line in lines:
        assert len(line["hits"]) == 3
        assert line["hits"][0]["path"] == str(stored)
        assert line["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["score"] for h in line["hits"]] == sorted(
            [h["score"] for h in line["hits"]], reverse=True
        )
    assert main([*args[:2], *args[3:], "--folder", "ünï cödé"]) == 0
    first, *hits = capsys.readouterr().out.splitlines()
    assert first == str(stored) and len(hits) == 2  # the folder holds two images
    assert all(f"{workflow_run['images'] / 'ünï cödé'}/" in hit for hit in hits)


def test_query_computes_as_the_run_did_and_names_the_fix_for_another_model(
    workflow_run, tmp_path, capsys
):
    new = shutil.copy(workflow_run["images"] / "top.jpg", tmp_path / "new.jpg")
    results = str(workflow_run["results"])
    # without --configfile: the run's recorded model and settings, so the copy finds its original
    assert main(["query", str(new), "--results", results, "--top", "1", "--json"]) == 0
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["hits"][0]["path"] == str(workflow_run["images"] / "top.jpg")
    assert line["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # a config of another model: its vectors cannot be compared with the store's
    other = write_config(
        tmp_path / "other.yaml", model={"name": "timm/resnet10t", "weights": "none"}
    )
    assert main(["query", str(new), "--results", results, "--configfile", str(other)]) == 2
    err = capsys.readouterr().err
    assert "was embedded with another model" in err and "--configfile" in err


def test_query_of_an_unknown_folder_says_so(workflow_run, capsys):
    image = str(workflow_run["images"] / "top.jpg")
    args = ["query", image, "--results", str(workflow_run["results"]), "--folder", "nope"]
    assert main(args) == 2
    assert "no folder 'nope'" in capsys.readouterr().err
