"""Training heads on labelled images: embed them, fit the head, measure it on the val split.

The workflow's ``embed_labels`` rule runs :func:`embed_labelled` and its ``train_head`` rule
runs :func:`train_head`, which writes the head, a metrics file and a confusion-matrix plot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ._files import atomic_path, save_npz
from .embed import embed_images
from .heads import HEADS, TrainingData, as_vectors, save_head
from .labels import labels_from_config

__all__ = ["classification_metrics", "embed_labelled", "plot_confusion", "train_head"]

log = logging.getLogger("snakembed")


def embed_labelled(config: dict, output: str | Path, threads: int | None = None) -> None:
    """Embed the labelled images of ``classify.labels`` with the config's backbone.

    Images that cannot be read are left out of training and listed, with their reasons, in
    the output and then in the metrics file.

    Args:
        config: a validated configuration.
        output: the ``.npz`` to write: ``ids`` (paths), ``vectors``, ``labels``, ``splits``,
            ``failed`` (JSON).
        threads: CPU threads for decoding and the network.
    """
    labelled = labels_from_config(config)
    ids = [str(p) for p in labelled.paths]
    result = embed_images(labelled.paths, config, ids=ids, threads=threads, label="labels")
    row = {image: i for i, image in enumerate(ids)}
    kept = [row[image] for image in result.ids]
    save_npz(
        output,
        ids=np.asarray(result.ids, dtype=str),
        vectors=as_vectors(result.vectors),
        labels=np.asarray([labelled.labels[i] for i in kept], dtype=str),
        splits=np.asarray([labelled.splits[i] for i in kept], dtype=str),
        categories=np.asarray(labelled.categories, dtype=str),
        failed=np.asarray(json.dumps(result.failed, ensure_ascii=False)),
    )


def train_head(
    embeddings: str | Path,
    config: dict,
    head_path: str | Path,
    metrics_path: str | Path,
    plot_path: str | Path,
) -> dict:
    """Fit the config's trainable head on the train split and measure it on the val split.

    Args:
        embeddings: what :func:`embed_labelled` wrote.
        config: a validated configuration; ``classify.head`` names the head.
        head_path: the head file, read by every folder's job.
        metrics_path: a JSON file: accuracy, per-class precision, recall, F1 and support,
            macro averages, the confusion matrix, the chosen settings and every trial, the
            predicted label of every val image, and the images that could not be read.
        plot_path: the confusion matrix as a PNG (its counts are also in the PNG's text).

    Returns:
        The metrics.
    """
    name = config["classify"]["head"]
    data, ids, failed = _training_data(embeddings)
    log.info(
        "training head %s on %d images, choosing its settings on %d (%d classes)",
        name,
        len(data.train_y),
        len(data.val_y),
        len(data.categories),
    )
    trained = HEADS.factory(name)(config, data)
    predicted = trained.head.predict(data.val_x).argmax(axis=1)
    metrics = classification_metrics(data.val_y, predicted, data.categories)
    metrics.update(
        head=name,
        settings=trained.settings,
        trials=trained.trials,
        train_images=int(len(data.train_y)),
        val_predictions={
            image: data.categories[p] for image, p in zip(ids, predicted, strict=True)
        },
        failed=failed,
    )
    save_head(trained.head, head_path)
    with atomic_path(metrics_path) as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")
    plot_confusion(metrics["confusion"], data.categories, plot_path, title=_title(metrics))
    log.info(
        "%s: val accuracy %.4f, macro F1 %.4f", name, metrics["accuracy"], metrics["macro"]["f1"]
    )
    return metrics


def _training_data(path: str | Path) -> tuple[TrainingData, list[str], dict[str, str]]:
    """The train and val splits of :func:`embed_labelled`'s output, and the val image ids."""
    with np.load(path, allow_pickle=False) as data:
        ids = [str(v) for v in data["ids"]]
        vectors, labels, splits = data["vectors"], data["labels"], data["splits"]
        categories = [str(c) for c in data["categories"]]
        failed = json.loads(str(data["failed"]))
    index = {c: i for i, c in enumerate(categories)}
    y = np.array([index[str(label)] for label in labels], np.int64)
    train, val = splits == "train", splits == "val"
    if not val.any() or len(set(y[train])) < 2:
        raise ValueError(
            f"{path}: after leaving out {len(failed)} unreadable image(s) there are "
            f"{int(train.sum())} train images of {len(set(y[train]))} class(es) and "
            f"{int(val.sum())} val images; a head needs two classes to train and val images "
            "to measure; fix or replace the unreadable images"
        )
    data = TrainingData(categories, vectors[train], y[train], vectors[val], y[val])
    return data, [i for i, v in zip(ids, val, strict=True) if v], failed


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, categories: list[str]) -> dict:
    """Accuracy, per-class precision, recall, F1 and support, macro averages, and the
    confusion matrix (rows: true class, columns: predicted class).

    Example:
        >>> m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b"])
        >>> m["accuracy"], m["confusion"], round(m["per_class"]["b"]["precision"], 3)
        (0.75, [[1, 1], [0, 2]], 0.667)
    """
    classes = len(categories)
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (np.asarray(truth), np.asarray(predicted)), 1)
    hits = np.diag(confusion).astype(float)
    support, claimed = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(hits, claimed, out=np.zeros(classes), where=claimed > 0)
    recall = np.divide(hits, support, out=np.zeros(classes), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros(classes), where=total > 0)
    present = support > 0  # macro averages over the classes that the val split holds
    return {
        "accuracy": float(hits.sum() / max(confusion.sum(), 1)),
        "val_images": int(confusion.sum()),
        "macro": {
            "precision": float(precision[present].mean()),
            "recall": float(recall[present].mean()),
            "f1": float(f1[present].mean()),
        },
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(categories)
        },
        "categories": list(categories),
        "confusion": confusion.tolist(),
    }


def _title(metrics: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in metrics["settings"].items())
    return (
        f"{metrics['head']} ({settings}): accuracy {metrics['accuracy']:.3f}, "
        f"macro F1 {metrics['macro']['f1']:.3f} on {metrics['val_images']} val images"
    )


def plot_confusion(
    confusion: list[list[int]], categories: list[str], path: str | Path, title: str = ""
) -> None:
    """Draw a confusion matrix (true class down, predicted class across) to a PNG.

    The counts are also written into the PNG's text chunk ``confusion`` (JSON), so the picture
    can be checked against the metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    side = max(4.0, 0.45 * len(categories) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(categories))
    ax.set_xticks(ticks, labels=categories, rotation=90 if len(categories) > 6 else 0)
    ax.set_yticks(ticks, labels=categories)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    if len(categories) <= 30:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            colour = "white" if count > threshold else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    fig.tight_layout()
    metadata = {"confusion": json.dumps(matrix.tolist()), "categories": json.dumps(categories)}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=metadata)
    plt.close(fig)
