"""The workflow on a real SLURM cluster: a single node started by tests/slurm/cluster.sh."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_image, run_snakemake, snakemake_command, write_config

import snakembed
from snakembed.store import folder_file

pytestmark = pytest.mark.slow

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
#: Folders per SLURM job in these tests (the profile's 50 would put them all in one job).
PER_JOB = 8
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node cluster; skipped, with the reason, where it cannot be started."""
    if shutil.which("bash") is None or os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root; run the tests as root")
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([CLUSTER, "up", state], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        subprocess.run([CLUSTER, "down", state], capture_output=True, timeout=60)
        pytest.skip(f"no SLURM cluster here: {up.stderr.strip() or up.stdout.strip()}")
    yield state
    subprocess.run([CLUSTER, "down", state], capture_output=True, timeout=60)


def _run_slurm(workdir: Path, configfile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = snakemake_command(
        workdir,
        configfile,
        "--profile",
        str(REPO / "workflow" / "profiles" / "slurm"),
        # the test cluster keeps no accounts and no accounting (sacct has nothing)
        "--slurm-no-account",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--group-components",
        f"folders={PER_JOB}",
        *extra,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """The demo images and 20 generated folders, run locally and through SLURM."""
    base = tmp_path_factory.mktemp("cluster")
    images = base / "images"
    shutil.copytree(REPO / "demo" / "images", images)
    for i in range(20):
        for j in range(2):
            make_image(images / "gen" / f"f{i:02d}" / f"{j}.jpg", seed=i * 10 + j)
    local = write_config(base / "local.yaml", images=str(images), results=str(base / "local"))
    run_snakemake(base, local)
    cluster = write_config(base / "slurm.yaml", images=str(images), results=str(base / "slurm"))
    proc = _run_slurm(base, cluster)
    return {"base": base, "images": images, "config": cluster, "proc": proc}


def test_every_folder_job_is_a_real_slurm_job_in_groups(runs):
    out = runs["proc"].stdout + runs["proc"].stderr
    folders = snakembed.open_store(runs["base"] / "slurm").folders()
    ids = SUBMITTED.findall(out)
    assert len(ids) == -(-len(folders) // PER_JOB), out[-3000:]
    known = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i %T"], capture_output=True, text=True, check=True
    ).stdout
    states = dict(line.split() for line in known.splitlines())
    assert all(states.get(i) == "COMPLETED" for i in ids), known


def test_cluster_embeddings_are_identical_to_a_local_run(runs):
    local = snakembed.open_store(runs["base"] / "local")
    cluster = snakembed.open_store(runs["base"] / "slurm")
    assert cluster.folders() == local.folders() and len(local.folders()) == 26
    for key in local.folders():
        with local[key] as a, cluster[key] as b:
            assert a.ids() == b.ids()
            assert np.array_equal(a.matrix(), b.matrix()), key


def test_a_rerun_submits_only_the_changed_folder(runs):
    results = runs["base"] / "slurm"
    before = {
        key: folder_file(results, key).stat().st_mtime_ns
        for key in snakembed.open_store(results).folders()
    }
    make_image(runs["images"] / "gen" / "f03" / "new.jpg", seed=999)
    out = _run_slurm(runs["base"], runs["config"])
    assert len(SUBMITTED.findall(out.stdout + out.stderr)) == 1
    changed = {
        key
        for key, mtime in before.items()
        if folder_file(results, key).stat().st_mtime_ns != mtime
    }
    assert changed == {"gen/f03"}
    with snakembed.open_store(results)["gen/f03"] as folder:
        assert "new.jpg" in folder.ids()


def test_a_folder_job_asks_for_memory_and_time_by_its_image_count(tmp_path):
    """No cluster needed: the resources are in the plan (a dry run shows them)."""
    make_image(tmp_path / "images" / "small" / "0.jpg")
    for i in range(1200):  # empty files count as images (they are recorded as failed)
        (tmp_path / "images" / "big" / f"{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / "big" / f"{i}.jpg").touch()
    config = write_config(tmp_path / "c.yaml", images=str(tmp_path / "images"), results="out")
    proc = run_snakemake(tmp_path, config, "--dry-run")
    out = proc.stdout + proc.stderr
    asked = dict(
        re.findall(r"wildcards: folder=(\w+)\n(?:\s+threads: \d+\n)?\s+resources: (.*)", out)
    )
    assert "runtime=10, mem_mb=2000" in asked["small"]
    assert "runtime=12, mem_mb=2060" in asked["big"]
