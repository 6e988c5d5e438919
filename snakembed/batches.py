"""Where the network's batches come from: image files made into ``uint8`` pixel batches.

Two ways, chosen by the config's ``decode`` (see :func:`snakembed.devices.resolve_decode`):

- ``pillow``: each image is read, decoded by Pillow (JPEG draft scaling for large photos),
  resized and cropped in DataLoader worker processes, and the batch stacked there. What the
  CPU does best.
- ``torchvision``: a thread pool reads and hashes the files and reads their headers; the JPEGs
  of a batch are decoded together by torchvision's decoder on the embedding device (nvJPEG on a
  GPU), and resized and cropped there, one call per image size. What that decoder does not take
  (PNG, TIFF, CMYK, a patch grid, ``lanczos``, a file it fails on, a JPEG large enough for
  Pillow's draft scaling with ``preprocess.draft``) takes the Pillow path in the same threads,
  one image at a time, and is counted. A batch that fails to decode is decoded
  image by image, so one bad file never costs the others. The next batch is read while the
  network runs on this one.

Objects in a bucket are read in the job's process, a few batches ahead with many requests in
flight, and their bytes handed to either way, which then only decodes.

Both give each item the same facts (``index``, ``sha256``, ``width``, ``height`` or ``error``)
and the same pixels up to the decoders' rounding (tested: embeddings agree to cosine ≥ 0.999).
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .buckets import is_bucket, read_ahead
from .images import ImageError, Preprocess, check_size, decode_image, read_image_bytes
from .patches import PatchGrid

__all__ = ["Decoder", "DecodeCounts", "pillow_batches", "tensor_batches"]

log = logging.getLogger("snakembed")

#: Decoded pixels one call to the device's JPEG decoder may produce (bounds its memory: 256
#: photos of 500x375, or 21 of 4000x3000).
_DECODE_PIXELS = 48_000_000

#: JPEG modes the device decoder takes (Pillow's names): others go the Pillow way.
_DEVICE_MODES = ("RGB", "L")


class Decoder:
    """Reads one image into the network's pixels (and patches) with Pillow.

    An image whose bytes hash to one of ``known`` is not decoded: its embedding is reused.

    Args:
        paths: the image files.
        preprocess: resize, crop and normalisation of the network.
        grid: the patch grid, if patches are embedded too.
        max_pixels: images with more pixels are refused before they are decoded.
        known: sha256 of images whose embeddings are reused.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        preprocess: Preprocess,
        grid: PatchGrid | None,
        max_pixels: int | None,
        known: frozenset[str] = frozenset(),
    ):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.grid = grid
        self.max_pixels = max_pixels
        self.known = known
        # JPEG draft mode may shrink an image while it stays twice as large as what needs it.
        self.min_side = preprocess.resize if preprocess.draft else None
        if self.min_side and grid is not None:
            self.min_side = max(self.min_side, grid.resize) if grid.resize else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            data = read_image_bytes(self.paths[index])
        except ImageError as exc:
            return {"index": index, "error": str(exc)}
        return self._item(index, data)

    def __getitems__(self, batch: Sequence) -> list[dict]:
        """A batch's items (DataLoader asks for a batch at once): ``batch`` holds indices, or
        ``(index, data)`` pairs, ``data`` the bytes read already (or the OSError of those that
        could not be), or None to read them here."""
        items = []
        for entry in batch:
            index, data = entry if isinstance(entry, tuple) else (entry, None)
            if data is None:
                items.append(self[index])
            elif isinstance(data, OSError):
                items.append({"index": index, "error": f"cannot read file: {data}"})
            else:
                items.append(self._item(index, data))
        return items

    def _item(self, index: int, data: bytes) -> dict:
        item: dict = {"index": index}
        if self.known:  # decode_image hashes the bytes too; only hash first to match
            digest = hashlib.sha256(data).hexdigest()
            if digest in self.known:
                return {**item, "sha256": digest, "known": True}
        return self.decode(item, data)

    def decode(self, item: dict, data: bytes) -> dict:
        """Fill ``item`` with the pixels of ``data`` (or the reason it has none)."""
        try:
            decoded = decode_image(data, self.min_side, self.max_pixels)
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


def _collate(items: list[dict]) -> dict:
    """A batch: the items' facts, and the decoded items' pixels as one tensor, stacked where
    they were decoded (one shared-memory block per batch, not one per image)."""
    import torch

    decoded = [item for item in items if "pixels" in item]
    pixels = torch.stack([item.pop("pixels") for item in decoded]) if decoded else None
    return {"items": items, "pixels": pixels}


