"""Embedding images: decode in worker processes, run the backbone in batches on its device.

The same functions serve the workflow's ``embed`` rule and the ``snakembed`` CLI, so an image
gets the same vector either way.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backbones import Backbone, backbone_from_config, is_local_weights, model_file_hashes
from .batches import DecodeCounts, Decoder, pillow_batches, tensor_batches
from .buckets import root_path
from .config import numbers_fingerprint, resolved
from .devices import Compute, compute_from_config, device_type
from .images import Preprocess
from .patches import PatchGrid

__all__ = [
    "Cancelled",
    "Embedder",
    "Embeddings",
    "autocast",
    "log_to_stderr",
    "embed_images",
    "load_backbone",
    "prepare_model",
    "resolve_device",
]

log = logging.getLogger("snakembed")


class Cancelled(Exception):
    """The work was called off (a worker's job has gone): nothing of it is kept."""


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
    #: How many of ``ids`` kept their earlier embeddings instead of being embedded again.
    reused: int = 0


def resolve_device(name: str = "auto"):
    """The torch device for a config's ``device:`` value.

    ``auto`` asks torch (never ``CUDA_VISIBLE_DEVICES`` alone): the first GPU when one is
    usable, else the CPU.

    Raises:
        ValueError: when the device is asked for but absent, naming the fix.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} asked for, but torch sees no GPU here; set device: cpu "
            "(snakembed embed and predict: --device cpu; a workflow: --config device=cpu; it "
            "resolves device: auto to cuda where it is planned when this machine has a GPU, or "
            "when the folder jobs ask a cluster for one: request a GPU node, or set device: cpu)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; set device: cpu")
    return device


def load_backbone(config: dict) -> Backbone:
    """The backbone of a validated config, with the config's preprocessing overrides applied."""
    backbone = backbone_from_config(config["model"])
    backbone.preprocess = backbone.preprocess.override(config["preprocess"])
    return backbone


def autocast(device, precision: str, *, cache: bool = True):
    """The autocast context of a concrete ``precision`` on ``device`` (a torch device or its
    type's name): none for fp32. ``cache``: keep the casts of weights (False to trace)."""
    import torch

    kind = getattr(device, "type", None) or device_type(str(device))
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        raise ValueError("precision: auto must be resolved first (see resolve_compute)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=kind, dtype=dtype, cache_enabled=cache)


def prepare_model(model, compute: Compute, size: int = 224):
    """A network made ready for inference as ``compute`` says: on its device, channels-last
    memory, and then

    - with ``compute.compile``: compiled with ``torch.compile`` (inductor);
    - else on the CPU in fp32 (with ``compute.optimize``): traced and frozen with TorchScript,
      with oneDNN's graph fusion, which folds batch norms into convolutions and fuses
      convolutions with what follows them (1.4x (ResNet-18) to 2.4x (EfficientNet-Lite0) faster
      than the network as usually run, here).

    bf16 on the CPU runs under autocast with its stem in fp32 (:func:`_stem_in_fp32`), compiled
    for large runs (:data:`snakembed.devices.COMPILE_MIN_IMAGES_CPU_BF16`), else as it is: its
    TorchScript trace, 1.0-1.8x faster, bakes bf16 into the folded batch norms and activations
    and agreed less with fp32 (default model, 30 real photos: minimum cosine 0.9910 against
    0.9985, median 0.9981 against 0.9997), where compiled it agrees as the network itself does.

    The traced network is checked against the network itself on other images and batch size;
    a network that cannot be traced, or whose trace differs, runs as it is.

    Args:
        model: the network (``backbone.model``).
        compute: the resolved setting (see :func:`snakembed.devices.resolve_compute`).
        size: the side of the images it will see, for the trace.

    Returns:
        The network to call: the traced or compiled one, or ``model`` itself on the device.

    Example:
        >>> import torch, torchvision
        >>> from snakembed.devices import resolve_compute
        >>> compute = resolve_compute("cpu", "fp32")
        >>> net = prepare_model(torchvision.models.resnet18(), compute, size=64)
        >>> net(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    import torch

    model = model.eval().to(compute.device).to(memory_format=torch.channels_last)
    if compute.precision == "bf16" and compute.device_type == "cpu":
        _stem_in_fp32(model)
    if compute.compile:
        return torch.compile(model, dynamic=False)
    if not compute.traced:
        return model
    try:
        return _traced(model, size)
    except Exception as exc:  # noqa: BLE001 - any network still runs as it is
        log.info("the network runs untraced (%s: %s)", type(exc).__name__, exc)
        return model


def _stem_in_fp32(model) -> None:
    """Run the network's stem in fp32 under bf16 autocast (in place, once): its first
    convolution, which sees the image at full resolution (where bf16's 8-bit mantissa loses most
    of its detail), and the depthwise convolutions right after it.

    Measured on 30 real photos with the default model (its stem convolution and one depthwise
    one): median cosine to fp32 0.99914 -> 0.99974, minimum 0.99583 -> 0.99852; they cost it
    about 8 % of its bf16 speed. A network's first dense convolution after the stem stays in
    bf16: for ResNet-18 it would cost another 10 % (73 -> 65 images/s) for agreement the stem
    alone already gives.
    """
    import torch

    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for i, conv in enumerate(convolutions):
        depthwise = conv.groups == conv.in_channels > 1
        if i and not depthwise:
            break
        if not getattr(conv, "_snakembed_fp32", False):
            conv.forward = _without_autocast(conv.forward)
            conv._snakembed_fp32 = True


def _without_autocast(forward):
    import torch

    def run(x):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float())

    return run


def _traced(model, size: int):
    """``model`` traced and frozen on the CPU with oneDNN's graph fusion; raises when the
    trace differs from the network."""
    import torch

    # oneDNN Graph (LLGA) fuses the frozen graph's convolutions with their activations and
    # additions: 1.1-1.4x over the frozen graph alone here (a new batch shape costs a fusion
    # pass of about 0.1-0.3 s, once). A setting of the process, which embeds only.
    torch.jit.enable_onednn_fusion(True)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, size, size, generator=generator)
    # Other images, another batch size, and the sample's negative, where a branch on the
    # input's values would take the other way.
    probes = [torch.randn(3, 3, size, size, generator=generator), -sample[:1]]
    channels_last = torch.channels_last
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the check below is what counts
        traced = torch.jit.freeze(
            torch.jit.trace(
                model, sample.contiguous(memory_format=channels_last), check_trace=False
            )
        )
        for probe in probes:
            probe = probe.contiguous(memory_format=channels_last)
            expected = model(probe)
            for _ in range(2):  # the first calls profile and optimise the frozen graph
                got = traced(probe)
            scale = float(expected.abs().max()) or 1.0
            same = got.shape == expected.shape and torch.allclose(
                got, expected, rtol=1e-3, atol=1e-4 * scale
            )
            if not same:
                raise ValueError("its trace gives other outputs than the network")
    return traced


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


class _Forward:
    """Runs the network on ``uint8`` batches of any length, in chunks of at most ``limit``.

    When the GPU runs out of memory, the chunk is halved and retried, and the smaller limit is
    kept for the rest of the run; only a single image that does not fit is an error. When a
    traced network fails on a batch, the network itself takes over.
    """

    def __init__(self, model, eager, preprocess: Preprocess, device, compute: Compute) -> None:
        self.model, self.preprocess, self.device = model, preprocess, device
        self.eager = eager if eager is not model else None
        self.precision = compute.precision
        self.limit = compute.batch_size

    def __call__(self, pixels) -> np.ndarray:
        outputs, start = [], 0
        while start < len(pixels):
            chunk = pixels[start : start + self.limit]
            try:
                outputs.append(self._run(chunk))
            except Exception as exc:
                if _is_out_of_memory(exc):
                    self._shrink(len(chunk), exc)
                elif self.eager is not None:
                    log.warning("the prepared network failed (%s); running it as it is", exc)
                    self.model, self.eager = self.eager, None
                else:
                    raise
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
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model(self.preprocess.normalize(pixels))
        return out.float().cpu().numpy()


class _Batcher:
    """Runs the network for several threads: each call waits for its rows, and the calls made
    while the network runs on one batch are joined into the next (one call per input shape,
    in chunks of the forward's batch size)."""

    def __init__(self, forward: _Forward) -> None:
        self.forward = forward
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.calls = 0  # network calls made, for the log and the tests
        threading.Thread(target=self._run, name="snakembed-network", daemon=True).start()

    @property
    def limit(self) -> int:
        return self.forward.limit

    def __call__(self, pixels) -> np.ndarray:
        done: Future = Future()
        self._queue.put((pixels, done))
        return done.result()

    def _run(self) -> None:
        while True:
            waiting = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    waiting.append(self._queue.get_nowait())
            shapes: dict[tuple, list] = {}
            for pixels, done in waiting:
                shapes.setdefault(tuple(pixels.shape[1:]), []).append((pixels, done))
            for group in shapes.values():
                self._run_group(group)

    def _run_group(self, group: list) -> None:
        import torch

        try:
            if len(group) == 1:
                outputs = [self.forward(group[0][0])]
            else:
                rows = self.forward(torch.cat([pixels for pixels, _ in group]))
                bounds = np.cumsum([0] + [len(pixels) for pixels, _ in group])
                outputs = [rows[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            self.calls += 1
        except BaseException as exc:  # noqa: BLE001 - each caller gets the error
            for _, done in group:
                done.set_exception(exc)
            return
        for (_, done), out in zip(group, outputs, strict=True):
            done.set_result(out)


class _Progress:
    """Logs a progress bar with images done, images/s and the time left, every few seconds:

    ``animals: [#########-----------]  45% 450/1000 images, 52.3 images/s, ETA 0:00:10``
    """

    _WIDTH = 20

    def __init__(self, total: int, label: str, every: float = 5.0) -> None:
        self.total, self.label, self.every = total, label, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            log.info("%s: %s", self.label, self.line(now - self.start))

    def line(self, seconds: float) -> str:
        """The progress after ``seconds``, as logged."""
        fraction = self.done / self.total if self.total else 1.0
        filled = round(fraction * self._WIDTH)
        rate = self.done / max(seconds, 1e-9)
        eta = _clock((self.total - self.done) / rate) if rate else "?"
        return (
            f"[{'#' * filled}{'-' * (self._WIDTH - filled)}] {fraction:4.0%} "
            f"{self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta}"
        )


def _clock(seconds: float) -> str:
    """``h:mm:ss``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Embedder:
    """A config's backbone made ready to embed images: built once, then used for every folder
    (an embed worker keeps one for all the folders it serves).

    Args:
        config: a validated configuration (model, preprocess, patches, batch_size, device,
            precision, optimize, max_pixels, threads).
        backbone: an already built backbone (default: built from ``config``).
        threads: CPU threads for decoding workers and the network (default: ``config``).

    Example:
        >>> from snakembed.config import load_config
        >>> embedder = Embedder(load_config())  # doctest: +SKIP
        >>> embedder(["demo/images/animals/chelsea.jpg"]).vectors.shape  # doctest: +SKIP
        (1, 1280)
    """

    def __init__(
        self,
        config: dict,
        backbone: Backbone | None = None,
        threads: int | None = None,
        device: str | None = None,
    ) -> None:
        import torch

        # device and precision as they will be used: what the files record and what decides
        # whether earlier embeddings may be reused
        config = resolved(config)
        self.config = config
        self.threads = threads or config["threads"]
        torch.set_num_threads(self.threads)
        #: How the numbers are computed, resolved once and passed down.
        self.compute = compute_from_config(config, device=device)
        self.device = resolve_device(self.compute.device)
        self.threaded = False
        self.batch_size = self.compute.batch_size
        self.backbone = backbone or load_backbone(config)
        patches = config["patches"]
        self.grid = None
        if patches["enabled"]:
            self.grid = PatchGrid(
                patches["size"], patches["stride"], patches["resize"], patches["border"]
            )
        eager = self.backbone.model
        model = prepare_model(eager, self.compute, self.backbone.preprocess.crop)
        self.forward = _Forward(model, eager, self.backbone.preprocess, self.device, self.compute)
        self.meta = _meta(self.backbone, config, self.compute)

    def share(self) -> None:
        """Let several threads embed at once (a shared worker's jobs): images are read in each
        caller's threads (no decoding processes), and what they submit while the network runs
        is joined into its next batch."""
        if not self.threaded:
            self.forward = _Batcher(self.forward)
            self.threaded = True

    def __call__(
        self,
        paths: Sequence[str | Path],
        *,
        ids: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        label: str = "embed",
        reuse: Embeddings | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Embeddings:
        """Embed image files, batch by batch.

        Args:
            paths: image files.
            ids: the id of each image (default: the file name).
            sources: the path to record for each image (default: as given).
            label: what progress lines start with.
            reuse: earlier embeddings of the same config; an image whose content (sha256) is
                among them is not decoded again.
            cancelled: asked before each batch; when it says so, :class:`Cancelled` is raised.

        Returns:
            The embeddings of the images that could be decoded, and the reasons of those that
            could not.
        """
        import torch

        paths = [root_path(p) for p in paths]  # a Path, or a BucketPath (s3://)
        ids = list(ids) if ids is not None else [p.name for p in paths]
        sources = list(sources) if sources is not None else [str(p) for p in paths]
        known = _Known(reuse)
        batch_size = self.batch_size
        decoder = Decoder(
            paths, self.backbone.preprocess, self.grid, self.config["max_pixels"], known.keys
        )
        counts = DecodeCounts()
        on_device = self.compute.decode == "torchvision"
        if on_device or self.threaded:
            batches = tensor_batches(
                decoder, batch_size, self.threads, self.device, counts, jpegs=on_device
            )
        else:
            workers = 0 if len(paths) <= batch_size or self.threads < 2 else min(self.threads, 16)
            batches = pillow_batches(decoder, batch_size, workers, self.device.type == "cuda")
        kept: list[dict] = []
        vectors: list[np.ndarray] = []
        patches: list[tuple[np.ndarray, np.ndarray]] = []
        failed: dict[str, str] = {}
        progress = _Progress(len(paths), label)
        for batch in batches:
            if cancelled is not None and cancelled():
                raise Cancelled(f"{label}: called off after {progress.done} of {len(paths)} images")
            good = []
            for item in batch["items"]:
                if "error" in item:
                    failed[ids[item["index"]]] = item["error"]
                    log.warning("%s: %s", sources[item["index"]], item["error"])
                else:
                    good.append(item)
            fresh = [item for item in good if "known" not in item]  # in batch["pixels"]
            computed = iter(())
            if fresh:
                computed = iter(self.forward(batch["pixels"]))
            if fresh and self.grid is not None:
                cut = torch.from_numpy(np.concatenate([it["patches"] for it in fresh]))
                patch_rows = self.forward(cut)
                bounds = np.cumsum([0] + [len(it["boxes"]) for it in fresh])
                for it, lo, hi in zip(fresh, bounds[:-1], bounds[1:], strict=True):
                    it["patch_vectors"] = patch_rows[lo:hi]
            for item in good:
                if "known" in item:
                    known.fill(item)
                else:
                    item["vector"] = next(computed)
            if good:
                vectors.append(np.stack([it["vector"] for it in good]))
                if self.grid is not None:
                    patches.extend((it["patch_vectors"], it["boxes"]) for it in good)
            kept.extend(
                {k: v for k, v in it.items() if k in ("index", "sha256", "width", "height")}
                for it in good
            )
            progress.update(len(batch["items"]))
        if counts.device:
            log.info(
                "%s: %d images decoded on %s, %d by Pillow",
                label,
                counts.device,
                self.device,
                counts.pillow,
            )

        empty = np.zeros((0, *_row_shape(self.backbone)), np.float32)
        result = Embeddings(
            ids=[ids[it["index"]] for it in kept],
            sources=[sources[it["index"]] for it in kept],
            sha256=[it["sha256"] for it in kept],
            width=np.array([it["width"] for it in kept], np.int64),
            height=np.array([it["height"] for it in kept], np.int64),
            vectors=np.concatenate(vectors) if vectors else empty,
            failed=failed,
            meta=dict(self.meta),
            reused=known.used,
        )
        if self.grid is not None:
            result.patch_counts = np.array([len(b) for _, b in patches], np.int64)
            result.patch_boxes = (
                np.concatenate([b for _, b in patches]) if patches else np.zeros((0, 4), np.int64)
            )
            result.patch_vectors = np.concatenate([v for v, _ in patches]) if patches else empty
        return result


class _Known:
    """Earlier embeddings by image content (sha256), to reuse instead of decoding again."""

    def __init__(self, earlier: Embeddings | None) -> None:
        self.earlier = earlier
        self.rows = {sha: i for i, sha in enumerate(earlier.sha256)} if earlier else {}
        self.keys = frozenset(self.rows)
        self.offsets = None
        if earlier is not None and earlier.patch_counts is not None:
            self.offsets = np.concatenate([[0], np.cumsum(earlier.patch_counts)])
        self.used = 0

    def fill(self, item: dict) -> None:
        """Give a known item its earlier vector, size and patches."""
        row, earlier = self.rows[item["sha256"]], self.earlier
        item.update(
            vector=earlier.vectors[row],
            width=int(earlier.width[row]),
            height=int(earlier.height[row]),
        )
        if self.offsets is not None:
            lo, hi = self.offsets[row], self.offsets[row + 1]
            item["patch_vectors"] = earlier.patch_vectors[lo:hi]
            item["boxes"] = earlier.patch_boxes[lo:hi]
        self.used += 1


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
    """Embed image files with the config's backbone, batch by batch (see :class:`Embedder`,
    which keeps the prepared network for further calls).

    Args:
        paths: image files.
        config: a validated configuration (model, preprocess, patches, batch_size, device,
            precision, optimize).
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
    embedder = Embedder(config, backbone=backbone, threads=threads)
    return embedder(paths, ids=ids, sources=sources, label=label)


def _row_shape(backbone: Backbone) -> tuple[int, ...]:
    """The shape of one image's embedding: ``[D]``, or ``[positions, D]`` with ``pool: none``
    (positions unknown without an image: 0)."""
    return (0, backbone.embedding_dim) if backbone.pool == "none" else (backbone.embedding_dim,)


def _meta(backbone: Backbone, config: dict, compute: Compute) -> dict:
    """What a folder file records of how its numbers were made (``config``: resolved)."""
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
        "device": device_type(config["device"]),
        "precision": config["precision"],
        "decode": config["decode"],
        # compiled and eager bf16 differ by bf16's rounding (cosine >= 0.9998): never mixed
        "compiled": int(compute.compile),
        "config_hash": numbers_fingerprint(config)["hash"],
        # a custom network's source file, by content (its code changes the numbers)
        "module_sha256": model_file_hashes(config["model"])["module_sha256"] or "",
        "settings": _settings(config),
    }


def _settings(config: dict) -> dict:
    """The config's keys that make the numbers, as a folder file records them (a checkpoint's
    path made absolute), so that single images can be embedded as the run embedded them."""
    model = dict(config["model"])
    if is_local_weights(model["weights"]):
        model["weights"] = str(Path(model["weights"]).resolve())
    keys = ("preprocess", "patches", "max_pixels", "precision", "decode")
    return {
        "model": model,
        **{key: config[key] for key in keys},
        "device": device_type(config["device"]),
    }


def log_to_stderr() -> None:
    """Send snakembed's progress lines to stderr (a rule's log file)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
