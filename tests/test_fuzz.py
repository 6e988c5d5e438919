"""Fuzzing: random and mutated bytes into the image loader and the store reader.

Each reader must either succeed or raise its documented error (``ImageError``; ``StoreError``),
never crash or hang, for 10,000 cases each. The cases come from a fixed
seed (the ``ci`` profile in ``conftest.py``), so CI always checks the same ones; run with
``--hypothesis-profile explore`` to try new ones.
"""

from __future__ import annotations

import contextlib
import signal

import h5py
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


def _seed_contents() -> tuple[Embeddings, Predictions]:
    rng = np.random.default_rng(0)
    ids = ["a.jpg", "b.png", "c.jpg"]
    embeddings = Embeddings(
        ids=ids,
        sources=[f"f/{i}" for i in ids],
        sha256=[f"{i}" * 64 for i in range(3)],
        width=np.array([10, 20, 30]),
        height=np.array([5, 6, 7]),
        vectors=rng.normal(size=(3, 8)).astype(np.float32),
        failed={"bad.jpg": "empty file"},
        patch_vectors=rng.normal(size=(6, 8)).astype(np.float32),
        patch_boxes=np.arange(24).reshape(6, 4),
        patch_counts=np.array([1, 2, 3]),
        meta=embedding_meta(patches={"size": 4}),
    )
    labels = np.array([["x", "y"], ["y", "x"], ["x", "y"]])
    scores = np.array([[0.75, 0.25], [0.5, 0.375], [0.875, 0.125]], np.float32)
    predictions = Predictions(ids=ids, labels=labels, scores=scores, head="h")
    return embeddings, predictions


@pytest.fixture(scope="module")
def store_seed(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("seed") / "seed.h5"
    write_folder(*_seed_contents(), path, "f")
    return path.read_bytes()


def _read_everything(path) -> dict:
    """Everything the reader gives for a folder file, checked for the shapes it promises: one
    row per image in every column, and each record's vectors shaped as the matrix's rows."""
    with Folder(path, "f") as folder:
        ids, matrix, table = folder.ids(), folder.matrix(), folder.table()
        attrs, failed = folder.attrs, folder.failed
        assert len(folder) == len(ids) == len(matrix)
        assert all(len(column) == len(ids) for column in table.values())
        assert table["image_id"] == ids
        records = list(folder)
        assert [record.image_id for record in records] == ids
        for record in records:
            assert record.embedding.shape == matrix.shape[1:]
            if record.patches is not None:
                vectors, boxes = record.patches.embeddings, record.patches.boxes
                assert vectors.shape[1:] == matrix.shape[-1:] and boxes.shape == (len(vectors), 4)
            assert all(isinstance(label, str) for label, _ in record.topk or [])
        return {
            "ids": ids,
            "matrix": matrix,
            "table": table,
            "attrs": attrs,
            "failed": failed,
            "records": records,
        }


def test_the_store_seed_reads_back_what_was_written(store_seed, tmp_path):
    path = tmp_path / "f.h5"
    path.write_bytes(store_seed)
    embeddings, predictions = _seed_contents()
    read = _read_everything(path)
    assert read["ids"] == embeddings.ids and read["failed"] == embeddings.failed
    assert np.array_equal(read["matrix"], embeddings.vectors)
    assert read["table"]["source"] == embeddings.sources
    assert read["table"]["sha256"] == embeddings.sha256
    assert list(read["table"]["width"]) == [10, 20, 30]
    assert read["table"]["label"] == ["x", "y", "x"]
    assert np.array_equal(read["table"]["score"], predictions.scores[:, 0])
    assert read["attrs"]["embedding_dim"] == 8 and read["attrs"]["patches"] == {"size": 4}
    offsets = np.concatenate([[0], np.cumsum(embeddings.patch_counts)])
    for i, record in enumerate(read["records"]):
        assert record.source == embeddings.sources[i] and record.sha256 == embeddings.sha256[i]
        assert (record.width, record.height) == (embeddings.width[i], embeddings.height[i])
        assert np.array_equal(record.embedding, embeddings.vectors[i])
        assert record.label == predictions.labels[i, 0]
        assert record.score == predictions.scores[i, 0]
        assert record.topk == list(zip(predictions.labels[i], predictions.scores[i], strict=True))
        lo, hi = offsets[i], offsets[i + 1]
        assert np.array_equal(record.patches.embeddings, embeddings.patch_vectors[lo:hi])
        assert np.array_equal(record.patches.boxes, embeddings.patch_boxes[lo:hi])


def test_store_reader_never_crashes_or_hangs(store_seed, tmp_path):
    """Whatever the bytes, reading gives a consistent folder or a StoreError naming the file:
    never another exception (a KeyError, an h5py error) and never a hang."""
    path = tmp_path / "f.h5"
    cases = []

    @given(st.one_of(st.binary(max_size=4096), _mutations([store_seed])))
    def check(data):
        cases.append(len(data))
        path.write_bytes(data)
        with _no_hang(), contextlib.suppress(StoreError):
            _read_everything(path)

    check()
    assert len(cases) >= 10_000


#: What a damaged folder file may hold in place of a dataset, or of an attribute's value.
_DATASET_DAMAGE = ("deleted", "a group", "a row short", "text", "a scalar", "3-d")
_ATTRIBUTE_DAMAGE = ("deleted", "x", 7, 2.5, np.array([1, 2]), np.bytes_(b"\xff\xfe"), "{")


def _damage_dataset(f: h5py.File, name: str, damage: str) -> None:
    data = f[name][()]
    del f[name]
    if damage == "a group":
        f.create_group(name)
    elif damage == "a row short":
        f[name] = data[:-1]
    elif damage == "text":
        f[name] = np.array(["x"] * len(data), dtype=h5py.string_dtype())
    elif damage == "a scalar":
        f[name] = 7
    elif damage == "3-d":
        f[name] = np.zeros((2, 2, 2), np.float32)


def test_store_reader_names_every_damaged_part(store_seed, tmp_path):
    """Each dataset and attribute of a folder file damaged in turn (gone, another type, another
    shape), which random bytes almost never reach: every read gives what it promises or a
    StoreError, never another exception."""
    seed, path = tmp_path / "seed.h5", tmp_path / "f.h5"
    seed.write_bytes(store_seed)
    datasets, attributes = [], [("/", name) for name in h5py.File(seed, "r").attrs]
    with h5py.File(seed, "r") as f:

        def visit(name, item):
            if isinstance(item, h5py.Dataset):
                datasets.append(name)
            attributes.extend((name, attr) for attr in item.attrs)

        f.visititems(visit)
    cases = [("dataset", name, damage) for name in datasets for damage in _DATASET_DAMAGE]
    cases += [("attribute", where, damage) for where in attributes for damage in _ATTRIBUTE_DAMAGE]
    refused = 0
    for kind, where, damage in cases:
        path.write_bytes(store_seed)
        with h5py.File(path, "r+") as f:
            if kind == "dataset":
                _damage_dataset(f, where, damage)
            elif isinstance(damage, str) and damage == "deleted":
                del f[where[0]].attrs[where[1]]
            else:
                f[where[0]].attrs[where[1]] = damage
        try:
            _read_everything(path)
        except StoreError as exc:
            assert str(path) in str(exc), (kind, where, damage)
            refused += 1
    assert len(cases) > 300 and refused > len(cases) // 3
