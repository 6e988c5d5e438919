"""End-to-end runs of the real workflow: the output contract, file by file."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
from conftest import REPO, folder_shard, make_image, run_snakemake, shard_log, write_config
from labelled import make_labelled_tree

import snakembed
from snakembed._files import texts
from snakembed.layout import folder_file


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_folder_gets_a_file_with_the_contract(workflow_run):
    results, images = workflow_run["results"], workflow_run["images"]
    folders = workflow_run["folders"]
    for key, names in folders.items():
        path = folder_file(results, key)
        assert path.is_file(), f"missing {path}"
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            assert attrs["format_version"] == 1
            assert attrs["model"] == "resnet18"
            assert attrs["layer"] == "pre_logits"
            assert attrs["embedding_dim"] == 512
            assert attrs["folder"] == key
            assert len(attrs["weights_sha256"]) == 64
            assert json.loads(attrs["preprocess"])["crop"] == 56
            assert json.loads(attrs["patches"])["size"] == 32
            for name in ("snakembed_version", "config_hash", "versions"):
                assert attrs[name]
            expected_good = [n for n in names]
            ids = [v.decode() for v in f["_ids"][()]]
            assert ids == sorted(expected_good)
            assert f["_embeddings"].shape == (len(ids), 512)
            for i, image_id in enumerate(ids):
                group = f[image_id]
                emb = group["embedding"][()]
                assert emb.dtype == np.float32 and emb.shape == (512,)
                assert np.array_equal(emb, f["_embeddings"][i])
                source = images / group.attrs["source"]
                assert source.name == image_id and source.is_file()
                assert group.attrs["sha256"] == _sha(source)
                from PIL import Image

                with Image.open(source) as im:
                    assert (group.attrs["width"], group.attrs["height"]) == im.size
                assert isinstance(group.attrs["label"], str) and group.attrs["label"]
                assert 0 < group.attrs["score"] <= 1
                labels = [v.decode() for v in group["topk_labels"][()]]
                scores = group["topk_scores"][()]
                assert len(labels) == 3 and labels[0] == group.attrs["label"]
                assert np.all(np.diff(scores) <= 0) and np.isclose(scores[0], group.attrs["score"])
                boxes = group["patch_boxes"][()]
                assert group["patch_embeddings"].shape == (len(boxes), 512)
                assert len(boxes) >= 4
                w, h = group.attrs["width"], group.attrs["height"]
                assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
                assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
                assert boxes[:, 2].max() == w and boxes[:, 3].max() == h  # shift covers the border


def test_labels_come_from_the_networks_own_classifier(tmp_path):
    """The pretrained head is the network's final layer, named by the weights' categories: a
    classifier that favours ImageNet class 281 by a logit of 10 labels every image `tabby`
    (torchvision's name for it) with probability e^10 / (e^10 + 999)."""
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[281] = 10.0
        model.fc.bias[7] = 2.0  # the runner-up: `cock`
    torch.save(model.state_dict(), tmp_path / "tabby.pth")
    for i in range(3):
        make_image(tmp_path / "images" / "a" / f"{i}.jpg", seed=i)
    config = write_config(
        tmp_path / "config.yaml",
        images="images",
        results="results",
        model={"name": "resnet18", "weights": str(tmp_path / "tabby.pth")},
    )
    run_snakemake(tmp_path, config)
    score = np.exp(10) / (np.exp(10) + np.exp(2) + 998)
    with h5py.File(tmp_path / "results" / "embeddings" / "a.h5", "r") as f:
        for name in ("0.jpg", "1.jpg", "2.jpg"):
            assert f[name].attrs["label"] == "tabby"
            assert np.isclose(f[name].attrs["score"], score, rtol=1e-5)
            assert [v.decode() for v in f[name]["topk_labels"][:2]] == ["tabby", "cock"]


def test_images_in_the_root_and_odd_names_are_folders(workflow_run):
    results = workflow_run["results"]
    assert (results / "embeddings" / "_root.h5").is_file()
    assert (results / "embeddings" / "ünï cödé.h5").is_file()
    assert (results / "embeddings" / "alpha" / "deep" / "b c.h5").is_file()
    # a folder without images of its own gets no file; hidden folders and other files are skipped
    assert not (results / "embeddings" / "alpha" / "deep.h5").exists()
    assert not list(results.rglob("*hidden*"))
    with h5py.File(folder_file(results, "alpha"), "r") as f:
        assert "notes.txt" not in f


def test_bad_files_are_recorded_and_the_rest_is_stored(workflow_run):
    results = workflow_run["results"]
    with h5py.File(folder_file(results, "alpha"), "r") as f:
        failed = json.loads(f.attrs["failed"])
        assert set(failed) == workflow_run["bad"]
        assert "empty" in failed["empty.jpg"]
        assert "not an image" in failed["text.jpg"]
        assert "truncated" in failed["truncated.jpg"].lower()
        for name in ("a1.jpg", "a2.png", "a3.jpeg"):
            assert name in f
        for name in workflow_run["bad"]:
            assert name not in f
    log = shard_log(results, "alpha")
    assert "truncated.jpg" in log


def test_logs_show_progress_per_shard_and_the_run_shows_shards_done(workflow_run):
    """Each shard's log ends the progress of its folders with full bars that count every
    image given to the network (failures too); Snakemake counts the shard jobs."""
    from snakembed.shards import read_shard_manifest

    results = workflow_run["results"]
    shard = folder_shard(results, "alpha")
    folders = read_shard_manifest(results / "manifests" / f"{shard}.json").folders
    total = sum(len(entry["images"]) for entry in folders.values())
    bar = r"INFO (alpha|\S.* and \d+ more folders): \[#{20}\] 100% (\d+)/\2 images, "
    bar += r"[\d.]+ images/s, ETA 0:00:00"
    full = re.findall(bar, shard_log(results, "alpha"))
    assert full and sum(int(n) for _, n in full) == total, shard_log(results, "alpha")
    out = workflow_run["proc"].stdout + workflow_run["proc"].stderr
    shards = {folder_shard(workflow_run["results"], key) for key in workflow_run["folders"]}
    steps = len(shards) + 3  # the shards, the index, the report and `all`
    assert f"{steps} of {steps} steps (100%) done" in out


def test_shard_jobs_leave_no_intermediates_and_keep_logs(workflow_run):
    results = workflow_run["results"]
    assert sorted(p.name for p in results.iterdir()) == [
        "benchmarks",
        "compute.json",  # the device and precision the run was planned for
        "embeddings",
        "index.h5",
        "logs",
        "manifests",  # each shard's folders and their images
        "report",
        "shards",  # what each shard job stored
    ]
    shard = folder_shard(results, "alpha/deep/b c")
    stored = len(workflow_run["folders"]["alpha/deep/b c"])
    assert f"alpha/deep/b c: {stored} images stored" in shard_log(results, "alpha/deep/b c")
    for top, suffix in (("manifests", ".json"), ("shards", ".json")):
        assert (results / top / f"{shard}{suffix}").is_file()
    rules = sorted(p.name for p in (results / "benchmarks").iterdir())
    assert rules == ["embed_classify_store", "index.tsv", "report_pages.tsv"]
    shards = {folder_shard(results, key) for key in workflow_run["folders"]}
    benchmarks = results / "benchmarks" / "embed_classify_store"
    assert sorted(p.name for p in benchmarks.iterdir()) == sorted(f"{s}.tsv" for s in shards)


def test_index_mirrors_the_tree(workflow_run):
    results = workflow_run["results"]
    with h5py.File(results / "index.h5", "r") as index:
        assert index["alpha/deep/b c/x 1.jpg/embedding"].shape == (512,)
        # a folder that holds images and sub-folders: both reachable
        assert "a1.jpg" in index["alpha"] and "deep" in index["alpha"]
        # images in the root itself
        assert index["top.jpg"].attrs["source"] == "top.jpg"
        with h5py.File(folder_file(results, "ünï cödé"), "r") as f:
            assert np.array_equal(index["ünï cödé/é.jpg/embedding"][()], f["é.jpg/embedding"][()])
        assert json.loads(index.attrs["folders"]) == sorted(workflow_run["folders"])


def test_index_links_survive_moving_the_results(workflow_run, tmp_path):
    """The index reads the folder files beside it wherever the results folder goes: a copy's
    index reads the copy's files (changed here, to tell them apart), and still does after the
    copy is moved away from where it was written."""
    import shutil

    copy, moved = tmp_path / "copy", tmp_path / "elsewhere" / "moved"
    shutil.copytree(workflow_run["results"], copy)
    for key in ("alpha", "ünï cödé"):  # a folder linked image by image, and one linked whole
        with h5py.File(folder_file(copy, key), "r+") as f:
            for image_id in texts(f["_ids"]):
                f[f"{image_id}/embedding"][...] *= -1
    moved.parent.mkdir()
    copy.rename(moved)
    original = snakembed.open_store(workflow_run["results"])
    with h5py.File(moved / "index.h5", "r") as index:
        for key, image_id in (("alpha", "a1.jpg"), ("ünï cödé", "é.jpg"), ("alpha", "a2.png")):
            linked = index[f"{key}/{image_id}/embedding"][()]
            with original[key] as folder:
                expected = -folder[image_id].embedding
            assert expected.any() and np.array_equal(linked, expected), (key, image_id)


def _snapshot(results: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(results / "embeddings")): (_sha(p), p.stat().st_mtime_ns)
        for p in sorted((results / "embeddings").rglob("*.h5"))
    }


