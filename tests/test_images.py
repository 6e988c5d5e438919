"""Decoding images of every kind to RGB, and discovering image folders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_image, make_tree
from PIL import Image

from snakembed.images import DiscoveryError, ImageError, Preprocess, decode_image, discover_folders


def _bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _rgb(seed=0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("1", "PNG")],
)
def test_any_mode_becomes_rgb(mode, fmt):
    decoded = decode_image(_bytes(_rgb().convert(mode), fmt))
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (40, 30)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    decoded = decode_image(_bytes(rgba, "PNG"))
    assert np.asarray(decoded.image).min() == 255


def test_palette_with_transparency():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30] * 256)
    data = _bytes(palette, "PNG", transparency=0)
    assert np.asarray(decode_image(data).image).min() == 255


def test_16_bit_uses_the_full_range():
    ramp = np.linspace(0, 65535, 64 * 8).astype(np.uint16).reshape(8, 64)
    decoded = decode_image(_bytes(Image.fromarray(ramp), "PNG"))
    pixels = np.asarray(decoded.image)[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.all(np.diff(pixels[0].astype(int)) >= 0)


def test_float_tiff_in_unit_range():
    values = np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8)
    decoded = decode_image(_bytes(Image.fromarray(values, "F"), "TIFF"))
    pixels = np.asarray(decoded.image)[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize("orientation,rotated", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation_is_applied(orientation, rotated):
    image = _rgb(size=(60, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(_bytes(image, "JPEG", exif=exif))
    expected = (20, 60) if rotated else (60, 20)
    assert (decoded.width, decoded.height) == expected
    assert decoded.image.size == expected


def test_sha256_of_the_file_bytes():
    import hashlib

    data = _bytes(_rgb(), "PNG")
    assert decode_image(data).sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
    ],
)
def test_bad_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_truncated_jpeg_is_refused():
    data = _bytes(_rgb(size=(200, 200)), "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_draft_mode_keeps_twice_the_target():
    data = _bytes(_rgb(size=(1600, 1200)), "JPEG")
    decoded = decode_image(data, min_side=256)
    assert (decoded.width, decoded.height) == (1600, 1200)
    assert min(decoded.image.size) >= 512 and decoded.image.size[0] < 1600
    assert decode_image(data).image.size == (1600, 1200)


def test_draft_mode_changes_embeddings_very_little(tmp_path):
    """A large photo decoded at reduced scale gives nearly the full decode's pixels."""
    path = make_image(tmp_path / "big.jpg", size=(2000, 1500), seed=1, quality=95)
    pre = Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear")
    full = pre.pixels(decode_image(path.read_bytes()).image).float()
    draft = pre.pixels(decode_image(path.read_bytes(), min_side=256).image).float()
    assert (full - draft).abs().mean() < 3.0  # of 255


def test_discover_folders(tmp_path):
    expected = make_tree(tmp_path)
    assert discover_folders(tmp_path, [".jpg", ".jpeg", ".png"]) == expected


def test_discover_refuses_a_missing_root(tmp_path):
    with pytest.raises(DiscoveryError, match="does not exist"):
        discover_folders(tmp_path / "nope", [".jpg"])


def test_discover_refuses_an_empty_tree(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DiscoveryError, match="no image files"):
        discover_folders(tmp_path, [".jpg"])


def test_discover_refuses_results_inside_the_images(tmp_path):
    make_image(tmp_path / "a" / "x.jpg")
    with pytest.raises(DiscoveryError, match="inside the image root"):
        discover_folders(tmp_path, [".jpg"], exclude=tmp_path / "results")


def test_preprocess_override_keeps_unset_values():
    pre = Preprocess(256, 224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic")
    new = pre.override({"resize": 128, "crop": None, "mean": None})
    assert (new.resize, new.crop, new.mean, new.interpolation) == (
        128,
        224,
        (0.1, 0.2, 0.3),
        "bicubic",
    )
