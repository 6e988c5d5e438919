"""Classifying embeddings with a head plugin, for one folder or for the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._files import save_npz
from .embed import load_embeddings
from .heads import Head, as_vectors, create_head, load_head, save_head, top_k

__all__ = [
    "Predictions",
    "build_head",
    "classify_folder",
    "predict",
    "save_predictions",
    "load_predictions",
]


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


def build_head(config: dict, output: str | Path) -> Head:
    """Build the config's head once and save it for every folder's classify job (the ``head``
    rule).

    Args:
        config: a validated configuration; ``classify.head`` names the head plugin.
        output: the ``.npz`` file to write.

    Returns:
        The head.
    """
    head = create_head(config["classify"]["head"], config)
    save_head(head, output)
    return head


def classify_folder(
    embeddings_path: str | Path, head_path: str | Path, output: str | Path, config: dict
) -> Predictions:
    """Classify one folder's embeddings with a saved head (the ``classify`` rule).

    Args:
        embeddings_path: the ``.npz`` written by the embed step.
        head_path: the head saved by :func:`build_head`.
        output: the ``.npz`` to write.
        config: a validated configuration; ``classify:`` names the head and ``topk``.

    Returns:
        The predictions that were written.
    """
    embeddings = load_embeddings(embeddings_path)
    settings = config["classify"]
    head = load_head(head_path)
    result = predict(head, settings["head"], embeddings.ids, embeddings.vectors, settings["topk"])
    save_predictions(result, output)
    return result


def save_predictions(predictions: Predictions, path: str | Path) -> None:
    """Write predictions to ``.npz`` atomically."""
    save_npz(
        path,
        ids=np.asarray(predictions.ids, dtype=str),
        labels=np.asarray(predictions.labels, dtype=str),
        scores=np.asarray(predictions.scores, dtype=np.float32),
        head=np.asarray(json.dumps(predictions.head)),
    )


def load_predictions(path: str | Path) -> Predictions:
    """Read what :func:`save_predictions` wrote."""
    with np.load(path, allow_pickle=False) as data:
        return Predictions(
            ids=[str(v) for v in data["ids"]],
            labels=data["labels"],
            scores=data["scores"],
            head=json.loads(str(data["head"])),
        )
