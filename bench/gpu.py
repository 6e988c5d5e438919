"""The GPU check: throughput of the workflow on one GPU, against the seeds' loop and the network.

Builds, once, a tree of ``--folders`` x ``--per-folder`` 500x375 JPEGs and one of
``--large-folders`` x ``--large-per-folder`` 4000x3000 photos (a few distinct photo-like
encodes, hard-linked under every other name: the decoder pays for each file as for a new one),
then measures, each in a fresh process under a time limit (a step that fails or runs out of
time is recorded as such and the others still run):

- **seeds**: the seeds' loop (ImageFolder, DataLoader(4 workers, batch 32), fp32) on the first
  ``--seeds-images`` images;
- **network**: the network alone on random ``uint8`` batches as the workflow runs it (bf16,
  channels last), eager, and for ``--compile`` models also ``torch.compile``'d (its warm-up
  timed apart);
- **workflow**: ``snakemake --cores N`` from discovery to ``index.h5``, HDF5 written, on as
  many folders as the seeds' rate says fit in ``--step-seconds`` (all of them once the workflow
  is fast);
- **large**: the workflow on the 4000x3000 tree (ResNet-50);
- **one changed folder**: after the default model's run, one folder's images are replaced by
  other pictures and the workflow runs again;
- **parity**: 226 images (photos, large photos, truncated, grayscale, CMYK, EXIF-rotated,
  progressive, PNG) embedded by ResNet-50 through the device's JPEG decoder, through Pillow on
  the device, and through Pillow in fp32 on the CPU: the same files kept and refused, and the
  lowest cosine of each pair (the mark: >= 0.999).

Prints a table and writes it, with every figure, to ``OUT/gpu.json`` (``$OUT`` or ``--out``).

Usage::

    bench/gpu.sh                                   # on the GPU machine (installs, then this)
    python bench/gpu.py --device cpu --folders 2 --per-folder 40 --large-folders 1 \\
        --large-per-folder 4 --seeds-images 40 --models resnet18 --compile none  # a dry check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402 - bench/ is not a package

TARGETS = {
    "resnet50": "workflow >= 0.7 x network (bf16 eager) and >= 8 x seeds",
    "resnet18": "workflow >= 12,000 images/s",
    "efficientnet_lite0": "workflow >= 8,000 images/s",
    "large": "4000x3000, ResNet-50: >= 1,500 images/s",
    "changed": "one changed folder of 1,000 among 200: < 15 s",
}


def build_tree(root: Path, folders: int, per_folder: int, size: tuple[int, int], seed0=0) -> int:
    """``folders`` x ``per_folder`` JPEGs of ``size``: distinct encodes hard-linked."""
    sources = root.parent / f".sources-{size[0]}x{size[1]}-{seed0}"
    sources.mkdir(parents=True, exist_ok=True)
    encodes = []
    for seed in range(throughput.DISTINCT):
        path = sources / f"{seed}.jpg"
        if not path.exists():
            throughput.picture(size, seed0 + seed).save(path, quality=90)
        encodes.append(path)
    for f in range(folders):
        folder = root / f"folder_{f:04d}"
        if folder.is_dir() and len(os.listdir(folder)) == per_folder:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            target = folder / f"{i:06d}.jpg"
            if not target.exists():
                os.link(encodes[(f * per_folder + i) % len(encodes)], target)
    return folders * per_folder


def subtree(tree: Path, folders: int) -> Path:
    """A tree of the first ``folders`` folders of ``tree`` (hard links, made once)."""
    names = sorted(p.name for p in tree.iterdir() if p.is_dir())[:folders]
    if len(names) == len(list(tree.iterdir())):
        return tree
    sub = tree.parent / f"{tree.name}-{folders}"
    for name in names:
        if (sub / name).is_dir():
            continue
        (sub / name).mkdir(parents=True)
        for image in (tree / name).iterdir():
            os.link(image, sub / name / image.name)
    return sub


def parity(tree: Path, large: Path, device: str, out: Path) -> dict:
    """The same images through the device's JPEG decoder and through Pillow (both on
    ``device``), and through Pillow in fp32 on the CPU: the lowest cosine of each pair, and
    whether the same files were refused for the same reasons (odd files included: truncated,
    grayscale, CMYK, EXIF-rotated, PNG)."""
    import io

    import numpy as np
    from PIL import Image

    from snakembed.config import load_config
    from snakembed.embed import Embedder

    odd = out / "odd"
    odd.mkdir(parents=True, exist_ok=True)
    photo = throughput.picture((640, 480), 42)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    (odd / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    photo.convert("L").save(odd / "gray.jpg")
    photo.convert("CMYK").save(odd / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(odd / "rotated.jpg", exif=exif)
    photo.save(odd / "drawing.png")
    photo.save(odd / "progressive.jpg", progressive=True)
    folders = sorted(p for p in tree.iterdir() if p.is_dir())
    paths = sorted(folders[0].iterdir())[:200] + sorted(next(large.iterdir()).iterdir())[:20]
    paths += sorted(odd.iterdir())
    runs = {}
    for name, settings in {
        "device_decoder": {"device": device, "decode": "torchvision"},
        "pillow": {"device": device, "decode": "pillow"},
        "cpu_fp32": {"device": "cpu", "decode": "pillow", "precision": "fp32"},
    }.items():
        for model in ("resnet50",):
            config = load_config(
                overrides={"model": {"name": model, "weights": "none"}, "threads": 8, **settings}
            )
            runs[name] = Embedder(config)(paths)
    base = runs["device_decoder"]
    result = {"images": len(paths), "failed": base.failed}
    for name in ("pillow", "cpu_fp32"):
        other = runs[name]
        same = base.ids == other.ids and base.failed == other.failed
        a, b = base.vectors, other.vectors
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        result[name] = {
            "same_images_and_failures": same,
            "cosine_min": float(cosine.min()) if same else None,
            "other_failed": other.failed,
        }
    return result


def _step(name: str, args: list[str], timeout: float) -> dict:
    """One measurement in a child process; its JSON, or what went wrong."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout:.0f} s"}
    if proc.returncode != 0:
        print(f"  {name} failed:\n{proc.stderr[-2000:]}", flush=True)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["step_seconds"] = round(time.perf_counter() - start, 1)
    return result


