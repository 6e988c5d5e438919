"""A long-lived process that runs the folder jobs (embed, classify, store) of one machine.

Every folder job would otherwise pay for starting Python, importing torch, initialising CUDA and
loading the model: seconds, as long as embedding a few hundred images. Instead, the first folder
job on a machine starts a worker that prepares the network once and listens on a Unix socket;
every later job with the same settings hands its folder to that worker and relays its progress
lines to the job's log. Each job still writes only its own folder's output, so Snakemake's
per-folder tracking is unchanged, and the output is the same as running in the job itself.

Workers are keyed by everything that changes their work (the whole config, the job's threads,
the Python and snakembed code), live in a private folder of the system's temporary folder,
serve one job at a time (a job holds a slot's lock while it is served; concurrent jobs use
further slots, up to the CPU count over the job's threads), and exit after ``idle`` seconds
without a job. Where no worker can be used (the temporary folder is not private, the worker
cannot start, or dies), the job embeds the folder itself, with a warning in its log.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

__all__ = ["prestart", "run_folder_served", "serve", "worker_dir"]

log = logging.getLogger("snakembed")

#: The longest path a Unix socket can bind to (sun_path is 108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 103

#: Seconds a job waits for a new worker to load its model before embedding by itself.
_START_TIMEOUT = 300.0

#: Workers this process started (reaped here, so a dead one is never taken for a live one).
_STARTED: list[subprocess.Popen] = []


class WorkerUnavailable(RuntimeError):
    """No worker could serve the job (it could not start, or died); the job embeds itself."""


def worker_dir() -> Path | None:
    """This user's private folder for worker sockets, or None when it cannot be made private."""
    path = Path(tempfile.gettempdir()) / f"snakembed-workers-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None  # another user could connect to the sockets or replace them
    return path


def _key(config: dict, threads: int) -> str:
    """What a worker is for: the config, the threads, and this Python's snakembed code."""
    package = Path(__file__).parent
    code = sorted(
        (str(p.relative_to(package)), p.stat().st_mtime_ns) for p in package.rglob("*.py")
    )
    settings = {"config": config, "threads": threads, "python": sys.executable, "code": code}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def run_folder_served(
    manifest: str | Path,
    output: str | Path,
    config: dict,
    *,
    head: str | Path | None,
    threads: int,
) -> None:
    """Run one folder's job through this machine's worker (the ``embed_classify_store`` rule),
    as :func:`snakembed.pipeline.run_folder` would in this process.

    Args:
        manifest: the folder's manifest file (see :mod:`snakembed.manifest`).
        output: the folder's ``.h5`` file.
        config: a validated configuration; with ``worker.enabled`` false the folder is
            run in this process.
        head: the head file, or None to not classify.
        threads: CPU threads for this job.
    """
    from .manifest import read_manifest
    from .pipeline import run_folder

    folder = read_manifest(manifest)
    request = {
        "images_root": os.path.abspath(folder.root),
        "folder": folder.folder,
        "names": folder.names,
        "output": os.path.abspath(output),
        "head": os.path.abspath(head) if head else None,
        "refused": folder.refused,
    }
    if config["worker"]["enabled"]:
        try:
            with _slot(config, threads) as (sock_path, lock_path):
                _relay(_connect(sock_path, lock_path, config, threads), request)
                return
        except WorkerUnavailable as exc:
            print(f"snakembed: running in this job instead: {exc}", file=sys.stderr, flush=True)
    run_folder(**_arguments(request), config=config, threads=threads)


def _arguments(request: dict) -> dict:
    keys = ("images_root", "folder", "names", "output", "head", "refused")
    return {key: request[key] for key in keys}


