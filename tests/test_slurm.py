"""The workflow on a real SLURM cluster: a single node started by tests/slurm/cluster.sh."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    OTHER_FILESYSTEMS,
    REPO,
    machine_compute,
    make_image,
    other_filesystem,
    run_snakemake,
    skip_unless_ci,
    snakemake_command,
    write_config,
)

import snakembed
from snakembed.layout import folder_file
from snakembed.shards import shard_name, shard_of

pytestmark = pytest.mark.slow

#: Shards in these tests (auto would put this small tree in one shard, one SLURM job).
SHARDS = 4
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


def _slurm_command(workdir: Path, configfile: Path, *extra: str) -> list[str]:
    return snakemake_command(
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
        *extra,
    )


def _run_slurm(
    workdir: Path, configfile: Path, *extra: str, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = _slurm_command(workdir, configfile, *extra)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}
    )
    if check:
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _states() -> dict[str, str]:
    """``{SLURM job id: state}`` of every job the cluster remembers (MinJobAge: 10 minutes)."""
    known = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i %T"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split() for line in known.splitlines())


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """The demo images and 20 generated folders, run locally and through SLURM."""
    base = tmp_path_factory.mktemp("cluster")
    images = base / "images"
    shutil.copytree(REPO / "demo" / "images", images)
    for i in range(20):
        for j in range(2):
            make_image(images / "gen" / f"f{i:02d}" / f"{j}.jpg", seed=i * 10 + j)
    # The test cluster's GPU is fake: the folder jobs, which ask for one, compute on the CPU.
    # The same shards as the cluster's: their small folders are then embedded in the same
    # batches, bit for bit.
    local = write_config(
        base / "local.yaml",
        images=str(images),
        results=str(base / "local"),
        device="cpu",
        shards={"count": SHARDS},
    )
    run_snakemake(base, local)
    cluster = write_config(
        base / "slurm.yaml",
        images=str(images),
        results=str(base / "slurm"),
        device="cpu",
        shards={"count": SHARDS},
    )
    # The jobs' $TMPDIR: node-local scratch (another filesystem), as clusters give jobs.
    scratch = other_filesystem(base)
    proc = _run_slurm(base, cluster, env={"TMPDIR": str(scratch)} if scratch else None)
    yield {"base": base, "images": images, "config": cluster, "proc": proc, "scratch": scratch}
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


def test_every_shard_job_is_a_real_slurm_job(runs):
    out = runs["proc"].stdout + runs["proc"].stderr
    folders = snakembed.open_store(runs["base"] / "slurm").folders()
    shards = {shard_of(key, SHARDS) for key in folders}
    ids = SUBMITTED.findall(out)
    assert len(ids) == len(shards) > 1, out[-3000:]
    states = _states()
    assert all(states.get(i) == "COMPLETED" for i in ids), states


def test_cluster_embeddings_are_identical_to_a_local_run(runs):
    local = snakembed.open_store(runs["base"] / "local")
    cluster = snakembed.open_store(runs["base"] / "slurm")
    assert cluster.folders() == local.folders() and len(local.folders()) == 26
    for key in local.folders():
        with local[key] as a, cluster[key] as b:
            assert a.ids() == b.ids()
            assert np.array_equal(a.matrix(), b.matrix()), key


def test_folder_files_are_built_in_the_nodes_scratch(runs):
    if runs["scratch"] is None:
        skip_unless_ci(f"no folder on another filesystem than the results: {OTHER_FILESYSTEMS}")
    logs = sorted((runs["base"] / "slurm" / "logs" / "embed_classify_store").rglob("*.log"))
    text = "".join(log.read_text() for log in logs)
    results = re.escape(str(runs["base"] / "slurm"))
    built = re.findall(
        rf"INFO (\S+): building its file in .* \(scratch\), then copying it to {results}", text
    )
    assert sorted(built) == snakembed.open_store(runs["base"] / "slurm").folders()
    assert not list(runs["scratch"].rglob("*.h5"))  # copied over, not left behind


def test_a_rerun_submits_only_the_changed_folders_shard(runs):
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


def test_cluster_jobs_read_a_bucket_themselves(slurm, s3_server, tmp_path):
    """``images: s3://...`` through SLURM: the jobs on the node read the bucket with the
    submitting environment's credentials and endpoint, and store what a local run of the same
    tree on disk stores."""
    from s3server import BUCKET

    images = tmp_path / "images"
    for i in range(3):
        for j in range(2):
            make_image(images / f"f{i}" / f"{j}.jpg", seed=10 * i + j)
    s3_server.upload(images, "cluster")
    settings = {"device": "cpu", "shards": {"count": 2}}
    local = write_config(tmp_path / "local.yaml", images=str(images), results="local", **settings)
    run_snakemake(tmp_path, local)
    cluster = write_config(
        tmp_path / "slurm.yaml", images=f"s3://{BUCKET}/cluster", results="slurm", **settings
    )
    proc = _run_slurm(tmp_path, cluster, env=s3_server.env)
    assert len(set(SUBMITTED.findall(proc.stderr))) >= 2  # the shards ran as SLURM jobs
    here, there = snakembed.open_store(tmp_path / "local"), snakembed.open_store(tmp_path / "slurm")
    assert here.folders() == there.folders() == ["f0", "f1", "f2"]
    for key in here.folders():
        with here[key] as a, there[key] as b:
            assert a.ids() == b.ids() and not b.failed
            assert np.allclose(a.matrix(), b.matrix(), atol=1e-5)


def test_a_shard_job_asks_for_memory_and_time_by_its_image_count(tmp_path):
    """No cluster needed: the resources are in the plan (a dry run shows them). Time goes by
    the shard's images, memory by its largest folder's (one folder is held at a time)."""
    make_image(tmp_path / "images" / "small" / "0.jpg")
    for name, count in (("big", 1200), ("bigger", 1400)):
        # empty files count as images (they are recorded as failed)
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "images" / name / f"{i}.jpg").touch()
    config = write_config(
        tmp_path / "c.yaml", images=str(tmp_path / "images"), results="out", shards={"count": 2}
    )
    proc = run_snakemake(tmp_path, config, "--dry-run")
    out = proc.stdout + proc.stderr
    asked = dict(
        re.findall(r"wildcards: shard=(\S+)\n(?:\s+threads: \d+\n)?\s+resources: (.*)", out)
    )
    folders = {"small": 1, "big": 1200, "bigger": 1400}
    for shard, resources in asked.items():
        sizes = [n for key, n in folders.items() if shard_name(shard_of(key, 2), 2) == shard]
        assert f"runtime={10 + sum(sizes) // 600}, mem_mb={2000 + max(sizes) // 20}" in resources
    assert len(asked) == len({shard_of(key, 2) for key in folders})


def _cancel_first_running_job(proc: subprocess.Popen, cancelled: list[str]) -> None:
    """scancel the first of the cluster's jobs that runs while ``proc`` does."""
    before = set(_states())
    while proc.poll() is None:
        running = [i for i, state in _states().items() if i not in before and state == "RUNNING"]
        if running:
            subprocess.run(["scancel", running[0]], check=True)
            cancelled.append(running[0])
            return
        time.sleep(0.2)


