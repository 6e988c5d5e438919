"""Throughput of the workflow end to end, against the seeds' loop and the network alone.

Makes a tree of JPEGs, then times, in one run, on the same tree and the same model:

- **seeds**: the usual way: torchvision ``ImageFolder`` + ``DataLoader(num_workers=4,
  batch_size=32)`` + an fp32 model (Resize 256, CenterCrop 224);
- **eager**: the network alone as the seeds run it (fp32, channels first, untraced) on random
  tensors;
- **ceiling**: the network alone on random tensors, prepared as the workflow prepares it
  (:func:`snakembed.embed.prepare_model`: channels last; traced and frozen on the CPU; bf16 on a
  GPU), same batch size: no decoding, no files;
- **workflow**: ``snakemake --cores N`` from discovery to ``index.h5``, HDF5 files written,
  after timing its plan (``--dry-run``).

It prints images/s for each, the ratios workflow / seeds and workflow / ceiling, the plan time,
the workflow's wall time per folder beyond the network's own (the ceiling's time for the same
images), and the peak resident memory of each (the largest process, embed workers included).

The tree: ``--folders`` folders of ``--per-folder`` JPEGs (quality 90). ``--mix standard`` is
all 500x375 (an ImageNet-like photo size); ``--mix mixed`` draws each image's size from 300x200,
500x375, 640x480, 1024x768, 1920x1080 and 4000x3000; ``--mix large`` is all 4000x3000. A
few distinct pictures (smooth shapes, gradients and sensor-like noise) are encoded per size and
their bytes repeated under other names, which costs the decoder exactly as much.

Usage::

    python bench/throughput.py                                   # CPU: 4 folders x 500, resnet18
    python bench/throughput.py --model efficientnet_lite0
    python bench/throughput.py --folders 1000 --per-folder 10          # per-folder overhead
    python bench/throughput.py --folders 1 --per-folder 50000 --crop 64 # memory of a big folder
    python bench/throughput.py --device cuda --folders 200 --per-folder 1000 --cores 16
    python bench/throughput.py --abba        # seeds, workflow, workflow, seeds: best of two each
    python bench/throughput.py --abba --precision fp32   # the workflow in fp32 on any CPU
    python bench/throughput.py --abba --compile true     # the workflow torch.compile'd
    python bench/throughput.py --abba --against fp32     # the defaults against fp32
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
from functools import partial
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    "standard": [(500, 375)],
    "mixed": [(300, 200), (500, 375), (640, 480), (1024, 768), (1920, 1080), (4000, 3000)],
    "large": [(4000, 3000)],
}

#: Distinct pictures encoded per size; the rest of the tree repeats their bytes.
DISTINCT = 8


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A photo-like picture: a gradient sky, a few shapes, and noise like a sensor's."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = top + (bottom - top) * (y / h)[..., None] + 20 * np.sin(x / w * 6)[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.3) * min(w, h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8), "RGB")


def make_tree(root: Path, folders: int, per_folder: int, mix: str) -> int:
    """Write the tree; returns the number of images."""
    rng = np.random.default_rng(0)
    encoded: dict[tuple[int, int], list[bytes]] = {}
    for size in SIZES[mix]:
        encoded[size] = []
        for seed in range(DISTINCT):
            path = root / f".picture_{seed}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture(size, seed).save(path, quality=90)
            encoded[size].append(path.read_bytes())
            path.unlink()
    sizes = SIZES[mix]
    for f in range(folders):
        folder = root / f"folder_{f:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            size = sizes[int(rng.integers(len(sizes)))]
            data = encoded[size][(f * per_folder + i) % DISTINCT]
            (folder / f"{i:06d}.jpg").write_bytes(data)
    return folders * per_folder


def _peak_mib() -> float:
    """Peak resident memory of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: list[str], script: str = __file__) -> dict:
    """Run one measurement of ``script`` in a fresh process (so peak memory is its own) and
    read its JSON."""
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def seeds(tree: Path, model: str, device: str, threads: int, size: dict) -> dict:
    """The seeds' loop: ImageFolder, DataLoader(4 workers, batch 32), fp32."""
    import torch
    from torchvision import datasets, transforms

    from snakembed.backbones import create_backbone

    torch.set_num_threads(threads)
    backbone = create_backbone(model, weights="none")
    pre = backbone.preprocess
    transform = transforms.Compose(
        [
            transforms.Resize(size["resize"] or 256),
            transforms.CenterCrop(size["crop"] or 224),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    dataset = datasets.ImageFolder(str(tree), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=4)
    net = backbone.model.to(device)
    start = time.perf_counter()
    count = 0
    with torch.inference_mode():
        for images, _ in loader:
            net(images.to(device)).cpu()
            count += len(images)
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "peak_mib": _peak_mib()}


def eager(model: str, device: str, threads: int, batch: int, images: int, size: dict) -> dict:
    """The network alone as the seeds run it: fp32, channels first, untraced."""
    import torch

    from snakembed.backbones import create_backbone

    torch.set_num_threads(threads)
    backbone = create_backbone(model, weights="none")
    net = backbone.model.eval().to(device)
    crop = size["crop"] or backbone.preprocess.crop
    x = torch.randn(batch, 3, crop, crop, device=device)
    with torch.inference_mode():
        net(x)  # warm-up
        start = time.perf_counter()
        done = 0
        while done < images:
            net(x).cpu()
            done += batch
        seconds = time.perf_counter() - start
    return {"images": done, "seconds": seconds, "peak_mib": _peak_mib()}


def ceiling(
    model: str,
    device: str,
    threads: int,
    batch: int,
    images: int,
    size: dict,
    compile: bool = False,
    precision: str = "auto",
) -> dict:
    """The network alone on random tensors, prepared and run as the workflow runs it (with
    ``compile``: ``torch.compile``'d too, its warm-up timed apart)."""
    import torch

    from snakembed.config import load_config
    from snakembed.embed import Embedder

    config = load_config(
        overrides={
            "model": {"name": model, "weights": "none"},
            "device": device,
            "precision": precision,
            "batch_size": batch,
            "threads": threads,
            "preprocess": size,
        }
    )
    embedder = Embedder(config)
    if compile:
        embedder.forward.model = torch.compile(embedder.forward.model)
    crop = embedder.backbone.preprocess.crop
    x = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8)
    if embedder.device.type == "cuda":
        x = x.pin_memory()
    start = time.perf_counter()
    embedder.forward(x)  # warm-up
    embedder.forward(x)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    done = 0
    while done < images:
        embedder.forward(x)  # uint8 in, float32 NumPy out, as for decoded images
        done += batch
    seconds = time.perf_counter() - start
    return {"images": done, "seconds": seconds, "peak_mib": _peak_mib(), "warmup_seconds": warmup}


