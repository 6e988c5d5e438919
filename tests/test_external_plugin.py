"""A third-party backbone works by being installed: pip install, then use it by name."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
from conftest import REPO, make_image, run_snakemake, write_config


def test_an_installed_plugin_package_is_used_by_name(tmp_path):
    source = tmp_path / "plugin_pkg"
    shutil.copytree(REPO / "tests" / "plugin_pkg", source)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(site), str(source)],
        check=True,
        capture_output=True,
    )
    images = tmp_path / "images"
    make_image(images / "shapes" / "one.png", seed=1)
    make_image(images / "shapes" / "two.jpg", seed=2)
    config = write_config(
        tmp_path / "config.yaml",
        images=str(images),
        results="results",
        model={"name": "tinynet", "weights": "none"},
        preprocess={},
    )
    run_snakemake(tmp_path, config, env={"PYTHONPATH": str(site)})
    with h5py.File(tmp_path / "results" / "embeddings" / "shapes.h5", "r") as f:
        assert f.attrs["model"] == "tinynet" and f.attrs["embedding_dim"] == 8
        assert '"crop": 32' in f.attrs["preprocess"]  # the plugin's own preprocessing
        assert f["one.png"]["embedding"].shape == (8,)
        assert f["one.png"].attrs["label"] in {"circle", "square", "triangle", "star"}
    # without the package, the name is unknown and the run stops before any job
    proc = run_snakemake(tmp_path, config, check=False)
    assert proc.returncode != 0 and "unknown backbone 'tinynet'" in proc.stdout + proc.stderr
