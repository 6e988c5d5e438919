"""Real image files of every awkward kind, made byte by byte for the tests.

``GOOD`` files must be embedded; ``BAD`` files must be recorded with a reason that matches.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: Pixels (width, height) just over Pillow's default limit of 89,478,485.
HUGE = (9500, 9500)


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def quadrants(size=(64, 48)) -> Image.Image:
    """Four flat colours, one per quadrant: orientation is visible even after JPEG."""
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[: h // 2, : w // 2] = (230, 20, 20)
    array[: h // 2, w // 2 :] = (20, 230, 20)
    array[h // 2 :, : w // 2] = (20, 20, 230)
    array[h // 2 :, w // 2 :] = (230, 230, 20)
    return Image.fromarray(array, "RGB")


def photo(size=(120, 90), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def truncated_jpeg() -> bytes:
    data = encode(photo((200, 160)), "JPEG")
    return data[: len(data) // 2]


def png_with_broken_crc() -> bytes:
    data = bytearray(encode(photo((16, 16)), "PNG"))
    data[29] ^= 0xFF  # the IHDR chunk's CRC: 8 signature + 4 length + 4 type + 13 data
    return bytes(data)


def huge_png() -> bytes:
    """A one-bit PNG over the default pixel limit: a few KB on disk, 270 MB once decoded."""
    return encode(Image.new("1", HUGE, 1), "PNG")


def animated_gif() -> bytes:
    """Three frames: red, green, blue. The first frame (red) must be used."""
    frames = []
    for i in range(3):
        frame = Image.new("P", (24, 24), i)
        frame.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
        frames.append(frame)
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def multipage_tiff() -> bytes:
    """Two pages of different sizes and colours; the first (grey, 30x20) must be used."""
    first = Image.new("RGB", (30, 20), (90, 90, 90))
    return encode(first, "TIFF", save_all=True, append_images=[Image.new("RGB", (50, 50), "red")])


def tiff_16bit() -> bytes:
    ramp = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    return encode(Image.fromarray(ramp), "TIFF")  # mode I;16


def tiff_float() -> bytes:
    return encode(Image.fromarray(np.linspace(0, 1, 512, dtype=np.float32).reshape(16, 32)), "TIFF")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def ycck_jpeg(cmyk=(0, 255, 255, 0)) -> bytes:
    """A JPEG in Adobe's YCCK colour space (as Photoshop writes CMYK), of one CMYK colour.

    Pillow cannot write YCCK, so the CMYK values are converted to YCCK by hand (libjpeg's
    formulas, for Adobe's inverted CMYK), written as plain CMYK, and the Adobe marker's
    transform flag is set to 2 (YCCK).
    """
    stored = 255 - np.asarray(cmyk, float)  # Adobe CMYK is stored inverted
    r, g, b = 255 - stored[:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    values = 255 - np.clip(np.round([y, cb, cr, stored[3]]), 0, 255)
    data = bytearray(
        encode(Image.new("CMYK", (32, 32), tuple(int(v) for v in values)), "JPEG", quality=100)
    )
    adobe = data.find(b"Adobe")
    assert data[adobe + 11] == 0, "expected an Adobe marker with transform 0"
    data[adobe + 11] = 2
    return bytes(data)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([10, 20, 30, 200, 50, 50] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))
    return encode(image, "PNG", transparency=0)


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(quadrants(), "JPEG", quality=95, exif=exif)


def one_pixel() -> bytes:
    return encode(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG")


def exif_expected(orientation: int, array: np.ndarray | None = None) -> np.ndarray:
    """The quadrants image (or ``array``, as stored) as a viewer shows it, from the EXIF
    specification (not Pillow)."""
    a = np.asarray(quadrants()) if array is None else array
    return {
        1: a,
        2: a[:, ::-1],
        3: a[::-1, ::-1],
        4: a[::-1, :],
        5: a.transpose(1, 0, 2),
        6: np.rot90(a, -1),
        7: a.transpose(1, 0, 2)[::-1, ::-1],
        8: np.rot90(a, 1),
    }[orientation]


#: name -> bytes: images that must be embedded.
GOOD = {
    "one pixel.png": one_pixel,
    "animated.gif": animated_gif,
    "pages.tiff": multipage_tiff,
    "deep16.tif": tiff_16bit,
    "float32.tif": tiff_float,
    "cmyk.jpg": cmyk_jpeg,
    "ycck.jpg": ycck_jpeg,
    "palette.png": palette_with_transparency,
    **{f"exif{k}.jpg": (lambda k=k: exif_jpeg(k)) for k in range(1, 9)},
}

#: name -> (bytes, a regular expression the recorded reason must match).
BAD = {
    "truncated.jpg": (truncated_jpeg, "truncated"),
    "empty.jpg": (lambda: b"", "empty file"),
    "text.jpg": (lambda: b"just some text, renamed\n" * 4, "not an image"),
    "broken crc.png": (png_with_broken_crc, "corrupt PNG.*checksum"),
    "huge.png": (huge_png, "too large.*max_pixels"),
}


def _flat(size: tuple[int, int], rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.uint8), (size[1], size[0], 3))


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.round(values).astype(np.uint8)[..., None], 3, axis=-1)


def _palette_expected() -> np.ndarray:
    array = np.empty((16, 16, 3), np.uint8)
    array[:, :8] = (200, 50, 50)  # palette index 1
    array[:, 8:] = 255  # index 0, transparent: composited on white
    return array


#: name -> (the RGB pixels ``GOOD[name]`` shows, from how it was made; the mean absolute
#: difference a decode may have from them: JPEG's loss, or none).
GOOD_PIXELS = {
    "one pixel.png": (_flat((1, 1), (200, 100, 50)), 0),
    "animated.gif": (_flat((24, 24), (255, 0, 0)), 0),
    "pages.tiff": (_flat((30, 20), (90, 90, 90)), 0),
    "deep16.tif": (_gray(np.linspace(0, 65535, 64 * 16).reshape(16, 64) * 255 / 65535), 1),
    "float32.tif": (_gray(np.linspace(0, 1, 512).reshape(16, 32) * 255), 1),
    "cmyk.jpg": (_flat((32, 32), (255, 0, 0)), 4),
    "ycck.jpg": (_flat((32, 32), (255, 0, 0)), 4),
    "palette.png": (_palette_expected(), 0),
    **{f"exif{k}.jpg": (exif_expected(k), 8) for k in range(1, 9)},
}
