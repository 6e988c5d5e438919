"""Fine-tuning a whole backbone on labelled images (the workflow's optional ``finetune`` rule).

The network is the config's model with a new final layer for the labelled classes. Training
uses random resized crops and horizontal flips, AdamW with a one-epoch warm-up and a cosine
decay, and stops early when the validation loss has not improved for ``patience`` epochs. The
best epoch's weights are written as ``.safetensors`` with the class names in its metadata, so
``model.weights`` can point at the file and the ``pretrained`` head then predicts those classes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ._files import atomic_path
from .backbones import Backbone, backbone_from_config
from .config import resolved
from .devices import compute_from_config
from .embed import autocast, log_to_stderr, resolve_device
from .images import ImageError, Preprocess, read_image
from .labels import labels_from_config

__all__ = ["finetune"]

log = logging.getLogger("snakembed")


class _Images(torch.utils.data.Dataset):
    """Labelled images as ``uint8`` tensors: augmented for training, centre-cropped for val."""

    def __init__(self, paths, targets, preprocess: Preprocess, train: bool, max_pixels):
        from torchvision.transforms import v2

        self.paths, self.targets = list(paths), list(targets)
        self.preprocess, self.train, self.max_pixels = preprocess, train, max_pixels
        mode = v2.InterpolationMode(preprocess.interpolation)
        self.augment = v2.Compose(
            [
                v2.RandomResizedCrop(preprocess.crop, interpolation=mode, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.PILToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.paths[index], max_pixels=self.max_pixels).image
            pixels = self.augment(image) if self.train else self.preprocess.pixels(image)
        except ImageError as exc:
            return index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop training
            return index, None, f"cannot preprocess image: {type(exc).__name__}: {exc}"
        return index, pixels, self.targets[index]


def _collate(items):
    good = [(i, p, t) for i, p, t in items if p is not None]
    bad = {i: reason for i, p, reason in items if p is None}
    if not good:
        return None, None, bad
    pixels = torch.stack([p for _, p, _ in good])
    return pixels, torch.tensor([t for _, _, t in good]), bad


def _network(config: dict, categories: list[str]) -> tuple[Backbone, torch.nn.Module]:
    """The config's model, from ``finetune.weights``, with a final layer for ``categories``."""
    settings = {**config["model"], "weights": config["finetune"]["weights"]}
    backbone = backbone_from_config({**settings, "layer": "pre_logits", "pool": "avg"})
    if backbone.classifier_name is None:
        raise ValueError(
            f"model {backbone.name!r} has no final linear layer to replace; fine-tuning needs "
            "a classifier network"
        )
    backbone.preprocess = backbone.preprocess.override(config["preprocess"])
    network = backbone.model
    torch.manual_seed(0)
    head = torch.nn.Linear(backbone.embedding_dim, len(categories))
    network.set_submodule(backbone.classifier_name, head)
    return backbone, network


