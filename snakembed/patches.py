"""Cutting an image into a grid of square patches, keeping each patch's box.

The image is first resized so that its shorter side is ``resize`` pixels; patches of ``size``
pixels are cut every ``stride`` pixels; each box is reported as ``x0, y0, x1, y1`` in the
*original* image's pixels (after EXIF orientation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

__all__ = ["PatchGrid", "grid_starts"]

_BORDERS = ("drop", "pad", "shift")


def grid_starts(length: int, size: int, stride: int, border: str) -> list[int]:
    """Start offsets of patches along one axis.

    Args:
        length: the axis' length in pixels.
        size: patch side.
        stride: step between patch starts.
        border: ``drop`` (only whole patches), ``pad`` (extend past the end; the caller pads),
            or ``shift`` (add a last patch that ends exactly at the border; pads when
            ``length < size``).

    Returns:
        Sorted start offsets; empty for ``drop`` when ``length < size``.

    Example:
        >>> grid_starts(500, 224, 224, "drop"), grid_starts(500, 224, 224, "shift")
        ([0, 224], [0, 224, 276])
        >>> grid_starts(500, 224, 224, "pad")
        [0, 224, 448]
    """
    if border not in _BORDERS:
        raise ValueError(f"border must be one of {_BORDERS}, not {border!r}")
    if length < size:
        return [] if border == "drop" else [0]
    starts = list(range(0, length - size + 1, stride))
    end = starts[-1] + size
    if end < length:
        if border == "shift":
            starts.append(length - size)
        elif border == "pad":
            extra = math.ceil((length - end) / stride)
            starts.extend(starts[-1] + stride * (i + 1) for i in range(extra))
    return starts


@dataclass(frozen=True)
class PatchGrid:
    """Patch settings (the config's ``patches:`` block, less ``enabled``).

    Example:
        >>> PatchGrid(size=224, stride=224, resize=448, border="shift").to_dict()["border"]
        'shift'
    """

    size: int
    stride: int
    resize: int | None = None
    border: str = "shift"

    def __post_init__(self) -> None:
        if self.border not in _BORDERS:
            raise ValueError(f"border must be one of {_BORDERS}, not {self.border!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def cut(self, image: Image.Image, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Cut ``image`` into patches.

        Args:
            image: the RGB image, possibly already reduced (JPEG draft) from the original.
            width: the original image's width, for the boxes.
            height: the original image's height.

        Returns:
            ``(pixels, boxes)``: ``uint8 [P, 3, size, size]`` (zero-padded past the border) and
            ``int64 [P, 4]`` boxes ``x0, y0, x1, y1`` in original pixels, clipped to the image.
        """
        scale = self.resize / min(width, height) if self.resize else 1.0
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        if image.size != (new_w, new_h):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        xs = grid_starts(new_w, self.size, self.stride, self.border)
        ys = grid_starts(new_h, self.size, self.stride, self.border)
        if not xs or not ys:
            return np.zeros((0, 3, self.size, self.size), np.uint8), np.zeros((0, 4), np.int64)
        canvas = np.zeros(
            (max(new_h, ys[-1] + self.size), max(new_w, xs[-1] + self.size), 3), np.uint8
        )
        canvas[:new_h, :new_w] = np.asarray(image)
        pixels = np.stack(
            [canvas[y : y + self.size, x : x + self.size] for y in ys for x in xs]
        ).transpose(0, 3, 1, 2)
        boxes = np.array(
            [
                [
                    x / scale,
                    y / scale,
                    min(x + self.size, new_w) / scale,
                    min(y + self.size, new_h) / scale,
                ]
                for y in ys
                for x in xs
            ]
        )
        boxes = np.rint(boxes).astype(np.int64)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        return np.ascontiguousarray(pixels), boxes
