"""A long-lived process that runs the folder jobs (embed, classify, store) of one machine.

Every folder job would otherwise pay for starting Python, importing torch, initialising CUDA and
loading the model: seconds, as long as embedding a few hundred images. Instead, the first folder
job on a machine starts a worker that prepares the network once and listens on a Unix socket;
every later job with the same identity hands its folder to that worker and relays its progress
lines to the job's log. Each job still writes only its own folder's output, so Snakemake's
per-folder tracking is unchanged, and the output is the same as running in the job itself.

A worker serves a job only if it computes exactly what the job would compute itself. Its
*identity* (:func:`identity`) holds everything that decides the numbers, by content: the
config, the weights file's sha256 (a checkpoint rewritten in place is another identity), the
custom network's source file, snakembed's code, the Python, the threads, the resolved device and
precision, and the environment that picks weights (``TORCH_HOME``, ``HF_HOME``,
``CUDA_VISIBLE_DEVICES``, ...). Workers are found by a hash of it, and on every connection the
worker first sends the identity it computed from what it actually loaded; the job compares it
with its own and embeds the folder itself when they differ. A trained head is read by content
for every folder.

Workers live in a private folder of the system's temporary folder, serve one job at a time (a
job holds a slot's lock while it is served; concurrent jobs use further slots, up to the CPU
count over the job's threads), and exit after ``worker.idle`` seconds without a job. A job that
dies while it is served (killed, cancelled, Ctrl-C) closes its connection: the worker stops that
folder between two batches and writes nothing. A connection that sends nothing (a probe) is
closed without a word. Where no worker can be used (the temporary folder is not private, the
worker cannot start, dies, or serves another identity), the job embeds the folder itself, with a
line in its log saying why.
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
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "WorkerUnavailable",
    "hash_cache",
    "identity",
    "prestart",
    "run_folder_served",
    "serve",
    "worker_dir",
]

log = logging.getLogger("snakembed")

#: The longest path a Unix socket can bind to (sun_path is 108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 103

#: Seconds a job waits for a new worker to load its model before embedding by itself.
_START_TIMEOUT = 300.0

#: Seconds a job waits for a worker's identity once connected.
_HELLO_TIMEOUT = 60.0

#: The environment that chooses weights and devices: a worker started with other values would
#: compute something else.
_ENVIRONMENT = (
    "CUDA_VISIBLE_DEVICES",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "PYTHONPATH",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
)

#: Workers this process started (reaped here, so a dead one is never taken for a live one).
_STARTED: list[subprocess.Popen] = []


class WorkerUnavailable(RuntimeError):
    """No worker could serve the job (it could not start, died, or serves another identity);
    the job embeds itself."""


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


def identity(
    config: dict,
    threads: int,
    *,
    weights_sha256: str | None = None,
    device: str | None = None,
) -> dict:
    """Everything that decides what a worker computes for ``config``, by content.

    Args:
        config: a validated configuration.
        threads: the job's CPU threads.
        weights_sha256: the loaded checkpoint's sha256 (a worker gives what it loaded); default:
            the file's, when ``model.weights`` is a file (cached by its stat, see
            :func:`snakembed._files.cached_sha256`).
        device: the kind of device the network runs on (a worker gives its own); default:
            ``config``'s, resolved here.

    Returns:
        A JSON-serialisable dict; equal dicts compute equal numbers.

    Example:
        >>> from snakembed.config import load_config
        >>> config = load_config(overrides={"device": "cpu"})
        >>> identity(config, 2)["device"], identity(config, 2)["precision"]
        ('cpu', 'fp32')
    """
    from .backbones import is_local_weights, model_file_hashes
    from .config import resolved
    from .devices import device_type

    config = resolved(config)
    model = config["model"]
    files = model_file_hashes(model, hash_cache())
    if weights_sha256 is None:
        weights_sha256 = files["weights_sha256"]
    return {
        "config": config,
        "threads": threads,
        "python": sys.executable,
        "code": _code_sha256(),
        "module": files["module_sha256"],
        "weights_sha256": weights_sha256 if is_local_weights(model["weights"]) else None,
        "device": device or device_type(config["device"]),
        "precision": config["precision"],
        "environment": {name: os.environ.get(name) for name in _ENVIRONMENT},
    }


_CODE: list[str] = []


def _code_sha256() -> str:
    """The sha256 of snakembed's own code, as this process found it first."""
    if not _CODE:
        package = Path(__file__).parent
        digest = hashlib.sha256()
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
        _CODE.append(digest.hexdigest())
    return _CODE[0]


