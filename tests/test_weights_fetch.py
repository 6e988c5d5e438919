"""The weights_fetch rule: named weights come into the cache once, before any job needs them."""

from __future__ import annotations

import json

import numpy as np
import torch
import torchvision
from conftest import make_image, run_snakemake, write_config

from snakembed.backbones import file_sha256
from snakembed.config import load_config
from snakembed.embed import embed_images
from snakembed.layout import folder_file
from snakembed.reader import Folder

#: Where torch hub keeps resnet18's IMAGENET1K_V1 weights once downloaded.
CACHED = "hub/checkpoints/resnet18-f37072fd.pth"

#: No internet: every download goes to a proxy port where nothing listens.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}


def _setup(tmp_path):
    make_image(tmp_path / "images" / "a" / "x.jpg")
    return write_config(
        tmp_path / "config.yaml",
        images="images",
        results="results",
        model={"name": "resnet18", "weights": "IMAGENET1K_V1"},
    )


def test_fetch_records_the_cached_weights_and_the_run_uses_them(tmp_path):
    torch_home = tmp_path / "torch"
    (torch_home / CACHED).parent.mkdir(parents=True)
    torch.manual_seed(5)  # stands in for the download: the file torch hub would have written
    torch.save(torchvision.models.resnet18().state_dict(), torch_home / CACHED)
    config = _setup(tmp_path)
    env = {"TORCH_HOME": str(torch_home), **OFFLINE}
    run_snakemake(tmp_path, config, "weights_fetch", env=env)
    record = json.loads((tmp_path / "results" / "weights" / "fetched.json").read_text())
    assert record["model"] == "resnet18" and record["weights"] == "IMAGENET1K_V1"
    assert record["weights_sha256"] == file_sha256(torch_home / CACHED)
    assert record["torch_hub"] == str(torch_home / "hub")
    assert not (tmp_path / "results" / "embeddings").exists()  # fetching embeds nothing
    proc = run_snakemake(tmp_path, config, env=env)
    assert "weights_fetch" not in proc.stderr.split("Job stats:")[1].split("\n\n")[0]
    # the folder was embedded with exactly the cached file's weights
    with Folder(folder_file(tmp_path / "results", "a"), "a") as folder:
        assert folder.attrs["weights_sha256"] == record["weights_sha256"]
        assert folder.attrs["weights"] == "IMAGENET1K_V1" and folder.ids() == ["x.jpg"]
        stored = folder.matrix()
    local = load_config(config, {"model": {"weights": str(torch_home / CACHED)}})
    expected = embed_images([tmp_path / "images" / "a" / "x.jpg"], local)
    np.testing.assert_allclose(stored, expected.vectors, rtol=1e-4, atol=1e-5)


def test_without_the_weights_or_internet_the_fetch_fails_first_naming_the_fix(tmp_path):
    config = _setup(tmp_path)
    env = {"TORCH_HOME": str(tmp_path / "empty"), **OFFLINE}
    proc = run_snakemake(tmp_path, config, check=False, env=env)
    assert proc.returncode != 0
    log = (tmp_path / "results" / "logs" / "weights_fetch.log").read_text()
    assert "cannot get weights ResNet18_Weights.IMAGENET1K_V1" in log
    assert "snakemake --cores 1 --forcerun weights_fetch weights_fetch" in log
    # no folder job started: the fetch is what failed, before any of them
    assert (tmp_path / "results" / "logs").is_dir()
    assert not (tmp_path / "results" / "logs" / "embed_classify_store").exists()
    assert not (tmp_path / "results" / "embeddings").exists()
    assert "rule embed_classify_store:" not in proc.stdout + proc.stderr
