"""Fuzzing: random and mutated bytes into the image loader and the store reader.

Each reader must either succeed or raise its documented error (``ImageError``; ``StoreError``
or ``KeyError``), never crash or hang, for 10,000 cases each. The cases come from a fixed
seed (the ``ci`` profile in ``conftest.py``), so CI always checks the same ones; run with
``--hypothesis-profile explore`` to try new ones.
"""

from __future__ import annotations

import contextlib
import signal

import numpy as np
import pytest
import samples
from conftest import embedding_meta
from hypothesis import given
from hypothesis import strategies as st

from snakembed.classify import Predictions
from snakembed.embed import Embeddings
from snakembed.images import ImageError, decode_image
from snakembed.reader import Folder, StoreError
from snakembed.store import write_folder

pytestmark = pytest.mark.slow

#: No single case may take longer than this.
HANG_SECONDS = 10


@contextlib.contextmanager
def _no_hang():
    def alarm(signum, frame):
        raise AssertionError(f"no answer in {HANG_SECONDS} s: a hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _mutations(seeds: list[bytes]):
    """A seed file with some bytes overwritten, a run of bytes deleted, and/or truncated."""

    @st.composite
    def mutate(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            start = draw(st.integers(0, len(data) - 1))
            del data[start : start + draw(st.integers(1, 64))]
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return bytes(data)

    return mutate()


_IMAGE_SEEDS = [
    samples.encode(samples.photo((24, 18)), "JPEG"),
    samples.encode(samples.photo((24, 18)), "PNG"),
    samples.encode(samples.photo((24, 18)), "BMP"),
    samples.encode(samples.photo((24, 18)), "WEBP"),
    samples.encode(samples.photo((24, 18)), "TIFF"),
    samples.animated_gif(),
    samples.cmyk_jpeg(),
    samples.exif_jpeg(6),
    samples.tiff_float(),
    samples.palette_with_transparency(),
]


def test_image_loader_never_crashes_or_hangs():
    cases = []

    @given(st.one_of(st.binary(max_size=4096), _mutations(_IMAGE_SEEDS)))
    def check(data):
        cases.append(len(data))
        with _no_hang():
            try:
                decoded = decode_image(data, min_side=8)
            except ImageError:
                return
        assert decoded.image.mode == "RGB"
        assert decoded.image.width >= 1 and decoded.image.height >= 1

    check()
    assert len(cases) >= 10_000


def _folder_file_bytes(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(0)
    ids = ["a.jpg", "b.png", "c.jpg"]
    embeddings = Embeddings(
        ids=ids,
        sources=[f"f/{i}" for i in ids],
        sha256=["0" * 64] * 3,
        width=np.array([10, 20, 30]),
        height=np.array([5, 6, 7]),
        vectors=rng.normal(size=(3, 8)).astype(np.float32),
        failed={"bad.jpg": "empty file"},
        patch_vectors=rng.normal(size=(6, 8)).astype(np.float32),
        patch_boxes=np.tile(np.array([[0, 0, 5, 5]]), (6, 1)),
        patch_counts=np.array([2, 2, 2]),
        meta=embedding_meta(patches={"size": 4}),
    )
    labels = np.array([["x", "y"]] * 3)
    predictions = Predictions(
        ids=ids, labels=labels, scores=np.full((3, 2), 0.5, np.float32), head="h"
    )
    path = tmp_path_factory.mktemp("seed") / "seed.h5"
    write_folder(embeddings, predictions, path, "f")
    return path.read_bytes()


@pytest.fixture(scope="module")
def store_seed(tmp_path_factory):
    return _folder_file_bytes(tmp_path_factory)


def _read_everything(path) -> None:
    with Folder(path, "f") as folder:
        folder.attrs, folder.failed, folder.table(), len(folder)
        for record in folder:
            record.embedding.sum()


def test_the_store_seed_reads(store_seed, tmp_path):
    path = tmp_path / "f.h5"
    path.write_bytes(store_seed)
    _read_everything(path)


def test_store_reader_never_crashes_or_hangs(store_seed, tmp_path):
    path = tmp_path / "f.h5"
    cases = []

    @given(st.one_of(st.binary(max_size=4096), _mutations([store_seed])))
    def check(data):
        cases.append(len(data))
        path.write_bytes(data)
        with _no_hang(), contextlib.suppress(StoreError, KeyError):
            _read_everything(path)

    check()
    assert len(cases) >= 10_000
