"""A long-lived process that computes the folders of the shard jobs of one machine.

Every shard job would otherwise pay for starting torch, initialising CUDA and loading the model:
seconds, as long as embedding a few hundred images, and paid again by every job of a run and
every run of a session. Instead, the first job on a machine starts a worker that prepares the
network once and listens on a Unix socket; every later job with the same identity hands it its
folders (a group of small folders at a time, see :func:`snakembed.pipeline.compute_folders`) and
relays its progress lines to the job's log. The job still writes each folder's file itself, and
the output is the same as computing in the job. The CLI's ``predict``, ``embed`` and ``query``
use workers the same way (:func:`snakembed.pipeline.compute_images`), so that only the first
command of a session loads the network.

A worker serves a job only if it computes exactly what the job would compute itself. Its
*identity* (:func:`identity`) holds everything that decides the numbers, by content: the config,
the weights file's sha256 (a checkpoint rewritten in place is another identity), the custom
network's source file, snakembed's code, the Python, the threads, the resolved device and
precision, the environment that picks weights (``TORCH_HOME``, ``HF_HOME``,
``CUDA_VISIBLE_DEVICES``, ...), and a checksum of the one that says which S3 server images in a
bucket come from, and as whom (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Workers are
found by a hash of it, and on every connection the worker first sends the identity it computed
from what it actually loaded; the job compares it with its own and computes the folders itself
when they differ. A trained head is read by content for every request.

Workers live in a private folder of the system's temporary folder, serve one job at a time (a
job holds a slot's lock while it is served; concurrent jobs use further slots, up to the CPU
count over the job's threads), and exit after ``worker.idle`` seconds without a job. A job that
dies while it is served (killed, cancelled, Ctrl-C) closes its connection: the worker stops
between two batches and writes nothing. A connection that sends nothing (a probe) is closed
without a word. Where no worker can be used (the temporary folder is not private, the worker
cannot start, dies, or serves another identity), the job computes the folders itself, with a
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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from .buckets import BucketUnavailable

__all__ = [
    "WorkerUnavailable",
    "compute_served",
    "hash_cache",
    "identity",
    "prestart",
    "run_served",
    "serve",
    "services",
    "shared",
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

#: The environment that decides which S3 server a worker reads a bucket's images from, and as
#: whom (see :mod:`snakembed.buckets`): part of the identity by a checksum, never in clear.
_AWS_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
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
        >>> config = load_config(overrides={"device": "cpu", "precision": "fp32"})
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
        "config": {key: value for key, value in config.items() if key not in _PER_REQUEST},
        "threads": threads,
        "python": sys.executable,
        "code": _code_sha256(),
        "module": files["module_sha256"],
        "weights_sha256": weights_sha256 if is_local_weights(model["weights"]) else None,
        "device": device or device_type(config["device"]),
        "precision": config["precision"],
        "environment": {name: os.environ.get(name) for name in _ENVIRONMENT},
        "aws": hashlib.sha256(
            json.dumps([os.environ.get(name) for name in _AWS_ENVIRONMENT]).encode()
        ).hexdigest(),
    }


#: Config sections that are not part of a worker's identity: ``classify`` comes with each
#: request (one worker answers ``predict --topk 3`` and ``embed`` alike), and ``worker`` says
#: how workers are found and how long they wait, not what they compute.
_PER_REQUEST = ("classify", "worker")

#: The errors a worker sends back by kind, which the CLI raises again as such (what was asked
#: wrong: a head file, a layer without a classifier); a job shows the worker's traceback.
_KINDS = {
    kind.__name__: kind
    for kind in (
        FileNotFoundError,
        PermissionError,
        OSError,
        KeyError,
        LookupError,
        ValueError,
        BucketUnavailable,
    )
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


def run_served(
    request: dict, config: dict, threads: int | None, *, models=None
) -> dict[str, Exception]:
    """Compute folders (:func:`compute_served`) and store each folder's file.

    Args:
        request: ``images_root``, ``head`` and ``parts``: the folders, each ``{"folder",
            "names", "output", "refused", "manifest_sha256"}`` (see
            :func:`~snakembed.pipeline.run_folder`).
        config: a validated configuration.
        threads: CPU threads for this job.
        models: the network and head kept across this job's folders, when it computes them
            itself.

    Returns:
        ``{folder: error}`` of the folders whose file could not be written (the others are
        stored).

    Raises:
        Exception: when computing the folders failed (none of them is stored).
    """
    from .pipeline import store_folders

    start = time.monotonic()
    computed, _ = compute_served(request, config, threads, models=models)
    return store_folders(request["parts"], computed, config, start)


def compute_served(
    request: dict,
    config: dict,
    threads: int | None,
    *,
    models=None,
    before_here: Callable[[], None] | None = None,
    job: bool = True,
) -> tuple[list[tuple], bool]:
    """Compute folders through this machine's worker, as
    :func:`snakembed.pipeline.compute_folders` would in this process (which it does with
    ``worker.enabled`` false, or where no worker can serve).

    Args:
        before_here: called before the folders are computed in this process (its decoding
            processes are forked then: a caller's threads must be done).
        job: the caller is a workflow job: every line of the worker's log goes to its stderr
            (its rule's log). Else (the CLI) they go to snakembed's logger, at their level.
        others: as :func:`run_served`.

    Returns:
        Each part's ``(embeddings, predictions)``, and whether a worker computed them.

    Raises:
        Exception: when computing the folders failed.
    """
    from .embed import log_to_stderr
    from .pipeline import compute_folders

    threads = threads or config["threads"]
    request = {**request, "classify": config["classify"]}
    if job:
        log_to_stderr()
    if config["worker"]["enabled"]:
        try:
            ident = identity(config, threads)
            with _slot(ident, config) as base:
                return _relay(_connect(base, config, ident), request, ident, job), True
        except WorkerUnavailable as exc:
            if job:
                print(f"snakembed: running in this job instead: {exc}", file=sys.stderr, flush=True)
            else:
                log.info("computing here instead: %s", exc)
    if before_here is not None:
        before_here()
    computed = compute_folders(**_folder_arguments(request, config), threads=threads, models=models)
    return computed, False


def _folder_arguments(request: dict, config: dict) -> dict:
    """The arguments of :func:`~snakembed.pipeline.compute_folders` that a request gives, and
    ``config`` with the request's ``classify`` settings."""
    arguments = {key: request[key] for key in ("images_root", "parts", "head")}
    return {**arguments, "config": {**config, "classify": request["classify"]}}


def shared(config: dict) -> bool:
    """Whether ``config``'s workers serve many jobs at once (``worker.shared``; ``auto``: on a
    GPU), batching their images together, rather than one job at a time.

    Example:
        >>> from snakembed.config import load_config
        >>> shared(load_config(overrides={"device": "cuda"}))
        True
        >>> shared(load_config(overrides={"device": "cpu"}))
        False
    """
    from .config import resolved
    from .devices import device_type

    setting = config["worker"]["shared"]
    if setting != "auto":
        return bool(setting)
    return device_type(resolved(config)["device"]) == "cuda"


def services(config: dict) -> int:
    """How many shared workers a machine runs for ``config`` (``worker.services``; ``auto``:
    one per visible GPU, else one)."""
    from .config import resolved
    from .devices import device_type, gpu_count

    setting = config["worker"]["services"]
    if setting != "auto":
        return int(setting)
    return max(1, gpu_count()) if device_type(resolved(config)["device"]) == "cuda" else 1


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
def _slot(ident: dict, config: dict) -> Iterator[Path]:
    """The worker this job goes to, as the stem of its files (``.sock``, ``.pid``, ``.log``),
    with a slot held (locked) for the block.

    Unshared workers serve one job each: up to the CPU count over the job's threads slots, one
    worker each. Shared workers (one per GPU) serve every job of the machine: the job takes
    the least busy one (slots held per worker, taken in turn).
    """
    stem = _sock_stem(ident)
    if shared(config):
        count = services(config)
        slots = [
            (Path(f"{stem}-s{i}-{j}.lock"), Path(f"{stem}-s{i}"))
            for j in range(os.cpu_count() or 1)
            for i in range(count)
        ]
    else:
        count = max(1, (os.cpu_count() or 1) // max(1, ident["threads"]))
        slots = [(Path(f"{stem}-{i}.lock"), Path(f"{stem}-{i}")) for i in range(count)]
    handles = []
    try:
        for lock, base in slots:
            handle = open(lock, "a+")  # noqa: SIM115 - held for the block
            handles.append(handle)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield base
            return
        fcntl.flock(handles[0], fcntl.LOCK_EX)  # every slot busy: wait for the first
        yield slots[0][1]
    finally:
        for handle in handles:
            handle.close()


def _connect(base: Path, config: dict, ident: dict) -> socket.socket:
    """A connection to the worker at ``base``, starting one if none is listening or starting
    (one job at a time decides, under the worker's start lock)."""
    sock_path = base.with_suffix(".sock")
    with contextlib.suppress(OSError):
        return _open(sock_path)
    with open(base.with_suffix(".start"), "a+") as start:
        fcntl.flock(start, fcntl.LOCK_EX)
        pid = _starting(base)
        if pid is None:
            with contextlib.suppress(OSError):
                return _open(sock_path)  # started while this job waited for the lock
            pid = _spawn(base, config, ident["threads"])
    log_path = base.with_suffix(".log")
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


def _spawn(base: Path, config: dict, threads: int) -> int:
    """Start the worker at ``base`` (in its own session, to outlive the job); returns its pid."""
    config_path = base.with_suffix(".json")
    config_path.write_text(json.dumps(config))
    service = base.name.rsplit("-s", 1)[1] if "-s" in base.name else "0"
    with open(base.with_suffix(".log"), "a") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snakembed.worker",
                "--config",
                str(config_path),
                "--socket",
                str(base.with_suffix(".sock")),
                "--threads",
                str(threads),
                "--service",
                service,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _STARTED.append(process)
    base.with_suffix(".pid").write_text(str(process.pid))
    return process.pid


def _starting(base: Path) -> int | None:
    """The pid of the worker at ``base`` when one was started and still runs (loading its
    model)."""
    try:
        pid = int(base.with_suffix(".pid").read_text())
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
    state, command = _process(pid)
    # a zombie has exited; another program may have taken the pid of a worker that is gone
    return state is None or (not state.startswith("Z") and "snakembed.worker" in command)


def _process(pid: int) -> tuple[str | None, str]:
    """A live process's state (``R``, ``S``, ``Z`` ...) and command line, from ``/proc`` on Linux,
    else from ``ps`` (macOS, the BSDs); ``(None, "")`` where neither can tell."""
    proc = Path(f"/proc/{pid}")
    with contextlib.suppress(OSError):
        status = (proc / "status").read_text()
        state = status.partition("\nState:\t")[2][:1]
        return state, (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["ps", "-ww", "-o", "stat=", "-o", "args=", "-p", str(pid)],  # -ww: not cut short
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if out:
            state, _, command = out.partition(" ")
            return state, command.strip()
    return None, ""


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
    base = Path(f"{stem}-s0") if shared(config) else Path(f"{stem}-0")
    with open(base.with_suffix(".start"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a job is starting it
        with contextlib.suppress(OSError):
            _open(base.with_suffix(".sock")).close()  # a probe: closed without a word
            return False
        if _starting(base) is not None:
            return False
        _spawn(base, config, threads)
        return True


def _open(sock_path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock_path))
    except OSError:
        conn.close()
        raise
    return conn


def _named(request: dict) -> str:
    """The folders of a request, in words."""
    folders = [part["folder"] for part in request["parts"]]
    if len(folders) == 1:
        return f"folder {folders[0]}"
    return f"folders {', '.join(folders[:5])}{' ...' if len(folders) > 5 else ''}"


def _relay(conn: socket.socket, request: dict, ident: dict, job: bool = True) -> list[tuple]:
    """Check the worker's identity against ``ident``, send the request, copy the worker's log
    lines to stderr (``job``) or to snakembed's logger, and receive each folder's embeddings
    and predictions.

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
                if "log" in message and job:
                    print(message["log"], file=sys.stderr, flush=True)
                elif "log" in message:
                    log.log(message.get("level", logging.INFO), message.get("message", ""))
                elif "results" in message:
                    out = []
                    for header, size in zip(message["results"], message["bytes"], strict=True):
                        payload = stream.read(size)
                        if len(payload) != size:
                            raise WorkerUnavailable("the worker stopped while it sent its results")
                        out.append(_unpack(header, payload))
                    return out
                elif "error" in message and _raised_again(message, job):
                    raise _KINDS[message["kind"]](message["message"])
                elif "error" in message:
                    raise RuntimeError(f"embedding {_named(request)} failed:\n{message['error']}")
        except (OSError, ValueError) as exc:
            raise WorkerUnavailable(f"lost the worker ({exc})") from exc
    raise WorkerUnavailable("the worker stopped before it finished the folders")


def _pack(result, predictions) -> tuple[dict, bytes]:
    """A folder's embeddings and predictions as a JSON header and NumPy's ``.npz`` bytes."""
    import io

    import numpy as np

    arrays = {"width": result.width, "height": result.height, "vectors": result.vectors}
    for name in ("patch_vectors", "patch_boxes", "patch_counts"):
        if getattr(result, name) is not None:
            arrays[name] = getattr(result, name)
    header = {key: getattr(result, key) for key in ("ids", "sources", "sha256", "failed", "meta")}
    header["reused"] = result.reused
    if predictions is not None:
        arrays["labels"], arrays["scores"] = predictions.labels, predictions.scores
        header["head"] = predictions.head
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return header, buffer.getvalue()


def _unpack(header: dict, payload: bytes) -> tuple:
    """What :func:`_pack` packed: ``(Embeddings, Predictions or None)``."""
    import io

    import numpy as np

    from .classify import Predictions
    from .embed import Embeddings

    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    result = Embeddings(
        ids=header["ids"],
        sources=header["sources"],
        sha256=header["sha256"],
        width=arrays["width"],
        height=arrays["height"],
        vectors=arrays["vectors"],
        failed=header["failed"],
        patch_vectors=arrays.get("patch_vectors"),
        patch_boxes=arrays.get("patch_boxes"),
        patch_counts=arrays.get("patch_counts"),
        meta=header["meta"],
        reused=header["reused"],
    )
    predictions = None
    if "head" in header:
        predictions = Predictions(
            list(header["ids"]), arrays["labels"], arrays["scores"], header["head"]
        )
    return result, predictions


def _raised_again(message: dict, job: bool) -> bool:
    """Whether an error the worker sent is raised again as its kind: a command's errors of what
    was asked; a job's bucket that cannot be read (the job stops instead of trying each folder)."""
    kind = _KINDS.get(message.get("kind", ""))
    return kind is not None and (not job or kind is BucketUnavailable)


def _kind(exc: BaseException) -> dict:
    """An error's kind among ``_KINDS`` and its message, for the CLI to raise again."""
    for name, kind in _KINDS.items():
        if isinstance(exc, kind):
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return {"kind": name, "message": text}
    return {}


def _identity_difference(served: dict | None, ident: dict) -> str:
    if not isinstance(served, dict):
        return "the worker did not say what it computes"
    differ = sorted(k for k in {*served, *ident} if served.get(k) != ident.get(k))
    return f"the worker computes with another {', '.join(differ)} than this job would"


class _SocketLog(logging.Handler):
    """Sends the log lines of the thread that serves a job to that job."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        thread = threading.get_ident()
        self.addFilter(lambda record: record.thread == thread)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError, ValueError):
            line = {
                "log": self.format(record),
                "level": record.levelno,
                "message": record.getMessage(),
            }
            self.stream.write(json.dumps(line).encode() + b"\n")
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


def serve(
    config: dict,
    sock_path: str | Path,
    threads: int,
    idle: float | None = None,
    service: int = 0,
) -> int:
    """Load the config's model once, then embed the folders that jobs send until no job comes
    for ``idle`` seconds (``worker.idle``): one at a time, or, for a shared worker (see
    :func:`shared`), all at once, each in its own thread, their images batched together.

    Args:
        config: a validated configuration.
        sock_path: the Unix socket to listen on.
        threads: the jobs' CPU threads.
        idle: seconds without a job before leaving (default: ``worker.idle``).
        service: which of a machine's shared workers this is: it runs on GPU
            ``service`` modulo the GPUs there are (with ``device: cuda``).

    Returns:
        How many folders were served.
    """
    from .embed import log_to_stderr
    from .pipeline import Models

    log_to_stderr()
    models = Models(hash_cache=hash_cache())
    embedder = models.embedder(config, threads, device=_service_device(config, service))
    together = shared(config)
    if together:
        embedder.share()
    own = identity(
        config,
        threads,
        weights_sha256=embedder.backbone.weights_sha256,
        device=embedder.device.type,
    )
    hello = json.dumps({"identity": own}).encode() + b"\n"
    idle = config["worker"]["idle"] if idle is None else idle
    sock_path = Path(sock_path)
    sock_path.unlink(missing_ok=True)  # a dead worker's; the start lock keeps others out
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(256)
    server.settimeout(idle)
    log.info(
        "worker %d ready: %s on %s%s",
        os.getpid(),
        embedder.backbone.name,
        embedder.compute.describe(),
        ", shared by every job" if together else "",
    )
    counts = _Served()
    why = f"no job came for {idle:g} s"
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if counts.busy():
                    continue
                break
            conn.settimeout(None)
            if together:
                counts.start()
                threading.Thread(
                    target=_serve_thread, args=(conn, hello, config, threads, models, counts)
                ).start()
            else:
                with contextlib.suppress(OSError), conn:
                    counts.done(_serve_one(conn, hello, config, threads, models))
    except BaseException as exc:
        why = str(exc) if isinstance(exc, _Stopped) else f"{type(exc).__name__}: {exc}"
        raise
    finally:
        server.close()
        sock_path.unlink(missing_ok=True)
        sock_path.with_suffix(".pid").unlink(missing_ok=True)
        counts.wait()
        used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        log.info(
            "worker %d leaves after %d folder(s), %.1f CPU seconds: %s",
            os.getpid(),
            counts.served,
            sum(u.ru_utime + u.ru_stime for u in used),
            why,
        )
    return counts.served


def _service_device(config: dict, service: int) -> str | None:
    """The GPU of a machine's ``service``-th shared worker (``cuda:N``), or None: the
    config's device."""
    from .config import resolved

    device = resolved(config)["device"]
    if device != "cuda" or not shared(config):
        return None
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{service % count}" if count > 1 else None


class _Served:
    """Counts the folders a worker served and the jobs it is serving (from their threads)."""

    def __init__(self) -> None:
        self.served = 0
        self._active = 0
        self._lock = threading.Condition()

    def start(self) -> None:
        with self._lock:
            self._active += 1

    def done(self, served: int, started: bool = False) -> None:
        with self._lock:
            self.served += served
            if started:
                self._active -= 1
                self._lock.notify_all()

    def busy(self) -> bool:
        with self._lock:
            return self._active > 0

    def wait(self) -> None:
        with self._lock:
            self._lock.wait_for(lambda: self._active == 0)


def _serve_thread(conn, hello, config, threads, models, counts: _Served) -> None:
    served = 0
    try:
        with contextlib.suppress(OSError), conn:
            served = _serve_one(conn, hello, config, threads, models)
    finally:
        counts.done(served, started=True)


def _serve_one(conn: socket.socket, hello: bytes, config: dict, threads: int, models) -> int:
    """Serve one connection: 1 when a folder was served, 0 for a probe or a job that left.

    Raises:
        OSError: when the job's connection breaks (the caller drops it).
    """
    from .pipeline import Cancelled, compute_folders

    conn.sendall(hello)
    with conn.makefile("rwb") as stream:
        line = stream.readline()
        if not line.strip():
            return 0  # a probe, or a job that found another identity: nothing to say
        handler = _SocketLog(stream)
        log.addHandler(handler)
        hangup = _Hangup(conn)
        payloads: list[bytes] = []
        try:
            request = json.loads(line)
            log.info("worker %d runs %s", os.getpid(), _named(request))
            computed = compute_folders(
                **_folder_arguments(request, config),
                threads=threads,
                models=models,
                cancelled=hangup.gone.is_set,
            )
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            log.info("worker %d: peak memory %.0f MiB", os.getpid(), peak)
            packed = [_pack(result, predictions) for result, predictions in computed]
            payloads = [payload for _, payload in packed]
            reply = {"results": [header for header, _ in packed], "bytes": list(map(len, payloads))}
        except Cancelled as exc:
            log.removeHandler(handler)
            log.warning("worker %d dropped %s: %s", os.getpid(), _named(request), exc)
            return 0
        except Exception as exc:  # noqa: BLE001 - reported to the job, the worker goes on
            reply = {"error": traceback.format_exc(), **_kind(exc)}
        finally:
            hangup.close()
            log.removeHandler(handler)
        stream.write(json.dumps(reply).encode() + b"\n" + b"".join(payloads))
        stream.flush()
    return 1


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snakembed.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--service", type=int, default=0)
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    signal.signal(signal.SIGTERM, _terminated)  # leave as after Ctrl-C: files removed, said why
    try:
        serve(config, args.socket, args.threads, service=args.service)
    except _Stopped:
        return 128 + signal.SIGTERM
    return 0


class _Stopped(BaseException):
    """A signal to stop (not an error of the folder being served, which the job is told)."""


def _terminated(signum: int, frame) -> None:
    raise _Stopped(f"stopped by {signal.Signals(signum).name}")


if __name__ == "__main__":
    sys.exit(_main())
