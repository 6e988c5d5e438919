"""Finding image folders, decoding images of any kind to RGB, and preprocessing them.

Nothing here needs a GPU: decoding runs in worker processes and hands uint8 tensors to the
network, which normalises whole batches on its device.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ROOT_FOLDER",
    "DiscoveryError",
    "ImageError",
    "Preprocess",
    "DecodedImage",
    "discover_folders",
    "decode_image",
    "read_image",
]

#: The folder key of images that lie directly in the image root.
ROOT_FOLDER = "."

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


class DiscoveryError(ValueError):
    """The image tree cannot be used as it is; the message names the path and the fix."""


class ImageError(ValueError):
    """A file that is not a usable image; the message is the reason stored with it."""


def discover_folders(
    root: str | Path, extensions: list[str], exclude: str | Path | None = None
) -> dict[str, list[str]]:
    """Find every folder under ``root`` that directly holds image files.

    Hidden files and folders (names starting with ``.``) are skipped. The key of a folder is its
    path relative to ``root`` with ``/`` separators; images directly in ``root`` have the key
    ``"."``.

    Args:
        root: the image root.
        extensions: file endings that count as images, compared case-insensitively.
        exclude: a folder to refuse inside the tree (the results folder).

    Returns:
        ``{folder key: sorted image file names}``, keys sorted.

    Raises:
        DiscoveryError: when the root does not exist, holds no image, or contains ``exclude``.

    Example:
        >>> discover_folders("demo/images", [".jpg", ".png"])["animals"]  # doctest: +SKIP
        ['chelsea.jpg', 'horse.jpg']
    """
    root = Path(root)
    if not root.is_dir():
        raise DiscoveryError(
            f"image root {str(root)!r} does not exist or is not a folder; "
            "set `images:` in the config (or --config images=/path/to/images)"
        )
    suffixes = tuple(e.lower() for e in extensions)
    exclude_real = os.path.realpath(exclude) if exclude is not None else None
    root_real = os.path.realpath(root)
    if exclude_real is not None and (exclude_real + os.sep).startswith(root_real + os.sep):
        raise DiscoveryError(
            f"the results folder {str(exclude)!r} lies inside the image root {str(root)!r}; "
            "choose a `results:` folder outside the images"
        )
    folders: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        images = sorted(
            f for f in filenames if not f.startswith(".") and f.lower().endswith(suffixes)
        )
        if images:
            rel = Path(dirpath).relative_to(root).as_posix()
            folders[rel] = images
    if not folders:
        raise DiscoveryError(
            f"no image files ({', '.join(extensions)}) under {str(root)!r}; "
            "check `images:` and `extensions:` in the config"
        )
    _check_names(folders)
    return dict(sorted(folders.items()))


def _check_names(folders: dict[str, list[str]]) -> None:
    """An image and a sub-folder of the same name cannot both appear in the index."""
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
        """Resize and crop an RGB image: a ``uint8`` tensor ``[3, crop, crop]``."""
        import torchvision.transforms.functional as F

        image = F.resize(image, [self.resize], interpolation=_mode(self.interpolation))
        return F.pil_to_tensor(F.center_crop(image, [self.crop]))

    def normalize(self, batch):
        """``uint8 [B, 3, H, W]`` to normalised float32 on the batch's device."""
        import torch

        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return batch.to(torch.float32).div_(255).sub_(mean).div_(std)


def _mode(name: str):
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


def read_image(path: str | Path, min_side: int | None = None) -> DecodedImage:
    """Read and decode an image file; see :func:`decode_image`.

    Raises:
        ImageError: when the file cannot be read or decoded, with the reason.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
    return decode_image(data, min_side)


def decode_image(data: bytes, min_side: int | None = None) -> DecodedImage:
    """Decode image bytes to RGB with EXIF orientation applied.

    Grayscale, palette, RGBA (composited on white), CMYK, 16-bit and float images all become
    8-bit RGB. Only the first frame of an animation or a multi-page file is used.

    Args:
        data: the file's bytes.
        min_side: when set, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as its shorter
            side stays at least twice this long (Pillow's draft mode).

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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            orientation = image.getexif().get(0x0112, 1)
            width, height = image.size
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            if min_side and image.format == "JPEG" and min(image.size) >= 4 * min_side:
                # Pillow picks the largest 1/2, 1/4, 1/8 reduction that keeps this size.
                factor = min(image.size) / (2 * min_side)
                image.draft(image.mode, (int(image.width / factor), int(image.height / factor)))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombWarning as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file (unknown or unsupported format)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return DecodedImage(image=image, width=width, height=height, sha256=digest)


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