def finetune(
    config: dict,
    checkpoint: str | Path,
    history: str | Path,
    threads: int | None = None,
) -> dict:
    """Fine-tune the config's backbone on ``classify.labels`` and save the best weights.

    Args:
        config: a validated configuration (``model``, ``finetune``, ``classify.labels``,
            ``preprocess``, ``device``, ``precision``).
        checkpoint: the ``.safetensors`` file to write.
        history: a JSON file: every epoch's losses, validation accuracy and learning rate, the
            best epoch, why training stopped, and the images that could not be read.
        threads: CPU threads for image decoding and the CPU network.

    Returns:
        The history.
    """
    log_to_stderr()
    settings = config["finetune"]
    threads = threads or config["threads"]
    torch.set_num_threads(threads)
    labelled = labels_from_config(config)
    categories = labelled.categories
    backbone, network = _network(config, categories)
    loaders = _loaders(labelled, backbone.preprocess, config, threads)
    compute = compute_from_config(resolved(config))
    device = resolve_device(compute.device)
    network.to(device)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"]
    )
    steps_per_epoch = max(1, len(loaders["train"]))
    total = settings["epochs"] * steps_per_epoch
    if settings["max_steps"]:
        total = min(total, settings["max_steps"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps_per_epoch, total))
    run = _Run(network, backbone.preprocess, device, compute.precision)
    epochs, best, stopped = [], None, "epochs"
    for epoch in range(1, settings["epochs"] + 1):
        start = time.monotonic()
        losses = run.train(loaders["train"], optimizer, schedule, limit=total)
        val_loss, val_accuracy = run.evaluate(loaders["val"])
        epochs.append(
            {
                "epoch": epoch,
                "steps": run.steps,
                "train_loss": float(np.mean(losses)) if losses else None,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": float(schedule.get_last_lr()[0]),
                "seconds": round(time.monotonic() - start, 2),
            }
        )
        log.info("epoch %d: %s", epoch, json.dumps(epochs[-1]))
        if best is None or val_loss < best[0]:
            state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
            best = (val_loss, epoch, state)
        elif epoch - best[1] >= settings["patience"]:
            stopped = f"no lower val loss for {settings['patience']} epochs"
            break
        if run.steps >= total:
            stopped = "max_steps" if total == settings["max_steps"] else "epochs"
            break
    best_loss, best_epoch, state = best
    result = {
        "model": backbone.name,
        "base_weights": backbone.weights,
        "categories": categories,
        "best_epoch": best_epoch,
        "best_val_loss": best_loss,
        "stopped": stopped,
        "epochs": epochs,
        "failed": run.failed,
    }
    _save(state, checkpoint, categories, backbone)
    with atomic_path(history) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def _loaders(labelled, preprocess: Preprocess, config: dict, threads: int) -> dict:
    """A shuffled, augmented loader of the train split and a plain one of the val split."""
    index = {c: i for i, c in enumerate(labelled.categories)}
    loaders = {}
    for split in ("train", "val"):
        rows = [i for i, s in enumerate(labelled.splits) if s == split]
        dataset = _Images(
            [labelled.paths[i] for i in rows],
            [index[labelled.labels[i]] for i in rows],
            preprocess,
            train=split == "train",
            max_pixels=config["max_pixels"],
        )
        loaders[split] = torch.utils.data.DataLoader(
            dataset,
            batch_size=config["finetune"]["batch_size"],
            shuffle=split == "train",
            num_workers=min(threads, 8) if threads > 1 else 0,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(0),
        )
    return loaders


class _Run:
    """Training steps and evaluations of one network, counting steps and unreadable images."""

    def __init__(self, network, preprocess: Preprocess, device, precision: str) -> None:
        self.network, self.preprocess = network, preprocess
        self.device, self.precision = device, precision
        self.steps = 0
        self.failed: dict[str, str] = {}

    def _batches(self, loader):
        for pixels, target, bad in loader:
            self.failed.update({str(loader.dataset.paths[i]): r for i, r in bad.items()})
            if pixels is not None:
                yield pixels, target.to(self.device)

    def _logits(self, pixels):
        with autocast(self.device, self.precision):
            return self.network(self.preprocess.normalize(pixels.to(self.device))).float()

    def train(self, loader, optimizer, schedule, limit: int) -> list[float]:
        """One epoch, or until ``limit`` steps in all; the loss of every step."""
        self.network.train()
        losses = []
        for pixels, target in self._batches(loader):
            loss = torch.nn.functional.cross_entropy(self._logits(pixels), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            self.steps += 1
            if self.steps >= limit:
                break
        return losses

    def evaluate(self, loader) -> tuple[float, float]:
        """The mean loss and the accuracy on ``loader``'s images."""
        self.network.eval()
        loss_sum, hits, count = 0.0, 0, 0
        with torch.inference_mode():
            for pixels, target in self._batches(loader):
                logits = self._logits(pixels)
                loss_sum += float(
                    torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                )
                hits += int((logits.argmax(dim=1) == target).sum())
                count += len(target)
        if count == 0:
            raise ValueError("no val image could be read; see the failed images in the log")
        return loss_sum / count, hits / count


def _warmup_cosine(warmup: int, total: int):
    """A learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine to zero."""

    def factor(step: int) -> float:
        if step < warmup and warmup < total:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))

    return factor


def _save(state: dict, path: str | Path, categories: list[str], backbone: Backbone) -> None:
    from safetensors.torch import save_file

    metadata = {
        "categories": json.dumps(categories, ensure_ascii=False),
        "model": backbone.name,
        "base_weights": backbone.weights,
    }
    # Tensors that share memory (tied weights) must be separate copies in a safetensors file.
    state = {k: v.contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
