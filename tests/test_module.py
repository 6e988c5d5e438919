"""The workflow as a Snakemake module of another workflow: ``module snakembed:`` with the
repository's Snakefile and the host's ``config["snakembed"]``, and
``use rule * from snakembed as snakembed_*``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import yaml
from conftest import (
    FAST_CONFIG,
    SNAKEMAKE,
    make_image,
    run_command,
    run_snakemake,
    write_config,
)

from snakembed.layout import EMBEDDINGS, IDS, INDEX_FILE, LABELS, SCORES, folder_file

# The host workflow, as a README shows it: its own config file, rule and config key, and the
# onstart handler that Snakemake (9.17 and later) no longer takes from a module by itself.
HOST = """\
from snakembed.workflow import snakefile as snakembed_snakefile


configfile: "host.yaml"


module snakembed:
    snakefile:
        snakembed_snakefile()
    config:
        config["snakembed"]


use rule * from snakembed as snakembed_*


rule all:
    input:
        rules.snakembed_all.input,
        "host.txt",
    default_target: True


rule host:
    output:
        "host.txt",
    params:
        other=config["other"],
    shell:
        "echo {params.other} > {output}"


onstart:
    snakembed.start_run()
"""

FOLDERS = ("a", "b", "c/d")


def _host(workdir: Path, images: Path, model: dict, **settings) -> Path:
    """A host workflow in ``workdir`` whose snakembed results go to ``workdir/results``."""
    workdir.mkdir(parents=True, exist_ok=True)
    snakefile = workdir / "Snakefile"
    snakefile.write_text(HOST)
    snakembed = {**FAST_CONFIG, "images": str(images), "results": "results", "model": model}
    snakembed.update(settings)
    host = {"other": "kept", "snakembed": snakembed}
    (workdir / "host.yaml").write_text(yaml.safe_dump(host))
    # the host's own config.yaml, which the module must not read (its config comes from `config:`)
    (workdir / "config.yaml").write_text("images: nowhere\nnot_a_snakembed_key: 1\n")
    return snakefile


def _run_host(
    workdir: Path, *extra: str, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        SNAKEMAKE,
        "--cores",
        "2",
        "--snakefile",
        str(workdir / "Snakefile"),
        "--directory",
        str(workdir),
        *extra,
    ]
    return run_command(cmd, check=check, env=env)


def _files(results: Path) -> set[str]:
    return {p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file()}


def _folder(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {
            "ids": [v.decode() for v in f[IDS][()]],
            "embeddings": f[EMBEDDINGS][()],
            "labels": [v.decode() for v in f[LABELS][()]],
            "scores": f[SCORES][()],
        }


def test_as_a_module_the_results_equal_a_plain_runs(tmp_path, resnet18_checkpoint, workers):
    images = tmp_path / "images"
    for seed, folder in enumerate(FOLDERS):
        for i in range(2):
            make_image(images / folder / f"{i}.jpg", seed=10 * seed + i)
    model = {"name": "resnet18", "weights": str(resnet18_checkpoint)}
    plain = tmp_path / "plain"
    plain.mkdir()
    config = write_config(
        plain / "config.yaml", images=str(images), results=str(plain / "results"), model=model
    )
    run_snakemake(plain, config, env=workers.env)

    host = tmp_path / "host"
    _host(host, images, model)
    proc = _run_host(host, env=workers.env)
    out = proc.stdout + proc.stderr
    assert "snakembed_embed_classify_store" in out
    assert (host / "host.txt").read_text() == "kept\n"  # the host's own config and rules

    results = host / "results"
    # the same files (logs and benchmarks per folder under the rule's own name), the same numbers
    assert _files(results) == _files(plain / "results")
    for folder in FOLDERS:
        ours, theirs = (
            _folder(folder_file(results, folder)),
            _folder(folder_file(plain / "results", folder)),
        )
        assert ours["ids"] == theirs["ids"] == ["0.jpg", "1.jpg"]
        assert np.allclose(ours["embeddings"], theirs["embeddings"], atol=1e-5)
        assert ours["labels"] == theirs["labels"]
        assert np.allclose(ours["scores"], theirs["scores"], atol=1e-5)
    with h5py.File(results / INDEX_FILE, "r") as index:
        assert json.loads(index.attrs["folders"]) == sorted(FOLDERS)
        assert index["c/d/1.jpg/embedding"].shape == (512,)

    again = _run_host(host, env=workers.env)
    assert "Nothing to be done" in again.stdout + again.stderr

    # a folder removed from the tree: its results go (the host's onstart calls start_run), and
    # the index is rebuilt without it
    before = _files(results)
    for path in (images / "b").iterdir():
        path.unlink()
    (images / "b").rmdir()
    pruned = _run_host(host, env=workers.env)
    assert "removed results/embeddings/b.h5" in pruned.stdout + pruned.stderr
    # b's file goes, and the files of a shard that held only b
    shards = {p.name.removesuffix(".json") for p in (results / "manifests").iterdir()}
    per_shard = ("logs/embed_classify_store/", "benchmarks/embed_classify_store/", "manifests/")
    gone = {"embeddings/b.h5"} | {
        path
        for path in before
        if path.startswith((*per_shard, "shards/"))
        and path.rsplit("/", 1)[1].split(".")[0] not in shards
    }
    assert _files(results) == before - gone
    with h5py.File(results / INDEX_FILE, "r") as index:
        assert json.loads(index.attrs["folders"]) == ["a", "c/d"]
    last = _run_host(host, env=workers.env)
    assert "Nothing to be done" in last.stdout + last.stderr


def test_as_a_module_resources_set_for_the_renamed_folder_rule_count(tmp_path):
    """--set-resources names the folder jobs' rule as the host does: a GPU asked for there plans
    the run for cuda, as the slurm profile's `embed_classify_store: gpu: 1` does in a plain run."""
    images = tmp_path / "images"
    make_image(images / "a" / "0.jpg")
    _host(tmp_path, images, {"name": "resnet18", "weights": "none"}, device="auto")
    gpu = "snakembed_embed_classify_store:gpu=1"
    proc = _run_host(tmp_path, "--dry-run", "--set-resources", gpu)
    assert "gpu=1" in proc.stdout + proc.stderr
    compute = json.loads((tmp_path / "results" / "compute.json").read_text())
    assert compute["device"] == "cuda"
