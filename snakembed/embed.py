"""Embedding images: decode in worker processes, run the backbone in batches on its device.

The same functions serve the workflow's ``embed`` rule and the ``snakembed`` CLI, so an image
gets the same vector either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._files import save_npz
from .backbones import Backbone, backbone_from_config
from .config import numbers_fingerprint
from .images import ImageError, Preprocess, read_image
from .patches import PatchGrid

__all__ = [
    "Embeddings",
    "autocast",
    "log_to_stderr",
    "embed_folder",
    "embed_images",
    "load_backbone",
    "resolve_device",
    "save_embeddings",
    "load_embeddings",
]

log = logging.getLogger("snakembed")


@dataclass
class Embeddings:
    """The embeddings of a set of images, row ``i`` for ``ids[i]``.

    Images that failed are not in ``ids``; they are in ``failed`` with their reasons.
    """

    ids: list[str]
    sources: list[str]
    sha256: list[str]
    width: np.ndarray
    height: np.ndarray
    vectors: np.ndarray
    failed: dict[str, str] = field(default_factory=dict)
    patch_vectors: np.ndarray | None = None
    patch_boxes: np.ndarray | None = None
    patch_counts: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def resolve_device(name: str = "auto"):
    """The torch device for a config's ``device:`` value.

    ``auto`` asks torch (never ``CUDA_VISIBLE_DEVICES``): the first GPU when one is usable,
    else the CPU.

    Raises:
        ValueError: when the device is asked for but absent, naming the fix.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} asked for, but torch sees no GPU; set device: auto or cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; set device: auto")
    return device


def load_backbone(config: dict) -> Backbone:
    """The backbone of a validated config, with the config's preprocessing overrides applied."""
    backbone = backbone_from_config(config["model"])
    backbone.preprocess = backbone.preprocess.override(config["preprocess"])
    return backbone


