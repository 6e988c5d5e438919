"""The finetune rule: one training step on the CPU, and its checkpoint used as the weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_snakemake, write_config
from labelled import make_labelled_tree

import snakembed
from snakembed.backbones import create_backbone
from snakembed.finetune import _warmup_cosine


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """``model.weights`` names the finetune rule's checkpoint, so one run fine-tunes, then
    embeds and classifies with the fine-tuned network's own head."""
    base = tmp_path_factory.mktemp("finetune")
    truth = make_labelled_tree(base / "labelled", train=4, val=2)
    checkpoint = "results/finetune/checkpoint.safetensors"
    config = write_config(
        base / "config.yaml",
        images="labelled",
        results="results",
        model={"name": "resnet18", "weights": checkpoint},
        classify={"head": "pretrained", "labels": "labelled", "topk": 3},
        finetune={"weights": "none", "epochs": 3, "batch_size": 32, "max_steps": 1},
    )
    proc = run_snakemake(base, config)
    history = json.loads((base / "results" / "finetune" / "history.json").read_text())
    return {"base": base, "truth": truth, "history": history, "log": proc.stderr}


def test_one_step_is_trained_and_recorded(finetuned):
    history = finetuned["history"]
    assert history["stopped"] == "max_steps"
    assert [e["steps"] for e in history["epochs"]] == [1]
    epoch = history["epochs"][0]
    assert np.isfinite([epoch["train_loss"], epoch["val_loss"]]).all()
    assert 0 <= epoch["val_accuracy"] <= 1 and history["best_epoch"] == 1
    assert history["categories"] == ["blue", "green", "red"] and history["failed"] == {}


def test_the_checkpoint_differs_from_where_it_started(finetuned):
    path = finetuned["base"] / "results" / "finetune" / "checkpoint.safetensors"
    tuned = create_backbone("resnet18", weights=str(path))
    start = create_backbone("resnet18", weights="none")
    assert tuned.categories == ["blue", "green", "red"]
    assert tuned.classifier.out_features == 3
    changed = [
        name
        for (name, a), (_, b) in zip(
            tuned.model.state_dict().items(), start.model.state_dict().items(), strict=True
        )
        if a.dtype.is_floating_point and not torch.equal(a, b)
    ]
    assert "conv1.weight" in changed  # the whole backbone was trained, not just a new head


def test_the_workflow_labels_images_with_the_fine_tuned_classes(finetuned):
    store = snakembed.open_store(finetuned["base"] / "results")
    record = store.lookup("val/red/red_0.png")
    assert record.label in ("blue", "green", "red")
    with store["val/red"] as folder:
        assert folder.attrs["weights"] == "results/finetune/checkpoint.safetensors"
        assert len(folder.attrs["weights_sha256"]) == 64


def test_the_learning_rate_warms_up_then_decays_to_zero():
    factor = _warmup_cosine(warmup=4, total=20)
    values = [factor(step) for step in range(21)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert values[20] == pytest.approx(0.0)


class TinyNet(torch.nn.Module):
    """No batch norm: with a learning rate of almost zero, the validation loss stays put."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_training_stops_when_the_val_loss_stops_falling(tmp_path):
    from snakembed.config import load_config
    from snakembed.finetune import finetune

    make_labelled_tree(tmp_path / "labelled", train=2, val=1)
    config = load_config(
        overrides={
            "images": str(tmp_path / "labelled"),
            "model": {"name": "custom", "module": "test_finetune:TinyNet", "weights": "none"},
            "preprocess": {"resize": 16, "crop": 16},
            "classify": {"labels": str(tmp_path / "labelled")},
            "finetune": {"weights": "none", "epochs": 10, "patience": 2, "lr": 1e-12},
            "threads": 1,
        }
    )
    history = finetune(config, tmp_path / "tuned.safetensors", tmp_path / "history.json")
    assert history["stopped"] == "no lower val loss for 2 epochs"
    assert len(history["epochs"]) == 3 and history["best_epoch"] == 1
    assert create_backbone(
        "custom", weights=str(tmp_path / "tuned.safetensors"), module="test_finetune:TinyNet"
    ).categories == ["blue", "green", "red"]
