"""Classifier heads: embeddings in, class probabilities out.

A head plugin is a factory ``f(config) -> Head`` registered in the ``snakembed.heads``
entry-point group; ``config`` is the whole validated workflow configuration.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .._registry import Registry

__all__ = ["Head", "HEADS", "create_head", "list_heads", "top_k"]

#: The head registry (entry-point group ``snakembed.heads``).
HEADS = Registry("snakembed.heads", "head")


class Head(Protocol):
    """What a head provides."""

    #: the class names, in output order.
    categories: list[str]

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """``float32 [N, D]`` embeddings to ``float32 [N, C]`` probabilities."""
        ...


def list_heads() -> list[str]:
    """Every registered head name, sorted.

    Example:
        >>> list_heads()
        ['pretrained']
    """
    return HEADS.names()


def create_head(name: str, config: dict) -> Head:
    """Build a registered head for a validated configuration.

    Raises:
        PluginError: for an unknown name, listing the known ones.
    """
    return HEADS.factory(name)(config)


def top_k(
    probabilities: np.ndarray, categories: list[str], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of every row, best first.

    Returns:
        ``(labels, scores)``: str ``[N, k]`` and float32 ``[N, k]``.

    Example:
        >>> top_k(np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"], 2)[0].tolist()
        [['b', 'c']]
    """
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    labels = np.asarray(categories, dtype=object)[order].astype(str)
    scores = np.take_along_axis(probabilities, order, axis=1).astype(np.float32)
    return labels, scores