def test_only_changed_folders_are_recomputed(tmp_path, resnet18_checkpoint):
    images = tmp_path / "images"
    for seed, folder in enumerate(("a", "b", "c/d")):
        for i in range(2):
            make_image(images / folder / f"{i}.jpg", seed=10 * seed + i)
    config = write_config(tmp_path / "config.yaml", images=str(images), results="results")
    results = tmp_path / "results"
    run_snakemake(tmp_path, config)
    before = _snapshot(results)
    assert set(before) == {"a.h5", "b.h5", "c/d.h5"}

    def changed_after(action) -> set[str]:
        nonlocal before
        action()
        run_snakemake(tmp_path, config)
        after = _snapshot(results)
        diff = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
        before = after
        return diff

    # an image added (with an old mtime, so only the changed set of inputs can tell)
    def add():
        make_image(images / "a" / "new.jpg", seed=77)
        import os

        os.utime(images / "a" / "new.jpg", (1_000_000_000, 1_000_000_000))

    assert changed_after(add) == {"a.h5"}
    with h5py.File(results / "embeddings" / "a.h5", "r") as f:
        assert "new.jpg" in f
    assert changed_after(lambda: make_image(images / "b" / "0.jpg", seed=99)) == {"b.h5"}
    assert changed_after(lambda: (images / "c" / "d" / "1.jpg").unlink()) == {"c/d.h5"}
    with h5py.File(results / "embeddings" / "c" / "d.h5", "r") as f:
        assert "1.jpg" not in f and "0.jpg" in f
    assert changed_after(lambda: make_image(images / "e" / "0.png", seed=5)) == {"e.h5"}
    with h5py.File(results / "index.h5", "r") as index:
        assert index["e/0.png/embedding"].shape == (512,)

    dry = run_snakemake(tmp_path, config, "--dry-run")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # the same settings written as floats, as Snakemake's --config reads 89478485.0
    as_floats = ("--config", "max_pixels=89478485.0", "patches={resize: 448.0}")
    dry = run_snakemake(tmp_path, config, "--dry-run", *as_floats)
    assert "Nothing to be done" in dry.stdout + dry.stderr

    # a change of model (here its weights) recomputes every folder
    write_config(
        tmp_path / "config.yaml",
        images=str(images),
        results="results",
        model={"name": "resnet18", "weights": str(resnet18_checkpoint)},
    )
    assert changed_after(lambda: None) == set(before)
    with h5py.File(results / "embeddings" / "a.h5", "r") as f:
        assert f.attrs["weights"] == str(resnet18_checkpoint)
    # and so does a change of preprocessing
    write_config(
        tmp_path / "config.yaml",
        images=str(images),
        results="results",
        model={"name": "resnet18", "weights": str(resnet18_checkpoint)},
        preprocess={"resize": 72, "crop": 64},
    )
    assert changed_after(lambda: None) == set(before)
    with h5py.File(results / "embeddings" / "a.h5", "r") as f:
        assert json.loads(f.attrs["preprocess"])["crop"] == 64


