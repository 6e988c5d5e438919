"""The embedding loop: out-of-memory recovery, the traced network, determinism, reuse of
unchanged images, refused files."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FAST_CONFIG,
    OTHER_FILESYSTEMS,
    make_image,
    other_filesystem,
    skip_unless_ci,
)

from snakembed.config import load_config
from snakembed.devices import resolve_compute
from snakembed.embed import Embedder, embed_images, load_backbone, prepare_model
from snakembed.pipeline import Models, run_folder
from snakembed.reader import Folder


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
    # The network runs untraced, so that the tests can replace it with a wrapper.
    config = load_config(overrides={**FAST_CONFIG, "batch_size": 8, "optimize": False})
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
    out = tmp_path / "a.h5"
    run_folder(
        tmp_path / "images",
        "a",
        ["ok.jpg", "secret.jpg"],
        out,
        config,
        refused={"secret.jpg": "outside the image root"},
    )
    with Folder(out, "a") as stored:
        assert stored.ids() == ["ok.jpg"]
        assert stored.failed == {"secret.jpg": "outside the image root"}


def test_the_traced_network_gives_the_networks_embeddings(setup):
    """Tolerance: float rounding (1e-4 of the largest value); the trace is used on the CPU."""
    paths, config, _ = setup
    traced = Embedder({**config, "optimize": True}, threads=1)
    eager = Embedder(config, threads=1)
    assert isinstance(traced.forward.model, torch.jit.ScriptModule)
    assert not isinstance(eager.forward.model, torch.jit.ScriptModule)
    a, b = traced(paths), eager(paths)
    assert a.ids == b.ids
    assert np.allclose(a.vectors, b.vectors, rtol=1e-4, atol=1e-4 * np.abs(b.vectors).max())
    # oneDNN's graph fusion takes over a batch shape from its second call: the fused kernels
    # give the network's numbers too
    pixels = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8)
    expected = eager.forward(pixels)
    assert torch.jit.onednn_fusion_enabled()
    for _ in range(4):
        got = traced.forward(pixels)
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


class _Untraceable(torch.nn.Module):
    """Branches on its input's values: a trace would bake one branch in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)

    def forward(self, x):
        pooled = x.mean(dim=(2, 3))
        return self.linear(pooled) if pooled.sum() > 0 else -self.linear(pooled)


def test_a_network_whose_trace_differs_runs_untraced(caplog):
    net = _Untraceable()
    with caplog.at_level(logging.INFO, logger="snakembed"):
        ready = prepare_model(net, resolve_compute("cpu", "fp32"), size=8)
    assert ready is net and "runs untraced" in caplog.text
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(ready(x), net(x))


def test_a_traced_network_that_fails_at_run_time_hands_over_to_the_network(setup, caplog):
    paths, config, _ = setup
    embedder = Embedder({**config, "optimize": True}, threads=1)
    expected = Embedder(config, threads=1)(paths)

    def broken(x):
        raise RuntimeError("the trace does not fit this shape")

    embedder.forward.model = broken
    with caplog.at_level(logging.WARNING, logger="snakembed"):
        got = embedder(paths)
    assert "running it as it is" in caplog.text
    assert np.array_equal(got.vectors, expected.vectors)


def test_unchanged_images_are_reused_and_new_ones_embedded(tmp_path, caplog):
    root = tmp_path / "images"
    for i in range(3):
        make_image(root / "a" / f"{i}.png", seed=i)
    config = load_config(overrides=FAST_CONFIG)
    out, models = tmp_path / "a.h5", Models()
    names = ["0.png", "1.png", "2.png"]
    run_folder(root, "a", names, out, config, models=models)
    make_image(root / "a" / "1.png", seed=99)  # changed
    make_image(root / "a" / "3.png", seed=3)  # added
    with caplog.at_level(logging.INFO, logger="snakembed"):
        again = run_folder(root, "a", [*names, "3.png"], out, config, models=models)
    assert "2 unchanged images reused" in caplog.text
    fresh = run_folder(root, "a", [*names, "3.png"], tmp_path / "fresh.h5", config)
    assert again.ids == fresh.ids == ["0.png", "1.png", "2.png", "3.png"]
    assert np.array_equal(again.vectors, fresh.vectors)
    assert list(again.width) == list(fresh.width) and again.sha256 == fresh.sha256