def autocast(device, precision: str):
    """The autocast context of a config's ``precision`` (``auto``: bf16 on a GPU, else fp32)."""
    import torch

    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Decoder:
    """Reads one image into the network's pixels (and patches); runs in DataLoader workers."""

    def __init__(
        self,
        paths: Sequence[Path],
        preprocess: Preprocess,
        grid: PatchGrid | None,
        max_pixels: int | None,
    ):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.grid = grid
        self.max_pixels = max_pixels
        # JPEG draft mode may shrink an image while it stays twice as large as what needs it.
        self.min_side = preprocess.resize if preprocess.draft else None
        if self.min_side and grid is not None:
            self.min_side = max(self.min_side, grid.resize) if grid.resize else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        item: dict = {"index": index}
        try:
            decoded = read_image(path, self.min_side, self.max_pixels)
            item.update(sha256=decoded.sha256, width=decoded.width, height=decoded.height)
            item["pixels"] = self.preprocess.pixels(decoded.image)
            if self.grid is not None:
                item["patches"], item["boxes"] = self.grid.cut(
                    decoded.image, decoded.width, decoded.height
                )
        except ImageError as exc:
            item["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the folder
            item["error"] = f"cannot preprocess image: {type(exc).__name__}: {exc}"
        return item


def _as_list(batch: list) -> list:
    return batch


def _batches(decoder: _Decoder, batch_size: int, workers: int, pin: bool) -> Iterator[list[dict]]:
    if workers == 0:
        for start in range(0, len(decoder), batch_size):
            yield [decoder[i] for i in range(start, min(start + batch_size, len(decoder)))]
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(
        decoder,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_as_list,
        pin_memory=pin,
        prefetch_factor=4,
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


class _Forward:
    """Runs the network on ``uint8`` batches of any length, in chunks of at most ``limit``.

    When the GPU runs out of memory, the chunk is halved and retried, and the smaller limit is
    kept for the rest of the run; only a single image that does not fit is an error.
    """

    def __init__(self, model, preprocess: Preprocess, device, precision: str, limit: int):
        self.model, self.preprocess, self.device = model, preprocess, device
        self.precision = precision
        self.limit = limit

    def __call__(self, pixels) -> np.ndarray:
        outputs, start = [], 0
        while start < len(pixels):
            chunk = pixels[start : start + self.limit]
            try:
                outputs.append(self._run(chunk))
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                self._shrink(len(chunk), exc)
                continue
            start += len(chunk)
        return np.concatenate(outputs)

    def _shrink(self, size: int, exc: BaseException) -> None:
        import torch

        if size <= 1:
            raise RuntimeError(
                f"{self.device} ran out of memory on a single image ({exc}); lower "
                "preprocess.resize and preprocess.crop, use a smaller model, or set device: cpu"
            ) from exc
        self.limit = max(1, size // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning(
            "%s out of memory with %d images per batch; retrying with %d (set batch_size: %d "
            "to start there)",
            self.device,
            size,
            self.limit,
            self.limit,
        )

    def _run(self, pixels) -> np.ndarray:
        import torch

        pixels = pixels.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model(self.preprocess.normalize(pixels))
        return out.float().cpu().numpy()


class _Progress:
    """Logs images done, images/s and the time left, every few seconds."""

    def __init__(self, total: int, label: str, every: float = 5.0) -> None:
        self.total, self.label, self.every = total, label, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info(
                "%s: %d/%d images, %.1f images/s, %.0f s left",
                self.label,
                self.done,
                self.total,
                rate,
                eta,
            )


def embed_images(
    paths: Sequence[str | Path],
    config: dict,
    *,
    ids: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    backbone: Backbone | None = None,
    threads: int | None = None,
    label: str = "embed",
) -> Embeddings:
    """Embed image files with the config's backbone, batch by batch.

    Args:
        paths: image files.
        config: a validated configuration (model, preprocess, patches, batch_size, device,
            precision).
        ids: the id of each image (default: the file name).
        sources: the path to record for each image (default: as given).
        backbone: an already built backbone (default: built from ``config``).
        threads: CPU threads for decoding workers and the network (default: ``config``).
        label: what progress lines start with.

    Returns:
        The embeddings of the images that could be decoded, and the reasons of those that
        could not.

    Example:
        >>> from snakembed.config import load_config
        >>> e = embed_images(["demo/images/animals/chelsea.jpg"], load_config())  # doctest: +SKIP
        >>> e.vectors.shape  # doctest: +SKIP
        (1, 1280)
    """
    import torch

    paths = [Path(p) for p in paths]
    ids = list(ids) if ids is not None else [p.name for p in paths]
    sources = list(sources) if sources is not None else [str(p) for p in paths]
    threads = threads or config["threads"]
    torch.set_num_threads(threads)
    backbone = backbone or load_backbone(config)
    device = resolve_device(config["device"])
    model = backbone.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    patches = config["patches"]
    grid = None
    if patches["enabled"]:
        grid = PatchGrid(patches["size"], patches["stride"], patches["resize"], patches["border"])
    batch_size = config["batch_size"]
    decoder = _Decoder(paths, backbone.preprocess, grid, config["max_pixels"])
    workers = 0 if len(paths) <= batch_size or threads < 2 else min(threads, 16)

    forward = _Forward(model, backbone.preprocess, device, config["precision"], batch_size)
    kept: list[dict] = []
    vectors: list[np.ndarray] = []
    patch_vectors: list[np.ndarray] = []
    failed: dict[str, str] = {}
    progress = _Progress(len(paths), label)
    for batch in _batches(decoder, batch_size, workers, pin=device.type == "cuda"):
        good = []
        for item in batch:
            if "error" in item:
                failed[ids[item["index"]]] = item["error"]
                log.warning("%s: %s", sources[item["index"]], item["error"])
            else:
                good.append(item)
        if good:
            vectors.append(forward(torch.stack([it["pixels"] for it in good])))
            if grid is not None:
                cut = np.concatenate([it["patches"] for it in good])
                patch_vectors.append(forward(torch.from_numpy(cut)))
            kept.extend(
                {k: v for k, v in it.items() if k not in ("pixels", "patches")} for it in good
            )
        progress.update(len(batch))

    empty = np.zeros((0, *_row_shape(backbone)), np.float32)
    result = Embeddings(
        ids=[ids[it["index"]] for it in kept],
        sources=[sources[it["index"]] for it in kept],
        sha256=[it["sha256"] for it in kept],
        width=np.array([it["width"] for it in kept], np.int64),
        height=np.array([it["height"] for it in kept], np.int64),
        vectors=np.concatenate(vectors) if vectors else empty,
        failed=failed,
        meta=_meta(backbone, config),
    )
    if grid is not None:
        result.patch_counts = np.array([len(it["boxes"]) for it in kept], np.int64)
        result.patch_boxes = (
            np.concatenate([it["boxes"] for it in kept]) if kept else np.zeros((0, 4), np.int64)
        )
        result.patch_vectors = np.concatenate(patch_vectors) if patch_vectors else empty
    return result


def _row_shape(backbone: Backbone) -> tuple[int, ...]:
    """The shape of one image's embedding: ``[D]``, or ``[positions, D]`` with ``pool: none``
    (positions unknown without an image: 0)."""
    return (0, backbone.embedding_dim) if backbone.pool == "none" else (backbone.embedding_dim,)


def _meta(backbone: Backbone, config: dict) -> dict:
    patches = config["patches"]
    return {
        "model": backbone.name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256 or "",
        "layer": backbone.layer,
        "pool": backbone.pool,
        "embedding_dim": backbone.embedding_dim,
        "preprocess": backbone.preprocess.to_dict(),
        "patches": {k: v for k, v in patches.items() if k != "enabled"}
        if patches["enabled"]
        else None,
        "precision": config["precision"],
        "config_hash": numbers_fingerprint(config)["hash"],
    }


_ARRAYS = ("ids", "sources", "sha256", "width", "height", "vectors")
_PATCH_ARRAYS = ("patch_vectors", "patch_boxes", "patch_counts")


def save_embeddings(embeddings: Embeddings, path: str | Path) -> None:
    """Write embeddings to an ``.npz`` file, atomically (temporary name, then rename)."""
    arrays = {name: np.asarray(getattr(embeddings, name)) for name in _ARRAYS}
    for name in _PATCH_ARRAYS:
        if getattr(embeddings, name) is not None:
            arrays[name] = getattr(embeddings, name)
    arrays["failed"] = np.asarray(json.dumps(embeddings.failed))
    arrays["meta"] = np.asarray(json.dumps(embeddings.meta))
    save_npz(path, **arrays)


def load_embeddings(path: str | Path) -> Embeddings:
    """Read what :func:`save_embeddings` wrote."""
    with np.load(path, allow_pickle=False) as data:
        fields = {name: data[name] for name in _ARRAYS}
        for name in ("ids", "sources", "sha256"):
            fields[name] = [str(v) for v in fields[name]]
        for name in _PATCH_ARRAYS:
            fields[name] = data.get(name)
        return Embeddings(
            **fields,
            failed=json.loads(str(data["failed"])),
            meta=json.loads(str(data["meta"])),
        )


def embed_folder(
    images_root: str | Path,
    folder: str,
    names: Sequence[str],
    output: str | Path,
    config: dict,
    threads: int | None = None,
    refused: dict[str, str] | None = None,
    backbone: Backbone | None = None,
) -> Embeddings:
    """Embed one image folder and save the result for the classify and store steps.

    Args:
        images_root: the image root.
        folder: the folder's key (its path relative to the root, ``.`` for the root itself).
        names: the folder's image file names.
        output: the ``.npz`` file to write.
        config: a validated configuration.
        threads: CPU threads for this job.
        refused: ``{name: reason}`` for images that discovery refused to read; they are
            recorded as failed.
        backbone: an already built backbone of ``config`` (a worker's).

    Returns:
        The folder's embeddings.
    """
    log_to_stderr()
    refused = dict(refused or {})
    readable = [name for name in names if name not in refused]
    directory = Path(images_root) / folder
    start = time.monotonic()
    result = embed_images(
        [directory / n for n in readable],
        config,
        ids=readable,
        sources=[name if folder == "." else f"{folder}/{name}" for name in readable],
        threads=threads,
        label=folder,
        backbone=backbone,
    )
    for name, reason in refused.items():
        log.warning("%s: %s", name if folder == "." else f"{folder}/{name}", reason)
    result.failed = dict(sorted({**refused, **result.failed}.items()))
    save_embeddings(result, output)
    seconds = time.monotonic() - start
    log.info(
        "%s: %d images embedded, %d failed, in %.1f s (%.1f images/s)",
        folder,
        len(result.ids),
        len(result.failed),
        seconds,
        len(names) / max(seconds, 1e-9),
    )
    return result


def log_to_stderr() -> None:
    """Send snakembed's progress lines to stderr (a rule's log file)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