def test_resnet18_matches_torchvision(tmp_path, resnet18_checkpoint):
    """The stored embedding equals torchvision's own model and transforms, computed apart."""
    import torch
    import torchvision
    from PIL import Image
    from torchvision.models import ResNet18_Weights

    images = tmp_path / "images"
    paths = [
        make_image(images / "f" / "one.jpg", size=(300, 220), seed=3),
        make_image(images / "f" / "two.png", size=(180, 260), seed=4),
    ]
    config = write_config(
        tmp_path / "config.yaml",
        images=str(images),
        results="results",
        model={"name": "resnet18", "weights": str(resnet18_checkpoint)},
        preprocess={},
        classify={"head": "none"},
    )
    run_snakemake(tmp_path, config)

    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(resnet18_checkpoint, weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval()
    transform = ResNet18_Weights.IMAGENET1K_V1.transforms()
    with h5py.File(tmp_path / "results" / "embeddings" / "f.h5", "r") as f:
        assert "label" not in f["one.jpg"].attrs  # classification is off
        for path in paths:
            with torch.no_grad():
                expected = model(transform(Image.open(path).convert("RGB"))[None])[0].numpy()
            stored = f[path.name]["embedding"][()]
            # The resize runs on uint8 tensors (as on a GPU), whose rounding differs from
            # Pillow's by one level in a few pixels: near the reference, not equal to it.
            cosine = stored @ expected / np.linalg.norm(stored) / np.linalg.norm(expected)
            assert cosine >= 0.9999
            assert np.abs(stored - expected).max() <= 2e-3 * np.abs(expected).max()


def test_a_spatial_map_is_stored_as_a_matrix_per_image(tmp_path):
    """layer: layer3, pool: none keeps every position: [H*W, C] per image, [N, H*W, C] bulk,
    and the knn head classifies each image by its mean vector."""
    import snakembed

    make_labelled_tree(tmp_path / "labelled", train=2, val=1)
    config = write_config(
        tmp_path / "config.yaml",
        images="labelled",
        results="results",
        model={"name": "resnet18", "weights": "none", "layer": "layer3", "pool": "none"},
        preprocess={"resize": 64, "crop": 64},
        classify={"head": "knn", "labels": "labelled", "k": 1},
    )
    run_snakemake(tmp_path, config)
    store = snakembed.open_store(tmp_path / "results")
    with store["val/red"] as folder:
        assert (folder.attrs["layer"], folder.attrs["pool"]) == ("layer3", "none")
        assert folder.attrs["embedding_dim"] == 256
        assert folder.matrix().shape == (1, 16, 256)  # 64 px / 16 = a 4 x 4 map of layer3
        record = folder["red_0.png"]
        assert record.embedding.shape == (16, 256)
        assert np.array_equal(record.embedding, folder.matrix()[0])
        assert record.label == "red"  # its mean vector's nearest labelled image is red
    # the report and the search compare maps by their mean vectors too
    assert (tmp_path / "results" / "report" / "neighbours.html").is_file()
    hits = snakembed.search(store, record.embedding[None], top=1)[0]  # one [P, D] map
    assert (hits[0].folder, hits[0].image_id) == ("val/red", "red_0.png")


def test_unknown_model_fails_before_any_job(tmp_path):
    images = tmp_path / "images"
    make_image(images / "a" / "x.jpg")
    config = write_config(
        tmp_path / "config.yaml", images=str(images), results="results", model={"name": "nope"}
    )
    proc = run_snakemake(tmp_path, config, check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "unknown backbone 'nope'" in message
    assert "efficientnet_lite0" in message and "torchvision (80 names" in message
    assert "timm (" in message and "snakembed list" in message
    assert not (tmp_path / "results").exists()


def test_config_overrides_from_the_command_line(tmp_path):
    """`--config model={name: resnet18, weights: none}` passes the string `none`."""
    images = tmp_path / "images"
    make_image(images / "a" / "x.jpg")
    config = write_config(tmp_path / "config.yaml", images=str(images), results="results")
    run_snakemake(
        tmp_path,
        config,
        "--config",
        "model={name: resnet18, weights: none}",
        "classify={head: none}",
    )
    with h5py.File(tmp_path / "results" / "embeddings" / "a.h5", "r") as f:
        assert f.attrs["weights"] == "none" and f.attrs["embedding_dim"] == 512


def test_demo_labels_the_cat_a_cat(tmp_path):
    """The bundled demo with the offline pretrained default (EfficientNet-Lite0)."""
    run_snakemake(
        tmp_path,
        REPO / "config.yaml",
        "--config",
        f"images={REPO / 'demo' / 'images'}",
        "results=results",
    )
    with h5py.File(tmp_path / "results" / "index.h5", "r") as index:
        cat = index["animals/chelsea.jpg"]
        assert "cat" in cat.attrs["label"]
        assert cat["embedding"].shape == (1280,)
        assert index["objects/coffee.jpg"].attrs["label"] == "espresso"
    # its weights come with the package: no job fetches them first
    assert not (tmp_path / "results" / "weights").exists()


def test_lint_is_clean():
    import subprocess

    from conftest import SNAKEMAKE

    proc = subprocess.run(
        [SNAKEMAKE, "--lint", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_a_new_classify_setting_reclassifies_every_folder_without_decoding(tmp_path):
    for i in range(2):
        make_image(tmp_path / "images" / "f" / f"{i}.jpg", seed=i)
    first = write_config(tmp_path / "a.yaml", images="images", results="results")
    run_snakemake(tmp_path, first)
    top2 = write_config(
        tmp_path / "b.yaml", images="images", results="results", classify={"topk": 2}
    )
    run_snakemake(tmp_path, top2)
    log = shard_log(tmp_path / "results", "f")
    assert "2 unchanged images reused" in log
    with h5py.File(tmp_path / "results" / "embeddings" / "f.h5", "r") as f:
        assert f["0.jpg"]["topk_labels"].shape == (2,)