def _run_and_cancel(workdir: Path, configfile: Path, *extra: str) -> tuple[int, str, str]:
    """Run the workflow through SLURM and scancel its first job once it runs.

    Returns:
        Snakemake's exit status, its output, and the cancelled job's id.
    """
    cmd = _slurm_command(workdir, configfile, *extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cancelled: list[str] = []
    killer = threading.Thread(target=_cancel_first_running_job, args=(proc, cancelled))
    killer.start()
    out, _ = proc.communicate(timeout=900)
    killer.join()
    assert cancelled, f"no job ran long enough to be cancelled:\n{out[-3000:]}"
    return proc.returncode, out, cancelled[0]


def _assert_reported(workdir: Path, out: str, cancelled: str) -> None:
    """The run names the failed shard job and its SLURM log, which says it was cancelled."""
    logs = workdir / ".snakemake" / "slurm_logs" / "rule_embed_classify_store"
    log = next(logs.rglob(f"{cancelled}.log"))
    assert "Error in rule embed_classify_store" in out and str(log) in out, out[-4000:]
    assert f"JOB {cancelled} ON" in log.read_text() and "CANCELLED" in log.read_text()


@pytest.fixture
def small_tree(slurm, tmp_path):
    for i in range(3):
        for j in range(2):
            make_image(tmp_path / "images" / f"f{i}" / f"{j}.jpg", seed=i * 10 + j)
    config = write_config(
        tmp_path / "c.yaml",
        images=str(tmp_path / "images"),
        results=str(tmp_path / "out"),
        device="cpu",
        shards={"count": 2},
    )
    return tmp_path, config


def test_a_cluster_job_computes_on_the_device_planned_for_it(slurm, tmp_path):
    """The slurm profile's folder jobs ask for a GPU, so `device: auto` is planned as cuda and
    bf16 where the run starts; the job's own Snakemake on the node takes that plan instead of
    resolving auto again (which here, without a real GPU, would silently give fp32 on the CPU).
    This cluster's GPU is fake (its jobs see GPU 0): on a machine without a real one, the job
    says so and stops; on one with a GPU, it computes there."""
    make_image(tmp_path / "images" / "a" / "0.jpg")
    config = write_config(
        tmp_path / "c.yaml",
        images=str(tmp_path / "images"),
        results=str(tmp_path / "out"),
        device="auto",
        precision="auto",
    )
    proc = _run_slurm(tmp_path, config, "--retries", "0", check=False)
    compute = json.loads((tmp_path / "out" / "compute.json").read_text())
    assert (compute["device"], compute["precision"]) == ("cuda", "bf16")
    log = (tmp_path / "out" / "logs" / "embed_classify_store" / "1-of-1.log").read_text()
    if machine_compute()["device"] == "cuda":
        assert proc.returncode == 0, log
        with snakembed.open_store(tmp_path / "out")["a"] as folder:
            assert (folder.attrs["device"], folder.attrs["precision"]) == ("cuda", "bf16")
        return
    assert proc.returncode != 0
    assert "device 'cuda' asked for, but torch sees no GPU here" in log
    assert not (tmp_path / "out" / "embeddings" / "a.h5").exists()


def test_a_cancelled_job_is_submitted_again(small_tree):
    base, config = small_tree
    returncode, out, cancelled = _run_and_cancel(base, config)
    assert returncode == 0, out[-4000:]
    _assert_reported(base, out, cancelled)
    assert "Trying to restart job" in out
    ids = SUBMITTED.findall(out)
    # the two shard jobs, then the cancelled one again (the profile's retries)
    assert ids[0] == cancelled and len(ids) == 3, out[-3000:]
    assert all(_states()[i] == "COMPLETED" for i in ids[1:])
    _assert_complete(base / "out")


def test_a_cancelled_job_is_reported_and_a_rerun_completes(small_tree):
    base, config = small_tree
    returncode, out, cancelled = _run_and_cancel(base, config, "--retries", "0")
    assert returncode != 0
    _assert_reported(base, out, cancelled)
    assert not (base / "out" / "index.h5").exists()
    _run_slurm(base, config)
    _assert_complete(base / "out")


def _assert_complete(results: Path) -> None:
    store = snakembed.open_store(results)
    assert store.folders() == ["f0", "f1", "f2"]
    for key in store.folders():
        with store[key] as folder:
            assert folder.ids() == ["0.jpg", "1.jpg"] and folder.matrix().shape[0] == 2
