"""Decoding images of every kind to RGB, and discovering image folders."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import samples
from conftest import make_image, make_tree
from PIL import Image

from snakembed.images import (
    DEFAULT_MAX_PIXELS,
    DiscoveryError,
    ImageError,
    Preprocess,
    decode_image,
    discover_folders,
)


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


def test_sha256_of_the_file_bytes():
    import hashlib

    data = _bytes(_rgb(), "PNG")
    assert decode_image(data).sha256 == hashlib.sha256(data).hexdigest()


def test_draft_mode_keeps_twice_the_target():
    data = _bytes(_rgb(size=(1600, 1200)), "JPEG")
    decoded = decode_image(data, min_side=256)
    assert (decoded.width, decoded.height) == (1600, 1200)
    assert min(decoded.image.size) >= 512 and decoded.image.size[0] < 1600
    assert decode_image(data).image.size == (1600, 1200)


def test_draft_mode_changes_pixels_and_embeddings_very_little(tmp_path):
    """A large photo decoded at reduced scale gives nearly the full decode's pixels, and so
    nearly its embedding in the pretrained default model: far nearer than another photo's."""
    from snakembed.config import load_config
    from snakembed.embed import embed_images, load_backbone

    path = make_image(tmp_path / "big.jpg", size=(2000, 1500), seed=1, quality=95)
    other = make_image(tmp_path / "other.jpg", size=(2000, 1500), seed=2, quality=95)
    pre = Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear")
    full = pre.pixels(decode_image(path.read_bytes()).image).float()
    draft = pre.pixels(decode_image(path.read_bytes(), min_side=256).image).float()
    assert (full - draft).abs().mean() < 3.0  # of 255

    def unit_vectors(draft: bool) -> np.ndarray:
        settings = {"device": "cpu", "optimize": False, "preprocess": {"draft": draft}}
        config = load_config(overrides=settings)
        # a backbone of each config's own: load_backbone applies its preprocessing
        vectors = embed_images([path, other], config, backbone=load_backbone(config)).vectors
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    full, draft = unit_vectors(False), unit_vectors(True)
    assert 0 < 1 - full[0] @ draft[0] < 0.002  # other pixels: near, never the same
    assert 1 - full[0] @ draft[0] < (1 - full[0] @ full[1]) / 20


def test_discover_folders(tmp_path):
    expected = make_tree(tmp_path)
    found = discover_folders(tmp_path, [".jpg", ".jpeg", ".png"])
    assert found.folders == expected
    assert found.refused == {} and found.skipped == {}


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


# --------------------------------------------------------------------------- awkward files


@pytest.mark.parametrize("name", sorted(samples.BAD))
def test_bad_files_are_refused_with_their_reason(name):
    make, reason = samples.BAD[name]
    with pytest.raises(ImageError, match=reason):
        decode_image(make())


@pytest.mark.parametrize("name", sorted(samples.GOOD))
def test_awkward_files_decode_to_the_pixels_they_show(name):
    """Each file becomes the RGB picture it was made as (its first frame or page, upright, its
    transparency on white, its full tonal range), at the size it is shown."""
    expected, tolerance = samples.GOOD_PIXELS[name]
    decoded = decode_image(samples.GOOD[name]())
    assert decoded.image.mode == "RGB"
    pixels = np.asarray(decoded.image)
    assert pixels.shape == expected.shape
    assert (decoded.height, decoded.width) == expected.shape[:2]
    assert np.abs(pixels.astype(int) - expected).mean() <= tolerance


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(orientation):
    decoded = decode_image(samples.exif_jpeg(orientation))
    expected = samples.exif_expected(orientation)
    assert (decoded.height, decoded.width) == expected.shape[:2]
    assert np.abs(np.asarray(decoded.image, float) - expected).mean() < 8


def test_first_frame_of_an_animation_and_first_page_of_a_tiff():
    assert np.asarray(decode_image(samples.animated_gif()).image)[5, 5].tolist() == [255, 0, 0]
    page = decode_image(samples.multipage_tiff())
    assert page.image.size == (30, 20)
    assert np.asarray(page.image)[5, 5].tolist() == [90, 90, 90]