def pillow_batches(decoder: Decoder, batch_size: int, workers: int, pin: bool) -> Iterator[dict]:
    """Batches decoded by Pillow, in ``workers`` DataLoader processes (0: in this one).

    Yields:
        ``{"items": [...], "pixels": uint8 [n, 3, crop, crop] or None}``, where ``pixels``
        holds the items that have pixels, in order.
    """
    if workers == 0:
        for batch in _batches(decoder, batch_size):
            yield _collate(decoder.__getitems__(batch))
        return
    from torch.utils.data import DataLoader

    in_bucket = any(is_bucket(path) for path in decoder.paths)
    yield from DataLoader(
        decoder,
        batch_sampler=_Batches(_batches(decoder, batch_size), len(decoder), batch_size),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        prefetch_factor=2 if in_bucket else 4,  # bytes read ahead may be of large photos
    )


def _batches(decoder: Decoder, batch_size: int) -> Iterator[list[tuple[int, object]]]:
    """The decoder's images, batch by batch, as ``(index, data)`` pairs: ``data`` is the bytes
    read (or the OSError of those that could not be) of objects in a bucket, read in this
    process ahead of decoding, many requests in flight (obstore cannot read in the decoding
    processes, forked from one where it has: see :mod:`snakembed.buckets`); None for a file,
    read where it is decoded."""
    count = len(decoder)
    if not any(is_bucket(path) for path in decoder.paths):
        for start in range(0, count, batch_size):
            yield [(i, None) for i in range(start, min(start + batch_size, count))]
        return
    urls = [str(path) for path in decoder.paths]
    for start, batch in zip(range(0, count, batch_size), read_ahead(urls, batch_size), strict=True):
        yield list(enumerate(batch, start))


class _Batches:
    """Batches given once, for DataLoader's ``batch_sampler`` (which asks for their number)."""

    def __init__(self, batches: Iterator, count: int, batch_size: int):
        self.batches, self.count = batches, -(-count // batch_size)

    def __iter__(self) -> Iterator:
        return self.batches

    def __len__(self) -> int:
        return self.count


class DecodeCounts:
    """How many images each way decoded: ``device`` (the tensor decoder) and ``pillow``."""

    def __init__(self) -> None:
        self.device = 0
        self.pillow = 0


def tensor_batches(
    decoder: Decoder,
    batch_size: int,
    threads: int,
    device,
    counts: DecodeCounts | None = None,
    *,
    jpegs: bool = True,
) -> Iterator[dict]:
    """Batches whose JPEGs torchvision's decoder decodes on ``device``, the rest by Pillow.

    Args:
        decoder: what to read, and the Pillow way for what the device decoder does not take.
        batch_size: images per batch.
        threads: threads that read, hash and (the Pillow way) decode files.
        device: the torch device to decode on (a GPU: nvJPEG; the CPU: libjpeg-turbo).
        counts: incremented with how many images each way decoded.
        jpegs: False sends every image the Pillow way (in threads, not processes: a shared
            worker's, whose threads must not fork).

    Yields:
        As :func:`pillow_batches`, with ``pixels`` on ``device``.
    """
    counts = counts if counts is not None else DecodeCounts()
    batches = _batches(decoder, batch_size)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="snakembed-read") as pool:

        def submit(batch: list) -> list[Future]:
            return [pool.submit(_read, decoder, i, jpegs, data) for i, data in batch]

        pending = submit(next(batches, []))
        while pending:
            items = [future.result() for future in pending]
            # read the next batch while this one is decoded and run through the network
            pending = submit(next(batches, []))
            yield _device_batch(items, decoder, device, pool, counts)


def _read(decoder: Decoder, index: int, jpegs: bool, data: bytes | OSError | None) -> dict:
    """An item with its bytes and header facts, or its error, or its known sha256; an image the
    device decoder does not take is decoded by Pillow here. ``data``: the image's bytes (or
    why they could not be read) where they were read already, else None."""
    item: dict = {"index": index}
    if isinstance(data, OSError):
        return {**item, "error": f"cannot read file: {data}"}
    try:
        data = read_image_bytes(decoder.paths[index]) if data is None else data
    except ImageError as exc:
        return {**item, "error": str(exc)}
    digest = hashlib.sha256(data).hexdigest()
    if digest in decoder.known:
        return {**item, "sha256": digest, "known": True}
    header = _jpeg_header(data, decoder) if jpegs else None
    if header is None:
        return decoder.decode(item, data)
    if "error" in header:
        return {**item, **header}
    return {**item, **header, "sha256": digest, "data": data}


