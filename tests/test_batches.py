"""The batched tensor decoding path (``decode: torchvision``), on the CPU as CI runs it: the
same decoder and code the GPU path uses (there it runs on nvJPEG; ``bench/gpu.sh`` checks that),
with the same routing of what it does not take, the same fallbacks and the same counts."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import samples
from conftest import FAST_CONFIG, folder_shard, run_snakemake, shard_log, write_config
from PIL import Image, ImageDraw

from snakembed.config import load_config, numbers_fingerprint
from snakembed.embed import Embedder
from snakembed.reader import Folder


def _smooth(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like picture (gradient and shapes): what resampling differences are judged on."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = Image.fromarray(np.broadcast_to(top + (bottom - top) * y, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.3) * min(w, h)
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(rng.integers(0, 256, 3).tolist()))
    return image


def _noisy(size: tuple[int, int], seed: int) -> Image.Image:
    """Gradients with strong per-pixel noise: what a decode at reduced scale changes most."""
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.linspace(0, 255, w)[None, :, None], np.linspace(0, 255, h)[:, None, None]
    pixels = (x * rng.random(3) + y * rng.random(3) + rng.integers(0, 40, (h, w, 3))) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _files(folder) -> dict[str, str]:
    """Every kind of file the tensor path routes; returns name -> the way it must take."""
    folder.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "a.jpg": (_smooth((300, 200), 1).save, {"quality": 90}, "device"),
        "b_progressive.jpg": (_smooth((240, 180), 2).save, {"progressive": True}, "device"),
        # large enough for Pillow's draft scaling, which the device decoder does not do: a
        # noisy photo, whose embedding a reduced-scale decode moves most (cosine 0.9986)
        "c_large.jpg": (_noisy((1200, 900), 3).save, {"quality": 90}, "pillow"),
        "d_gray.jpg": (_smooth((160, 120), 4).convert("L").save, {}, "device"),
        "e_rotated.jpg": (_smooth((200, 120), 5).save, {"exif": exif}, "device"),
        "f_drawing.png": (_smooth((90, 70), 6).save, {}, "pillow"),
        "h_too_large.jpg": (_smooth((1100, 1010), 8).save, {}, "failed"),
    }
    ways = {}
    for name, (save, options, way) in files.items():
        save(folder / name, **options)
        ways[name] = way
    (folder / "g_cmyk.jpg").write_bytes(samples.cmyk_jpeg())
    ways["g_cmyk.jpg"] = "pillow"
    (folder / "i_truncated.jpg").write_bytes(samples.truncated_jpeg())
    ways["i_truncated.jpg"] = "failed"
    return ways


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batches") / "images"
    ways = _files(folder)
    paths = sorted(folder.iterdir())
    results = {}
    for decode in ("pillow", "torchvision"):
        config = load_config(
            overrides={**FAST_CONFIG, "decode": decode, "device": "cpu", "max_pixels": 1_100_000}
        )
        results[decode] = Embedder(config)(paths)
    return ways, results


def test_both_decoders_keep_and_refuse_the_same_images_with_the_same_facts(embedded):
    ways, results = embedded
    pillow, tensor = results["pillow"], results["torchvision"]
    kept = sorted(name for name, way in ways.items() if way != "failed")
    # a batch holding a truncated file keeps its good images
    assert pillow.ids == tensor.ids == kept
    assert pillow.failed.keys() == tensor.failed.keys() == {"h_too_large.jpg", "i_truncated.jpg"}
    assert pillow.failed == tensor.failed  # the same reasons, word for word
    assert "image too large" in tensor.failed["h_too_large.jpg"]
    assert pillow.sha256 == tensor.sha256
    # EXIF orientation applied by both: the rotated photo is recorded upright
    assert list(pillow.width) == list(tensor.width)
    assert list(pillow.height) == list(tensor.height)
    rotated = tensor.ids.index("e_rotated.jpg")
    assert (tensor.width[rotated], tensor.height[rotated]) == (120, 200)


def test_both_decoders_give_the_same_embeddings(embedded):
    _, results = embedded
    a, b = results["pillow"].vectors, results["torchvision"].vectors
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.999, dict(zip(results["pillow"].ids, cosine, strict=True))
    # the same pixels through the same resize: equal to rounding
    assert np.allclose(a, b, atol=1e-4 * np.abs(a).max())


def test_without_draft_scaling_the_device_decodes_large_photos_to_the_same_embedding(
    tmp_path, caplog
):
    folder = tmp_path / "images"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 5
    _noisy((1200, 900), 7).save(folder / "large.jpg", quality=90)
    _noisy((900, 600), 8).save(folder / "large_rotated.jpg", quality=90, exif=exif)
    paths = sorted(folder.iterdir())
    vectors = {}
    for decode in ("pillow", "torchvision"):
        overrides = {**FAST_CONFIG, "decode": decode, "device": "cpu"}
        config = load_config(
            overrides={**overrides, "preprocess": {**overrides["preprocess"], "draft": False}}
        )
        with caplog.at_level(logging.INFO, logger="snakembed"):
            result = Embedder(config)(paths, label="large")
        assert result.ids == ["large.jpg", "large_rotated.jpg"]
        vectors[decode] = result.vectors
    assert "large: 2 images decoded on cpu, 0 by Pillow" in caplog.text
    a, b = vectors["pillow"], vectors["torchvision"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.999


def test_the_log_counts_what_each_decoder_took(tmp_path, caplog):
    ways = _files(tmp_path / "images")
    paths = sorted((tmp_path / "images").iterdir())
    config = load_config(
        overrides={**FAST_CONFIG, "decode": "torchvision", "device": "cpu", "max_pixels": 1_100_000}
    )
    with caplog.at_level(logging.INFO, logger="snakembed"):
        Embedder(config)(paths, label="mixed")
    device = sum(way == "device" for way in ways.values())
    pillow = sum(way == "pillow" for way in ways.values())
    assert f"mixed: {device} images decoded on cpu, {pillow} by Pillow" in caplog.text
    for name in ("h_too_large.jpg", "i_truncated.jpg"):
        assert name in caplog.text  # refused files are named in the log


def test_the_decoder_is_part_of_the_numbers():
    cpu = {"device": "cpu"}
    auto = numbers_fingerprint(load_config(overrides={**cpu, "decode": "auto"}))
    pillow = numbers_fingerprint(load_config(overrides={**cpu, "decode": "pillow"}))
    tensor = numbers_fingerprint(load_config(overrides={**cpu, "decode": "torchvision"}))
    assert auto == pillow  # auto is Pillow on the CPU
    assert tensor["hash"] != pillow["hash"]
    gpu = numbers_fingerprint(load_config(overrides={"device": "cuda", "decode": "auto"}))
    assert gpu["decode"] == "torchvision"


def test_changing_the_decoder_recomputes_every_folder(tmp_path):
    images = tmp_path / "images"
    for folder, seed in (("x", 10), ("y", 20)):
        (images / folder).mkdir(parents=True)
        for i in range(3):
            _smooth((160, 120), seed + i).save(images / folder / f"{i}.jpg")
    workdir = tmp_path / "work"
    workdir.mkdir()
    configfile = write_config(
        tmp_path / "config.yaml", images=str(images), results="results", device="cpu"
    )
    run_snakemake(workdir, configfile)
    before = {}
    for folder in ("x", "y"):
        with Folder(workdir / "results" / "embeddings" / f"{folder}.h5", folder) as stored:
            assert stored.attrs["decode"] == "pillow"
            before[folder] = stored.matrix()
    run_snakemake(workdir, configfile, "--config", "decode=torchvision")
    for folder in ("x", "y"):
        with Folder(workdir / "results" / "embeddings" / f"{folder}.h5", folder) as stored:
            assert stored.attrs["decode"] == "torchvision"
            after = stored.matrix()
        log = shard_log(workdir / "results", folder)
        assert "3 images stored (3 embedded, 0 reused)" in log
        # each group of the folder's shard says how its JPEGs were decoded: all on the device
        shard = folder_shard(workdir / "results", folder)
        shard_images = 3 * sum(folder_shard(workdir / "results", f) == shard for f in "xy")
        decoded = re.findall(r": (\d+) images decoded on cpu, (\d+) by Pillow", log)
        assert sum(int(d) for d, _ in decoded) == shard_images and {p for _, p in decoded} == {"0"}
        cosine = (before[folder] * after).sum(1) / (
            np.linalg.norm(before[folder], axis=1) * np.linalg.norm(after, axis=1)
        )
        assert cosine.min() >= 0.999
