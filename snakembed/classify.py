"""Classifying embeddings with a head plugin, for each folder's job or for the CLI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .heads import Head, as_vectors, top_k

__all__ = ["Predictions", "predict"]


@dataclass
class Predictions:
    """Top-k labels and probabilities, row ``i`` for image ``ids[i]``."""

    ids: list[str]
    labels: np.ndarray
    scores: np.ndarray
    head: str

    @property
    def label(self) -> list[str]:
        """The best label of every image."""
        return [str(v) for v in self.labels[:, 0]] if len(self.ids) else []

    @property
    def score(self) -> np.ndarray:
        """The best label's probability for every image."""
        return self.scores[:, 0] if len(self.ids) else np.zeros(0, np.float32)


def predict(head: Head, head_name: str, ids: list[str], vectors: np.ndarray, k: int) -> Predictions:
    """Apply ``head`` to embeddings and keep the ``k`` best labels of each.

    Embeddings stored as maps (``pool: none``, ``[N, H*W, D]``) are classified by their mean
    vector.

    Example:
        >>> # p = predict(create_head("pretrained", cfg), "pretrained", ids, vectors, 5)
    """
    k = max(1, k)
    if len(ids) == 0:
        empty = np.zeros((0, k))
        return Predictions(list(ids), empty.astype(str), empty.astype(np.float32), head_name)
    labels, scores = top_k(head.predict(as_vectors(vectors)), head.categories, k)
    return Predictions(list(ids), labels, scores, head_name)
