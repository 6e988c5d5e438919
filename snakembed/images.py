"""Finding image folders, decoding images of any kind to RGB, and preprocessing them.

Nothing here needs a GPU: decoding runs in worker processes and hands uint8 tensors to the
network, which normalises whole batches on its device.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .buckets import is_bucket, read_object
from .layout import ROOT_FOLDER

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Discovery",
    "DiscoveryError",
    "ImageError",
    "Preprocess",
    "DecodedImage",
    "check_folder_names",
    "check_size",
    "discover_folders",
    "decode_image",
    "interpolation_mode",
    "read_image",
    "read_image_bytes",
]

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


class DiscoveryError(ValueError):
    """The image tree cannot be used as it is; the message names the path and the fix."""


class ImageError(ValueError):
    """A file that is not a usable image; the message is the reason stored with it."""


#: Pillow's own limit: images with more pixels are refused unless ``max_pixels`` is raised.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


@dataclass
class Discovery:
    """What :func:`discover_folders` found.

    Attributes:
        folders: ``{folder key: sorted image file names}``, refused files included, keys sorted.
        refused: ``{folder key: {name: reason}}`` for image files that will not be read: broken
            links, links out of the image root, files that are not regular files or cannot be
            read. They are recorded as failed in their folder's file.
        skipped: ``{relative path: reason}`` for folder links that were not followed.
        identities: ``{folder key: {name: identity}}`` where the listing itself tells each
            image's content apart (a bucket's size, ETag and modification time, see
            :mod:`snakembed.buckets`); None for a local tree, whose files are looked at.
    """

    folders: dict[str, list[str]]
    refused: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    identities: dict[str, dict[str, list]] | None = None

    def readable(self, folder: str) -> list[str]:
        """The folder's image names that will be read."""
        refused = self.refused.get(folder, {})
        return [name for name in self.folders[folder] if name not in refused]


def discover_folders(
    root: str | Path,
    extensions: list[str],
    exclude: str | Path | None = None,
    follow_external_links: bool = False,
) -> Discovery:
    """Find every folder under ``root`` that directly holds image files.

    Hidden files and folders (names starting with ``.``) are skipped. Symbolic links are
    followed while they stay inside ``root``; links that leave it are refused (files) or not
    followed (folders) unless ``follow_external_links``. A link back to a folder above it (a
    cycle) is never followed. The key of a folder is its path relative to ``root`` with ``/``
    separators; images directly in ``root`` have the key ``"."``.

    Args:
        root: the image root.
        extensions: file endings that count as images, compared case-insensitively.
        exclude: a folder to refuse inside the tree (the results folder).
        follow_external_links: read links whose targets lie outside ``root``.

    Returns:
        The folders, and what was refused or skipped, with reasons.

    Raises:
        DiscoveryError: when the root does not exist, holds no image, or contains ``exclude``.

    Example:
        >>> discover_folders("demo/images", [".jpg", ".png"]).folders["animals"]  # doctest: +SKIP
        ['chelsea.jpg', 'horse.jpg']
    """
    root = Path(root)
    if not root.is_dir():
        bucket = " (a bucket is written s3://BUCKET/PREFIX)" if str(root).startswith("s3:") else ""
        raise DiscoveryError(
            f"image root {str(root)!r} does not exist or is not a folder{bucket}; "
            "set `images:` in the config (or --config images=/path/to/images)"
        )
    suffixes = tuple(e.lower() for e in extensions)
    root_real = os.path.realpath(root)
    if exclude is not None and _inside(os.path.realpath(exclude), root_real):
        raise DiscoveryError(
            f"the results folder {str(exclude)!r} lies inside the image root {str(root)!r}; "
            "choose a `results:` folder outside the images"
        )
    found = Discovery(folders={})
    # (folder path, key, real paths of the folder and those above it: a link to one is a cycle)
    stack = [(str(root), ROOT_FOLDER, (root_real,))]
    while stack:
        directory, key, above = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            found.skipped[key] = f"cannot list the folder: {exc.strerror or exc}"
            continue
        images, refused = [], {}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = entry.name if key == ROOT_FOLDER else f"{key}/{entry.name}"
            if _is_dir(entry):
                real = (
                    os.path.realpath(entry.path)
                    if entry.is_symlink()
                    else os.path.join(above[-1], entry.name)
                )
                reason = _link_problem(entry, real, root_real, follow_external_links)
                if reason is None and real in above:
                    reason = "link to a folder above it (a cycle); not followed"
                if reason is not None:
                    found.skipped[child] = reason
                else:
                    stack.append((entry.path, child, (*above, real)))
            elif entry.name.lower().endswith(suffixes):
                images.append(entry.name)
                reason = _file_problem(entry, root_real, follow_external_links)
                if reason is not None:
                    refused[entry.name] = reason
        if images:
            found.folders[key] = images
        if refused:
            found.refused[key] = refused
    if not found.folders:
        raise DiscoveryError(
            f"no image files ({', '.join(extensions)}) under {str(root)!r}; "
            "check `images:` and `extensions:` in the config"
        )
    check_folder_names(found.folders)
    found.folders = dict(sorted(found.folders.items()))
    found.refused = dict(sorted(found.refused.items()))
    return found


