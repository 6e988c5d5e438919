"""A user's own network: ``model: {name: custom, module: "mypkg.nets:MyCNN", kwargs: {...}}``."""

from __future__ import annotations

from .._registry import import_object
from ..images import Preprocess
from . import NO_WEIGHTS, Backbone, fit_classes, from_classifier, load_weights

__all__ = ["custom"]

#: ImageNet's statistics and the usual 256/224 resize and crop: override them in ``preprocess:``.
DEFAULT_PREPROCESS = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def custom(
    weights: str | None = "default",
    module: str | None = None,
    kwargs: dict | None = None,
) -> Backbone:
    """A network built by ``module`` (a class or factory) with ``kwargs``.

    Args:
        weights: ``default`` (whatever the class or factory sets up itself), a checkpoint path,
            or ``none`` (the same as ``default``, with a fixed seed). A checkpoint with another
            number of classes resizes the final linear layer.
        module: ``package.module:Name``.
        kwargs: keyword arguments for it.

    Example:
        >>> custom(module="torchvision.models:resnet18", kwargs={"num_classes": 3}).embedding_dim
        512
    """
    import torch

    if not module:
        raise ValueError("name: custom needs model.module, as `package.module:Name`")
    factory = import_object(module)
    torch.manual_seed(0)  # the same initialisation in every process
    model = factory(**(kwargs or {}))
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{module!r} returned a {type(model).__name__}, not a torch.nn.Module")
    sha, label = None, "none" if weights in NO_WEIGHTS else "default"
    if weights not in (*NO_WEIGHTS, "default"):
        sha, label = load_weights(model, weights, adapt=fit_classes), str(weights)
    return from_classifier(f"custom:{module}", model, DEFAULT_PREPROCESS, label, weights_sha256=sha)
