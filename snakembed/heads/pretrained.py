"""The backbone's own classifier (ImageNet classes for the default model)."""

from __future__ import annotations

import numpy as np

from ..backbones import Backbone
from .linear import LinearHead

__all__ = ["pretrained"]


def pretrained(config: dict, backbone: Backbone | None = None) -> LinearHead:
    """The final layer that the backbone was trained with, as a :class:`LinearHead`.

    Args:
        config: the validated configuration; ``model:`` names the backbone.
        backbone: an already built backbone of that config, to avoid building it twice.

    Raises:
        ValueError: when the backbone has no classifier of its own.

    Example:
        >>> from snakembed.config import load_config
        >>> pretrained(load_config()).categories[281]
        'tabby, tabby cat'
    """
    if backbone is None:
        from ..backbones import backbone_from_config

        backbone = backbone_from_config(config["model"])
    if backbone.classifier is None or not backbone.categories:
        raise ValueError(
            f"model {backbone.name!r} has no classifier of its own at its layer "
            f"{backbone.layer!r}, so the pretrained head has no classes to give: classify "
            "with a trained head (classify.head: linear or knn; snakembed predict --head FILE), "
            "or take the vectors alone (classify.head: none; snakembed embed)"
        )
    weight = backbone.classifier.weight.detach().float().numpy()
    bias = backbone.classifier.bias
    bias = bias.detach().float().numpy() if bias is not None else np.zeros(len(weight), np.float32)
    return LinearHead(weight, bias, backbone.categories)