def test_16_bit_tiff_uses_the_full_range():
    pixels = np.asarray(decode_image(samples.tiff_16bit()).image)[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.all(np.diff(pixels[0].astype(int)) >= 0)


@pytest.mark.parametrize("make", [samples.cmyk_jpeg, samples.ycck_jpeg], ids=["cmyk", "ycck"])
def test_cmyk_and_ycck_jpegs_keep_their_colour(make):
    with Image.open(io.BytesIO(make())) as raw:
        assert raw.mode == "CMYK"
    rgb = np.asarray(decode_image(make()).image, int)[16, 16]
    assert np.abs(rgb - [255, 0, 0]).max() <= 6


def test_ycck_sample_is_really_ycck():
    with Image.open(io.BytesIO(samples.ycck_jpeg())) as image:
        assert image.info["adobe_transform"] == 2


def test_one_pixel_image_is_kept_and_preprocessed():
    decoded = decode_image(samples.one_pixel())
    pre = Preprocess(64, 56, (0.5,) * 3, (0.5,) * 3)
    pixels = pre.pixels(decoded.image)
    assert pixels.shape == (3, 56, 56)
    assert pixels[:, 0, 0].tolist() == [200, 100, 50]


def test_the_pixel_limit_refuses_before_decoding_and_can_be_raised():
    data = samples.huge_png()
    with pytest.raises(ImageError, match="9500x9500 = 90,250,000 pixels"):
        decode_image(data)
    decoded = decode_image(data, max_pixels=100_000_000)
    assert decoded.image.size == samples.HUGE
    small = samples.encode(samples.photo((40, 40)), "PNG")
    with pytest.raises(ImageError, match="over the limit of 1,000"):
        decode_image(small, max_pixels=1000)
    assert decode_image(small, max_pixels=None).width == 40
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # Pillow's own limit is left alone


def test_decoding_in_many_threads_leaves_pillow_and_warnings_as_they_were():
    """The report and the threaded batches decode in many threads at once: Pillow's pixel limit
    and the warning filters, lifted while they decode, are as they were afterwards."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    data = samples.encode(samples.photo((64, 48)), "JPEG")
    filters = list(warnings.filters)
    with ThreadPoolExecutor(32) as pool:
        sizes = set(pool.map(lambda _: decode_image(data).width, range(3000)))
    assert sizes == {64}
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS
    assert warnings.filters == filters


# --------------------------------------------------------------------------- links and odd files


def test_links_inside_the_root_are_followed(tmp_path):
    make_image(tmp_path / "real" / "x.jpg")
    (tmp_path / "real" / "link.jpg").symlink_to("x.jpg")
    (tmp_path / "alias").symlink_to("real", target_is_directory=True)
    found = discover_folders(tmp_path, [".jpg"])
    assert found.folders == {"alias": ["link.jpg", "x.jpg"], "real": ["link.jpg", "x.jpg"]}
    assert found.refused == {} and found.skipped == {}


def test_links_out_of_the_root_are_refused_unless_allowed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_image(root / "a" / "own.jpg")
    make_image(outside / "far.jpg")
    (root / "a" / "far.jpg").symlink_to(outside / "far.jpg")
    (root / "b").symlink_to(outside, target_is_directory=True)
    found = discover_folders(root, [".jpg"])
    assert found.folders == {"a": ["far.jpg", "own.jpg"]}
    assert "outside the image root" in found.refused["a"]["far.jpg"]
    assert "follow_external_links" in found.skipped["b"]
    assert found.readable("a") == ["own.jpg"]
    allowed = discover_folders(root, [".jpg"], follow_external_links=True)
    assert allowed.folders == {"a": ["far.jpg", "own.jpg"], "b": ["far.jpg"]}
    assert allowed.refused == {} and allowed.skipped == {}


def test_broken_links_pipes_and_cycles(tmp_path):
    make_image(tmp_path / "a" / "ok.jpg")
    (tmp_path / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    found = discover_folders(tmp_path, [".jpg"])
    assert found.folders == {"a": ["gone.jpg", "ok.jpg", "pipe.jpg"]}
    assert "broken symbolic link" in found.refused["a"]["gone.jpg"]
    assert "not a regular file" in found.refused["a"]["pipe.jpg"]
    assert "cycle" in found.skipped["a/loop"]


def test_hidden_files_and_folders_are_skipped(tmp_path):
    make_image(tmp_path / "a" / "x.jpg")
    make_image(tmp_path / "a" / ".x.jpg")
    make_image(tmp_path / ".cache" / "y.jpg")
    assert discover_folders(tmp_path, [".jpg"]).folders == {"a": ["x.jpg"]}