def _inside(path: str, root: str) -> bool:
    return (path + os.sep).startswith(root + os.sep)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _link_problem(
    entry: os.DirEntry, real: str, root_real: str, follow_external: bool
) -> str | None:
    """Why a link may not be followed, or None."""
    if not entry.is_symlink():
        return None
    if not os.path.exists(real):
        return f"broken symbolic link: its target {os.readlink(entry.path)!r} does not exist"
    if not follow_external and not _inside(real, root_real):
        return (
            f"symbolic link to {real!r}, outside the image root; set "
            "`follow_external_links: true` in the config to read it"
        )
    return None


def _file_problem(entry: os.DirEntry, root_real: str, follow_external: bool) -> str | None:
    """Why an image file will not be read, or None."""
    real = os.path.realpath(entry.path) if entry.is_symlink() else entry.path
    reason = _link_problem(entry, real, root_real, follow_external)
    if reason is not None:
        return reason
    try:
        regular = entry.is_file()
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"
    if not regular:
        return "not a regular file (a pipe, socket or device); move it out of the image tree"
    if not os.access(entry.path, os.R_OK):
        return "permission denied: the file cannot be read; fix its permissions"
    return None


def check_folder_names(folders: dict[str, list[str]]) -> None:
    """An image and a sub-folder of the same name cannot both appear in the index.

    Args:
        folders: ``{folder key: image names}`` as discovery found them.

    Raises:
        DiscoveryError: naming the folder.

    Example:
        >>> check_folder_names({".": ["a.jpg"], "b": ["c.jpg"]})
        >>> check_folder_names({".": ["a.jpg"], "a.jpg": ["b.jpg"]})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        snakembed.images.DiscoveryError: folder 'a.jpg' has the same name as an image beside it...
    """
    for key in folders:
        if key == ROOT_FOLDER:
            continue
        parent, _, name = key.rpartition("/")
        if name in folders.get(parent or ROOT_FOLDER, ()):
            raise DiscoveryError(
                f"folder {key!r} has the same name as an image beside it; rename one of them"
            )


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, crop the centre, normalise: what a classifier's weights expect.

    Args:
        resize: the shorter side is resized to this many pixels.
        crop: side of the centre crop.
        mean: per-channel mean, RGB, in 0..1.
        std: per-channel standard deviation.
        interpolation: ``nearest``, ``bilinear``, ``bicubic`` or ``lanczos``.
        draft: let the JPEG decoder shrink large photos while keeping twice ``resize``.

    Example:
        >>> Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear").crop
        224
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    draft: bool = True

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def override(self, settings: dict) -> Preprocess:
        """A copy with every non-null value of ``settings`` (the config's ``preprocess:``)."""
        changes = {k: v for k, v in settings.items() if v is not None}
        return Preprocess(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        """The settings as plain JSON types."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def pixels(self, image: Image.Image):
        """Resize and crop an RGB image: a ``uint8`` tensor ``[3, crop, crop]``.

        The resize runs on the ``uint8`` tensor (torchvision's antialiased kernels, as on a
        GPU), except ``lanczos``, which only Pillow has.
        """
        import torch
        import torchvision.transforms.v2.functional as F

        mode = interpolation_mode(self.interpolation)
        if self.interpolation == "lanczos":
            image = F.resize(image, [self.resize], interpolation=mode)
            return F.pil_to_tensor(F.center_crop(image, [self.crop]))
        pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
        pixels = F.resize(pixels, [self.resize], interpolation=mode, antialias=True)
        return F.center_crop(pixels, [self.crop])

    def normalize(self, batch):
        """``uint8 [B, 3, H, W]`` to normalised float32 on the batch's device, channels last."""
        import torch

        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1) * 255
        scale = 1 / (torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1) * 255)
        pixels = batch.to(torch.float32, memory_format=torch.channels_last)
        return pixels.sub_(mean).mul_(scale)


def interpolation_mode(name: str):
    """torchvision's ``InterpolationMode`` of a ``preprocess.interpolation`` name.

    Example:
        >>> interpolation_mode("bicubic").value
        'bicubic'
    """
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


@dataclass
class DecodedImage:
    """An image read from disk: its RGB pixels (at reduced scale for large JPEGs) and facts.

    ``width`` and ``height`` are those of the original image once EXIF orientation is applied;
    ``image`` may be smaller (JPEG draft mode).
    """

    image: Image.Image
    width: int
    height: int
    sha256: str


