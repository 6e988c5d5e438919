"""Interrupted and concurrent runs: SIGKILL at random points, reading while the workflow writes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, SNAKEMAKE, make_image, run_snakemake, write_config

import snakembed
from snakembed.reader import Folder

pytestmark = pytest.mark.slow


def _tree(root: Path, folders: int = 6, per_folder: int = 4) -> list[str]:
    keys = [f"f{i}" if i % 2 else f"nest/f{i}" for i in range(folders)]
    for i, key in enumerate(keys):
        for j in range(per_folder):
            make_image(root / key / f"{j}.jpg", size=(60 + j, 50), seed=10 * i + j)
    return keys


def _start(workdir: Path, configfile: Path, env: dict) -> subprocess.Popen:
    """The workflow in its own process group, so that one signal reaches all its jobs."""
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)]
    cmd += ["--configfile", str(configfile), "--cores", "2"]
    log = open(workdir / "run.log", "a")  # noqa: SIM115 - the child holds it
    env = {**os.environ, **env}
    return subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=env)


def _output(workdir: Path) -> str:
    return (workdir / "run.log").read_text()[-5000:]


def _kill(proc: subprocess.Popen, workers) -> None:
    """Kill everything the run started, as a crash or a power loss would: Snakemake, its jobs,
    and the embed workers, which live in their own sessions."""
    with contextlib.suppress(ProcessLookupError):  # the workflow may have just finished
        os.killpg(proc.pid, signal.SIGKILL)
    workers.kill()
    proc.wait()
    time.sleep(0.5)  # let the orphaned jobs' signals land before files are inspected
    assert not workers.pids()


def _check_nothing_partial(results: Path) -> int:
    """Every finished-looking file under ``results`` reads completely; returns how many."""
    checked = 0
    for path in results.rglob("*"):
        if path.name.endswith(".tmp"):
            continue  # a killed writer's temporary file: never read, removed on the next write
        if path == results / "index.h5":
            with h5py.File(path, "r") as index:
                assert index.attrs["folders"]
            checked += 1
        elif path.suffix == ".h5":
            with Folder(path, "x") as folder:
                assert len(folder.ids()) == len(folder.matrix()) == folder.attrs["num_images"]
            checked += 1
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                for name in data.files:
                    data[name]
            checked += 1
    return checked


def _folder_files(results: Path) -> int:
    """How many folder files a run has finished (a killed writer's ``.tmp`` is none)."""
    return sum(1 for p in (results / "embeddings").rglob("*.h5") if not p.name.startswith("."))


def _matrices(results: Path) -> dict[str, bytes]:
    store = snakembed.open_store(results)
    out = {}
    for key in store:
        with store[key] as folder:
            out[key] = folder.matrix().tobytes() + "\n".join(folder.ids()).encode()
    return out


def test_killed_runs_resume_to_the_same_results(tmp_path, workers):
    images = tmp_path / "images"
    # folders large enough that a kill lands while the shard job still has folders to do
    keys = _tree(images, per_folder=16)
    reference_dir, work_dir = tmp_path / "reference", tmp_path / "work"
    for directory in (reference_dir, work_dir):
        directory.mkdir()
        # each small folder a group of its own: a kill can land between two folders' files
        write_config(
            directory / "config.yaml",
            images=str(images),
            results="results",
            shards={"group": 1},
        )
    start = time.monotonic()
    run_snakemake(reference_dir, reference_dir / "config.yaml", env=workers.env)
    duration = time.monotonic() - start
    reference = _matrices(reference_dir / "results")
    assert sorted(reference) == sorted(keys)

    rng = random.Random(20261123)
    results = work_dir / "results"
    mid_run = []  # folder files present after each kill that landed while the run went on
    for attempt in range(3):
        before = _folder_files(results)
        proc = _start(work_dir, work_dir / "config.yaml", workers.env)
        # a kill in the middle: once this run has written a folder file of its own, at a random
        # point of the job that follows (its worker busy, its file half written, or between)
        deadline = time.monotonic() + 2 * duration + 60
        while _folder_files(results) <= before and proc.poll() is None:
            assert time.monotonic() < deadline, _output(work_dir)
            time.sleep(0.02)
        # the first kill at once (a warm worker may finish every folder within the random
        # wait: some folders done and others not needs one kill there), the others at random
        time.sleep(rng.uniform(0, 0.3 * duration / len(keys)) if attempt else 0)
        finished = proc.poll() is not None
        assert proc.returncode in (None, 0), _output(work_dir)
        _kill(proc, workers)
        _check_nothing_partial(results)
        if finished:
            break
        mid_run.append(_folder_files(results))
        # Snakemake keeps its lock after a SIGKILL; --unlock is the documented way on
        run_snakemake(work_dir, work_dir / "config.yaml", "--unlock", env=workers.env)
    # at least one kill left some folders done and others not
    assert any(0 < done < len(keys) for done in mid_run), mid_run

    run_snakemake(work_dir, work_dir / "config.yaml", env=workers.env)
    assert _check_nothing_partial(results) >= len(keys)
    assert not list(results.rglob("*.tmp"))
    # bit-identical to the run that was never interrupted
    assert _matrices(results) == reference


def test_reading_while_the_workflow_writes(tmp_path, workers):
    images = tmp_path / "images"
    keys = _tree(images, folders=6, per_folder=3)
    # folders in several jobs, each written as soon as it is done: the files are replaced
    # seconds apart, not all at once at the end of one group (a reader then never saw both)
    shards = {"count": 8, "group": 1}
    config = write_config(
        tmp_path / "config.yaml", images=str(images), results="results", shards=shards
    )
    results = tmp_path / "results"

    def read_until(proc: subprocess.Popen) -> list[dict[str, str]]:
        """Read every folder whole, again and again while ``proc`` runs; returns the settings
        (``preprocess``) of each folder seen, one mapping per pass over the store."""
        passes = []
        while proc.poll() is None:
            time.sleep(0.05)  # leave the two cores to the workflow, mostly
            try:
                store = snakembed.open_store(results)
            except FileNotFoundError:
                assert not (results / "embeddings").is_dir()
                continue
            seen = {}
            for key in store:
                with store[key] as folder:
                    ids, matrix, table = folder.ids(), folder.matrix(), folder.table()
                    assert len(ids) == len(matrix) == folder.attrs["num_images"]
                    assert table["image_id"] == ids
                    assert np.array_equal(table["embedding"], matrix)
                    for row, image_id in enumerate(ids):
                        assert np.array_equal(folder[image_id].embedding, matrix[row])
                    seen[key] = json.dumps(folder.attrs["preprocess"], sort_keys=True)
            passes.append(seen)
        return passes

    proc = _start(tmp_path, config, workers.env)
    read_until(proc)
    assert proc.returncode == 0, _output(tmp_path)
    first = _matrices(results)
    assert sorted(first) == sorted(keys)
    # a second run rewrites every file (new preprocessing) while the old ones are being read
    write_config(
        config, images=str(images), results="results", shards=shards, preprocess={"resize": 72}
    )
    proc = _start(tmp_path, config, workers.env)
    passes = read_until(proc)
    assert proc.returncode == 0, _output(tmp_path)
    # some passes read old and new files side by side: they read while files were replaced
    assert any(len(set(seen.values())) == 2 for seen in passes), passes
    second = _matrices(results)
    assert all(second[k] != first[k] for k in keys)
    with h5py.File(results / "embeddings" / "f1.h5", "r") as f:
        assert '"resize": 72' in f.attrs["preprocess"]


def test_a_reader_keeps_its_version_while_the_file_is_replaced(workflow_run, tmp_path):
    """A folder opened before a rewrite reads the old version whole, then the new one."""
    import shutil

    from snakembed.layout import folder_file

    source = folder_file(workflow_run["results"], "alpha")
    path = tmp_path / "alpha.h5"
    shutil.copy(source, path)
    with Folder(path, "alpha") as old:
        before = old.matrix()
        replacement = tmp_path / ".alpha.h5.new"
        with h5py.File(source, "r") as src, h5py.File(replacement, "w", libver="latest") as dst:
            for name, value in src.attrs.items():
                dst.attrs[name] = value
            for name in src:
                src.copy(src[name], dst, name=name)
            dst["_embeddings"][...] = 0
        os.replace(replacement, path)
        assert np.array_equal(old.matrix(), before) and before.any()
        assert old.ids() == [v.decode() for v in h5py.File(source, "r")["_ids"][()]]
    with Folder(path, "alpha") as new:
        assert not new.matrix().any()
