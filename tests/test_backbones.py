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
    config = load_config(overrides={"model": {"name": name, "weights": "none"}, "threads": 1})
    result = embed_images(paths, config)
    reference = _timm_reference if name.startswith("timm/") else _torchvision_reference
    forward, transform, model = reference(name)
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        expected = forward(batch).numpy()
    assert result.vectors.shape == expected.shape
    assert result.meta["embedding_dim"] == expected.shape[1]
    a, b = result.vectors, expected
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.9999


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
