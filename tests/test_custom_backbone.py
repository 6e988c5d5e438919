"""A user's own network: model: {name: custom, module: "pkg.mod:Class", kwargs: {...}}."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import make_image, run_snakemake, write_config

from snakembed.backbones import WeightsError, backbone_from_config
from snakembed.config import ConfigError, validate_config
from snakembed.plan import plan_run

NETS = """
import torch


class SmallCNN(torch.nn.Module):
    def __init__(self, width=8, classes=3):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
        )
        self.fc = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))
"""


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _model(**model):
    return validate_config({"model": {"name": "custom", **model}})["model"]


def test_a_custom_class_with_kwargs_and_a_checkpoint(nets):
    from my_nets import SmallCNN

    torch.manual_seed(3)
    trained = SmallCNN(width=6, classes=2)
    path = nets / "trained.pt"
    torch.save(trained.state_dict(), path)
    backbone = backbone_from_config(
        _model(module="my_nets:SmallCNN", kwargs={"width": 6, "classes": 2}, weights=str(path))
    )
    assert backbone.embedding_dim == 6 and backbone.categories == ["class_0", "class_1"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = trained.features(x).flatten(1)
        assert torch.allclose(backbone.model(x), expected)
    assert len(backbone.weights_sha256) == 64


def test_a_checkpoint_that_does_not_fit_the_custom_class(nets):
    from my_nets import SmallCNN

    path = nets / "wide.pt"
    torch.save(SmallCNN(width=16).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit"):
        backbone_from_config(_model(module="my_nets:SmallCNN", weights=str(path)))


@pytest.mark.parametrize(
    "model,message",
    [
        ({"name": "custom"}, "needs your network's class"),
        ({"name": "custom", "module": "no_such_pkg.nets:Net"}, "cannot import 'no_such_pkg.nets'"),
        ({"name": "custom", "module": "my_nets:BigCNN"}, "no 'BigCNN'; its classes.*SmallCNN"),
        ({"name": "custom", "module": "my_nets"}, "`package.module:Name`"),
    ],
)
def test_bad_custom_settings_stop_the_plan(nets, model, message):
    make_image(nets / "images" / "a" / "x.jpg")
    config = {"images": str(nets / "images"), "results": str(nets / "results"), "model": model}
    with pytest.raises(ConfigError, match=f"'model.module'.*{message}"):
        plan_run(config)


def test_the_workflow_embeds_with_a_custom_network(nets):
    images = nets / "images"
    make_image(images / "a" / "x.jpg", seed=1)
    config = write_config(
        nets / "config.yaml",
        images=str(images),
        results="results",
        model={"name": "custom", "module": "my_nets:SmallCNN", "kwargs": {"width": 5}},
        preprocess={"resize": 40, "crop": 32},
    )
    run_snakemake(nets, config, env={"PYTHONPATH": str(nets)})
    with h5py.File(nets / "results" / "embeddings" / "a.h5", "r") as f:
        assert f.attrs["model"] == "custom:my_nets:SmallCNN" and f.attrs["embedding_dim"] == 5
        embedding = f["x.jpg"]["embedding"][()]
        assert embedding.shape == (5,) and np.isfinite(embedding).all()
        assert f["x.jpg"].attrs["label"] in {"class_0", "class_1", "class_2"}