def _rate(figure: dict) -> float | None:
    if "error" in figure or not figure.get("seconds"):
        return None
    return figure["images"] / figure["seconds"]


def _part(args) -> None:
    """Run one measurement (in a child) and print its JSON."""
    size = {"resize": None, "crop": None}
    tree = Path(args.tree) if args.tree else None
    if args.part == "seeds":
        result = throughput.seeds(tree, args.model, args.device, args.cores, size)
    elif args.part == "network":
        result = throughput.ceiling(
            args.model, args.device, args.cores, args.batch, args.images, size
        )
    elif args.part == "parity":
        result = parity(tree, Path(args.results), args.device, Path(args.out))
    elif args.part == "compiled":
        result = throughput.ceiling(
            args.model, args.device, args.cores, args.batch, args.images, size, compile=True
        )
    else:
        result = throughput.workflow(
            tree,
            Path(args.results),
            args.model,
            args.device,
            args.cores,
            args.cores,
            args.batch,
            size,
        )
        result["images"] = sum(len(os.listdir(p)) for p in tree.iterdir())
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="resnet50,resnet18,efficientnet_lite0")
    parser.add_argument("--compile", default="resnet50", help="models to time compiled, or none")
    parser.add_argument("--folders", type=int, default=200)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--large-folders", type=int, default=20)
    parser.add_argument("--large-per-folder", type=int, default=100)
    parser.add_argument("--seeds-images", type=int, default=10000)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=256, help="the network's batch")
    parser.add_argument("--step-seconds", type=float, default=60.0, help="aim per workflow run")
    parser.add_argument(
        "--expect", type=float, help="the workflow's expected images/s (default: the seeds')"
    )
    parser.add_argument("--work", help="build the trees here (default: a temporary folder)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        _part(args)
        return

    began = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="snakembed-gpu-"))
    tree, large = work / "images", work / "large"
    total = build_tree(tree, args.folders, args.per_folder, (500, 375))
    build_tree(large, args.large_folders, args.large_per_folder, (4000, 3000))
    print(
        f"trees: {total} 500x375 JPEGs, {args.large_folders * args.large_per_folder} "
        f"4000x3000 ({time.perf_counter() - began:.0f} s to make)",
        flush=True,
    )
    per_step = args.step_seconds
    seeds_tree = subtree(tree, max(1, args.seeds_images // args.per_folder))
    report: dict = {
        "machine": {"python": platform.python_version(), "cores": args.cores},
        "args": {k: v for k, v in vars(args).items() if k not in ("part", "model", "tree")},
        "models": {},
    }
    try:
        import torch

        report["machine"]["torch"] = torch.__version__
        if torch.cuda.is_available():
            report["machine"]["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "gpu.json").write_text(json.dumps(report, indent=1))

    common = ["--device", args.device, "--cores", str(args.cores), "--batch", str(args.batch)]
    report["parity"] = _step(
        "parity",
        [
            *common,
            "--part",
            "parity",
            "--tree",
            str(tree),
            "--results",
            str(large),
            "--out",
            str(work),
        ],
        3 * per_step,
    )
    save()
    print(f"parity (resnet50): {json.dumps(report['parity'])}", flush=True)
    models = [m for m in args.models.split(",") if m]
    for model in models:
        figures: dict = {}
        report["models"][model] = figures
        base = [*common, "--model", model]
        figures["seeds"] = _step(
            "seeds", [*base, "--part", "seeds", "--tree", str(seeds_tree)], 4 * per_step
        )
        n = min(total, 20 * args.batch)
        figures["network"] = _step(
            "network", [*base, "--part", "network", "--images", str(n)], 2 * per_step
        )
        if model in args.compile.split(","):
            figures["compiled"] = _step(
                "compiled", [*base, "--part", "compiled", "--images", str(4 * n)], 4 * per_step
            )
        # as many folders as should take about per_step seconds at the expected rate
        expected = args.expect or _rate(figures["seeds"]) or 1000.0
        folders = max(1, min(args.folders, int(expected * per_step / args.per_folder)))
        part = subtree(tree, folders)
        results = work / f"results-{model}"
        shutil.rmtree(results, ignore_errors=True)
        figures["workflow"] = _step(
            "workflow",
            [*base, "--part", "workflow", "--tree", str(part), "--results", str(results)],
            6 * per_step,
        )
        if model == "efficientnet_lite0" and "error" not in figures["workflow"]:
            # one folder's images replaced by other pictures, then the workflow again
            first = sorted(p for p in part.iterdir() if p.is_dir())[0]
            changed = work / ".changed"
            build_tree(changed, 1, args.per_folder, (500, 375), seed0=100)
            for image in sorted(first.iterdir()):
                image.unlink()
            for image in sorted((changed / "folder_0000").iterdir()):
                os.link(image, first / image.name)
            figures["changed"] = _step(
                "changed",
                [*base, "--part", "workflow", "--tree", str(part), "--results", str(results)],
                4 * per_step,
            )
            figures["changed"]["folders"] = folders
        save()
        _print_model(model, figures)
    figures = {}
    report["models"]["large"] = figures
    results = work / "results-large"
    figures["workflow"] = _step(
        "large",
        [
            *common,
            "--model",
            "resnet50",
            "--part",
            "workflow",
            "--tree",
            str(large),
            "--results",
            str(results),
        ],
        6 * per_step,
    )
    save()
    _print_model("large (resnet50, 4000x3000)", figures)
    print(f"total {time.perf_counter() - began:.0f} s; figures in {out / 'gpu.json'}")
    print("targets: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items()))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def _print_model(model: str, figures: dict) -> None:
    print(f"{model}:", flush=True)
    rates = {}
    for name, figure in figures.items():
        rate = _rate(figure)
        rates[name] = rate
        if name == "changed" and rate is not None:
            print(f"  {name:10s} {figure['seconds']:.1f} s for 1 of {figure['folders']} folders")
            continue
        if rate is None:
            print(f"  {name:10s} {figure.get('error', 'no figure')}")
            continue
        extra = ""
        if "warmup_seconds" in figure:
            extra = f"  (warm-up {figure['warmup_seconds']:.1f} s)"
        if "plan_seconds" in figure:
            extra = f"  (plan {figure['plan_seconds']:.1f} s, peak {figure['peak_mib']:.0f} MiB)"
        print(
            f"  {name:10s} {rate:9.0f} images/s  {figure['images']:7d} images "
            f"{figure['seconds']:7.1f} s{extra}",
            flush=True,
        )
    flow = rates.get("workflow")
    if flow and rates.get("seeds"):
        print(f"  workflow / seeds   {flow / rates['seeds']:.2f}")
    if flow and rates.get("network"):
        print(f"  workflow / network {flow / rates['network']:.2f}")


if __name__ == "__main__":
    main()
