"""The ``knn`` head: the labels of the nearest labelled embeddings (cosine similarity)."""

from __future__ import annotations

import numpy as np

from . import Trained, TrainingData

__all__ = ["NEIGHBOURS", "KnnHead", "knn"]

#: Neighbour counts tried on the validation split when ``classify.k`` is null.
NEIGHBOURS = (1, 3, 5, 9, 15, 25, 51)

#: Query rows per similarity block, to bound memory on large labelled sets.
_BLOCK = 1024


class KnnHead:
    """Scores each class by its share of the ``k`` most cosine-similar labelled embeddings.

    Args:
        vectors: ``[M, D]`` labelled embeddings.
        labels: ``[M]`` class indices into ``categories``.
        categories: class names.
        k: neighbours that vote.

    Example:
        >>> head = KnnHead(np.array([[1.0, 0], [0.9, 0.1], [0, 1.0]]), np.array([0, 0, 1]),
        ...                ["a", "b"], k=3)
        >>> (head.predict(np.array([[1.0, 0.05]])) * 3).tolist()  # two votes for a, one for b
        [[2.0, 1.0]]
    """

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, categories: list[str], k: int):
        self.vectors = _unit(vectors)
        self.labels = np.asarray(labels, np.int64)
        self.categories = [str(c) for c in categories]
        self.k = int(min(k, len(self.vectors)))
        if len(self.labels) != len(self.vectors) or self.k < 1:
            raise ValueError(
                f"a knn head needs one label per vector and k >= 1; got {len(self.vectors)} "
                f"vectors, {len(self.labels)} labels and k={k}"
            )

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        queries = _unit(embeddings)
        votes = np.zeros((len(queries), len(self.categories)), np.float32)
        for start in range(0, len(queries), _BLOCK):
            similarity = queries[start : start + _BLOCK] @ self.vectors.T
            nearest = np.argpartition(-similarity, self.k - 1, axis=1)[:, : self.k]
            rows = np.repeat(np.arange(len(nearest)), self.k)
            np.add.at(votes[start : start + _BLOCK], (rows, self.labels[nearest].ravel()), 1.0)
        return votes / self.k

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "vectors": self.vectors,
            "labels": self.labels,
            "categories": np.asarray(self.categories, dtype=str),
            "k": np.asarray(self.k),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> KnnHead:
        categories = [str(c) for c in arrays["categories"]]
        return cls(arrays["vectors"], arrays["labels"], categories, int(arrays["k"]))


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def knn(config: dict, data: TrainingData) -> Trained:
    """The ``knn`` head over the train split; ``k`` is ``classify.k``, or the count of
    :data:`NEIGHBOURS` with the best validation accuracy (ties: the higher mean vote for the
    true class).

    Example:
        >>> x = np.array([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]], np.float32)
        >>> data = TrainingData(["a", "b"], x, np.array([0, 0, 1, 1]), x, np.array([0, 0, 1, 1]))
        >>> knn({"classify": {"k": None}}, data).settings
        {'k': 1}
    """
    fixed = config["classify"].get("k")
    counts = [fixed] if fixed is not None else [k for k in NEIGHBOURS if k <= len(data.train_x)]
    best, trials = None, []
    for k in counts or [1]:
        head = KnnHead(data.train_x, data.train_y, data.categories, k)
        votes = head.predict(data.val_x)
        accuracy = float((votes.argmax(axis=1) == data.val_y).mean())
        true_vote = float(votes[np.arange(len(votes)), data.val_y].mean())
        trials.append({"k": head.k, "val_accuracy": accuracy, "val_true_vote": true_vote})
        if best is None or (accuracy, true_vote) > best[:2]:
            best = (accuracy, true_vote, head)
    return Trained(best[2], {"k": best[2].k}, trials)


knn.needs_labels = True
