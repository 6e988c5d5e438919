"""Plugins: entry points, duplicates, unknown names, the built-in backbones and heads."""

from __future__ import annotations

import importlib.metadata as md
import sys
import types

import numpy as np
import pytest
import torch
from conftest import python_in_new_process

from snakembed._registry import PluginError, Registry
from snakembed.backbones import (
    Backbone,
    WeightsError,
    create_backbone,
    list_backbones,
    load_checkpoint,
)
from snakembed.config import load_config
from snakembed.heads import create_head, list_heads
from snakembed.images import Preprocess


def _fake_plugin_module(monkeypatch, name="fake_snakembed_plugin"):
    module = types.ModuleType(name)

    def tiny(weights="default"):
        model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return Backbone(
            name="tiny",
            model=model,
            preprocess=Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3),
            embedding_dim=3,
            weights=str(weights),
        )

    module.tiny = tiny
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _with_entry_points(monkeypatch, extra: list[md.EntryPoint]):
    real = md.entry_points

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        return found + [ep for ep in extra if ep.group == kwargs.get("group")]

    monkeypatch.setattr("snakembed._registry.entry_points", entry_points)


def test_builtins_are_registered_through_entry_points():
    names = list_backbones()
    assert "efficientnet_lite0" in names and "resnet18" in names and "mobilenet_v3_small" in names
    assert list_heads() == ["knn", "linear", "pretrained"]
    groups = {ep.name for ep in md.entry_points(group="snakembed.backbones")}
    assert {"efficientnet_lite0", "torchvision"} <= groups


def test_a_third_party_backbone_is_found_by_name(monkeypatch):
    _fake_plugin_module(monkeypatch)
    ep = md.EntryPoint("tiny", "fake_snakembed_plugin:tiny", "snakembed.backbones")
    _with_entry_points(monkeypatch, [ep])
    assert "tiny" in list_backbones()
    backbone = create_backbone("tiny", weights="none")
    out = backbone.model(torch.ones(2, 3, 8, 8))
    assert out.shape == (2, 3)


def test_a_duplicate_name_raises(monkeypatch):
    _fake_plugin_module(monkeypatch)
    ep = md.EntryPoint("resnet18", "fake_snakembed_plugin:tiny", "snakembed.backbones")
    _with_entry_points(monkeypatch, [ep])
    with pytest.raises(PluginError, match="provided twice"):
        list_backbones()


def test_two_entry_points_with_one_name_raise(monkeypatch):
    _fake_plugin_module(monkeypatch)
    ep = md.EntryPoint("efficientnet_lite0", "fake_snakembed_plugin:tiny", "snakembed.backbones")
    _with_entry_points(monkeypatch, [ep])
    with pytest.raises(PluginError, match="uninstall one"):
        create_backbone("efficientnet_lite0")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(PluginError) as err:
        create_backbone("resnet9000")
    assert "unknown backbone 'resnet9000'" in str(err.value) and "resnet18" in str(err.value)
    with pytest.raises(PluginError, match="known heads: knn, linear, pretrained"):
        create_head("forest", load_config())


def test_registry_add_refuses_a_taken_name():
    registry = Registry("snakembed.heads", "head")
    with pytest.raises(PluginError, match="already registered"):
        registry.add("pretrained", object())
    registry.add("mine", lambda config: "made")
    assert registry.factory("mine")({}) == "made"


def test_efficientnet_lite0_has_offline_imagenet_weights():
    backbone = create_backbone("efficientnet_lite0")
    assert backbone.embedding_dim == 1280
    assert backbone.categories[281] == "tabby, tabby cat"
    assert backbone.preprocess.interpolation == "bicubic" and backbone.preprocess.crop == 224
    assert backbone.weights_sha256 and len(backbone.weights_sha256) == 64


def test_random_weights_are_the_same_in_every_process(tmp_path):
    """weights: none is one network, whatever the process drew from torch's generator before."""
    a = create_backbone("resnet18", weights="none")
    b = create_backbone("resnet18", weights=None)
    x = torch.linspace(-2, 2, 3 * 32 * 32).reshape(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
        assert torch.equal(a.classifier.weight, b.classifier.weight)
        features = a.model(x)
    saved = tmp_path / "other.pt"
    python_in_new_process(
        "import torch\n"
        "from snakembed.backbones import create_backbone\n"
        "torch.manual_seed(99); torch.randn(1000)  # another state of the generator\n"
        "b = create_backbone('resnet18', weights='none')\n"
        "x = torch.linspace(-2, 2, 3 * 32 * 32).reshape(1, 3, 32, 32)\n"
        "with torch.no_grad():\n"
        f"    torch.save({{'features': b.model(x), 'fc': b.classifier.weight}}, {str(saved)!r})\n"
    )
    other = torch.load(saved, weights_only=True)
    assert torch.equal(other["features"], features)
    assert torch.equal(other["fc"], a.classifier.weight)


def test_torchvision_preprocessing_follows_the_weights():
    backbone = create_backbone("resnet18", weights="none")
    assert (backbone.preprocess.resize, backbone.preprocess.crop) == (256, 224)
    assert backbone.categories[0] == "tench"
    assert create_backbone("mobilenet_v3_small", weights="none").embedding_dim == 1024


def test_checkpoint_with_other_classes(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=7)
    path = tmp_path / "seven.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    backbone = create_backbone("resnet18", weights=str(path))
    assert backbone.classifier.out_features == 7
    assert backbone.categories == [f"class_{i}" for i in range(7)]
    assert torch.equal(backbone.classifier.weight, model.fc.weight)


def test_safetensors_checkpoint(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    assert set(load_checkpoint(path)) == set(model.state_dict())


def test_checkpoint_that_does_not_fit(tmp_path):
    import torchvision

    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone("resnet18", weights=str(path))


def test_checkpoint_with_code_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # creates the marker file if ever unpickled

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsError, match="plain tensors"):
        load_checkpoint(path)
    with pytest.raises(WeightsError):
        create_backbone("resnet18", weights=str(path))
    assert not marker.exists()


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        create_backbone("resnet18", weights="IMAGENET_NOPE")


def test_pretrained_head_gives_probabilities():
    config = load_config(overrides={"model": {"name": "resnet18", "weights": "none"}})
    head = create_head("pretrained", config)
    probabilities = head.predict(np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32))
    assert probabilities.shape == (4, 1000)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_torchvision_names_are_listed_from_a_cache(tmp_path, monkeypatch):
    """Planning a torchvision model need not import torchvision (2 s) once its names are cached."""
    import torchvision.models

    from snakembed.backbones.torchvision_models import TorchvisionFamily

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = torchvision.models.list_models(module=torchvision.models)
    assert TorchvisionFamily().names() == expected
    (cache,) = (tmp_path / "snakembed").glob("torchvision-*-classifiers.json")
    cache.write_text('["resnet18", "only_in_the_cache"]')
    assert TorchvisionFamily().names() == ["resnet18", "only_in_the_cache"]
    cache.write_text("damaged")
    assert TorchvisionFamily().names() == expected
