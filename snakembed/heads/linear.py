"""A linear classifier with a softmax, in NumPy (the form the ``pretrained`` head is saved in
too), and the ``linear`` head: one fitted on labelled embeddings."""

from __future__ import annotations

import numpy as np

from . import Trained, TrainingData

__all__ = ["WEIGHT_DECAYS", "LinearHead", "linear"]


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


#: Weight decays tried on the validation split when ``classify.weight_decay`` is null.
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def linear(config: dict, data: TrainingData) -> Trained:
    """Fit a softmax classifier on labelled embeddings (the ``linear`` head).

    Features are standardised with the train split's mean and spread, then a multinomial
    logistic regression is fitted by full-batch L-BFGS (on the config's device: the GPU when
    there is one). Each weight decay of :data:`WEIGHT_DECAYS` (or ``classify.weight_decay``) is
    fitted on train and scored on val; the best validation accuracy wins (ties: the lower
    validation loss). The standardisation is folded into the saved weights.

    Args:
        config: a validated configuration (``classify.weight_decay``, ``device``).
        data: the labelled embeddings.

    Returns:
        The fitted head, the chosen weight decay, and every trial.

    Example:
        >>> x = np.array([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.2]], np.float32)
        >>> y = np.array([0, 0, 1, 1])
        >>> data = TrainingData(["a", "b"], x, y, x, y)
        >>> config = {"classify": {"weight_decay": 0.0}, "device": "cpu"}
        >>> linear(config, data).head.predict(x).argmax(axis=1).tolist()
        [0, 0, 1, 1]
    """
    import torch

    from ..embed import resolve_device

    device = resolve_device(config["device"])
    fixed = config["classify"].get("weight_decay")
    decays = (fixed,) if fixed is not None else WEIGHT_DECAYS
    mean = data.train_x.mean(axis=0)
    scale = data.train_x.std(axis=0) + 1e-6

    def tensor(array, dtype=torch.float32):
        return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)

    train_x = tensor((data.train_x - mean) / scale)
    val_x = tensor((data.val_x - mean) / scale)
    train_y, val_y = tensor(data.train_y, torch.long), tensor(data.val_y, torch.long)
    classes = len(data.categories)
    best, trials = None, []
    for decay in decays:
        weight, bias = _fit_softmax(train_x, train_y, classes, decay)
        with torch.no_grad():
            logits = val_x @ weight.T + bias
            loss = float(torch.nn.functional.cross_entropy(logits, val_y))
            accuracy = float((logits.argmax(dim=1) == val_y).float().mean())
        trials.append({"weight_decay": decay, "val_accuracy": accuracy, "val_loss": loss})
        if best is None or (accuracy, -loss) > (best[0], -best[1]):
            best = (accuracy, loss, decay, weight.cpu().numpy(), bias.cpu().numpy())
    _, _, decay, weight, bias = best
    folded = weight / scale  # x_std @ W.T + b == x @ (W / scale).T + (b - (mean / scale) @ W.T)
    head = LinearHead(folded, bias - folded @ mean, data.categories)
    return Trained(head, {"weight_decay": decay}, trials)


linear.needs_labels = True


def _fit_softmax(x, y, classes: int, decay: float, iterations: int = 300):
    """Multinomial logistic regression by L-BFGS: ``(weight [C, D], bias [C])``."""
    import torch

    torch.manual_seed(0)
    weight = torch.zeros(classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y)
        loss = loss + 0.5 * decay * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()
