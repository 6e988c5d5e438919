"""The embedding loop: out-of-memory recovery, determinism, refused files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import FAST_CONFIG, make_image

from snakembed.config import load_config
from snakembed.embed import embed_folder, embed_images, load_backbone, load_embeddings


class _RunsOutOfMemory(torch.nn.Module):
    """Raises CUDA's out-of-memory error for batches larger than ``fits`` (on any device)."""

    def __init__(self, inner: torch.nn.Module, fits: int) -> None:
        super().__init__()
        self.inner, self.fits, self.sizes = inner, fits, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


@pytest.fixture
def setup(tmp_path):
    paths = [make_image(tmp_path / f"{i}.png", size=(50 + i, 40), seed=i) for i in range(10)]
    config = load_config(overrides={**FAST_CONFIG, "batch_size": 8})
    return paths, config, load_backbone(config)


def test_out_of_memory_halves_the_batch_and_loses_nothing(setup, caplog):
    paths, config, backbone = setup
    expected = embed_images(paths, config, backbone=backbone, threads=1)
    flaky = _RunsOutOfMemory(backbone.model, fits=3)
    backbone.model = flaky
    with caplog.at_level(logging.WARNING, logger="snakembed"):
        got = embed_images(paths, config, backbone=backbone, threads=1)
    # 8 fails, 4 fails, then chunks of 2; the smaller size is kept for the next batch (of 2)
    assert flaky.sizes == [8, 4, 2, 2, 2, 2, 2]
    assert got.ids == expected.ids and not got.failed
    assert np.allclose(got.vectors, expected.vectors, atol=1e-5)
    assert "retrying with 4" in caplog.text and "retrying with 2" in caplog.text


def test_out_of_memory_on_one_image_is_a_clear_error(setup):
    paths, config, backbone = setup
    backbone.model = _RunsOutOfMemory(backbone.model, fits=0)
    with pytest.raises(RuntimeError, match="single image.*device: cpu"):
        embed_images(paths, config, backbone=backbone, threads=1)


def test_other_errors_are_not_taken_for_out_of_memory(setup):
    paths, config, backbone = setup

    def broken(x):
        raise RuntimeError("shape mismatch")

    backbone.model.forward = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        embed_images(paths, config, backbone=backbone, threads=1)


def test_same_inputs_give_bit_identical_embeddings(setup):
    paths, config, _ = setup
    first = embed_images(paths, config, threads=2)
    second = embed_images(paths, config, threads=2)
    assert first.vectors.tobytes() == second.vectors.tobytes()


def test_refused_files_are_recorded_without_being_read(tmp_path):
    folder = tmp_path / "images" / "a"
    make_image(folder / "ok.jpg")
    (folder / "secret.jpg").symlink_to("/etc/hostname")
    config = load_config(overrides=FAST_CONFIG)
    out = tmp_path / "a.npz"
    embed_folder(
        tmp_path / "images",
        "a",
        ["ok.jpg", "secret.jpg"],
        out,
        config,
        refused={"secret.jpg": "outside the image root"},
    )
    stored = load_embeddings(out)
    assert stored.ids == ["ok.jpg"]
    assert stored.failed == {"secret.jpg": "outside the image root"}
