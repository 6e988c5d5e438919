"""Backbones from torchvision and timm: the stored embedding is the model's own features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from snakembed.backbones import WeightsError, create_backbone
from snakembed.config import load_config
from snakembed.embed import embed_images

#: torchvision families and where their final linear layer sits.
TORCHVISION = {
    "resnet18": "fc",
    "mobilenet_v3_small": "classifier.3",
    "efficientnet_b0": "classifier.1",
}
TIMM = ["timm/resnet10t", "timm/mobilenetv3_small_050"]

#: The references are computed in float32 on the CPU: so are the embeddings compared with them.
CPU = {"device": "cpu", "precision": "fp32", "threads": 1}


def _assert_same_features(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal values up to float error, measured against the features' own scale.

    Random-weight networks give features of very different sizes (1e-13 for an untrained
    EfficientNet-B0, 10 for a ResNet-18), and unrelated images already score cosines of 0.99 or
    more there; a wrong resize kernel moves values by 10 % of that scale, float error by 0.1 %.
    """
    scale = np.abs(expected).max()
    assert scale > 0 and np.isfinite(scale)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=5e-3 * scale)


def _torchvision_reference(name: str):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    parent, _, attr = TORCHVISION[name].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, torch.nn.Identity())
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return model.eval(), transform, model


def _timm_reference(name: str):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name.removeprefix("timm/"), pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

    def features(x):
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return features, transform, model


@pytest.mark.parametrize("name", [*TORCHVISION, *TIMM])
def test_stored_embedding_is_the_models_own_features(name, tmp_path):
    paths = [make_image(tmp_path / f"{i}.jpg", size=(90 + 20 * i, 70), seed=i) for i in range(3)]
    config = load_config(overrides={"model": {"name": name, "weights": "none"}, **CPU})
    result = embed_images(paths, config)
    reference = _timm_reference if name.startswith("timm/") else _torchvision_reference
    forward, transform, model = reference(name)
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        expected = forward(batch).numpy()
    assert result.vectors.shape == expected.shape
    assert result.meta["embedding_dim"] == expected.shape[1]
    _assert_same_features(result.vectors, expected)


def test_timm_names_are_prefixed_and_carry_their_preprocessing():
    backbone = create_backbone("timm/resnet10t", weights="none")
    assert backbone.name == "timm/resnet10t" and backbone.embedding_dim == 512
    assert (backbone.preprocess.crop, backbone.preprocess.interpolation) == (176, "bicubic")
    assert backbone.categories[0].startswith("tench")  # ImageNet classes, from timm


def test_timm_checkpoint_with_other_classes(tmp_path):
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    path = tmp_path / "three.pth"
    torch.save(model.state_dict(), path)
    backbone = create_backbone("timm/resnet10t", weights=str(path))
    assert backbone.classifier.out_features == 3
    assert backbone.categories == ["class_0", "class_1", "class_2"]
    assert len(backbone.weights_sha256) == 64
    assert torch.equal(backbone.classifier.weight, model.get_classifier().weight)


def test_timm_checkpoint_that_does_not_fit(tmp_path):
    import timm

    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone("timm/resnet10t", weights=str(path))


#: A layer of each family, by the name torchvision's feature extraction gives it, and pooling.
LAYERS = {
    "resnet18": ("layer3", "avg"),
    "mobilenet_v3_small": ("features.5", "max"),
    "efficientnet_b0": ("features.4", "avg"),
    "timm/resnet10t": ("layer2", "max"),
}


def _hooked_output(model, layer: str, batch):
    """The model's own forward, with the layer's output caught by a hook."""
    caught = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: caught.setdefault("out", output)
    )
    with torch.no_grad():
        model(batch)
    handle.remove()
    return caught["out"]


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_named_layer_is_the_models_own_output_pooled(name, tmp_path):
    layer, pool = LAYERS[name]
    paths = [make_image(tmp_path / f"{i}.jpg", size=(90 + 20 * i, 70), seed=i) for i in range(3)]
    model_config = {"name": name, "weights": "none", "layer": layer, "pool": pool}
    config = load_config(overrides={"model": model_config, **CPU})
    result = embed_images(paths, config)
    reference = _timm_reference if name.startswith("timm/") else _torchvision_reference
    _, transform, model = reference(name)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    out = _hooked_output(model, layer, batch)  # [B, C, H, W]
    expected = (out.mean(dim=(2, 3)) if pool == "avg" else out.amax(dim=(2, 3))).numpy()
    assert result.vectors.shape == expected.shape
    assert result.meta["embedding_dim"] == expected.shape[1]
    assert (result.meta["layer"], result.meta["pool"]) == (layer, pool)
    _assert_same_features(result.vectors, expected)


def test_pool_none_keeps_every_position_as_a_row(tmp_path):
    paths = [make_image(tmp_path / f"{i}.jpg", size=(80, 64), seed=i) for i in range(2)]
    overrides = {
        "model": {"name": "resnet18", "weights": "none", "layer": "layer4", "pool": "none"},
        "preprocess": {"resize": 64, "crop": 64},
        **CPU,
    }
    result = embed_images(paths, load_config(overrides=overrides))
    _, transform, model = _torchvision_reference("resnet18")
    pixels = torch.stack(list(_pixels(paths, 64)))
    out = _hooked_output(model, "layer4", pixels)  # [2, 512, 2, 2]
    expected = out.flatten(2).transpose(1, 2).numpy()  # [2, 4, 512]: row-major positions
    assert result.vectors.shape == (2, 4, 512) and result.meta["embedding_dim"] == 512
    assert np.allclose(result.vectors, expected, atol=1e-4)


def _pixels(paths, side):
    """The pixels the workflow feeds the network for a resize and crop of ``side``."""
    from snakembed.images import Preprocess, read_image

    pre = Preprocess(side, side, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for path in paths:
        yield pre.normalize(pre.pixels(read_image(path).image).unsqueeze(0))[0]


def test_a_network_fx_cannot_trace_still_gives_its_submodules(tmp_path):
    from snakembed.backbones import Backbone
    from snakembed.backbones.layers import take_layer
    from snakembed.images import Preprocess

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            y = self.stem(x)
            if y.sum() > 0:  # data-dependent control flow: FX cannot trace this
                y = y * 2
            return self.head(y.mean(dim=(2, 3)))

    model = Branchy().eval()
    pre = Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3)
    backbone = Backbone("branchy", model, pre, 4, "none")
    taken = take_layer(backbone, "stem", "avg")
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(taken.model(x), model.stem(x).mean(dim=(2, 3)))
    assert taken.embedding_dim == 4 and taken.classifier is None
