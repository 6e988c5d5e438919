"""A small labelled tree that a linear classifier can separate: noisy images of three hues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: Each class's base colour (RGB).
HUES = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 50, 40)}


def make_labelled_tree(root: Path, train: int = 10, val: int = 6) -> dict[str, dict[str, str]]:
    """``root/{train,val}/{class}/{i}.png``: each image its class's colour, varied in
    brightness, with noise and a random size.

    Returns:
        ``{split: {path relative to root: class}}``.
    """
    rng = np.random.default_rng(0)
    truth: dict[str, dict[str, str]] = {"train": {}, "val": {}}
    for split, count in (("train", train), ("val", val)):
        for label, hue in HUES.items():
            for i in range(count):
                w, h = (int(v) for v in rng.integers(48, 96, size=2))
                brightness = rng.uniform(0.6, 1.2)
                noise = rng.normal(0, 25, size=(h, w, 3))
                pixels = np.clip(np.array(hue) * brightness + noise, 0, 255).astype(np.uint8)
                path = root / split / label / f"{label}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, "RGB").save(path)
                truth[split][f"{split}/{label}/{path.name}"] = label
    return truth