def read_image(
    path: str | Path, min_side: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Read and decode an image file; see :func:`decode_image`.

    Raises:
        ImageError: when the file cannot be read or decoded, with the reason.
    """
    return decode_image(read_image_bytes(path), min_side, max_pixels)


def read_image_bytes(path: str | Path) -> bytes:
    """An image file's bytes, or an object's in a bucket (``s3://...``, see
    :mod:`snakembed.buckets`).

    Raises:
        ImageError: when the file cannot be read, with the reason.
    """
    try:
        if is_bucket(path):
            return read_object(str(path))
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc


def decode_image(
    data: bytes, min_side: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode image bytes to RGB with EXIF orientation applied.

    Grayscale, palette, RGBA (composited on white), CMYK, YCCK, 16-bit and float images all
    become 8-bit RGB. Only the first frame of an animation or a multi-page file is used.

    Args:
        data: the file's bytes.
        min_side: when set, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as its shorter
            side stays at least twice this long (Pillow's draft mode).
        max_pixels: images with more pixels are refused before they are decoded (a
            decompression bomb, or a photo too large for memory); None for no limit.

    Returns:
        The decoded image with its original size and the sha256 of ``data``.

    Raises:
        ImageError: with the reason, for anything that is not a decodable image.

    Example:
        >>> decode_image(open("demo/images/animals/chelsea.jpg", "rb").read()).image.mode
        'RGB'
    """
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        raise ImageError("empty file")
    try:
        with _quiet_pillow():
            image = Image.open(io.BytesIO(data))
            check_size(image.size, max_pixels)
            orientation = image.getexif().get(0x0112, 1)
            width, height = image.size
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            if min_side and image.format == "JPEG" and min(image.size) >= 4 * min_side:
                # Pillow picks the largest 1/2, 1/4, 1/8 reduction that keeps this size.
                factor = min(image.size) / (2 * min_side)
                image.draft(image.mode, (int(image.width / factor), int(image.height / factor)))
            image.load()
            image = _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(_unidentified_reason(data)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return DecodedImage(image=image, width=width, height=height, sha256=digest)


#: Decoders inside :func:`_quiet_pillow` now, and what they lifted (the first to enter saves and
#: lifts, the last to leave restores: threads that each saved and restored would leave the
#: limit lifted, or the warnings ignored, for good).
_QUIET = {"inside": 0, "limit": None, "warnings": None}
_QUIET_LOCK = threading.Lock()
# a process forked while another thread held the lock must not wait for it
os.register_at_fork(after_in_child=lambda: globals().update(_QUIET_LOCK=threading.Lock()))


@contextlib.contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Lift Pillow's process-wide pixel limit (:func:`check_size` applies ours instead), and
    quiet its warnings about odd metadata in files that still decode; safe in many threads."""
    with _QUIET_LOCK:
        if _QUIET["inside"] == 0:
            _QUIET["limit"], Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            _QUIET["warnings"] = warnings.catch_warnings()
            _QUIET["warnings"].__enter__()
            warnings.simplefilter("ignore")
        _QUIET["inside"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["inside"] -= 1
            if _QUIET["inside"] == 0:
                Image.MAX_IMAGE_PIXELS = _QUIET["limit"]
                _QUIET["warnings"].__exit__(None, None, None)


def _unidentified_reason(data: bytes) -> str:
    """Why Pillow could not open a file: the error of the format its first bytes announce."""
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            verdict = accept(data[:16]) if accept is not None else False
        except Exception:  # noqa: BLE001 - a short file trips some signature checks
            verdict = False
        if isinstance(verdict, str):
            return f"unsupported {fmt} file: {verdict}"
        if verdict:
            try:
                with _quiet_pillow():
                    factory(io.BytesIO(data), "")
            except Exception as exc:  # noqa: BLE001 - the decoder's own words are the reason
                return f"corrupt {fmt} file: {exc}"
    return "not an image file (unknown or unsupported format)"


def check_size(size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse an image of ``size`` (width, height) with no pixels or more than ``max_pixels``.

    Raises:
        ImageError: with the reason and the config key that lifts the limit.

    Example:
        >>> check_size((100, 100), 10_000)
    """
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; raise `max_pixels` in the config to read it"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        return image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit integer or float grayscale to 0..255 by its natural range."""
    if array.dtype.kind in "ui" and array.dtype.itemsize == 2:
        return (array.astype(np.uint32) // 257).astype(np.uint8)
    values = np.nan_to_num(array.astype(np.float64))
    low, high = values.min(), values.max()
    if array.dtype.kind == "f" and low >= 0 and high <= 1:
        return (values * 255).round().astype(np.uint8)
    if array.dtype.kind in "ui" and low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if array.dtype.kind in "ui" and low >= 0 and high <= 65535:
        return (values // 257).astype(np.uint8)
    if high == low:
        return np.zeros(array.shape, np.uint8)
    return ((values - low) * (255.0 / (high - low))).round().astype(np.uint8)
