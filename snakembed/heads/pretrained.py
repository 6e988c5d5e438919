"""The backbone's own classifier (ImageNet classes for the default model)."""

from __future__ import annotations

import numpy as np

from ..backbones import Backbone, create_backbone

__all__ = ["PretrainedHead"]


class PretrainedHead:
    """Applies the final layer that the backbone was trained with, then a softmax.

    Args:
        config: the validated configuration; ``model:`` names the backbone.
        backbone: an already built backbone of that config, to avoid building it twice.

    Raises:
        ValueError: when the backbone has no classifier of its own.
    """

    def __init__(self, config: dict, backbone: Backbone | None = None) -> None:
        model = config["model"]
        if backbone is None:
            backbone = create_backbone(model["name"], model["weights"], model["layer"])
        if backbone.classifier is None or not backbone.categories:
            raise ValueError(
                f"model {model['name']!r} has no classifier of its own; "
                "set classify.head to none or to a trained head"
            )
        self.classifier = backbone.classifier
        self.categories = list(backbone.categories)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.classifier(torch.from_numpy(np.asarray(embeddings, np.float32)))
            return logits.float().softmax(dim=1).numpy()
