"""A linear classifier with a softmax, in NumPy: the form every built-in head is saved in."""

from __future__ import annotations

import numpy as np

__all__ = ["LinearHead"]


class LinearHead:
    """``softmax(embeddings @ weight.T + bias)``.

    Args:
        weight: ``[C, D]``.
        bias: ``[C]``.
        categories: ``C`` class names.

    Example:
        >>> head = LinearHead(np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros(2), ["a", "b"])
        >>> head.predict(np.array([[3.0, 0.0]])).argmax(axis=1).tolist()
        [0]
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, categories: list[str]) -> None:
        self.weight = np.asarray(weight, np.float32)
        self.bias = np.asarray(bias, np.float32)
        self.categories = [str(c) for c in categories]
        if self.weight.shape[0] != len(self.categories) or self.bias.shape != (
            len(self.categories),
        ):
            raise ValueError(
                f"a linear head of {len(self.categories)} classes needs weight [C, D] and bias "
                f"[C]; got {self.weight.shape} and {self.bias.shape}"
            )

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        logits = np.asarray(embeddings, np.float32) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "weight": self.weight,
            "bias": self.bias,
            "categories": np.asarray(self.categories, dtype=str),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LinearHead:
        return cls(arrays["weight"], arrays["bias"], [str(c) for c in arrays["categories"]])
