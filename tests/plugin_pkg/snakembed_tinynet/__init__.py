"""A third-party backbone: a tiny CNN with its own preprocessing and class names."""

import torch

from snakembed.backbones import NO_WEIGHTS, from_classifier, load_weights
from snakembed.images import Preprocess

CLASSES = ["circle", "square", "triangle", "star"]


def tinynet(weights="default"):
    """An 8-channel CNN; 8-d embeddings, 4 classes. ``weights``: ``none`` or a checkpoint."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, len(CLASSES)),
    )
    sha = None
    if weights not in NO_WEIGHTS and weights != "default":
        sha = load_weights(model, weights)
    preprocess = Preprocess(resize=36, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    label = "seed 7" if weights in (*NO_WEIGHTS, "default") else str(weights)
    return from_classifier(
        "tinynet", model, preprocess, label, weights_sha256=sha, categories=CLASSES
    )
