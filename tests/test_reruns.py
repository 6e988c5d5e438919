"""Reruns you can trust: after any change, the results equal a clean run's on the same inputs.

Each test changes something between real `snakemake` runs (a checkpoint, images, folders, the
precision, a killed job) and compares the results with a clean run, or checks what ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import (
    NO_GPU,
    REPO,
    SNAKEMAKE,
    assert_same_results,
    folder_matrices,
    folder_shard,
    machine_compute,
    make_image,
    run_snakemake,
    shard_log,
    write_config,
)
from labelled import make_labelled_tree
from PIL import Image

import snakembed
from snakembed.reduce import read_reduced

NOTHING = "Nothing to be done"


def _images(root: Path, *folders: str, per_folder: int = 2) -> None:
    """``per_folder`` JPEGs in each folder under ``root``, each image other than all others."""
    for folder in folders:
        for i in range(per_folder):
            seed = int.from_bytes(f"{folder}/{i}".encode()) % 100_000
            make_image(root / folder / f"{i:03d}.jpg", seed=seed)


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _mtimes(results: Path) -> dict[Path, int]:
    """Every file under ``results`` and when it was last written."""
    return {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}


def _log(workdir: Path, key: str) -> str:
    """The log of the last job of the folder's shard."""
    return shard_log(workdir / "results", key)


def _attrs(results: Path, stem: str) -> dict:
    with h5py.File(results / "embeddings" / f"{stem}.h5", "r") as f:
        return dict(f.attrs)


