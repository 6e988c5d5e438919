"""Embed jobs served by one long-lived worker: one model load per run, the same outputs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_CONFIG, make_image, run_snakemake, shard_log, write_config

import snakembed
import snakembed.reader


def _tree(root, folders=3):
    for f in range(folders):
        for i in range(3):
            make_image(root / f"f{f}" / f"{i}.jpg", size=(60 + 9 * i, 50), seed=10 * f + i)


def _configs(tmp_path, threads: int, **worker) -> tuple[Path, Path]:
    """Config files of a run served by workers (``results: served``) and of one without them
    (``results: alone``), on ``images``."""
    common = {"images": "images", "threads": threads}
    served = write_config(tmp_path / "served.yaml", results="served", worker=worker, **common)
    alone = write_config(
        tmp_path / "alone.yaml", results="alone", worker={"enabled": False}, **common
    )
    return served, alone


def test_one_worker_serves_every_folder_with_the_same_results(tmp_path):
    _tree(tmp_path / "images")
    # Two threads per job on two cores: one job at a time, so one worker slot.
    served, alone = _configs(tmp_path, threads=2)
    short = Path(tempfile.mkdtemp(prefix="sw", dir="/tmp"))  # Unix socket paths are short
    env = {"TMPDIR": str(short)}
    try:
        run_snakemake(tmp_path, served, env=env)
        run_snakemake(tmp_path, alone, env=env)
        # Started while Snakemake planned, once: the jobs waited for it, not starting another.
        workers = short / f"snakembed-workers-{os.getuid()}"
        lines = [line for log in workers.glob("*.log") for line in log.read_text().splitlines()]
        assert len([line for line in lines if " ready: " in line]) == 1
    finally:
        shutil.rmtree(short, ignore_errors=True)
    pids = set()
    for folder in ("f0", "f1", "f2"):
        log = shard_log(tmp_path / "served", folder)
        pids.update(re.findall(rf"worker (\d+) runs folders? (?:.*, )?{folder}\b", log))
        assert f"{folder}: 3 images stored" in log  # progress reaches the job's log
        assert "worker" not in shard_log(tmp_path / "alone", folder)
    assert len(pids) == 1  # the model was loaded once for the whole run
    a, b = snakembed.open_store(tmp_path / "served"), snakembed.open_store(tmp_path / "alone")
    for folder in a:
        assert np.array_equal(a[folder].matrix(), b[folder].matrix())  # bit-identical


def test_without_a_private_temporary_folder_each_job_embeds_itself(tmp_path):
    _tree(tmp_path / "images", folders=1)
    shared = tmp_path / "tmp" / f"snakembed-workers-{os.getuid()}"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # others could connect: never used
    config = write_config(tmp_path / "config.yaml", images="images", results="results")
    run_snakemake(tmp_path, config, env={"TMPDIR": str(tmp_path / "tmp")})
    log = shard_log(tmp_path / "results", "f0")
    assert "running in this job instead" in log and "has no private folder" in log
    assert "f0: 3 images stored" in log
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize("stop", ["idle", "SIGTERM"])
def test_a_worker_leaves_when_idle_or_stopped_and_says_why(tmp_path, stop):
    """It removes its socket and pid file, and its last log line says why it left."""
    import signal

    from snakembed.config import load_config

    config = load_config(overrides={"model": {"name": "resnet18", "weights": "none"}})
    config["worker"]["idle"] = 0.5 if stop == "idle" else 600
    (tmp_path / "config.json").write_text(json.dumps(config))
    sock = tmp_path / "w.sock"
    sock.with_suffix(".pid").write_text("0")  # as the job that starts it writes it
    args = ["--config", str(tmp_path / "config.json"), "--socket", str(sock), "--threads", "1"]
    log = tmp_path / "w.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "snakembed.worker", *args], stdout=out, stderr=out
        )
    deadline = time.monotonic() + 60
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sock.exists()  # listening once its model is loaded
    if stop == "SIGTERM":
        process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert not sock.exists() and not sock.with_suffix(".pid").exists()
    why = "no job came for 0.5 s" if stop == "idle" else "stopped by SIGTERM"
    assert log.read_text().splitlines()[-1].endswith(why)


def _fake_worker(sock_path: Path, hello: dict, then) -> threading.Thread:
    """A worker that says ``hello`` to one job, then does ``then(connection)``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)

    def serve_once():
        conn, _ = server.accept()
        conn.sendall(json.dumps({"identity": hello}).encode() + b"\n")
        then(conn)
        conn.close()
        server.close()

    thread = threading.Thread(target=serve_once)
    thread.start()
    return thread


