"""Where the numbers are computed: ``device``, ``precision`` and ``decode`` made concrete.

``device: auto``, ``precision: auto`` and ``decode: auto`` give different numbers on a GPU
(bf16, JPEGs decoded by nvJPEG) and on a CPU (fp32, Pillow), so they are resolved once, before
anything is computed, and the concrete values are what every folder file records, what decides
whether earlier embeddings may be reused, and what reruns a folder when they change. The
workflow resolves them where it is planned (see :func:`resolve_compute`); the library and the
CLI resolve them where they run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = [
    "AUTO",
    "device_type",
    "gpu_count",
    "gpu_visible",
    "resolve_batch_size",
    "resolve_compute",
    "resolve_decode",
    "resolve_precision",
]

#: The configured value that leaves the choice to snakembed.
AUTO = "auto"

#: Device files whose absence means that torch cannot see a GPU on Linux (NVIDIA; AMD ROCm;
#: WSL2's GPU paravirtualisation).
_GPU_DEVICE_FILES = ("nvidia[0-9]*", "kfd", "dxg")


def device_type(device: str) -> str:
    """The kind of a concrete ``device`` value, which is what changes the numbers.

    Example:
        >>> device_type("cuda:1"), device_type("cpu")
        ('cuda', 'cpu')
    """
    if device == AUTO:
        raise ValueError("device: auto must be resolved first (see resolve_compute)")
    return device.split(":", 1)[0]


def resolve_precision(device: str, precision: str) -> str:
    """A ``precision`` made concrete for ``device``: ``auto`` is bf16 on a GPU, else fp32.

    Example:
        >>> resolve_precision("cuda:0", "auto"), resolve_precision("cpu", "auto")
        ('bf16', 'fp32')
    """
    if precision != AUTO:
        return precision
    return "bf16" if device_type(device) == "cuda" else "fp32"


def resolve_decode(device: str, decode: str) -> str:
    """A ``decode`` made concrete for ``device``: ``auto`` is torchvision's decoder on a GPU
    (nvJPEG, in batches), else Pillow.

    Example:
        >>> resolve_decode("cuda", "auto"), resolve_decode("cpu", "auto")
        ('torchvision', 'pillow')
    """
    if decode != AUTO:
        return decode
    return "torchvision" if device_type(device) == "cuda" else "pillow"


def resolve_batch_size(device: str, batch_size: int | str) -> int:
    """A ``batch_size`` made concrete for ``device``: ``auto`` is 512 on a GPU (halved where it
    runs out of memory), 32 elsewhere.

    Example:
        >>> resolve_batch_size("cuda:0", "auto"), resolve_batch_size("cpu", "auto")
        (512, 32)
    """
    if batch_size != AUTO:
        return int(batch_size)
    return 512 if device_type(device) == "cuda" else 32


def gpu_visible() -> bool:
    """Whether torch sees a CUDA (or ROCm) GPU here.

    Torch is imported only where a GPU may exist: ``CUDA_VISIBLE_DEVICES`` hides them all, or
    (on Linux) no GPU device file exists, is answered without it, so that planning stays fast on
    machines without a GPU.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if sys.platform.startswith("linux") and not any(
        any(Path("/dev").glob(pattern)) for pattern in _GPU_DEVICE_FILES
    ):
        return False
    import torch

    return torch.cuda.is_available()


def gpu_count() -> int:
    """How many GPUs this machine's processes may use, without importing torch: the devices
    listed in ``CUDA_VISIBLE_DEVICES`` when it is set, else (on Linux) the NVIDIA device files.

    Example:
        >>> gpu_count() >= 0
        True
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        listed = [v for v in visible.split(",") if v.strip()]
        return 0 if listed[:1] == ["-1"] else len(listed)
    return len([p for p in Path("/dev").glob("nvidia*") if p.name[6:].isdigit()])


def resolve_compute(
    device: str, precision: str, decode: str = AUTO, *, gpu: bool | None = None
) -> dict[str, str]:
    """Concrete ``device``, ``precision`` and ``decode`` values for configured ones.

    Args:
        device: the config's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        precision: the config's ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``).
        decode: the config's ``decode`` (``auto``, ``pillow``, ``torchvision``).
        gpu: whether the computing machine has a GPU, where the caller knows better than this
            machine (the workflow: folder jobs that ask a cluster for a GPU get one); None asks
            torch here (:func:`gpu_visible`).

    Returns:
        ``{"device": ..., "precision": ..., "decode": ...}``, with ``auto`` replaced: the
        device is ``cuda`` when there is a GPU, else ``cpu``; the precision bf16 on a GPU,
        else fp32; the decoder torchvision's on a GPU, else Pillow.

    Example:
        >>> resolve_compute("auto", "auto", gpu=False)
        {'device': 'cpu', 'precision': 'fp32', 'decode': 'pillow'}
        >>> resolve_compute("auto", "auto", gpu=True)
        {'device': 'cuda', 'precision': 'bf16', 'decode': 'torchvision'}
        >>> resolve_compute("cpu", "bf16", "torchvision")
        {'device': 'cpu', 'precision': 'bf16', 'decode': 'torchvision'}
    """
    if device == AUTO:
        device = "cuda" if (gpu_visible() if gpu is None else gpu) else "cpu"
    return {
        "device": device,
        "precision": resolve_precision(device, precision),
        "decode": resolve_decode(device, decode),
    }