def _out(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def _ran(proc: subprocess.CompletedProcess, key: str) -> bool:
    """Whether the run computed the folder (its shard's job ran and stored it), or, dry,
    would run its shard's job."""
    results = Path(proc.args[proc.args.index("--directory") + 1]) / "results"
    shard = folder_shard(results, key)
    if shard is None or not re.search(rf"wildcards: shard={shard}\n", _out(proc)):
        return False
    if "--dry-run" in proc.args:
        return True
    stored = rf"^\S+ \S+ INFO {re.escape(key)}: \d+ images stored"
    return re.search(stored, _log(results.parent, key), re.MULTILINE) is not None


def _tried(proc: subprocess.CompletedProcess, key: str) -> bool:
    """Whether the run's job for the folder's shard tried the folder and logged its failure."""
    results = Path(proc.args[proc.args.index("--directory") + 1]) / "results"
    failed = rf"^\S+ \S+ ERROR {re.escape(key)}: failed: "
    return re.search(failed, _log(results.parent, key), re.MULTILINE) is not None


def test_a_checkpoint_rewritten_in_place_is_used_by_every_folder(tmp_path, workers):
    _images(tmp_path / "images", *(f"f{f}" for f in range(6)))
    ckpt = _checkpoint(tmp_path / "ckpt.pt", seed=1)
    model = {"name": "resnet18", "weights": str(ckpt)}
    # one thread per job on two cores: two workers, each serving folders, alive between runs
    settings = {"images": "images", "model": model, "worker": {"idle": 60}}
    config = write_config(tmp_path / "c.yaml", results="results", **settings)
    run_snakemake(tmp_path, config, env=workers.env)
    assert workers.started() == 2

    shutil.copyfile(_checkpoint(tmp_path / "other.pt", seed=2), ckpt)  # same path, new weights
    proc = run_snakemake(tmp_path, config, env=workers.env)
    assert all(_ran(proc, f"f{f}") for f in range(6))
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for f in range(6):
        assert _attrs(tmp_path / "results", f"f{f}")["weights_sha256"] == sha

    # replaced by a file with an older modification time (mv keeps it): Snakemake's own check
    # of the input's time would see nothing
    third = _checkpoint(tmp_path / "third.pt", seed=3)
    os.utime(third, (946_684_800, 946_684_800))  # 2000-01-01
    os.replace(third, ckpt)
    proc = run_snakemake(tmp_path, config, env=workers.env)
    assert all(_ran(proc, f"f{f}") for f in range(6))
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert {_attrs(tmp_path / "results", f"f{f}")["weights_sha256"] for f in range(6)} == {sha}

    clean = write_config(tmp_path / "clean.yaml", results="clean", **settings)
    run_snakemake(tmp_path, clean, env=workers.env)
    assert_same_results(tmp_path / "results", tmp_path / "clean")
    assert NOTHING in _out(run_snakemake(tmp_path, config, env=workers.env))


def test_a_folder_whose_job_failed_is_computed_again(tmp_path, workers):
    """A shard job that failed (a GPU asked for where there is none) leaves its folders'
    files as they were; the next run computes the changed folder and keeps the other one,
    whose file is still what its images and settings give."""
    _images(tmp_path / "images", "a", "b")
    config = write_config(tmp_path / "c.yaml", images="images", results="results")
    run_snakemake(tmp_path, config, env=workers.env)
    make_image(tmp_path / "images" / "a" / "new.jpg", seed=77)
    # every folder job fails: a GPU asked for where torch sees none (the GPUs hidden)
    failing = ("--config", "device=cuda")
    for _ in range(2):
        env = {**workers.env, **NO_GPU}
        proc = run_snakemake(tmp_path, config, *failing, check=False, env=env)
        assert "device 'cuda' asked for, but torch sees no GPU here" in _log(tmp_path, "b")
        assert proc.returncode != 0 and NOTHING not in _out(proc)
        assert not _ran(proc, "a") and not _ran(proc, "b")
        assert all(_tried(proc, key) for key in ("a", "b"))
    # back on the CPU: the changed folder is computed, and the results equal a clean run
    b = (tmp_path / "results" / "embeddings" / "b.h5").stat().st_mtime_ns
    proc = run_snakemake(tmp_path, config, env=workers.env)
    assert _ran(proc, "a") and not _ran(proc, "b")
    assert (tmp_path / "results" / "embeddings" / "b.h5").stat().st_mtime_ns == b
    assert "a: 2 unchanged images reused" in _log(tmp_path, "a")
    assert not list((tmp_path / "results" / "embeddings").glob(".*"))
    clean = write_config(tmp_path / "clean.yaml", images="images", results="clean")
    run_snakemake(tmp_path, clean, env=workers.env)
    assert_same_results(tmp_path / "results", tmp_path / "clean")
    assert NOTHING in _out(run_snakemake(tmp_path, config, env=workers.env))


def _labels(results: Path) -> dict[str, list]:
    """Every folder's labels and scores, in image order."""
    store = snakembed.open_store(results)
    out = {}
    for key in store:
        with store[key] as folder:
            out[key] = [(folder[i].label, round(folder[i].score, 5)) for i in folder.ids()]
    return out


def test_labels_replaced_by_an_older_file_train_the_head_again(tmp_path, workers):
    truth = make_labelled_tree(tmp_path / "images", train=3, val=2)
    rows = [f"{path},{label},{split}" for split in truth for path, label in truth[split].items()]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    settings = {"images": "images", "classify": {"head": "knn", "labels": str(labels), "k": 1}}
    settings["report"] = {"enabled": False}
    config = write_config(tmp_path / "c.yaml", results="results", **settings)
    run_snakemake(tmp_path, config, env=workers.env)

    # other labels for two training images, in a file dated 2000 copied over with its date
    swapped = rows[:]
    for i in (0, 1):
        path, label, split = swapped[i].split(",")
        swapped[i] = f"{path},{'green' if label != 'green' else 'blue'},{split}"
    older = tmp_path / "older.csv"
    older.write_text("path,label,split\n" + "\n".join(swapped) + "\n")
    os.utime(older, (946_684_800, 946_684_800))
    shutil.copy2(older, labels)
    proc = run_snakemake(tmp_path, config, env=workers.env)
    assert "rule train_head" in _out(proc)

    clean_labels = tmp_path / "clean.csv"
    shutil.copy(older, clean_labels)
    clean_settings = {**settings, "classify": {**settings["classify"], "labels": str(clean_labels)}}
    clean = write_config(tmp_path / "clean.yaml", results="clean", **clean_settings)
    run_snakemake(tmp_path, clean, env=workers.env)
    assert _labels(tmp_path / "results") == _labels(tmp_path / "clean")
    assert NOTHING in _out(run_snakemake(tmp_path, config, env=workers.env))


def test_an_edited_custom_network_embeds_every_image_again(tmp_path, workers):
    modules = tmp_path / "modules"
    modules.mkdir()
    source = """import torchvision


def net():
    model = torchvision.models.resnet18(num_classes=4)
    model.conv1.weight.data *= {scale}
    return model
"""
    (modules / "mynet.py").write_text(source.format(scale=1.0))
    _images(tmp_path / "images", "a", "b")
    settings = {"images": "images", "model": {"name": "custom", "module": "mynet:net"}}
    config = write_config(tmp_path / "c.yaml", results="results", **settings)
    env = {
        **workers.env,
        "PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")]),
    }
    run_snakemake(tmp_path, config, env=env)
    (modules / "mynet.py").write_text(source.format(scale=0.5))
    proc = run_snakemake(tmp_path, config, env=env)
    for stem in ("a", "b"):
        assert _ran(proc, stem)
        log = _log(tmp_path, stem)
        assert "unchanged images reused" not in log
    clean = write_config(tmp_path / "clean.yaml", results="clean", **settings)
    run_snakemake(tmp_path, clean, env=env)
    assert_same_results(tmp_path / "results", tmp_path / "clean")
    assert NOTHING in _out(run_snakemake(tmp_path, config, env=env))


