"""Classifier heads: embeddings in, class probabilities out.

A head plugin is a factory ``f(config) -> Head`` registered in the ``snakembed.heads``
entry-point group; ``config`` is the whole validated workflow configuration. A head trained on
labelled embeddings is a factory ``f(config, data: TrainingData) -> Trained`` with the attribute
``needs_labels = True``; the workflow's ``train_head`` rule calls it and saves the head to a file
(:func:`save_head`) that every folder's job loads (:func:`load_head`). A head that needs no
labels is built from the config by each worker; one whose factory takes ``backbone`` is given
the network the worker already holds (``pretrained`` reads its classifier).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

import numpy as np

from .._files import save_npz
from .._registry import Registry, import_object

__all__ = [
    "HEADS",
    "Head",
    "Trained",
    "TrainingData",
    "as_vectors",
    "create_head",
    "list_heads",
    "needs_labels",
    "load_head",
    "save_head",
    "top_k",
]

#: The head registry (entry-point group ``snakembed.heads``).
HEADS = Registry("snakembed.heads", "head")


class Head(Protocol):
    """What a head provides."""

    #: the class names, in output order.
    categories: list[str]

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """``float32 [N, D]`` embeddings to ``float32 [N, C]`` probabilities."""
        ...

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild the head, as plain arrays (no pickled objects)."""
        ...

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Head:
        """Rebuild the head from what :meth:`arrays` returned."""
        ...


@dataclass
class TrainingData:
    """Labelled embeddings: ``*_x`` float32 ``[N, D]``, ``*_y`` int indices into
    ``categories``."""

    categories: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray


@dataclass
class Trained:
    """What a trainable head's factory returns.

    Attributes:
        head: the head, fitted on the train split with the chosen settings.
        settings: the chosen hyper-parameters (``{"weight_decay": 0.001}``).
        trials: every setting tried, with its validation accuracy and loss.
    """

    head: Head
    settings: dict
    trials: list[dict] = field(default_factory=list)


def list_heads() -> list[str]:
    """Every registered head name, sorted.

    Example:
        >>> list_heads()
        ['knn', 'linear', 'pretrained']
    """
    return HEADS.names()


def needs_labels(name: str) -> bool:
    """Whether the head ``name`` is trained on labelled images (``linear``, ``knn``)."""
    return name != "none" and bool(getattr(HEADS.factory(name), "needs_labels", False))


def create_head(name: str, config: dict, backbone=None) -> Head:
    """Build a registered head that needs no labels for a validated configuration.

    Args:
        name: the head's registered name.
        config: a validated configuration.
        backbone: the config's already built backbone, for a head that takes one (``pretrained``
            reads its classifier) instead of building it again.

    Raises:
        PluginError: for an unknown name, listing the known ones.
        ValueError: for a head that is trained on labels (the ``train_head`` rule builds it).
    """
    if needs_labels(name):
        raise ValueError(
            f"head {name!r} is trained on labelled images; set classify.labels and let the "
            "workflow's train_head rule build it"
        )
    factory = HEADS.factory(name)
    if backbone is not None and "backbone" in inspect.signature(factory).parameters:
        return factory(config, backbone=backbone)
    return factory(config)


def save_head(head: Head, path: str | Path) -> None:
    """Save a head's arrays, and the class that rebuilds it, to ``.npz`` (atomically).

    Example:
        >>> from snakembed.heads.linear import LinearHead
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "head.npz")
        >>> save_head(LinearHead(np.eye(2), np.zeros(2), ["a", "b"]), path)
        >>> load_head(path).categories
        ['a', 'b']
    """
    cls = type(head)
    save_npz(path, __class__=np.asarray(f"{cls.__module__}:{cls.__qualname__}"), **head.arrays())


def load_head(path: str | Path) -> Head:
    """Load a head saved by :func:`save_head`.

    The class named in the file is imported only from snakembed or from a distribution that
    registers ``snakembed.heads`` plugins, and nothing is unpickled.

    Raises:
        ValueError: naming the file, when it is not a head file or names another class.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        class_path = str(arrays.pop("__class__"))
    except Exception as exc:  # noqa: BLE001 - a missing, corrupt or foreign file
        raise ValueError(
            f"{path} is not a snakembed head file ({type(exc).__name__}: {exc}); delete it and "
            "run the workflow again to rebuild it"
        ) from exc
    module = class_path.partition(":")[0]
    allowed = {"snakembed"} | {ep.module.split(".")[0] for ep in entry_points(group=HEADS.group)}
    if module.split(".")[0] not in allowed:
        raise ValueError(
            f"{path} names the class {class_path!r}, which is not from snakembed or a package "
            f"that registers heads ({', '.join(sorted(allowed))}); refusing to import it"
        )
    cls = import_object(class_path)
    if not isinstance(cls, type) or not hasattr(cls, "from_arrays"):
        raise ValueError(f"{path} names {class_path!r}, which is not a head class")
    return cls.from_arrays(arrays)


def as_vectors(embeddings: np.ndarray) -> np.ndarray:
    """One float32 vector per image: ``[N, D]`` as it is, ``[N, H*W, D]`` maps averaged over
    their positions.

    Example:
        >>> as_vectors(np.ones((2, 4, 3))).shape
        (2, 3)
    """
    embeddings = np.asarray(embeddings, np.float32)
    return embeddings.mean(axis=1) if embeddings.ndim == 3 else embeddings


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
