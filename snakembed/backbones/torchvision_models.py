"""Every classifier of ``torchvision.models``, by its torchvision name."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..images import Preprocess
from . import (
    NO_WEIGHTS,
    Backbone,
    WeightsError,
    file_sha256,
    fit_classes,
    from_classifier,
    is_local_weights,
    load_weights,
)

__all__ = ["FAMILY", "TorchvisionFamily"]


class TorchvisionFamily:
    """A plugin family: ``names()`` lists torchvision's classifiers, ``create()`` builds one."""

    def names(self) -> list[str]:
        """torchvision's classifiers, from a cache per torchvision version: importing
        torchvision to list them takes 2 s of every plan."""
        from importlib.metadata import version

        cache = _cache_dir() / f"torchvision-{version('torchvision')}-classifiers.json"
        with contextlib.suppress(OSError, ValueError):
            return json.loads(cache.read_text())
        import torchvision.models as models

        names = models.list_models(module=models)
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(names))
        return names

    def create(self, name: str, weights: str | None = "default") -> Backbone:
        import torch
        import torchvision.models as models

        builder = models.get_model_builder(name)
        enum = models.get_model_weights(name)
        meta_weights = enum.DEFAULT
        sha = None
        if weights in NO_WEIGHTS:
            torch.manual_seed(0)  # the same random network in every process
            model, label = builder(weights=None), "none"
        elif is_local_weights(weights):
            torch.manual_seed(0)
            model = builder(weights=None)
            label, sha = str(weights), load_weights(model, weights, adapt=fit_classes)
        else:
            meta_weights = _named_weights(name, enum, weights)
            try:
                model = builder(weights=meta_weights)
            except Exception as exc:  # noqa: BLE001 - a download that cannot happen here
                raise WeightsError(
                    f"cannot get weights {meta_weights} for {name} ({type(exc).__name__}: {exc}); "
                    "without internet (a cluster's compute node), fetch them once where there is: "
                    "`snakemake --cores 1 --forcerun weights_fetch weights_fetch` on the login "
                    "node, with TORCH_HOME on a filesystem the nodes share; or set "
                    "model.weights to a local checkpoint file"
                ) from exc
            label = str(meta_weights).split(".", 1)[1]
            sha = _cached_sha256(meta_weights.url)
        t = meta_weights.transforms()
        preprocess = Preprocess(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=t.interpolation.value,
        )
        categories = meta_weights.meta.get("categories")
        return from_classifier(
            name, model, preprocess, label, weights_sha256=sha, categories=categories
        )


def _cached_sha256(url: str) -> str | None:
    """The sha256 of torch hub's cached copy of a weights file, for the provenance."""
    import torch

    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return file_sha256(path) if os.path.isfile(path) else None


def _named_weights(name, enum, weights):
    if weights == "default":
        return enum.DEFAULT
    try:
        return enum[weights]
    except KeyError:
        known = ", ".join(["default", "none", *enum.__members__])
        raise WeightsError(
            f"unknown weights {weights!r} for {name}; choose one of {known}, or a checkpoint path"
        ) from None


FAMILY = TorchvisionFamily()


def _cache_dir() -> Path:
    """snakembed's folder in the user's cache (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "snakembed"