def test_reduced_vectors_follow_the_index(tmp_path, workers):
    _images(tmp_path / "images", "a", "b", per_folder=3)
    settings = {"images": "images", "reduce": {"method": "pca", "dim": 2}}
    settings["report"] = {"enabled": False}
    config = write_config(tmp_path / "c.yaml", results="results", **settings)

    def run():
        # one job at a time: reduce must not run before the index it reads
        run_snakemake(tmp_path, config, "--cores", "1", env=workers.env)
        with h5py.File(tmp_path / "results" / "index.h5", "r") as index:
            indexed = sorted(json.loads(index.attrs["folders"]))
        reduced = read_reduced(tmp_path / "results")
        assert sorted(reduced.folders()) == indexed
        return reduced

    run()
    _images(tmp_path / "images", "c", per_folder=3)
    assert sorted(run().folders()) == ["a", "b", "c"]
    shutil.rmtree(tmp_path / "images" / "a")
    reduced = run()
    assert sorted(reduced.folders()) == ["b", "c"]

    clean = write_config(tmp_path / "clean.yaml", results="clean", **settings)
    run_snakemake(tmp_path, clean, env=workers.env)
    expected = read_reduced(tmp_path / "clean")
    for key in ("b", "c"):
        assert reduced.ids(key) == expected.ids(key)
        assert np.allclose(reduced.matrix(key), expected.matrix(key), atol=1e-5)
    assert NOTHING in _out(run_snakemake(tmp_path, config, "--cores", "1", env=workers.env))


def test_workers_start_only_for_jobs_that_run(tmp_path, workers):
    _images(tmp_path / "images", "a")
    config = write_config(
        tmp_path / "c.yaml", images="images", results="results", threads=2, worker={"idle": 60}
    )
    for flags in (["--dry-run"], ["--lint"], ["--unlock"], ["--summary"]):
        run_snakemake(tmp_path, config, *flags, env=workers.env)
        assert workers.started() == 0 and not workers.pids(), flags
    run_snakemake(tmp_path, config, env=workers.env)
    assert workers.started() == 1
    report = tmp_path / "report.html"
    written = _mtimes(tmp_path / "results")
    for flags, said in (
        ([], NOTHING),
        (["--dry-run"], NOTHING),
        (["--report", str(report)], "Report created."),
    ):
        proc = run_snakemake(tmp_path, config, *flags, env=workers.env)
        assert said in _out(proc), flags
        assert workers.started() == 1, flags
        assert _mtimes(tmp_path / "results") == written, flags  # no job ran
    assert report.is_file()


def test_a_probe_never_harms_a_worker_and_its_log_is_true(tmp_path, workers):
    _images(tmp_path / "images", "a", "b")
    config = write_config(
        tmp_path / "c.yaml", images="images", results="results", threads=2, worker={"idle": 60}
    )
    run_snakemake(tmp_path, config, env=workers.env)
    (pid,) = workers.pids()
    make_image(tmp_path / "images" / "a" / "new.jpg", seed=99)
    # the run probes the live worker before its job, which that worker then serves
    run_snakemake(tmp_path, config, env=workers.env)
    log = _log(tmp_path, "a")
    assert f"worker {pid} runs folder a" in log
    assert workers.pids() == {pid} and workers.started() == 1
    lines = workers.logs()
    assert "Traceback" not in lines and "Error" not in lines and " leaves " not in lines


