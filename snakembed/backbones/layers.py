"""The embedding from any node of a network: pooled to a vector, or kept as a spatial map.

Layers are named as torchvision's feature-extraction utilities name them
(:func:`torchvision.models.feature_extraction.get_graph_node_names`, in eval mode): a graph node
such as ``layer3.1.add``, or a submodule such as ``layer3`` (its last node). Tracing uses timm's
wrapper, which knows the modules of timm models that cannot be traced; a network that cannot be
traced at all still gives the output of any of its submodules, through a forward hook.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from . import POOLS, PRE_LOGITS, LayerError

if TYPE_CHECKING:
    from . import Backbone

__all__ = ["layer_names", "take_layer"]


def layer_names(model: torch.nn.Module) -> list[str]:
    """Every name that ``layer:`` accepts for ``model``, in network order.

    Args:
        model: the network (its final linear layer may already be removed).

    Returns:
        The graph nodes (eval mode) and then the submodules that are not nodes themselves.

    Example:
        >>> import torchvision
        >>> names = layer_names(torchvision.models.resnet18())
        >>> "layer3" in names and "layer4.1.add" in names
        True
    """
    from timm.models import get_graph_node_names

    try:
        nodes = list(get_graph_node_names(model)[1])[1:]  # the first is the input
    except Exception:  # noqa: BLE001 - a network FX cannot trace still has submodules
        nodes = []
    return list(dict.fromkeys([*nodes, *(name for name, _ in model.named_modules() if name)]))


def take_layer(backbone: Backbone, layer: str, pool: str) -> Backbone:
    """The backbone whose output is ``layer``, pooled by ``pool``.

    A ``[B, C, H, W]`` map is pooled over ``H, W`` (``avg``, ``max``) or kept as ``[B, H*W, C]``
    (``none``); a ``[B, N, C]`` sequence of tokens is pooled over ``N`` or kept. A layer that
    gives one vector per image takes ``avg`` or ``max`` (both keep it as it is). The model's own
    classifier is dropped: it does not apply to another layer's features.

    Args:
        backbone: a backbone at ``pre_logits``.
        layer: ``pre_logits`` or a name from :func:`layer_names`.
        pool: one of :data:`POOLS`.

    Returns:
        The backbone, with ``model``, ``embedding_dim``, ``layer`` and ``pool`` set.

    Raises:
        LayerError: for an unknown layer (listing the valid ones) or a pooling it cannot take.

    Example:
        >>> from snakembed.backbones import create_backbone
        >>> take_layer(create_backbone("resnet18", "none"), "layer3", "avg").embedding_dim
        256
    """
    if pool not in POOLS:
        raise LayerError(f"pool {pool!r} is not one of {', '.join(POOLS)}")
    if layer == PRE_LOGITS:
        if pool != "avg":
            raise LayerError(
                f"pre_logits is already pooled by {backbone.name} itself, so pool: {pool} "
                "cannot apply; name the layer before the pooling (`snakembed layers "
                f"{backbone.name}` lists them), or set pool: avg"
            )
        return replace(backbone, layer=layer, pool=pool)
    model = _LayerModel(_extractor(backbone.model, layer, backbone.name), pool).eval()
    probe = _probe(model, backbone.preprocess.crop)
    if probe.ndim == 2 and pool == "none":
        raise LayerError(
            f"layer {layer!r} of {backbone.name} gives one vector per image, so there is no map "
            "to keep with pool: none; set pool: avg, or name an earlier layer"
        )
    if probe.ndim not in (2, 3):
        raise LayerError(
            f"layer {layer!r} of {backbone.name} gives a tensor of {probe.ndim + 1} dimensions, "
            "not a [B, C, H, W] map, [B, N, C] tokens or [B, C] vectors; name another layer"
        )
    return replace(
        backbone,
        model=model,
        embedding_dim=int(probe.shape[-1]),
        layer=layer,
        pool=pool,
        classifier=None,
        categories=None,
    )


def _probe(model: torch.nn.Module, side: int) -> torch.Tensor:
    """One forward pass of a black image, for the output's shape."""
    with torch.inference_mode():
        return model(torch.zeros(1, 3, side, side))


def _extractor(model: torch.nn.Module, layer: str, name: str) -> torch.nn.Module:
    """A module whose output is ``layer``'s output (the graph is listed only on failure)."""
    from timm.models import create_feature_extractor

    try:
        extractor = create_feature_extractor(model.eval(), return_nodes={layer: "out"})
        inputs = {node.name for node in extractor.graph.nodes if node.op == "placeholder"}
        if layer not in inputs:  # the network's input is not a layer (layer_names leaves it out)
            return extractor
        exc = None
    except Exception as error:  # noqa: BLE001 - an unknown node, or a network FX cannot trace
        exc = error
    names = layer_names(model)
    if layer not in names:
        raise LayerError(_unknown_layer(layer, model, names, name)) from None
    modules = dict(model.named_modules())
    if layer in modules:
        return _Hooked(model, modules[layer])
    raise LayerError(
        f"{name} cannot be traced up to node {layer!r} ({type(exc).__name__}: {exc}); name "
        f"one of its submodules instead: {', '.join(list(modules)[1:30])}"
    ) from exc


def _unknown_layer(layer: str, model: torch.nn.Module, names: list[str], name: str) -> str:
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    blocks = [child for child, _ in model.named_children()]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"{name} has no layer {layer!r}{hint}. Its top-level blocks are {', '.join(blocks)}; "
        f"`snakembed layers {name}` lists all {len(names)} layers, or use pre_logits"
    )


def _pooled(out: torch.Tensor, pool: str) -> torch.Tensor:
    if out.ndim == 4:  # [B, C, H, W]
        if pool == "none":
            return out.flatten(2).transpose(1, 2)
        return out.mean(dim=(2, 3)) if pool == "avg" else out.amax(dim=(2, 3))
    if out.ndim == 3 and pool != "none":  # [B, N, C] tokens
        return out.mean(dim=1) if pool == "avg" else out.amax(dim=1)
    return out


class _LayerModel(torch.nn.Module):
    """A feature extractor followed by the pooling."""

    def __init__(self, extractor: torch.nn.Module, pool: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)
        if isinstance(out, dict):
            out = out["out"]
        return _pooled(out, self.pool)


class _Stop(Exception):
    """Raised by a forward hook to end the pass once the layer's output is known."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


class _Hooked(torch.nn.Module):
    """Runs ``model`` up to ``module`` and returns that module's output (no tracing needed)."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handle = self.module.register_forward_hook(_stop_with_output)
        try:
            self.model(x)
        except _Stop as stop:
            return stop.output
        finally:
            handle.remove()
        raise RuntimeError("the layer's forward hook did not run")


def _stop_with_output(module, inputs, output):
    raise _Stop(output)
