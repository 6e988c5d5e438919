"""A real run over a hostile tree: broken files, odd names, links. Nothing crashes or is lost."""

from __future__ import annotations

import io
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import samples
import torch
from conftest import finished_run, make_image, run_snakemake, shard_log, write_config
from PIL import Image

import snakembed
from snakembed.config import load_config
from snakembed.embed import embed_images
from snakembed.layout import folder_file

#: Folder names that trip shells, globs, Snakemake's wildcards and case-insensitive eyes.
ODD_FOLDERS = [
    "sp ace",
    "qu'ote",
    'dq"uote',
    "br[ack]et",
    "br{ace}",
    "{folder}",
    "st*r",
    "qu?stion",
    "ünï cödé",
    "-dash",
    "Case",
    "case",
    "$(touch PWNED)",
]
#: File names in one folder, for the same reasons.
ODD_FILES = [
    "{x}.jpg",
    "-x.jpg",
    "A.jpg",
    "a.jpg",
    "it's.jpg",
    "?.png",
    "*.png",
    "`touch PWNED`.jpg",
    "_ids.jpg",  # the folder file's bulk datasets are named `_ids`, `_embeddings` ...
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    images = base / "images"
    mixed = images / "mixed"
    mixed.mkdir(parents=True)
    for name, make in samples.GOOD.items():
        (mixed / name).write_bytes(make())
    for name, (make, _) in samples.BAD.items():
        (mixed / name).write_bytes(make())
    # each EXIF-oriented JPEG's pixels as stored, turned as the EXIF specification says, saved
    # losslessly: what the oriented JPEG must be embedded as
    for k in range(1, 9):
        stored = np.asarray(Image.open(io.BytesIO(samples.exif_jpeg(k))).convert("RGB"))
        upright = np.ascontiguousarray(samples.exif_expected(k, stored))
        (images / "upright").mkdir(exist_ok=True)
        Image.fromarray(upright).save(images / "upright" / f"exif{k}.png")
    for name in ("empty.jpg", "text.jpg", "truncated.jpg"):
        (images / "all bad" / name).parent.mkdir(exist_ok=True)
        (images / "all bad" / name).write_bytes(samples.BAD[name][0]())
    for i, folder in enumerate(ODD_FOLDERS):
        make_image(images / folder / f"{folder}.jpg", seed=i)
    for i, name in enumerate(ODD_FILES):
        make_image(images / "files" / name, seed=50 + i)
    outside = base / "outside"
    make_image(outside / "far.jpg", seed=99)
    links = images / "links"
    links.mkdir()
    (links / "inside.jpg").symlink_to("../mixed/exif1.jpg")
    (links / "outside.jpg").symlink_to(outside / "far.jpg")
    (links / "broken.jpg").symlink_to(base / "nowhere.jpg")
    (images / "external").symlink_to(outside, target_is_directory=True)
    make_image(images / ".git" / "hidden.jpg")
    config = write_config(base / "config.yaml", images=str(images), results=str(base / "results"))
    return finished_run(base, images, config)


def test_the_run_stores_every_good_image_as_if_alone(hostile):
    """The bad files beside them change nothing: each good image's stored vector is the one it
    gets embedded on its own."""
    good = sorted(samples.GOOD)
    alone = embed_images(
        [hostile["images"] / "mixed" / name for name in good], load_config(hostile["config"])
    )
    assert alone.ids == good and not alone.failed
    with snakembed.open_store(hostile["results"])["mixed"] as folder:
        assert sorted(folder.ids()) == good
        assert set(folder.failed) == set(samples.BAD)
        for name, expected in zip(good, alone.vectors, strict=True):
            record = folder[name]
            assert record.label and record.source == f"mixed/{name}"
            np.testing.assert_allclose(record.embedding, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(samples.BAD))
def test_each_bad_file_is_recorded_with_its_reason(hostile, name):
    with snakembed.open_store(hostile["results"])["mixed"] as folder:
        assert re.search(samples.BAD[name][1], folder.failed[name])
        assert name not in folder
    log = shard_log(hostile["results"], "mixed")
    assert name in log


def test_the_stored_pixels_follow_exif_orientation(hostile):
    """An oriented JPEG is embedded as the same pixels truly turned, and as no other turn."""
    store = snakembed.open_store(hostile["results"])
    with store["mixed"] as mixed, store["upright"] as upright:
        for k in range(1, 9):
            expected = samples.exif_expected(k)
            record = mixed[f"exif{k}.jpg"]
            assert (record.height, record.width) == expected.shape[:2]
            truth = upright[f"exif{k}.png"].embedding
            assert np.allclose(record.embedding, truth, rtol=1e-4, atol=1e-5), k
            for other in range(1, 9):
                if other != k:
                    wrong = upright[f"exif{other}.png"].embedding
                    assert not np.allclose(record.embedding, wrong, rtol=1e-3, atol=1e-3), k


def test_a_folder_where_everything_failed_still_gets_a_file(hostile):
    results = hostile["results"]
    with snakembed.open_store(results)["all bad"] as folder:
        assert folder.ids() == [] and folder.matrix().shape == (0, 512)
        assert set(folder.failed) == {"empty.jpg", "text.jpg", "truncated.jpg"}
    with h5py.File(results / "index.h5", "r") as index:
        assert "all bad" in index


def test_odd_names_are_stored_under_their_own_names(hostile):
    store = snakembed.open_store(hostile["results"])
    for folder in ODD_FOLDERS:
        assert store.lookup(f"{folder}/{folder}.jpg").source == f"{folder}/{folder}.jpg"
    with store["files"] as folder:
        assert sorted(folder.ids()) == sorted(ODD_FILES)
        assert folder["A.jpg"].sha256 != folder["a.jpg"].sha256
        records = {record.image_id: record for record in folder}
        assert sorted(records) == sorted(ODD_FILES)
        for row, image_id in enumerate(folder.ids()):
            assert records[image_id].source == f"files/{image_id}"
            assert np.array_equal(records[image_id].embedding, folder.matrix()[row])
    assert store.lookup("files/_ids.jpg").image_id == "_ids.jpg"
    # braces cannot be in a Snakemake path: they are escaped in the file name only
    assert folder_file(hostile["results"], "br{ace}").name == "br%7Bace%7D.h5"
    assert (hostile["results"] / "embeddings" / "%7Bfolder%7D.h5").is_file()
    with h5py.File(hostile["results"] / "index.h5", "r") as index:
        assert index["br{ace}/br{ace}.jpg/embedding"].shape == (512,)


def test_names_never_reach_a_shell(hostile):
    assert not list(hostile["base"].rglob("PWNED"))
    assert not list(Path.cwd().glob("PWNED"))


def test_links_inside_are_followed_and_links_out_are_refused(hostile):
    store = snakembed.open_store(hostile["results"])
    with store["links"] as folder:
        assert folder.ids() == ["inside.jpg"]
        assert folder["inside.jpg"].sha256 == store["mixed"]["exif1.jpg"].sha256
        assert "follow_external_links" in folder.failed["outside.jpg"]
        assert "broken symbolic link" in folder.failed["broken.jpg"]
    assert "external" not in store.folders()
    output = hostile["proc"].stdout + hostile["proc"].stderr
    assert "not followed: external" in output


def test_hidden_folders_are_skipped(hostile):
    assert ".git" not in snakembed.open_store(hostile["results"]).folders()


def test_a_changed_brace_named_image_reruns_its_folder(hostile):
    """Images Snakemake cannot take as inputs are still tracked, by size and mtime."""
    path = hostile["images"] / "files" / "{x}.jpg"
    before = folder_file(hostile["results"], "files").stat().st_mtime_ns
    make_image(path, seed=1234)
    dry = run_snakemake(hostile["base"], hostile["base"] / "config.yaml", "--dry-run")
    assert re.search(r"embed_classify_store\s+1\b", dry.stdout), dry.stdout
    said = "1 folder changed: files (1 image rewritten); 1 shard to run"
    assert said in dry.stdout + dry.stderr
    run_snakemake(hostile["base"], hostile["base"] / "config.yaml")
    assert folder_file(hostile["results"], "files").stat().st_mtime_ns > before


def test_raising_the_limits_reads_what_was_refused(hostile):
    """Runs last: `max_pixels` and `follow_external_links` from the command line."""
    run_snakemake(
        hostile["base"],
        hostile["base"] / "config.yaml",
        "--config",
        "max_pixels=100000000",
        "follow_external_links=true",
    )
    store = snakembed.open_store(hostile["results"])
    with store["mixed"] as folder:
        assert folder["huge.png"].width == samples.HUGE[0]
        assert "huge.png" not in folder.failed
        assert set(folder.failed) == set(samples.BAD) - {"huge.png"}
    with store["links"] as folder:
        assert folder.ids() == ["inside.jpg", "outside.jpg"]
    assert store.lookup("external/far.jpg").sha256 == store["links"]["outside.jpg"].sha256


@pytest.mark.parametrize(
    "case,message",
    [
        ("negative batch", r"config key 'batch_size': -1 is less than the minimum of 1"),
        ("unknown head", r"config key 'classify.head': unknown head 'nope'.*pretrained"),
        ("missing weights", r"config key 'model.weights': checkpoint .*no.pth' does not exist"),
        ("unknown device", r"config key 'device': 'gpu' does not match"),
        ("patch too large", r"'patches.size': 96 is larger than patches.resize \(64\)"),
        ("no images", r"no image files .* under"),
        ("missing root", r"image root .*nowhere' does not exist"),
        ("results inside", r"the results folder .* lies inside the image root"),
        ("unknown layer", r"'model.layer': resnet18 has no layer 'layer9' \(did you mean layer4"),
        ("checkpoint misfit", r"'model.weights': checkpoint .*tiny.pth' does not fit ResNet"),
        ("pretrained on a layer", r"'classify.head': the pretrained head classifies pre_logits"),
        ("map of pre_logits", r"'model.pool': pre_logits is already pooled by resnet18"),
        ("linear without labels", r"'classify.labels': head 'linear' is trained on labelled"),
        ("labels of one class", r"'classify.labels': .*labels.csv has 1 class\(es\) among"),
    ],
)
def test_bad_setups_stop_before_any_job(tmp_path, case, message):
    images = tmp_path / "images"
    make_image(images / "a" / "x.jpg")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    tiny = tmp_path / "tiny.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), tiny)
    one_class = tmp_path / "labels.csv"
    one_class.write_text("a/x.jpg,cat,train\na/x.jpg,cat,val\n")
    settings = {"images": str(images), "results": str(tmp_path / "results")}
    settings.update(
        {
            "negative batch": {"batch_size": -1},
            "unknown head": {"classify": {"head": "nope"}},
            "missing weights": {"model": {"name": "resnet18", "weights": str(tmp_path / "no.pth")}},
            "unknown device": {"device": "gpu"},
            "patch too large": {
                "patches": {"enabled": True, "resize": 64, "size": 96, "border": "drop"}
            },
            "no images": {"images": str(tmp_path / "empty")},
            "missing root": {"images": str(tmp_path / "nowhere")},
            "results inside": {"results": str(images / "results")},
            "unknown layer": {
                "model": {"name": "resnet18", "weights": "none", "layer": "layer9"},
                "classify": {"head": "none"},
            },
            "checkpoint misfit": {"model": {"name": "resnet18", "weights": str(tiny)}},
            "pretrained on a layer": {"model": {"name": "resnet18", "layer": "layer3"}},
            "map of pre_logits": {"model": {"name": "resnet18", "weights": "none", "pool": "none"}},
            "linear without labels": {"classify": {"head": "linear"}},
            "labels of one class": {"classify": {"head": "knn", "labels": str(one_class)}},
        }[case]
    )
    config = write_config(tmp_path / "config.yaml", **settings)
    proc = run_snakemake(tmp_path, config, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(message, output), output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists() and not (images / "results").exists()