def hash_cache() -> Path | None:
    """The private folder of cached file checksums (see
    :func:`snakembed._files.cached_sha256`), or None where there is no private folder."""
    folder = worker_dir()
    return folder / "sha256" if folder is not None else None


def _key(ident: dict) -> str:
    """The name of the workers of an identity."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


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
    from .manifest import job_started, read_manifest_with_digest

    folder, digest = read_manifest_with_digest(manifest)
    request = {
        "manifest_sha256": digest,
        "images_root": os.path.abspath(folder.root),
        "folder": folder.folder,
        "names": folder.names,
        "output": os.path.abspath(output),
        "head": os.path.abspath(head) if head else None,
        "refused": folder.refused,
    }
    # A note left behind if the job fails: Snakemake then restores the folder's previous file
    # and still records the job as done; the next plan sees it and computes the folder again.
    with job_started(manifest, digest):
        _run_served(request, config, threads)


def _run_served(request: dict, config: dict, threads: int) -> None:
    from .pipeline import run_folder

    if config["worker"]["enabled"]:
        try:
            ident = identity(config, threads)
            with _slot(ident) as (sock_path, lock_path):
                _relay(_connect(sock_path, lock_path, config, ident), request, ident)
                return
        except WorkerUnavailable as exc:
            print(f"snakembed: running in this job instead: {exc}", file=sys.stderr, flush=True)
    run_folder(**_arguments(request), config=config, threads=threads)


def _arguments(request: dict) -> dict:
    keys = ("images_root", "folder", "names", "output", "head", "refused", "manifest_sha256")
    return {key: request[key] for key in keys}


def _sock_stem(ident: dict) -> Path:
    """Where the workers of an identity keep their files (``{stem}-{slot}.sock`` ...)."""
    folder = worker_dir()
    if folder is None:
        raise WorkerUnavailable(f"{tempfile.gettempdir()} has no private folder for workers")
    stem = folder / _key(ident)
    if len(os.fsencode(f"{stem}-999.sock")) > _MAX_SOCKET_PATH:
        raise WorkerUnavailable(
            f"socket paths under {folder} are too long for Unix sockets; set TMPDIR to a "
            "shorter folder to use workers"
        )
    return stem


@contextlib.contextmanager
def _slot(ident: dict) -> Iterator[tuple[Path, Path]]:
    """A free worker slot's socket and lock paths, held (locked) for the block."""
    stem = _sock_stem(ident)
    slots = max(1, (os.cpu_count() or 1) // max(1, ident["threads"]))
    handles = []
    try:
        for slot in range(slots):
            lock = Path(f"{stem}-{slot}.lock")
            handle = open(lock, "a+")  # noqa: SIM115 - held for the block
            handles.append(handle)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield lock.with_suffix(".sock"), lock
            return
        fcntl.flock(handles[0], fcntl.LOCK_EX)  # every slot busy: wait for the first
        yield Path(f"{stem}-0.sock"), Path(f"{stem}-0.lock")
    finally:
        for handle in handles:
            handle.close()


def _connect(sock_path: Path, lock_path: Path, config: dict, ident: dict) -> socket.socket:
    """A connection to the slot's worker, starting one if none is listening or starting."""
    with contextlib.suppress(OSError):
        return _open(sock_path)
    pid = _starting(lock_path)
    if pid is None:
        pid = _spawn(sock_path, lock_path, config, ident["threads"])
    log_path = lock_path.with_suffix(".log")
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if not _alive(pid):
            lines = log_path.read_text(errors="replace").splitlines()
            last = next((line for line in reversed(lines) if line.strip()), "no message")
            raise WorkerUnavailable(f"the worker exited ({last.strip()}); see {log_path}")
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
    Snakemake starts the run's first jobs (the workflow calls this when folder jobs are about
    to run locally).

    Returns:
        Whether a worker was started (not when one already runs or starts, when its slot is
        busy, or when workers are off or cannot be used).
    """
    from .backbones import is_local_weights

    weights = config["model"]["weights"]
    if not config["worker"]["enabled"] or (
        is_local_weights(weights) and not Path(weights).is_file()
    ):
        return False  # (a checkpoint that the finetune rule writes first: the jobs start one)
    ident = identity(config, threads)
    try:
        stem = _sock_stem(ident)
    except WorkerUnavailable:
        return False
    sock_path, lock_path = Path(f"{stem}-0.sock"), Path(f"{stem}-0.lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a job is being served there
        with contextlib.suppress(OSError):
            _open(sock_path).close()  # a probe: the worker closes it without a word
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


def _relay(conn: socket.socket, request: dict, ident: dict) -> None:
    """Check the worker's identity against ``ident``, send the request, and copy the worker's
    log lines to stderr until it says done.

    Raises:
        WorkerUnavailable: when the worker computes with another identity (naming what
            differs), or stops before it has finished.
        RuntimeError: when the folder failed in the worker (with the worker's traceback).
    """
    conn.settimeout(_HELLO_TIMEOUT)
    with conn, conn.makefile("rwb") as stream:
        try:
            # The worker sends nothing after its identity until it has the request, so the
            # stream's buffer takes nothing that the loop below would miss.
            served = json.loads(stream.readline() or b"null")
            served = served.get("identity") if isinstance(served, dict) else None
            if served != ident:
                raise WorkerUnavailable(_identity_difference(served, ident))
            conn.settimeout(None)
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
        except (OSError, ValueError) as exc:
            raise WorkerUnavailable(f"lost the worker ({exc})") from exc
    raise WorkerUnavailable("the worker stopped before it finished the folder")


def _identity_difference(served: dict | None, ident: dict) -> str:
    if not isinstance(served, dict):
        return "the worker did not say what it computes"
    differ = sorted(k for k in {*served, *ident} if served.get(k) != ident.get(k))
    return f"the worker computes with another {', '.join(differ)} than this job would"


class _SocketLog(logging.Handler):
    """Sends snakembed's log lines to the job being served."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(json.dumps({"log": self.format(record)}).encode() + b"\n")
            self.stream.flush()


class _Hangup:
    """Watches a job's connection while its folder runs: set once the job has gone (it never
    sends anything after its request, so a readable end is a closed one)."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._stop = threading.Event()
        self.gone = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._conn.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                data = self._conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.gone.set()
                return
            time.sleep(0.1)  # bytes a job should not send: not a hang-up; look again later

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def serve(config: dict, sock_path: str | Path, threads: int, idle: float | None = None) -> int:
    """Load the config's model once, then embed the folders that jobs send, one at a time,
    until no job comes for ``idle`` seconds (``worker.idle``).

    Returns:
        How many folders were served.
    """
    from .embed import log_to_stderr
    from .pipeline import Models

    log_to_stderr()
    models = Models(hash_cache=hash_cache())
    embedder = models.embedder(config, threads)
    own = identity(
        config,
        threads,
        weights_sha256=embedder.backbone.weights_sha256,
        device=embedder.device.type,
    )
    hello = json.dumps({"identity": own}).encode() + b"\n"
    idle = config["worker"]["idle"] if idle is None else idle
    sock_path = Path(sock_path)
    sock_path.unlink(missing_ok=True)  # a dead worker's; the slot's lock keeps others out
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(64)
    server.settimeout(idle)
    log.info("worker %d ready: %s on %s", os.getpid(), embedder.backbone.name, sock_path)
    served = 0
    why = f"no job came for {idle:g} s"
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            conn.settimeout(None)
            with contextlib.suppress(OSError), conn:
                served += _serve_one(conn, hello, config, threads, models)
    except BaseException as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        server.close()
        sock_path.unlink(missing_ok=True)
        sock_path.with_suffix(".pid").unlink(missing_ok=True)
        log.info("worker %d leaves after %d folder(s): %s", os.getpid(), served, why)
    return served


def _serve_one(conn: socket.socket, hello: bytes, config: dict, threads: int, models) -> int:
    """Serve one connection: 1 when a folder was served, 0 for a probe or a job that left.

    Raises:
        OSError: when the job's connection breaks (the caller drops it).
    """
    from .pipeline import Cancelled, run_folder

    conn.sendall(hello)
    with conn.makefile("rwb") as stream:
        line = stream.readline()
        if not line.strip():
            return 0  # a probe, or a job that found another identity: nothing to say
        handler = _SocketLog(stream)
        log.addHandler(handler)
        hangup = _Hangup(conn)
        try:
            request = json.loads(line)
            log.info("worker %d runs folder %s", os.getpid(), request["folder"])
            run_folder(
                **_arguments(request),
                config=config,
                threads=threads,
                models=models,
                cancelled=hangup.gone.is_set,
            )
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            log.info("worker %d: peak memory %.0f MiB", os.getpid(), peak)
            reply = {"done": True}
        except Cancelled as exc:
            log.removeHandler(handler)
            log.warning("worker %d dropped folder %s: %s", os.getpid(), request["folder"], exc)
            return 0
        except Exception:  # noqa: BLE001 - reported to the job, the worker goes on
            reply = {"error": traceback.format_exc()}
        finally:
            hangup.close()
            log.removeHandler(handler)
        stream.write(json.dumps(reply).encode() + b"\n")
        stream.flush()
    return 1


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
