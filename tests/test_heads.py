"""Heads trained on labels: linear and knn on a separable labelled tree, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_snakemake, write_config
from labelled import make_labelled_tree
from PIL import Image

import snakembed
from snakembed.heads import load_head


@pytest.fixture(scope="module", params=["linear", "knn"])
def trained(request, tmp_path_factory):
    """One run per head: the labelled tree is also the image tree, so every val image is
    classified by the workflow and stored."""
    base = tmp_path_factory.mktemp(request.param)
    truth = make_labelled_tree(base / "labelled")
    config = write_config(
        base / "config.yaml",
        images="labelled",
        results="results",
        classify={"head": request.param, "labels": "labelled", "topk": 2},
    )
    run_snakemake(base, config)
    head_dir = base / "results" / "heads" / request.param
    metrics = json.loads((head_dir / "metrics.json").read_text())
    return {
        "name": request.param,
        "base": base,
        "truth": truth,
        "metrics": metrics,
        "config": config,
    }


def _stored_val_labels(trained) -> dict[str, str]:
    store = snakembed.open_store(trained["base"] / "results")
    return {path: store.lookup(path).label for path in trained["truth"]["val"]}


def test_the_head_separates_the_classes(trained):
    metrics = trained["metrics"]
    assert metrics["accuracy"] >= 0.95
    assert metrics["categories"] == ["blue", "green", "red"]
    assert metrics["val_images"] == len(trained["truth"]["val"]) == 18
    assert metrics["train_images"] == len(trained["truth"]["train"]) == 30
    assert set(metrics["settings"]) == {"weight_decay" if trained["name"] == "linear" else "k"}
    assert len(metrics["trials"]) > 1  # settings were chosen on the val split


def test_metrics_agree_with_the_stored_predictions(trained):
    metrics, truth = trained["metrics"], trained["truth"]["val"]
    stored = _stored_val_labels(trained)
    predicted = {path.split("/", 1)[1]: label for path, label in stored.items()}
    recorded = {
        str(path).split("labelled/val/", 1)[1]: label
        for path, label in metrics["val_predictions"].items()
    }
    assert recorded == predicted
    hits = sum(stored[path] == label for path, label in truth.items())
    assert metrics["accuracy"] == pytest.approx(hits / len(truth))
    categories = metrics["categories"]
    confusion = np.zeros((3, 3), int)
    for path, label in truth.items():
        confusion[categories.index(label), categories.index(stored[path])] += 1
    assert metrics["confusion"] == confusion.tolist()
    for i, name in enumerate(categories):
        per_class = metrics["per_class"][name]
        claimed = confusion[:, i].sum()
        precision = confusion[i, i] / claimed if claimed else 0.0
        recall = confusion[i, i] / confusion[i].sum()
        assert per_class["precision"] == pytest.approx(precision)
        assert per_class["recall"] == pytest.approx(recall)
        assert per_class["support"] == confusion[i].sum()
    f1 = [metrics["per_class"][c]["f1"] for c in categories]
    assert metrics["macro"]["f1"] == pytest.approx(np.mean(f1))


def test_the_plot_shows_the_metrics_confusion_matrix(trained):
    path = trained["base"] / "results" / "heads" / trained["name"] / "confusion.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 300
        assert json.loads(image.text["confusion"]) == trained["metrics"]["confusion"]
        assert json.loads(image.text["categories"]) == trained["metrics"]["categories"]


def test_every_image_is_labelled_with_the_heads_classes(trained):
    store = snakembed.open_store(trained["base"] / "results")
    for split in ("train", "val"):
        for path in trained["truth"][split]:
            record = store.lookup(path)
            assert record.label in ("blue", "green", "red")
            assert [name for name, _ in record.topk][0] == record.label
    head = load_head(trained["base"] / "results" / "heads" / trained["name"] / "head.npz")
    assert head.categories == ["blue", "green", "red"]
    with store["val/red"] as folder:
        assert folder.attrs["classify"] == trained["name"]


def test_scores_are_probabilities_or_neighbour_votes(trained):
    store = snakembed.open_store(trained["base"] / "results")
    for path in trained["truth"]["val"]:
        scores = [score for _, score in store.lookup(path).topk]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        if trained["name"] == "knn":  # a share of k votes
            k = trained["metrics"]["settings"]["k"]
            assert all(score * k == pytest.approx(round(score * k), abs=1e-5) for score in scores)


def test_the_cli_predicts_with_the_trained_head(trained, capsys):
    from snakembed.cli import main

    head = trained["base"] / "results" / "heads" / trained["name"] / "head.npz"
    paths = [trained["base"] / "labelled" / p for p in list(trained["truth"]["val"])[::5]]
    args = ["predict", *map(str, paths), "--configfile", str(trained["config"]), "--json"]
    assert main([*args, "--head", str(head)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    store = snakembed.open_store(trained["base"] / "results")
    for line, path in zip(lines, paths, strict=True):
        assert line["label"] == store.lookup(path.relative_to(trained["base"] / "labelled")).label
    assert main(args) == 2  # without --head or --results: the error names the file to pass
    err = capsys.readouterr().err
    assert f"results/heads/{trained['name']}/head.npz does not exist" in err
    assert "pass its file with --head, or the run's results with --results" in err
    # the run's results alone: its model, preprocessing and trained head
    results = trained["base"] / "results"
    assert main(["predict", *map(str, paths), "--results", str(results), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line, path in zip(lines, paths, strict=True):
        assert line["label"] == store.lookup(path.relative_to(trained["base"] / "labelled")).label