def test_a_deleted_or_renamed_folder_leaves_nothing_behind(tmp_path, workers):
    _images(tmp_path / "images", "a", "b", "nest/c")
    config = write_config(tmp_path / "c.yaml", images="images", results="results")
    run_snakemake(tmp_path, config, env=workers.env)
    (tmp_path / "images" / "a").rename(tmp_path / "images" / "a2")
    shutil.rmtree(tmp_path / "images" / "nest")
    proc = run_snakemake(tmp_path, config, env=workers.env)
    assert "removed results/embeddings/a.h5" in _out(proc)

    results = tmp_path / "results"
    files = sorted(p.relative_to(results).as_posix() for p in (results / "embeddings").rglob("*"))
    assert files == ["embeddings/a2.h5", "embeddings/b.h5"]
    shards = sorted({folder_shard(results, key) for key in ("a2", "b")})
    for top, suffix in (
        ("logs/embed_classify_store", ".log"),
        ("benchmarks/embed_classify_store", ".tsv"),
        ("manifests", ".json"),
        ("shards", ".json"),
    ):
        left = sorted(p.relative_to(results / top).as_posix() for p in (results / top).rglob("*"))
        assert left == [f"{shard}{suffix}" for shard in shards], top
    os.unlink(results / "index.h5")  # a store read without its index lists the files
    assert sorted(snakembed.open_store(results)) == ["a2", "b"]

    run_snakemake(tmp_path, config, env=workers.env)
    clean = write_config(tmp_path / "clean.yaml", images="images", results="clean")
    run_snakemake(tmp_path, clean, env=workers.env)
    assert_same_results(results, tmp_path / "clean")