def workflow(
    tree: Path,
    results: Path,
    model: str,
    device: str,
    cores: int,
    threads: int,
    batch: int,
    size: dict,
    precision: str = "auto",
    compile: str = "auto",
) -> dict:
    """``snakemake --cores N`` from discovery to index, after timing its plan."""
    config = {
        "images": str(tree),
        "results": str(results),
        "model": {"name": model, "weights": "none"},
        "preprocess": size,
        "device": device,
        "precision": precision,
        "compile": {"true": True, "false": False}.get(compile, compile),
        "threads": threads,
        "batch_size": batch,
    }
    configfile = results.parent / "bench_config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    cmd = [
        snakemake,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(results.parent),
        "--configfile",
        str(configfile),
        "--cores",
        str(cores),
        "--quiet",
        "all",
    ]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, check=False)
    plan = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake --dry-run failed:\n{proc.stderr[-3000:]}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{proc.stderr[-3000:]}")
    # The largest process that snakemake ran (this process ran nothing else), or the embed
    # worker, which outlives the run and reports its peak in each job's log.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    folders = []
    for log in (results / "logs").rglob("*.log"):
        text = log.read_text()
        for match in re.finditer(r"peak memory (\d+) MiB", text):
            peak = max(peak, float(match.group(1)))
        stored = r"(\d+) images stored \(\d+ embedded, \d+ reused\), (\d+) failed, in ([\d.]+) s"
        done = re.finditer(stored, text)
        for match in done:
            folders.append({"images": int(match.group(1)), "seconds": float(match.group(3))})
    return {
        "seconds": seconds,
        "plan_seconds": plan,
        "peak_mib": peak,
        "jobs": _job_seconds(results / "benchmarks"),
        "folders": folders,
    }


