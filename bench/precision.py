"""What the CPU's precision and the network's preparation give: speed, warm-up and agreement.

Parts (all by default; ``--part`` picks one), each measured in a fresh process, in one run:

- **network**: images/s of the network alone (random tensors, ``--batch``, ``--threads``) for
  each ``--models``: fp32 as usually run (eager), fp32 as the workflow prepares it (traced and
  frozen, oneDNN graph fusion), fp32 ``torch.compile``'d, bf16 as the workflow runs it
  (autocast, channels last, the stem in fp32), and that ``torch.compile``'d (as ``compile:
  auto`` does for large runs), with the seconds each takes to be ready (trace, or compile, and
  the first batches). Ratios against the traced fp32 network.
- **agreement**: the default model's bf16 vectors (eager, and compiled) against its fp32 ones
  on real photos (the demo's and matplotlib's, each also mirrored and cropped): the
  distribution of per-image cosines, top-1 labels the same, and each image's 10 nearest
  neighbours the same.
- **predict**: the wall time of ``snakembed predict`` on one image in a new process, startup
  included: with no worker running, the next call (the worker the first started answers), and
  with workers off; and of ``python -c "import torch"`` for scale.

Whether this CPU has bf16 matrix units (``amx_bf16``, ``avx512_bf16``) is printed first: without
them bf16 is emulated and its speed says nothing of a CPU that has them.

Usage::

    python bench/precision.py
    python bench/precision.py --part network --models resnet50 --threads 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import throughput  # beside this file

REPO = Path(__file__).resolve().parents[1]


def network(model: str, way: str, threads: int, batch: int, batches: int) -> dict:
    """Images/s of ``model`` prepared ``way``, and the seconds until it was ready."""
    import torch

    from snakembed.backbones import create_backbone
    from snakembed.devices import resolve_compute
    from snakembed.embed import autocast, prepare_model

    torch.set_num_threads(threads)
    backbone = create_backbone(model, weights="none")
    crop = backbone.preprocess.crop
    precision = "bf16" if way.startswith("bf16") else "fp32"
    compiled = way.endswith("compiled")
    compute = resolve_compute("cpu", precision, compile=compiled, optimize=way != "eager")
    x = torch.randn(batch, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    net = prepare_model(backbone.model, compute, crop)
    with torch.inference_mode(), autocast("cpu", precision):
        for _ in range(2):
            net(x)
        ready = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            net(x)
        seconds = time.perf_counter() - start
    return {"images_per_s": batch * batches / seconds, "ready_s": ready}


def real_photos(folder: Path) -> list[Path]:
    """The demo's photos and matplotlib's, each also mirrored and cropped to its centre: 30
    real pictures, written to ``folder`` (the tests assert their agreement too)."""
    import matplotlib
    from PIL import Image, ImageOps

    sources = sorted(
        p for p in (REPO / "demo" / "images").rglob("*") if p.suffix in {".jpg", ".png"}
    )
    sources.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    paths = []
    for i, source in enumerate(sources):
        image = ImageOps.exif_transpose(Image.open(source)).convert("RGB")
        w, h = image.size
        crop = image.crop((w // 6, h // 6, w - w // 6, h - h // 6))
        for name, view in {"": image, "m": ImageOps.mirror(image), "c": crop}.items():
            path = folder / f"{i:02d}{name}.png"
            view.save(path)
            paths.append(path)
    return paths


def agreement(threads: int, compile: bool = False) -> dict:
    """bf16 (``compile``: compiled) against fp32 for the default model on real photos."""
    from snakembed.classify import predict
    from snakembed.config import load_config
    from snakembed.embed import Embedder
    from snakembed.heads import create_head

    paths = real_photos(Path(tempfile.mkdtemp(prefix="snakembed-bench-")))
    config = load_config(overrides={"device": "cpu", "threads": threads})
    runs = {}
    for precision in ("fp32", "bf16"):
        embedder = Embedder(
            {**config, "precision": precision, "compile": precision == "bf16" and compile}
        )
        result = embedder(paths)
        head = create_head("pretrained", config, embedder.backbone)
        labels = predict(head, "pretrained", result.ids, result.vectors, 1).labels
        unit = result.vectors / np.linalg.norm(result.vectors, axis=1, keepdims=True)
        runs[precision] = (unit, [row[0] for row in labels])
    (a, la), (b, lb) = runs["fp32"], runs["bf16"]
    cosine = (a * b).sum(axis=1)

    def neighbours(unit):
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :10]

    overlap = [len(set(x) & set(y)) / 10 for x, y in zip(neighbours(a), neighbours(b), strict=True)]
    return {
        "images": len(paths),
        "cosine": {
            q: float(np.quantile(cosine, v)) for q, v in [("min", 0), ("p5", 0.05), ("median", 0.5)]
        },
        "top1_same": sum(x == y for x, y in zip(la, lb, strict=True)),
        "neighbours_same_min": min(overlap),
        "neighbours_same_mean": float(np.mean(overlap)),
    }


def predict_wall() -> dict:
    """Seconds (best of three) of ``snakembed predict`` on one image in a new process: with no
    worker running (``cold``: the command starts one and waits for it), the next call (``next``:
    that worker answers), and with workers off (``here``: the command loads the network
    itself); and of importing torch. Each try in its own ``TMPDIR``, its worker stopped after."""
    cli = str(Path(sys.executable).parent / "snakembed")
    image = str(REPO / "demo" / "images" / "animals" / "chelsea.jpg")
    times: dict[str, list[float]] = {"cold": [], "next": [], "here": [], "import_torch": []}

    def timed(name: str, cmd: list[str], env: dict) -> None:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times[name].append(time.perf_counter() - start)

    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="sp", dir="/tmp") as tmp:
            env = {**os.environ, "TMPDIR": tmp}
            here = Path(tmp) / "here.yaml"
            here.write_text("worker: {enabled: false}\n")
            timed("cold", [cli, "predict", image], env)
            timed("next", [cli, "predict", image], env)
            timed("here", [cli, "predict", image, "--configfile", str(here)], env)
            timed("import_torch", [sys.executable, "-c", "import torch"], env)
            for pid in Path(tmp).glob("snakembed-workers-*/*.pid"):
                with contextlib.suppress(ValueError, OSError):
                    os.kill(int(pid.read_text()), signal.SIGKILL)
    return {name: min(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["network", "agreement", "predict"])
    parser.add_argument("--models", default="resnet18,resnet50,efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--way", help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args(argv)
    if args.way:
        print(json.dumps(network(args.models, args.way, args.threads, args.batch, args.batches)))
        return
    from snakembed.devices import cpu_has_bf16

    units = cpu_has_bf16()
    print(f"CPU bf16 matrix units: {'yes' if units else 'no (bf16 is emulated: slow)'}")
    if args.part in (None, "network"):
        ways = ("eager", "traced", "compiled", "bf16", "bf16-compiled")
        print(f"network alone, {args.threads} threads, batch {args.batch}: images/s (ready in s)")
        for model in args.models.split(","):
            got = {}
            for way in ways:
                got[way] = throughput._child(
                    [
                        "--models",
                        model,
                        "--way",
                        way,
                        "--threads",
                        str(args.threads),
                        "--batch",
                        str(args.batch),
                        "--batches",
                        str(args.batches),
                    ],
                    __file__,
                )
            base = got["traced"]["images_per_s"]
            cells = ", ".join(
                f"{way} {f['images_per_s']:.1f} ({f['ready_s']:.1f} s, "
                f"{f['images_per_s'] / base:.2f}x)"
                for way, f in got.items()
            )
            print(f"  {model}: {cells}")
    for compile in (False, True) if args.part in (None, "agreement") else ():
        figures = agreement(args.threads, compile)
        c = figures["cosine"]
        print(
            f"bf16{' compiled' if compile else ''} against fp32, default model, "
            f"{figures['images']} real photos: cosine min "
            f"{c['min']:.5f}, 5th percentile {c['p5']:.5f}, median {c['median']:.5f}; top-1 "
            f"labels the same {figures['top1_same']}/{figures['images']}; 10 nearest "
            f"neighbours the same: at least {figures['neighbours_same_min']:.0%} "
            f"(mean {figures['neighbours_same_mean']:.0%})"
        )
    if args.part in (None, "predict"):
        f = predict_wall()
        print(
            f"snakembed predict, one image, new process: {f['cold']:.2f} s with no worker "
            f"running, {f['next']:.2f} s the next call (its worker answers), {f['here']:.2f} s "
            f"with workers off (import torch alone: {f['import_torch']:.2f} s)"
        )


if __name__ == "__main__":
    main()