def _bmp(path: Path, seed: int) -> None:
    """A 40x30 BMP: every such file has the same size."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("detection", ["stat", "checksum"])
def test_an_image_rewritten_with_the_same_size_and_time_is_seen(tmp_path, workers, detection):
    (tmp_path / "images" / "a").mkdir(parents=True)
    _bmp(tmp_path / "images" / "a" / "x.bmp", seed=1)
    make_image(tmp_path / "images" / "a" / "y.jpg", seed=2)
    make_image(tmp_path / "images" / "b" / "z.jpg", seed=3)
    settings = {"images": "images", "change_detection": detection}
    config = write_config(tmp_path / "c.yaml", results="results", **settings)
    run_snakemake(tmp_path, config, env=workers.env)

    target = tmp_path / "images" / "a" / "x.bmp"
    before = target.stat()
    _bmp(tmp_path / "new.bmp", seed=4)
    shutil.copyfile(tmp_path / "new.bmp", target)  # as cp -p or rsync -a would leave it
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    proc = run_snakemake(tmp_path, config, env=workers.env)
    assert _ran(proc, "a") and not _ran(proc, "b")
    log = _log(tmp_path, "a")
    assert "1 unchanged images reused" in log  # y.jpg was not embedded again
    with snakembed.open_store(tmp_path / "results")["a"] as folder:
        assert folder["x.bmp"].sha256 == hashlib.sha256(target.read_bytes()).hexdigest()

    clean = write_config(tmp_path / "clean.yaml", results="clean", **settings)
    run_snakemake(tmp_path, clean, env=workers.env)
    assert_same_results(tmp_path / "results", tmp_path / "clean")

    # what does not change an image's content: a false alarm costs reading, never embedding
    os.chmod(target, 0o600)
    os.utime(target)
    proc = run_snakemake(tmp_path, config, env=workers.env)
    if detection == "checksum":
        assert NOTHING in _out(proc)
    else:
        assert _ran(proc, "a") and not _ran(proc, "b")
        log = _log(tmp_path, "a")
        assert "2 unchanged images reused" in log
    assert_same_results(tmp_path / "results", tmp_path / "clean")


def test_precision_and_device_are_resolved_recorded_and_never_mixed(tmp_path, workers):
    """On a machine where torch sees no GPU (its GPUs hidden, on any machine), auto is cpu, and
    bf16 where the CPU has AMX, else fp32; the other precision reruns every folder
    and reuses no vector of the first."""
    env = {**workers.env, **NO_GPU}
    _images(tmp_path / "images", "a", "b")
    auto = {"device": "auto", "precision": "auto"}
    config = write_config(tmp_path / "c.yaml", images="images", results="results", **auto)
    run_snakemake(tmp_path, config, env=env)  # device and precision: auto
    first = folder_matrices(tmp_path / "results")
    from snakembed.devices import cpu_has_bf16

    precision = machine_compute(gpu=False)["precision"]
    for stem in ("a", "b"):
        attrs = _attrs(tmp_path / "results", stem)
        assert (attrs["device"], attrs["precision"]) == ("cpu", precision)
    # auto is what it resolves to: naming it changes nothing
    proc = run_snakemake(
        tmp_path, config, "--config", "device=cpu", f"precision={precision}", env=env
    )
    assert NOTHING in _out(proc)

    # the other precision: every folder again, none reusing the first's vectors
    other = {"fp32": "bf16", "bf16": "fp32"}[precision]
    make_image(tmp_path / "images" / "a" / "new.jpg", seed=50)
    proc = run_snakemake(tmp_path, config, "--config", f"precision={other}", env=env)
    assert _ran(proc, "a") and _ran(proc, "b")
    second = folder_matrices(tmp_path / "results")
    for stem in ("a", "b"):
        assert _attrs(tmp_path / "results", stem)["precision"] == other
        assert "unchanged images reused" not in _log(tmp_path, stem)
        # bf16 where it is emulated: the job's log says it is slow, and what to set
        emulated = other == "bf16" and not cpu_has_bf16()
        assert ("runs several times slower than fp32" in _log(tmp_path, stem)) == emulated
    assert not np.array_equal(second["b"][1], first["b"][1])
    clean = write_config(tmp_path / "clean.yaml", images="images", results="clean", **auto)
    run_snakemake(tmp_path, clean, "--config", f"precision={other}", env=env)
    assert_same_results(tmp_path / "results", tmp_path / "clean")

    # Folder jobs that ask a cluster for a GPU resolve auto to cuda (bf16) where the run is
    # planned, though this machine shows none: every folder would be computed again...
    gpu = ("--set-resources", "embed_classify_store:gpu=1")
    proc = run_snakemake(tmp_path, config, *gpu, "--dry-run", env=env)
    assert _ran(proc, "a") and _ran(proc, "b")
    # ... and where a job finds no GPU it says so and leaves the folder's file as it was
    proc = run_snakemake(tmp_path, config, *gpu, check=False, env=env)
    assert proc.returncode != 0
    assert "device 'cuda' asked for, but torch sees no GPU here" in _log(tmp_path, "b")
    assert _attrs(tmp_path / "results", "b")["precision"] == other  # as the last run left it
    assert_same_results(tmp_path / "results", tmp_path / "clean")


@pytest.mark.slow
def test_a_killed_job_is_dropped_by_its_worker(tmp_path, workers):
    _images(tmp_path / "images", "big", per_folder=600)
    config = write_config(
        tmp_path / "c.yaml",
        images="images",
        results="results",
        preprocess={"resize": 128, "crop": 112},
        batch_size=2,
        threads=2,
        worker={"idle": 60},
    )
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
    cmd += ["--configfile", str(config), "--cores", "2"]
    with open(tmp_path / "run.log", "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=out, start_new_session=True, env={**os.environ, **workers.env}
        )
    log = tmp_path / "results" / "logs" / "embed_classify_store" / "1-of-1.log"
    deadline = time.monotonic() + 120
    while "runs folder big" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, (
            tmp_path / "run.log"
        ).read_text()
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its jobs, as Ctrl-C or a lost node would
    proc.wait()
    (pid,) = workers.pids()  # the worker lives in its own session: it outlives them
    deadline = time.monotonic() + 60
    while "dropped folder big" not in workers.logs():
        assert time.monotonic() < deadline, workers.logs()
        time.sleep(0.1)
    assert "big: 600 images stored" not in workers.logs()
    time.sleep(1.0)
    results = tmp_path / "results" / "embeddings"
    assert not results.exists() or not list(results.iterdir())
    assert workers.pids() == {pid}  # and it serves the next run
    run_snakemake(tmp_path, config, "--unlock", env=workers.env)
    run_snakemake(tmp_path, config, env=workers.env)
    assert f"worker {pid} runs folder big" in log.read_text()
    assert len(folder_matrices(tmp_path / "results")["big"][0]) == 600
