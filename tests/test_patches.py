"""The patch grid: border policies and boxes in original pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from snakembed.patches import PatchGrid, grid_starts


@pytest.mark.parametrize(
    "length,border,expected",
    [
        (100, "drop", [0, 32, 64]),
        (100, "shift", [0, 32, 64, 68]),
        (100, "pad", [0, 32, 64, 96]),
        (96, "shift", [0, 32, 64]),
        (20, "drop", []),
        (20, "shift", [0]),
        (20, "pad", [0]),
    ],
)
def test_grid_starts(length, border, expected):
    assert grid_starts(length, 32, 32, border) == expected


def test_overlapping_stride():
    assert grid_starts(64, 32, 16, "drop") == [0, 16, 32]


def test_unknown_border_is_refused():
    with pytest.raises(ValueError, match="border"):
        PatchGrid(32, 32, None, "wrap")


def _image(w, h):
    y, x = np.mgrid[0:h, 0:w]
    array = np.stack([x % 256, y % 256, np.zeros_like(x)], -1).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def test_boxes_without_resize_are_the_pixels_cut():
    image = _image(100, 70)
    pixels, boxes = PatchGrid(size=32, stride=32, resize=None, border="drop").cut(image, 100, 70)
    assert pixels.shape == (6, 3, 32, 32) and boxes.shape == (6, 4)
    for patch, (x0, y0, x1, y1) in zip(pixels, boxes, strict=True):
        assert (x1 - x0, y1 - y0) == (32, 32)
        assert np.array_equal(patch.transpose(1, 2, 0), np.asarray(image)[y0:y1, x0:x1])


def test_boxes_are_in_original_pixels_after_resize():
    image = _image(400, 200)
    pixels, boxes = PatchGrid(size=50, stride=50, resize=100, border="shift").cut(image, 400, 200)
    # resized to 200x100: 4 x 2 patches of 50, each 100 original pixels wide
    assert len(boxes) == 8
    assert boxes.tolist()[0] == [0, 0, 100, 100] and boxes.tolist()[-1] == [300, 100, 400, 200]


def test_pad_clips_boxes_and_zero_fills():
    image = _image(40, 40)
    pixels, boxes = PatchGrid(size=32, stride=32, resize=None, border="pad").cut(image, 40, 40)
    assert len(boxes) == 4
    assert boxes.tolist()[-1] == [32, 32, 40, 40]
    assert pixels[-1][:, 8:, :].max() == 0 and pixels[-1][:, :, 8:].max() == 0


def test_reduced_image_gives_boxes_of_the_original():
    """A draft-decoded image (half size) gives the same boxes as the full one."""
    grid = PatchGrid(size=32, stride=32, resize=64, border="shift")
    _, full = grid.cut(_image(256, 128), 256, 128)
    _, half = grid.cut(_image(128, 64), 256, 128)
    assert np.array_equal(full, half)


def test_drop_on_a_small_image_gives_no_patches():
    pixels, boxes = PatchGrid(size=64, stride=64, resize=None, border="drop").cut(
        _image(30, 30), 30, 30
    )
    assert pixels.shape == (0, 3, 64, 64) and boxes.shape == (0, 4)
