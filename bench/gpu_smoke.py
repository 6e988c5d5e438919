"""Smoke-check the GPU path of embed_images: it runs, and agrees with the CPU path.

Usage: python bench/gpu_smoke.py [N_IMAGES]
Prints images/s on the GPU for the default model and ResNet-50, and the cosine similarity of
GPU (bf16 autocast) and CPU (fp32) embeddings of the same images.
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from snakembed.config import load_config
from snakembed.embed import embed_images, load_backbone


def make_jpegs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.roll(base, i, axis=1)).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), n)
        for model in ({"name": "efficientnet_lite0"}, {"name": "resnet50", "weights": "none"}):
            gpu = load_config(
                overrides={"model": model, "device": "cuda", "batch_size": 256, "threads": 14}
            )
            backbone = load_backbone(gpu)
            embed_images(paths[:256], gpu, backbone=backbone)  # warm-up
            start = time.perf_counter()
            result = embed_images(paths, gpu, backbone=backbone)
            seconds = time.perf_counter() - start
            cpu = load_config(
                overrides={"model": model, "device": "cpu", "batch_size": 16, "threads": 8}
            )
            reference = embed_images(paths[:32], cpu)
            a, b = result.vectors[:32], reference.vectors
            cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            print(
                f"{model['name']}: {n / seconds:.0f} images/s on the GPU ({n} 500x375 JPEGs); "
                f"GPU bf16 vs CPU fp32 cosine min {cosine.min():.5f} mean {cosine.mean():.5f}"
            )


if __name__ == "__main__":
    main()
