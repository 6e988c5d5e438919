"""Host work per image: what the workflow costs a CPU besides decoding and the network.

A GPU at 30,000 images/s is fed by 16 cores only if everything else (reading, hashing, batching,
moving vectors between processes, HDF5 writing, Snakemake's per-folder work) costs at most 0.5
core-ms per image. This measures it on the CPU, where every process's CPU time can be counted:

- **workflow**: ``snakemake --cores N`` on two trees of tiny JPEGs (32x32, so that decoding and
  the network, ResNet-18 at 16x16, cost little), ``--folders`` and twice as many folders of
  ``--per-folder`` images. CPU seconds of Snakemake, its jobs and the embed worker (which says
  its own when it leaves) are summed; the difference between the two runs, per image, is the
  workflow's marginal cost (Snakemake's and the worker's starts cancel out);
- **baseline**: the same images embedded in one process by :class:`snakembed.embed.Embedder`
  (reading, decoding, the network; no files written), the same two sizes: its marginal CPU
  per image.

Host work per image = workflow marginal - baseline marginal. It prints both, the host work, the
ratio to the 0.5 core-ms budget, and the fixed CPU cost of a run (the smaller run's CPU beyond
its images' marginal cost).

Usage::

    python bench/host.py                         # 10 and 20 folders of 1,000 images
    python bench/host.py --shared                # through one shared worker (the GPU layout)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

#: Host work per image that lets 16 cores feed 30,000 images/s (with room for decoding).
BUDGET_MS = 0.5


def make_tree(root: Path, folders: int, per_folder: int) -> int:
    """``folders`` x ``per_folder`` distinct 32x32 JPEGs (distinct bytes: nothing is reused)."""
    rng = np.random.default_rng(0)
    for f in range(folders):
        folder = root / f"folder_{f:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return folders * per_folder


def _config(shared: bool, threads: int) -> dict:
    return {
        "model": {"name": "resnet18", "weights": "none"},
        "preprocess": {"resize": 16, "crop": 16},
        "device": "cpu",
        "threads": threads,
        "report": {"enabled": False},
        "worker": {"idle": 15, "shared": shared},
    }


def _children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def workflow(tree: Path, work: Path, cores: int, shared: bool, threads: int) -> dict:
    """CPU seconds of a whole ``snakemake`` run, the embed workers' included."""
    tmp = Path(tempfile.mkdtemp(prefix="sh", dir="/tmp"))  # the run's own workers
    configfile = work / "config.yaml"
    config = {**_config(shared, threads), "images": str(tree), "results": str(work / "results")}
    configfile.write_text(yaml.safe_dump(config))
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    cmd = [snakemake, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work)]
    cmd += ["--configfile", str(configfile), "--cores", str(cores), "--quiet", "all"]
    before, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)}
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{proc.stderr[-3000:]}")
    cpu = _children_cpu() - before
    # the workers outlive the run: wait for them to leave and say what they used
    folder = tmp / f"snakembed-workers-{os.getuid()}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = "".join(p.read_text() for p in folder.glob("*.log"))
        if logs.count(" ready: ") == logs.count(" leaves after "):
            break
        time.sleep(0.5)
    cpu += sum(float(s) for s in re.findall(r"leaves after \d+ folder\(s\), ([\d.]+) CPU", logs))
    shutil.rmtree(tmp, ignore_errors=True)
    return {"cpu": cpu, "wall": wall}


def baseline(tree: Path, threads: int) -> dict:
    """CPU seconds of embedding the tree's images in this process (reading, decoding, net)."""
    import torch  # noqa: F401 - imported before the clock starts, as a worker has it

    from snakembed.config import load_config
    from snakembed.embed import Embedder

    embedder = Embedder(load_config(overrides={**_config(False, threads), "batch_size": 32}))
    paths = sorted(tree.rglob("*.jpg"))
    used = resource.getrusage(resource.RUSAGE_SELF)
    before = used.ru_utime + used.ru_stime + _children_cpu()
    for folder in sorted({p.parent for p in paths}):
        embedder(sorted(folder.iterdir()))
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": used.ru_utime + used.ru_stime + _children_cpu() - before}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=10)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--threads", type=int, default=1, help="threads per folder job")
    parser.add_argument("--shared", action="store_true", help="one shared worker")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part == "baseline":
        print(json.dumps(baseline(Path(args.tree), args.threads)))
        return

    base = Path(tempfile.mkdtemp(prefix="snakembed-host-"))
    sizes = {"small": args.folders, "large": 2 * args.folders}
    figures: dict = {}
    for name, folders in sizes.items():
        tree = base / name / "images"
        images = make_tree(tree, folders, args.per_folder)
        flow = workflow(tree, base / name, args.cores, args.shared, args.threads)
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--part",
                "baseline",
                "--tree",
                str(tree),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        figures[name] = {"images": images, "workflow": flow, "baseline": json.loads(proc.stdout)}
        print(
            f"{images:6d} images: workflow {flow['cpu']:6.1f} CPU s ({flow['wall']:.1f} s wall), "
            f"baseline {figures[name]['baseline']['cpu']:6.1f} CPU s",
            flush=True,
        )
    small, large = figures["small"], figures["large"]
    extra = large["images"] - small["images"]
    flow_ms = (large["workflow"]["cpu"] - small["workflow"]["cpu"]) / extra * 1000
    base_ms = (large["baseline"]["cpu"] - small["baseline"]["cpu"]) / extra * 1000
    host = flow_ms - base_ms
    fixed = small["workflow"]["cpu"] - small["images"] * flow_ms / 1000
    mode = "one shared worker" if args.shared else "one job per worker"
    print(f"{mode}, {args.per_folder} images per folder, --cores {args.cores}:")
    print(f"  workflow marginal {flow_ms:.3f} core-ms per image")
    print(f"  baseline marginal {base_ms:.3f} core-ms per image (reading, decoding, network)")
    print(
        f"  host work         {host:.3f} core-ms per image = {host / BUDGET_MS:.2f} of the "
        f"{BUDGET_MS} core-ms budget"
    )
    print(f"  fixed per run     {fixed:.1f} CPU s (Snakemake, the worker's start, the index)")
    if args.json:
        print(json.dumps({"figures": figures, "host_ms": host, "fixed_cpu_s": fixed}))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
