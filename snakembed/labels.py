"""Labelled images for training heads: a CSV of ``path,label[,split]`` or a ``train/`` and
``val/`` tree of class folders (torchvision's ImageFolder convention)."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .buckets import root_path

__all__ = ["LabelError", "Labelled", "labels_from_config", "read_labels"]

#: The two splits: heads are fitted on ``train`` and their settings chosen on ``val``.
SPLITS = ("train", "val")


class LabelError(ValueError):
    """Labels that cannot be used; the message names the file and the fix."""


@dataclass
class Labelled:
    """Labelled images, one entry per image.

    Attributes:
        paths: the image files.
        labels: each image's class name.
        splits: each image's split, ``train`` or ``val``.
        source: where the labels came from (the CSV file or the tree), for messages.
    """

    paths: list[Path]
    labels: list[str]
    splits: list[str]
    source: str

    @property
    def categories(self) -> list[str]:
        """The class names, sorted (the order of a head's outputs)."""
        return sorted(set(self.labels))

    def count(self, split: str) -> int:
        """How many images ``split`` holds."""
        return sum(s == split for s in self.splits)


def read_labels(
    source: str | Path,
    images_root: str | Path,
    extensions: list[str],
    val_fraction: float = 0.2,
) -> Labelled:
    """Read labelled images and check that a head can be trained on them.

    Args:
        source: a CSV file (``path,label`` and an optional ``split`` column of ``train``/``val``;
            a header row is optional; relative paths are under ``images_root``), or a folder
            holding ``train/<class>/<image>`` and ``val/<class>/<image>``.
        images_root: where relative CSV paths point.
        extensions: the file endings that count as images (tree only).
        val_fraction: for a CSV without a split column, the share of images held out for
            validation, chosen by a hash of each path (the same every run).

    Returns:
        The labelled images.

    Raises:
        LabelError: naming the file and the fix: a missing source, a bad row, a missing image,
            fewer than two classes, an empty split, or a validation class unseen in training.

    Example:
        >>> read_labels("no/such.csv", ".", [".jpg"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        snakembed.labels.LabelError: classify.labels: 'no/such.csv' does not exist; ...
    """
    path = Path(source)
    if path.is_dir():
        labelled = _read_tree(path, extensions)
    elif path.is_file():
        labelled = _read_csv(path, root_path(images_root), val_fraction)
    else:
        raise LabelError(
            f"classify.labels: {str(source)!r} does not exist; give a CSV file of path,label "
            "rows or a folder with train/ and val/ class folders"
        )
    _check(labelled)
    return labelled


def labels_from_config(config: dict) -> Labelled:
    """The labelled images of a validated config's ``classify.labels`` (see
    :func:`read_labels`)."""
    settings = config["classify"]
    if settings["labels"] is None:
        raise LabelError(
            "classify.labels is not set; set it to a CSV of path,label rows or to a folder with "
            "train/ and val/ class folders"
        )
    return read_labels(
        settings["labels"], config["images"], config["extensions"], settings["val_fraction"]
    )


def _read_tree(root: Path, extensions: list[str]) -> Labelled:
    paths, labels, splits = [], [], []
    suffixes = tuple(e.lower() for e in extensions)
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise LabelError(
                f"classify.labels: {root} has no {split}/ folder; a labelled tree holds "
                "train/<class>/<image> and val/<class>/<image>"
            )
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for image in sorted(class_dir.iterdir()):
                name = image.name
                if not name.startswith(".") and name.lower().endswith(suffixes) and image.is_file():
                    paths.append(image)
                    labels.append(class_dir.name)
                    splits.append(split)
    return Labelled(paths, labels, splits, str(root))


def _read_csv(path: Path, images_root: Path, val_fraction: float) -> Labelled:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [row for row in csv.reader(fh) if any(cell.strip() for cell in row)]
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["path", "label"], ["image", "label"]):
        rows = rows[1:]
    paths, labels, splits = [], [], []
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
            raise LabelError(
                f"{path}: row {number} is {row!r}; each row must be `path,label` or "
                "`path,label,split`"
            )
        image = Path(cells[0])
        paths.append(image if image.is_absolute() else images_root / image)
        labels.append(cells[1])
        if len(cells) == 3:
            if cells[2] not in SPLITS:
                raise LabelError(
                    f"{path}: row {number} has split {cells[2]!r}; use train or val (or leave "
                    "the column out to hold out classify.val_fraction of the images)"
                )
            splits.append(cells[2])
        else:
            splits.append(_hashed_split(cells[0], val_fraction))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise LabelError(
            f"{path}: {len(missing)} labelled image(s) do not exist, for example "
            f"{', '.join(missing[:3])}; relative paths are read under the image root "
            f"{str(images_root)!r}; fix the paths or remove those rows"
        )
    return Labelled(paths, labels, splits, str(path))


def _hashed_split(name: str, val_fraction: float) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _check(labelled: Labelled) -> None:
    source = labelled.source
    for split in SPLITS:
        if labelled.count(split) == 0:
            raise LabelError(
                f"classify.labels: {source} has no {split} images; a head is fitted on train "
                "images and its settings are chosen on val images, so both are needed"
            )
    train = Counter(
        lab for lab, s in zip(labelled.labels, labelled.splits, strict=True) if s == "train"
    )
    if len(train) < 2:
        raise LabelError(
            f"classify.labels: {source} has {len(train)} class(es) among its train images; a "
            "classifier needs at least two"
        )
    unseen = sorted(set(labelled.labels) - set(train))
    if unseen:
        raise LabelError(
            f"classify.labels: {source} has val images of classes without train images "
            f"({', '.join(unseen[:5])}); add train images of them or remove those val images"
        )