def _job_seconds(benchmarks: Path) -> dict[str, dict[str, float]]:
    """Per rule: how many jobs ran and their summed wall seconds (Snakemake's benchmark files)."""
    rules: dict[str, dict[str, float]] = {}
    for path in sorted(benchmarks.rglob("*.tsv")):
        rule = path.relative_to(benchmarks).parts[0].removesuffix(".tsv")
        seconds = float(path.read_text().splitlines()[-1].split("\t")[0])
        entry = rules.setdefault(rule, {"jobs": 0, "seconds": 0.0})
        entry["jobs"] += 1
        entry["seconds"] = round(entry["seconds"] + seconds, 2)
    return rules


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a backbone name (random weights)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--folders", type=int, default=4)
    parser.add_argument("--per-folder", type=int, default=500)
    parser.add_argument("--mix", choices=sorted(SIZES), default="standard")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="snakemake --cores")
    parser.add_argument("--threads", type=int, help="threads per folder job (default: --cores)")
    parser.add_argument("--batch", type=int, help="batch size (default: 32 CPU, 256 GPU)")
    parser.add_argument("--resize", type=int, help="preprocess.resize (default: the model's)")
    parser.add_argument("--crop", type=int, help="preprocess.crop (default: the model's)")
    parser.add_argument(
        "--precision", default="auto", help="the workflow's precision (default: auto)"
    )
    parser.add_argument(
        "--compile",
        choices=["auto", "true", "false"],
        default="auto",
        help="the workflow's compile (default: auto)",
    )
    parser.add_argument("--keep", help="build the tree here and keep it")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--abba", action="store_true", help="only seeds, workflow, workflow, seeds: best of two"
    )
    parser.add_argument(
        "--against",
        choices=["seeds", "fp32"],
        default="seeds",
        help="what --abba compares the workflow with: the seeds' loop, or itself in fp32",
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)  # one measurement, in a child
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or args.cores
    batch = args.batch or (256 if args.device.startswith("cuda") else 32)
    size = {"resize": args.resize, "crop": args.crop}
    if args.part == "seeds":
        print(json.dumps(seeds(Path(args.tree), args.model, args.device, threads, size)))
        return
    if args.part == "eager":
        print(json.dumps(eager(args.model, args.device, threads, batch, args.images, size)))
        return
    if args.part == "ceiling":
        figures = ceiling(
            args.model, args.device, threads, batch, args.images, size, precision=args.precision
        )
        print(json.dumps(figures))
        return
    if args.part == "workflow":
        tree = Path(args.tree)
        figures = workflow(
            tree,
            tree.parent / "results",
            args.model,
            args.device,
            args.cores,
            threads,
            batch,
            size,
            args.precision,
            args.compile,
        )
        print(json.dumps(figures))
        return

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="snakembed-bench-"))
    tree = base / "images"
    start = time.perf_counter()
    if not tree.is_dir():
        make_tree(tree, args.folders, args.per_folder, args.mix)
    files = list(tree.rglob("*.jpg"))
    total, folders = len(files), len({f.parent for f in files})
    print(
        f"tree: {total} JPEGs ({args.mix}) in {folders} folders under {tree} "
        f"({time.perf_counter() - start:.0f} s to make)",
        flush=True,
    )
    common = [
        "--model",
        args.model,
        "--device",
        args.device,
        "--cores",
        str(args.cores),
        "--threads",
        str(threads),
        "--batch",
        str(batch),
        *(["--resize", str(args.resize)] if args.resize else []),
        *(["--crop", str(args.crop)] if args.crop else []),
        "--precision",
        args.precision,
        "--compile",
        args.compile,
    ]

    def run_workflow(*extra: str) -> dict:
        shutil.rmtree(base / "results", ignore_errors=True)
        shutil.rmtree(base / ".snakemake", ignore_errors=True)
        figure = _child([*common, *extra, "--part", "workflow", "--tree", str(tree)])
        figure["images"] = total
        return figure

    def run_seeds() -> dict:
        return _child([*common, "--part", "seeds", "--tree", str(tree)])

    if args.abba:
        # A B B A: drift (heat, caches) weighs on both alike
        if args.against == "fp32":
            name = "workflow in fp32"
            run_baseline = partial(run_workflow, "--precision", "fp32", "--compile", "false")
        else:
            name, run_baseline = "seeds", run_seeds
        a1, b1, b2, a2 = run_baseline(), run_workflow(), run_workflow(), run_baseline()
        best_a = min(a1, a2, key=lambda f: f["seconds"])
        best_b = min(b1, b2, key=lambda f: f["seconds"])
        print(
            f"A B B A (best of two each): {name} {a1['seconds']:.1f} / {a2['seconds']:.1f} s, "
            f"workflow ({args.precision}) {b1['seconds']:.1f} / {b2['seconds']:.1f} s; "
            f"workflow / {name} "
            f"{(total / best_b['seconds']) / (best_a['images'] / best_a['seconds']):.2f}"
        )
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        return
    figures = {
        "seeds": run_seeds(),
        "eager": _child([*common, "--part", "eager", "--images", str(min(total, 2000))]),
        "ceiling": _child([*common, "--part", "ceiling", "--images", str(total)]),
    }
    figures["workflow"] = run_workflow()
    rates = {name: f["images"] / f["seconds"] for name, f in figures.items()}
    print(f"model {args.model} on {args.device}, {args.cores} cores, batch {batch}")
    for name in ("seeds", "eager", "ceiling", "workflow"):
        f = figures[name]
        print(
            f"  {name:9s} {rates[name]:9.1f} images/s   {f['seconds']:8.1f} s   "
            f"peak {f['peak_mib']:7.0f} MiB"
        )
    jobs = ", ".join(
        f"{rule} {v['jobs']:g} x = {v['seconds']:.1f} s"
        for rule, v in figures["workflow"]["jobs"].items()
    )
    print(f"  workflow jobs: {jobs}")
    flow = figures["workflow"]
    network = total / rates["ceiling"]
    print(f"  workflow plan (--dry-run) {flow['plan_seconds']:.1f} s")
    print(
        f"  workflow beyond the network: {(flow['seconds'] - network) / folders:.2f} s "
        f"per folder ({folders} folders)"
    )
    print(f"  workflow / seeds   {rates['workflow'] / rates['seeds']:.2f}")
    print(f"  workflow / eager   {rates['workflow'] / rates['eager']:.2f}")
    print(f"  workflow / ceiling {rates['workflow'] / rates['ceiling']:.2f}")
    inside = sum(f["images"] for f in flow["folders"]) / max(
        sum(f["seconds"] for f in flow["folders"]), 1e-9
    )
    print(
        f"  inside the folders' jobs (worker start excluded) {inside:.1f} images/s "
        f"({inside / rates['ceiling']:.2f} of the ceiling)"
    )
    if args.json:
        print(json.dumps({"rates": rates, "figures": figures, "args": vars(args)}))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