def test_nothing_is_reused_when_the_numbers_change(tmp_path, caplog):
    make_image(tmp_path / "images" / "a" / "0.png")
    config = load_config(overrides=FAST_CONFIG)
    out = tmp_path / "a.h5"
    run_folder(tmp_path / "images", "a", ["0.png"], out, config)
    other = load_config(overrides={**FAST_CONFIG, "preprocess": {"resize": 72, "crop": 64}})
    with caplog.at_level(logging.INFO, logger="snakembed"):
        run_folder(tmp_path / "images", "a", ["0.png"], out, other)
    assert "unchanged images reused" not in caplog.text
    out.write_bytes(b"damaged")  # an unreadable earlier file is no reason to fail
    run_folder(tmp_path / "images", "a", ["0.png"], out, other)
    with Folder(out, "a") as stored:
        assert stored.ids() == ["0.png"]


def test_vectors_of_another_device_precision_or_compilation_are_never_reused(tmp_path, caplog):
    from snakembed.store import read_earlier

    make_image(tmp_path / "images" / "a" / "0.png")
    config = load_config(overrides=FAST_CONFIG)  # device: cpu, precision: fp32
    out, models = tmp_path / "a.h5", Models()
    run_folder(tmp_path / "images", "a", ["0.png"], out, config, models=models)
    meta = models.embedder(config).meta
    assert (meta["device"], meta["precision"], meta["compiled"]) == ("cpu", "fp32", 0)
    with Folder(out, "a") as stored:
        assert stored.attrs["compiled"] == 0
    assert read_earlier(out, meta) is not None
    changes = (("precision", "bf16"), ("device", "cuda"), ("weights_sha256", "x"), ("compiled", 1))
    for key, value in changes:
        assert read_earlier(out, {**meta, key: value}) is None, key

    bf16 = load_config(overrides={**FAST_CONFIG, "precision": "bf16"})
    with caplog.at_level(logging.INFO, logger="snakembed"):
        again = run_folder(tmp_path / "images", "a", ["0.png"], out, bf16, models=models)
    assert "unchanged images reused" not in caplog.text
    fresh = run_folder(tmp_path / "images", "a", ["0.png"], tmp_path / "fresh.h5", bf16)
    assert np.array_equal(again.vectors, fresh.vectors)
    with Folder(out, "a") as stored:
        assert (stored.attrs["device"], stored.attrs["precision"]) == ("cpu", "bf16")


def test_a_folder_called_off_stops_between_batches(tmp_path):
    """A worker whose job has gone stops its folder at the next batch (the job, being gone,
    writes nothing)."""
    from snakembed.pipeline import Cancelled, compute_folder

    for i in range(6):
        make_image(tmp_path / "images" / "a" / f"{i}.png", seed=i)
    config = load_config(overrides={**FAST_CONFIG, "batch_size": 2})
    asked = []

    def cancelled():  # asked before each of the three batches
        asked.append(True)
        return len(asked) >= 3

    names = [f"{i}.png" for i in range(6)]
    with pytest.raises(Cancelled, match="called off after 4 of 6 images"):
        compute_folder(
            tmp_path / "images", "a", names, tmp_path / "a.h5", config, cancelled=cancelled
        )
    assert len(asked) == 3


def test_patches_are_reused_with_their_images(tmp_path):
    root = tmp_path / "images"
    make_image(root / "a" / "0.png", size=(80, 60))
    patches = {"enabled": True, "size": 32, "stride": 32}
    config = load_config(overrides={**FAST_CONFIG, "patches": patches})
    out, models = tmp_path / "a.h5", Models()
    first = run_folder(root, "a", ["0.png"], out, config, models=models)
    make_image(root / "a" / "1.png", size=(64, 64), seed=1)
    again = run_folder(root, "a", ["0.png", "1.png"], out, config, models=models)
    n = first.patch_counts[0]
    assert np.array_equal(again.patch_vectors[:n], first.patch_vectors)
    assert np.array_equal(again.patch_boxes[:n], first.patch_boxes)
    assert list(again.patch_counts[:1]) == list(first.patch_counts)
    assert again.patch_counts[1] > 0