@contextlib.contextmanager
def _slot(config: dict, threads: int) -> Iterator[tuple[Path, Path]]:
    """A free worker slot's socket and lock paths, held (locked) for the block."""
    folder = worker_dir()
    if folder is None:
        raise WorkerUnavailable(f"{tempfile.gettempdir()} has no private folder for workers")
    key = _key(config, threads)
    if len(os.fsencode(folder / f"{key}-999.sock")) > _MAX_SOCKET_PATH:
        raise WorkerUnavailable(
            f"socket paths under {folder} are too long for Unix sockets; set TMPDIR to a "
            "shorter folder to use workers"
        )
    slots = max(1, (os.cpu_count() or 1) // max(1, threads))
    handles = []
    try:
        for slot in range(slots):
            lock = folder / f"{key}-{slot}.lock"
            handle = open(lock, "a+")  # noqa: SIM115 - held for the block
            handles.append(handle)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield folder / f"{key}-{slot}.sock", lock
            return
        fcntl.flock(handles[0], fcntl.LOCK_EX)  # every slot busy: wait for the first
        yield folder / f"{key}-0.sock", folder / f"{key}-0.lock"
    finally:
        for handle in handles:
            handle.close()


def _connect(sock_path: Path, lock_path: Path, config: dict, threads: int) -> socket.socket:
    """A connection to the slot's worker, starting one if none is listening or starting."""
    with contextlib.suppress(OSError):
        return _open(sock_path)
    pid = _starting(lock_path)
    if pid is None:
        pid = _spawn(sock_path, lock_path, config, threads)
    log_path = lock_path.with_suffix(".log")
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if not _alive(pid):
            tail = log_path.read_text(errors="replace")[-1500:]
            raise WorkerUnavailable(f"the worker exited: {tail}")
        with contextlib.suppress(OSError):
            return _open(sock_path)
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.kill(pid, 9)
    raise WorkerUnavailable(f"the worker did not start in {_START_TIMEOUT:.0f} s; see {log_path}")


def _spawn(sock_path: Path, lock_path: Path, config: dict, threads: int) -> int:
    """Start the slot's worker (in its own session, to outlive the job); returns its pid."""
    config_path = lock_path.with_suffix(".json")
    config_path.write_text(json.dumps(config))
    with open(lock_path.with_suffix(".log"), "a") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snakembed.worker",
                "--config",
                str(config_path),
                "--socket",
                str(sock_path),
                "--threads",
                str(threads),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _STARTED.append(process)
    lock_path.with_suffix(".pid").write_text(str(process.pid))
    return process.pid


def _starting(lock_path: Path) -> int | None:
    """The pid of the slot's worker when one was started and still runs (loading its model)."""
    try:
        pid = int(lock_path.with_suffix(".pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    for process in _STARTED:
        if process.pid == pid:
            return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process took the pid
    proc = Path(f"/proc/{pid}")
    with contextlib.suppress(OSError):  # Linux: a zombie exited; another program took the pid
        if "\nState:\tZ" in (proc / "status").read_text():
            return False
        if b"snakembed.worker" not in (proc / "cmdline").read_bytes():
            return False
    return True


def prestart(config: dict, threads: int) -> bool:
    """Start this machine's first worker for ``config`` now, so that it loads its network while
    Snakemake plans the run (the workflow calls this on local runs).

    Returns:
        Whether a worker was started (not when one already runs or starts, when its slot is
        busy, or when workers are off or cannot be used).
    """
    if not config["worker"]["enabled"]:
        return False
    folder = worker_dir()
    if folder is None:
        return False
    stem = folder / f"{_key(config, threads)}-0"
    if len(os.fsencode(stem)) + 5 > _MAX_SOCKET_PATH:
        return False
    sock_path, lock_path = stem.with_suffix(".sock"), stem.with_suffix(".lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a job is being served there
        with contextlib.suppress(OSError):
            _open(sock_path).close()
            return False
        if _starting(lock_path) is not None:
            return False
        _spawn(sock_path, lock_path, config, threads)
        return True


def _open(sock_path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock_path))
    except OSError:
        conn.close()
        raise
    return conn


def _relay(conn: socket.socket, request: dict) -> None:
    """Send the request; copy the worker's log lines to stderr until it says done."""
    with conn, conn.makefile("rwb") as stream:
        try:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            for line in stream:
                message = json.loads(line)
                if "log" in message:
                    print(message["log"], file=sys.stderr, flush=True)
                elif "done" in message:
                    return
                elif "error" in message:
                    raise RuntimeError(
                        f"embedding folder {request['folder']!r} failed:\n{message['error']}"
                    )
        except OSError as exc:
            raise WorkerUnavailable(f"lost the worker ({exc})") from exc
    raise WorkerUnavailable("the worker stopped before it finished the folder")


class _SocketLog(logging.Handler):
    """Sends snakembed's log lines to the job being served."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):
            self.stream.write(json.dumps({"log": self.format(record)}).encode() + b"\n")
            self.stream.flush()


def serve(config: dict, sock_path: str | Path, threads: int, idle: float | None = None) -> int:
    """Load the config's model once, then embed the folders that jobs send, one at a time,
    until no job comes for ``idle`` seconds (``worker.idle``).

    Returns:
        How many folders were served.
    """
    from .embed import log_to_stderr
    from .pipeline import Models, run_folder

    log_to_stderr()
    models = Models()
    embedder = models.embedder(config, threads)
    idle = config["worker"]["idle"] if idle is None else idle
    sock_path = Path(sock_path)
    sock_path.unlink(missing_ok=True)  # a dead worker's; the slot's lock keeps others out
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(64)
    server.settimeout(idle)
    log.info("worker %d ready: %s on %s", os.getpid(), embedder.backbone.name, sock_path)
    served = 0
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            with conn, conn.makefile("rwb") as stream:
                handler = _SocketLog(stream)
                log.addHandler(handler)
                try:
                    request = json.loads(stream.readline())
                    log.info("worker %d runs folder %s", os.getpid(), request["folder"])
                    run_folder(**_arguments(request), config=config, threads=threads, models=models)
                    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    log.info("worker %d: peak memory %.0f MiB", os.getpid(), peak)
                    reply = {"done": True}
                except Exception:  # noqa: BLE001 - reported to the job, the worker goes on
                    reply = {"error": traceback.format_exc()}
                finally:
                    log.removeHandler(handler)
                served += 1
                with contextlib.suppress(OSError):
                    stream.write(json.dumps(reply).encode() + b"\n")
                    stream.flush()
    finally:
        server.close()
        sock_path.unlink(missing_ok=True)
        sock_path.with_suffix(".pid").unlink(missing_ok=True)
        log.info("worker %d leaves after %d folder(s), idle for %s s", os.getpid(), served, idle)
    return served


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snakembed.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    serve(config, args.socket, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
