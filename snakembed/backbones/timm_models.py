"""Every model of ``timm``, by its timm name prefixed with ``timm/`` (``timm/convnext_tiny``).

The prefix keeps timm's names apart from torchvision's, which share many (``resnet50``).
"""

from __future__ import annotations

from ..images import Preprocess
from . import (
    NO_WEIGHTS,
    Backbone,
    WeightsError,
    from_classifier,
    is_local_weights,
    load_weights,
)

__all__ = [
    "FAMILY",
    "PREFIX",
    "TimmFamily",
    "fit_timm_classes",
    "from_timm",
    "timm_categories",
    "timm_preprocess",
]

#: What every timm backbone name starts with.
PREFIX = "timm/"


class TimmFamily:
    """A plugin family: ``names()`` lists timm's models, ``create()`` builds one."""

    #: Every name starts with this, so a lookup of another name need not import timm.
    prefix = PREFIX

    def names(self) -> list[str]:
        import timm

        return [PREFIX + name for name in timm.list_models()]

    def create(self, name: str, weights: str | None = "default") -> Backbone:
        """Build ``timm/<arch>``.

        Args:
            name: ``timm/`` and a timm model name.
            weights: ``default`` (timm's pretrained weights, downloaded once into the Hugging
                Face cache), a pretrained tag (``a1_in1k``), a local checkpoint, or ``none``.
        """
        import timm
        import torch

        arch = name.removeprefix(PREFIX)
        sha = None
        if weights in NO_WEIGHTS:
            torch.manual_seed(0)  # the same random network in every process
            model, label = timm.create_model(arch, pretrained=False), "none"
        elif is_local_weights(weights):
            torch.manual_seed(0)
            model, label = timm.create_model(arch, pretrained=False), str(weights)
            sha = load_weights(model, weights, adapt=fit_timm_classes)
        else:
            tagged = arch if weights == "default" else f"{arch}.{weights}"
            try:
                model = timm.create_model(tagged, pretrained=True)
            except Exception as exc:  # noqa: BLE001 - no internet, or an unknown tag
                raise WeightsError(
                    f"cannot get timm weights {tagged!r} ({type(exc).__name__}: {exc}); "
                    "without internet (a cluster's compute node), fetch them once where there is: "
                    "`snakemake --cores 1 --forcerun weights_fetch weights_fetch` on the login "
                    "node, with HF_HOME on a filesystem the nodes share; or set model.weights to a "
                    "local checkpoint file"
                ) from exc
            label = model.pretrained_cfg.get("tag") or weights
        return from_timm(name, model, label, sha)


def from_timm(name: str, model, weights: str, sha: str | None) -> Backbone:
    """A backbone from a timm classifier, with timm's preprocessing and class names."""
    return from_classifier(
        name,
        model,
        timm_preprocess(model),
        weights,
        weights_sha256=sha,
        categories=timm_categories(model),
    )


def timm_preprocess(model) -> Preprocess:
    """What a timm model's pretrained config asks for: resize, crop, mean, std, filter."""
    import timm

    config = timm.data.resolve_data_config(model=model)
    crop = int(config["input_size"][-1])
    interpolation = config["interpolation"]
    return Preprocess(
        resize=int(crop / config["crop_pct"]),
        crop=crop,
        mean=config["mean"],
        std=config["std"],
        interpolation=interpolation
        if interpolation in ("nearest", "bilinear", "bicubic", "lanczos")
        else "bicubic",
    )


def timm_categories(model) -> list[str] | None:
    """ImageNet class names when the model's classes are an ImageNet subset timm knows."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(model.num_classes)]


def fit_timm_classes(model, state: dict) -> dict:
    """Give the classifier as many outputs as the checkpoint's (a fine-tuned model)."""
    classifier = model.get_classifier()
    key = next((f"{n}.weight" for n, m in model.named_modules() if m is classifier), None)
    weight = state.get(key) if key else None
    if weight is not None and weight.ndim == 2 and weight.shape[0] != model.num_classes:
        model.reset_classifier(weight.shape[0])
    return state


FAMILY = TimmFamily()