@pytest.mark.parametrize("slurm", [False, True])
def test_a_folder_file_is_built_in_scratch_on_a_cluster_node(tmp_path, monkeypatch, request, slurm):
    """`scratch: auto` builds the file in $TMPDIR in a SLURM job, when that is another
    filesystem, and copies it over; the file is the same as one built beside the result."""
    results = tmp_path / "results"
    results.mkdir()
    scratch = other_filesystem(results)
    if scratch is None:
        skip_unless_ci(f"no folder on another filesystem than {results}: {OTHER_FILESYSTEMS}")
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "1")
    copied = []
    copy = shutil.copyfile
    monkeypatch.setattr(
        shutil, "copyfile", lambda a, b: copied.append(Path(a).parent) or copy(a, b)
    )
    make_image(tmp_path / "images" / "a" / "0.png")
    config = load_config(overrides=FAST_CONFIG)
    built = run_folder(tmp_path / "images", "a", ["0.png"], results / "a.h5", config)
    assert copied == ([scratch] if slurm else [])
    assert list(scratch.glob("*.h5")) == [] and sorted(p.name for p in results.iterdir()) == [
        "a.h5"
    ]
    with Folder(results / "a.h5", "a") as stored:
        assert stored.ids() == built.ids and np.array_equal(stored.matrix(), built.vectors)


@pytest.mark.parametrize("patches", [False, True])
def test_folders_computed_together_get_what_each_gets_alone(tmp_path, patches):
    """A shard job embeds its small folders as one stream and splits it: each folder's
    embeddings, patches, failures, reuse and predictions equal computing it alone, including
    the root folder, a folder whose images all fail, and one with an earlier file to reuse."""
    from snakembed.pipeline import compute_folder, compute_folders

    root = tmp_path / "images"
    names = {".": ["top.png"], "a": ["0.png", "1.jpg"], "b/c": ["x.png", "bad.jpg"], "d": ["e.png"]}
    for f, (folder, files) in enumerate(names.items()):
        for i, name in enumerate(files):
            make_image(root / folder / name, size=(60 + 7 * i, 44), seed=10 * f + i)
    (root / "b/c/bad.jpg").write_bytes(b"not an image")
    (root / "d/e.png").write_bytes(b"")
    refused = {"d": {}, "b/c": {"gone.png": "refused at discovery: test"}}
    overrides = {**FAST_CONFIG, "batch_size": 3}
    if patches:
        overrides["patches"] = {"enabled": True, "size": 32, "stride": 32}
    config = load_config(overrides=overrides)
    models = Models()
    earlier = tmp_path / "a-earlier.h5"
    run_folder(root, "a", ["0.png"], earlier, config, models=models)  # 0.png can be reused
    parts = []
    for folder, files in names.items():
        output = earlier if folder == "a" else tmp_path / f"{folder.replace('/', '_')}.h5"
        mine = refused.get(folder, {})
        parts.append(
            {"folder": folder, "names": [*files, *mine], "output": output, "refused": mine}
        )
    together = compute_folders(root, parts, config, models=models)
    for part, (result, predictions) in zip(parts, together, strict=True):
        alone, alone_predictions = compute_folder(
            root,
            part["folder"],
            part["names"],
            part["output"],
            config,
            refused=part["refused"],
            models=models,
        )
        assert result.ids == alone.ids and result.sources == alone.sources, part["folder"]
        assert result.sha256 == alone.sha256 and result.failed == alone.failed
        assert result.reused == alone.reused
        assert np.array_equal(result.width, alone.width)
        assert np.allclose(result.vectors, alone.vectors, atol=1e-4)
        assert predictions.ids == alone_predictions.ids
        assert np.array_equal(predictions.labels, alone_predictions.labels)
        if patches:
            assert np.array_equal(result.patch_counts, alone.patch_counts)
            assert np.array_equal(result.patch_boxes, alone.patch_boxes)
            assert np.allclose(result.patch_vectors, alone.patch_vectors, atol=1e-4)
    by_folder = {part["folder"]: result for part, (result, _) in zip(parts, together, strict=True)}
    assert by_folder["a"].reused == 1 and by_folder["."].ids == ["top.png"]
    assert set(by_folder["b/c"].failed) == {"bad.jpg", "gone.png"}
    assert by_folder["d"].ids == [] and set(by_folder["d"].failed) == {"e.png"}