def _hang_up_midway(conn):
    conn.recv(1 << 16)
    conn.sendall(b'{"log": "started"}\n')  # as a worker killed mid-folder would


def _changed_weights(ident: dict) -> dict:
    return {**ident, "weights_sha256": "0" * 64}


@pytest.mark.parametrize(
    "hello,then,said",
    [
        (dict, _hang_up_midway, "the worker stopped before it finished the folder"),
        (_changed_weights, lambda conn: None, "the worker computes with another weights_sha256"),
    ],
    ids=["stops midway", "other weights"],
)
def test_a_job_that_no_worker_can_serve_embeds_its_folder_itself(
    tmp_path, monkeypatch, caplog, resnet18_checkpoint, hello, then, said
):
    from snakembed.config import load_config
    from snakembed.pipeline import run_folder
    from snakembed.worker import _sock_stem, identity, run_served

    _tree(tmp_path / "images", folders=1)
    short = Path(tempfile.mkdtemp(prefix="sw", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    try:
        overrides = {"model": {"name": "resnet18", "weights": str(resnet18_checkpoint)}}
        config = load_config(overrides={**FAST_CONFIG, **overrides})
        names = ["0.jpg", "1.jpg", "2.jpg"]
        part = {
            "folder": "f0",
            "names": names,
            "output": str(tmp_path / "served.h5"),
            "refused": {},
            "manifest_sha256": "abc",
        }
        request = {"images_root": str(tmp_path / "images"), "head": None, "parts": [part]}
        ident = identity(config, 1)
        sock = Path(f"{_sock_stem(ident)}-0.sock")
        thread = _fake_worker(sock, hello(ident), then)
        errors = io.StringIO()
        monkeypatch.setattr(sys, "stderr", errors)
        with caplog.at_level(logging.INFO, logger="snakembed"):
            assert run_served(request, config, threads=1) == {}
        thread.join()
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert f"snakembed: running in this job instead: {said}" in errors.getvalue()
    assert "f0: 3 images stored" in caplog.text  # then the job embedded the folder
    run_folder(tmp_path / "images", "f0", names, tmp_path / "alone.h5", config)
    with (
        snakembed.reader.Folder(tmp_path / "served.h5", "f0") as served,
        snakembed.reader.Folder(tmp_path / "alone.h5", "f0") as alone,
    ):
        assert served.ids() == names and np.array_equal(served.matrix(), alone.matrix())


def test_a_temporary_folder_too_deep_for_sockets_is_said_and_the_job_runs_itself(tmp_path):
    _tree(tmp_path / "images", folders=1)
    deep = tmp_path / ("x" * 60)
    deep.mkdir()
    config = write_config(tmp_path / "config.yaml", images="images", results="results")
    run_snakemake(tmp_path, config, env={"TMPDIR": str(deep)})
    log = shard_log(tmp_path / "results", "f0")
    assert "too long for Unix sockets; set TMPDIR to a shorter folder" in log
    assert "f0: 3 images stored" in log


@pytest.mark.parametrize("way", ["/proc", "ps"])
def test_a_pid_taken_by_another_program_is_no_starting_worker(tmp_path, monkeypatch, way):
    """A stale pid file must never make a job wait for, or kill, an unrelated process; a
    worker's own pid is one. Told apart by /proc on Linux, by ps where there is none."""
    import snakembed.worker
    from snakembed.worker import _alive, _starting

    if way == "ps":  # as on macOS: no /proc
        real = Path
        hidden = tmp_path / "no-proc"
        monkeypatch.setattr(
            snakembed.worker, "Path", lambda p: real(str(p).replace("/proc/", f"{hidden}/"))
        )
    sleep = "import time; time.sleep(30)"
    other = subprocess.Popen([sys.executable, "-c", sleep])
    # a process whose command line names the worker module, as a worker's does
    worker = subprocess.Popen([sys.executable, "-c", sleep, "-m", "snakembed.worker"])
    try:
        (tmp_path / "k-0.pid").write_text(str(other.pid))
        assert not _alive(other.pid)
        assert _starting(tmp_path / "k-0.lock") is None
        (tmp_path / "k-0.pid").write_text(str(worker.pid))
        # until the child has exec'd, its command line is still this process's
        deadline = time.monotonic() + 10
        while not _alive(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(worker.pid)
        assert _starting(tmp_path / "k-0.lock") == worker.pid
    finally:
        for process in (other, worker):
            process.kill()
            process.wait()


def test_a_shared_worker_joins_the_images_of_concurrent_jobs_into_one_batch():
    """What jobs submit while the network runs is joined into its next call, and each job
    gets back exactly its own rows."""
    import torch

    from snakembed.embed import _Batcher

    class Network:
        limit = 64

        def __init__(self):
            self.sizes, self.running, self.release = [], threading.Event(), threading.Event()

        def __call__(self, pixels):
            self.sizes.append(len(pixels))
            self.running.set()
            self.release.wait(10)
            return pixels[:, 0, 0, 0].float().numpy()[:, None]

    network = Network()
    batcher = _Batcher(network)
    got = {}

    def job(tag, n):
        got[tag] = batcher(torch.full((n, 3, 2, 2), tag, dtype=torch.uint8))

    first = threading.Thread(target=job, args=(1, 5))
    first.start()
    network.running.wait(10)  # the network runs on job 1's batch ...
    others = [threading.Thread(target=job, args=(tag, tag)) for tag in (2, 3, 4)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 10
    while batcher._queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    network.release.set()  # ... while jobs 2, 3 and 4 submit theirs
    for thread in [first, *others]:
        thread.join(10)
    assert network.sizes == [5, 2 + 3 + 4]
    for tag, n in ((1, 5), (2, 2), (3, 3), (4, 4)):
        assert got[tag].tolist() == [[float(tag)]] * n


def test_jobs_are_spread_over_the_shared_workers(tmp_path, monkeypatch):
    from snakembed.config import load_config
    from snakembed.worker import _slot, identity

    monkeypatch.setattr(tempfile, "tempdir", str(Path(tempfile.mkdtemp(prefix="sw", dir="/tmp"))))
    config = load_config(overrides={"worker": {"shared": True, "services": 2}})
    ident = identity(config, 1)
    with _slot(ident, config) as a, _slot(ident, config) as b, _slot(ident, config) as c:
        assert [a.name[-3:], b.name[-3:], c.name[-3:]] == ["-s0", "-s1", "-s0"]
    with _slot(ident, config) as again:
        assert again == a  # the least busy first once the others have left
    shutil.rmtree(tempfile.tempdir, ignore_errors=True)


def test_shared_workers_give_every_folder_the_results_of_jobs_alone(tmp_path, workers):
    _tree(tmp_path / "images", folders=4)
    served, alone = _configs(tmp_path, threads=1, shared=True, services=2, idle=30)
    run_snakemake(tmp_path, served, env=workers.env)
    run_snakemake(tmp_path, alone, env=workers.env)
    lines = [line for log in workers.folder.glob("*.log") for line in log.read_text().splitlines()]
    ready = [line for line in lines if " ready: " in line]
    assert 1 <= len(ready) <= 2 and all("shared by every job" in line for line in ready)
    a, b = snakembed.open_store(tmp_path / "served"), snakembed.open_store(tmp_path / "alone")
    assert sorted(a) == sorted(b) == ["f0", "f1", "f2", "f3"]
    for folder in a:
        log = shard_log(tmp_path / "served", folder)
        assert re.search(rf"worker \d+ runs folders? (?:.*, )?{folder}\b", log)
        assert f"{folder}: 3 images stored (3 embedded, 0 reused)" in log
        assert a[folder].ids() == b[folder].ids()
        assert np.allclose(a[folder].matrix(), b[folder].matrix(), atol=1e-5)
        assert (
            a[folder].table(embeddings=False)["label"] == b[folder].table(embeddings=False)["label"]
        )
    # a rerun after one image changed: served again, the rest reused
    make_image(tmp_path / "images" / "f2" / "1.jpg", size=(70, 50), seed=99)
    run_snakemake(tmp_path, served, env=workers.env)
    log = shard_log(tmp_path / "served", "f2")
    assert "f2: 3 images stored (1 embedded, 2 reused)" in log


def test_a_worker_reads_buckets_only_for_the_same_server_and_identity(monkeypatch):
    """Another S3 endpoint or key is another worker; the secret never appears in the
    identity (which workers send on every connection)."""
    from snakembed.config import load_config
    from snakembed.worker import identity

    config = load_config(overrides={"model": {"name": "resnet18", "weights": "none"}})
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    first = identity(config, 1)
    assert "very-secret-value" not in json.dumps(first)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert identity(config, 1) != first
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert identity(config, 1) == first
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another")
    assert identity(config, 1) != first