def _jpeg_header(data: bytes, decoder: Decoder) -> dict | None:
    """Width and height (EXIF orientation applied) of a JPEG the device decoder takes, an
    ``error`` for one too large, or None for anything else."""
    if decoder.grid is not None or decoder.preprocess.interpolation == "lanczos":
        return None
    if not data.startswith(b"\xff\xd8"):
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            if image.format != "JPEG" or image.mode not in _DEVICE_MODES:
                return None
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - the Pillow way says what is wrong with the file
        return None
    try:
        check_size((width, height), decoder.max_pixels)
    except ImageError as exc:
        return {"error": str(exc)}
    if decoder.min_side and min(width, height) >= 4 * decoder.min_side:
        # Pillow decodes this one at reduced scale (draft): other pixels than a full decode
        # and resize, by more than rounding; so the Pillow way, for the same embedding
        return None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return {"width": width, "height": height}


def _device_batch(items: list[dict], decoder: Decoder, device, pool, counts) -> dict:
    """Decode the batch's JPEGs on ``device``; those it fails on go the Pillow way."""
    import torch

    jpegs = [item for item in items if "data" in item]
    images: dict[int, object] = {}
    for group in _by_pixels(jpegs):
        decoded = _decode_jpegs([it["data"] for it in group], device)
        for item, image in zip(group, decoded, strict=True):
            if image is None:
                continue
            images[item["index"]] = image
    failed = [item for item in jpegs if item["index"] not in images]
    list(pool.map(lambda it: decoder.decode(it, it["data"]), failed))
    for item in jpegs:
        del item["data"]
    counts.device += len(images)
    counts.pillow += sum(1 for item in items if "pixels" in item)
    pixels = _resize_crop(images, decoder.preprocess)
    batch = []
    for item in items:
        if item["index"] in pixels:
            batch.append(pixels[item["index"]])
        elif "pixels" in item:
            batch.append(item.pop("pixels").to(device, non_blocking=True))
    return {"items": items, "pixels": torch.stack(batch) if batch else None}


def _by_pixels(items: list[dict]) -> Iterator[list[dict]]:
    """``items`` in runs of at most :data:`_DECODE_PIXELS` decoded pixels."""
    group: list[dict] = []
    total = 0
    for item in items:
        size = item["width"] * item["height"]
        if group and total + size > _DECODE_PIXELS:
            yield group
            group, total = [], 0
        group.append(item)
        total += size
    if group:
        yield group


def _decode_jpegs(datas: list[bytes], device) -> list:
    """``uint8 [3, H, W]`` tensors on ``device`` for JPEG bytes, None for each that fails."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]

    def decode(inputs):
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders for TorchCodec's; they still serve
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg(
                inputs, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
            )
        if device.type == "cuda":
            # nvJPEG's hardware engine ignores CUDA streams: wait for it before the pixels
            # are read (torchvision#9606)
            torch.cuda.synchronize(device)
        return out

    try:
        return list(decode(tensors))
    except Exception:  # noqa: BLE001 - one bad file fails the batch: decode one by one
        pass
    images = []
    for tensor in tensors:
        try:
            images.append(decode([tensor])[0])
        except Exception:  # noqa: BLE001 - the Pillow way gives this file its reason
            images.append(None)
    return images


def _resize_crop(images: dict[int, object], preprocess: Preprocess) -> dict[int, object]:
    """Resize and crop decoded images as :meth:`Preprocess.pixels` does, one call for all the
    images of a size."""
    import torch
    import torchvision.transforms.v2.functional as F

    from .images import interpolation_mode

    mode = interpolation_mode(preprocess.interpolation)
    shapes: dict[tuple, list[int]] = {}
    for index, image in images.items():
        shapes.setdefault(tuple(image.shape), []).append(index)
    out = {}
    for indices in shapes.values():
        stack = torch.stack([images[i] for i in indices])
        stack = F.resize(stack, [preprocess.resize], interpolation=mode, antialias=True)
        stack = F.center_crop(stack, [preprocess.crop])
        out.update(zip(indices, stack, strict=True))
    return out
