"""Where the numbers are computed: one :class:`Compute` setting, every part of it concrete.

``device``, ``precision``, ``decode``, ``batch_size`` and ``compile`` may be ``auto``, and
``auto`` gives different numbers on a GPU (bf16, JPEGs decoded by nvJPEG), on a CPU with bf16
matrix units (bf16) and on other CPUs (fp32, Pillow). So they are resolved once, before anything
is computed, into one :class:`Compute` value that is passed down to everything that computes:
the concrete values are what every folder file records, what decides whether earlier
embeddings may be reused, and what reruns a folder when they change. The workflow resolves them
where it is planned (see :func:`resolve_compute`); the library and the CLI where they run.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "AUTO",
    "BF16_AUTO_CPU_FLAGS",
    "BF16_CPU_FLAGS",
    "COMPILE_MIN_IMAGES",
    "COMPILE_MIN_IMAGES_CPU_BF16",
    "Compute",
    "precision_warning",
    "compute_from_config",
    "cpu_has_bf16",
    "cpu_prefers_bf16",
    "device_type",
    "gpu_count",
    "gpu_visible",
    "resolve_batch_size",
    "resolve_compile",
    "resolve_compute",
    "resolve_decode",
    "resolve_precision",
]

#: The configured value that leaves the choice to snakembed.
AUTO = "auto"

#: CPU flags (Linux ``/proc/cpuinfo``) of bf16 matrix units that oneDNN uses through
#: ``torch.autocast("cpu", torch.bfloat16)``: Intel AMX, and AVX512-BF16 (Intel since Cooper
#: Lake, AMD since Zen 4).
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})

#: The CPU flags where ``precision: auto`` is bf16: Intel AMX's tile units, where bf16 runs at
#: 1.8-4x the traced fp32 network's rate (issue 26's table). AVX512-BF16 alone (AMD Zen 4,
#: Intel Cooper Lake) gains much less: measured on a Zen 4 EPYC, 2 threads, bf16 against the
#: traced and fused fp32 network ResNet-18 1.16x, ResNet-50 1.33x, and EfficientNet-Lite0 (the
#: default) 0.61x (fp32's fused depthwise convolutions win), so auto stays fp32 there.
BF16_AUTO_CPU_FLAGS = frozenset({"amx_bf16"})

#: Device files whose absence means that torch cannot see a GPU on Linux (NVIDIA; AMD ROCm;
#: WSL2's GPU paravirtualisation).
_GPU_DEVICE_FILES = ("nvidia[0-9]*", "kfd", "dxg")

#: ``compile: auto`` compiles on a GPU only for runs that compute at least this many images:
#: inductor's warm-up (tens of seconds the first time on a machine, seconds once its cache on
#: disk holds the graphs) is repaid by 1.4-1.6x faster batches (DESIGN: ResNet-18 34.6k -> 50k
#: images/s, ResNet-50 12.8k -> 20.8k on an H100) only over many images.
COMPILE_MIN_IMAGES = 200_000

#: ... and on a CPU in bf16 for runs of at least this many: there the network cannot be traced
#: (the trace of its autocast agrees less with fp32), and compiled it runs 1.15-1.5x faster
#: than under eager autocast (2 cores, Zen 4: ResNet-18 73 -> 85 images/s, EfficientNet-Lite0
#: 94 -> 130; end to end 1.19x) for 20-40 s of warm-up per batch shape the first time on a
#: machine, 2-5 s once inductor's cache holds it. In fp32 on a CPU it gained 3-7 % over the
#: traced network: never by itself.
COMPILE_MIN_IMAGES_CPU_BF16 = 20_000


@dataclass(frozen=True)
class Compute:
    """How a run computes its numbers, resolved once: what is recorded and passed down.

    Attributes:
        device: a torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast).
        decode: ``pillow`` or ``torchvision``.
        batch_size: images per forward pass (on a GPU, halved where memory runs out).
        compile: whether the network is ``torch.compile``'d.
        optimize: whether, on the CPU in fp32, the network is traced and frozen (TorchScript,
            with oneDNN's graph fusion).

    Example:
        >>> c = resolve_compute("cpu", "fp32")
        >>> c.device_type, c.batch_size, c.compile
        ('cpu', 32, False)
    """

    device: str
    precision: str
    decode: str
    batch_size: int
    compile: bool = False
    optimize: bool = True

    @property
    def device_type(self) -> str:
        """The kind of device (``cpu``, ``cuda``, ``mps``): what changes the numbers."""
        return device_type(self.device)

    def to_dict(self) -> dict:
        """The setting as a JSON-serialisable dict."""
        return asdict(self)

    def describe(self) -> str:
        """One line for logs: ``cpu, fp32, pillow, batch 32, traced``."""
        way = "compiled" if self.compile else "traced" if self.traced else "eager"
        return (
            f"{self.device}, {self.precision}, {self.decode} decoding, batch {self.batch_size}, "
            f"{way}"
        )

    @property
    def traced(self) -> bool:
        """Whether the network is traced and frozen: with ``optimize``, on the CPU in fp32,
        uncompiled (bf16 on the CPU runs eager autocast, which agrees better with fp32)."""
        return (
            self.optimize
            and not self.compile
            and self.device_type == "cpu"
            and self.precision == "fp32"
        )


def device_type(device: str) -> str:
    """The kind of a concrete ``device`` value, which is what changes the numbers.

    Example:
        >>> device_type("cuda:1"), device_type("cpu")
        ('cuda', 'cpu')
    """
    if device == AUTO:
        raise ValueError("device: auto must be resolved first (see resolve_compute)")
    return device.split(":", 1)[0]


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU has bf16 matrix units (:data:`BF16_CPU_FLAGS`), where bf16
    autocast runs in hardware; elsewhere it is emulated, and several times slower than fp32.

    Read from ``/proc/cpuinfo`` on Linux (no torch import, so planning stays fast), else asked
    of torch.

    Example:
        >>> isinstance(cpu_has_bf16(), bool)
        True
    """
    return _cpu_has(BF16_CPU_FLAGS, "_is_amx_tile_supported", "_is_avx512_bf16_supported")


def cpu_prefers_bf16() -> bool:
    """Whether ``precision: auto`` is bf16 on this machine's CPU: whether it has AMX's bf16
    tile units (:data:`BF16_AUTO_CPU_FLAGS`; read as :func:`cpu_has_bf16` reads its flags).

    Example:
        >>> cpu_prefers_bf16() <= cpu_has_bf16()
        True
    """
    return _cpu_has(BF16_AUTO_CPU_FLAGS, "_is_amx_tile_supported")


def _cpu_has(flags: frozenset[str], *torch_checks: str) -> bool:
    """Whether the CPU lists any of ``flags`` in ``/proc/cpuinfo``; where that cannot be read,
    whether any of ``torch.cpu``'s ``torch_checks`` says so."""
    listed = _cpu_flags()
    if listed is not None:
        return bool(listed & flags)
    try:
        import torch

        return any(getattr(torch.cpu, check)() for check in torch_checks)
    except (ImportError, AttributeError):
        return False


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``, None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def resolve_precision(device: str, precision: str) -> str:
    """A ``precision`` made concrete for ``device``: ``auto`` is bf16 on a GPU and on a CPU
    with AMX (:func:`cpu_prefers_bf16`), else fp32.

    Example:
        >>> resolve_precision("cuda:0", "auto")
        'bf16'
        >>> resolve_precision("cpu", "auto") == ("bf16" if cpu_prefers_bf16() else "fp32")
        True
    """
    if precision != AUTO:
        return precision
    kind = device_type(device)
    return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_prefers_bf16()) else "fp32"


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


def resolve_compile(
    device: str, compile: bool | str, images: int | None = None, precision: str = "fp32"
) -> bool:
    """A ``compile`` made concrete: ``auto`` compiles on a GPU for a run of at least
    :data:`COMPILE_MIN_IMAGES` images to compute (``images``; None: unknown, no), on a CPU in
    bf16 for one of at least :data:`COMPILE_MIN_IMAGES_CPU_BF16`, never on a CPU in fp32 (there
    the network is traced) or on MPS.

    Example:
        >>> resolve_compile("cuda", "auto", 10**6), resolve_compile("cuda", "auto", 500)
        (True, False)
        >>> resolve_compile("cpu", "auto", 10**6), resolve_compile("cpu", True)
        (False, True)
        >>> resolve_compile("cpu", "auto", 10**5, "bf16")
        True
    """
    if compile != AUTO:
        return bool(compile)
    kind, images = device_type(device), images or 0
    if kind == "cpu" and precision == "bf16":
        return images >= COMPILE_MIN_IMAGES_CPU_BF16
    return kind == "cuda" and images >= COMPILE_MIN_IMAGES


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
    device: str,
    precision: str,
    decode: str = AUTO,
    *,
    batch_size: int | str = AUTO,
    compile: bool | str = AUTO,
    optimize: bool = True,
    images: int | None = None,
    gpu: bool | None = None,
) -> Compute:
    """The concrete :class:`Compute` setting for configured values.

    Args:
        device: the config's ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        precision: the config's ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``).
        decode: the config's ``decode`` (``auto``, ``pillow``, ``torchvision``).
        batch_size: the config's ``batch_size`` (``auto`` or a number).
        compile: the config's ``compile`` (``auto``, true, false).
        optimize: the config's ``optimize``.
        images: how many images the run computes (for ``compile: auto``); None: unknown.
        gpu: whether the computing machine has a GPU, where the caller knows better than this
            machine (the workflow: folder jobs that ask a cluster for a GPU get one); None asks
            torch here (:func:`gpu_visible`).

    Returns:
        The setting, with ``auto`` replaced: the device is ``cuda`` when there is a GPU, else
        ``cpu``; the precision bf16 on a GPU and on a CPU with AMX, else fp32;
        the decoder torchvision's on a GPU, else Pillow; the batch 512 on a GPU, else 32;
        compiled for large runs on a GPU or in bf16 on a CPU.

    Example:
        >>> resolve_compute("auto", "auto", gpu=True).to_dict()
        {'device': 'cuda', 'precision': 'bf16', 'decode': 'torchvision', 'batch_size': 512, \
'compile': False, 'optimize': True}
        >>> resolve_compute("cpu", "fp32", "torchvision", batch_size=8).describe()
        'cpu, fp32, torchvision decoding, batch 8, traced'
    """
    if device == AUTO:
        device = "cuda" if (gpu_visible() if gpu is None else gpu) else "cpu"
    precision = resolve_precision(device, precision)
    return Compute(
        device=device,
        precision=precision,
        decode=resolve_decode(device, decode),
        batch_size=resolve_batch_size(device, batch_size),
        compile=resolve_compile(device, compile, images, precision),
        optimize=bool(optimize),
    )


def compute_from_config(config: dict, *, device: str | None = None) -> Compute:
    """The :class:`Compute` setting of a validated config (``device`` overrides its device).

    Example:
        >>> from snakembed.config import validate_config
        >>> compute_from_config(validate_config({"device": "cpu", "precision": "fp32"})).precision
        'fp32'
    """
    return resolve_compute(
        device or config["device"],
        config["precision"],
        config["decode"],
        batch_size=config["batch_size"],
        compile=config.get("compile", AUTO),
        optimize=config["optimize"],
    )


def precision_warning(compute: Compute) -> str | None:
    """A warning for a reduced precision that this CPU emulates (several times slower than
    fp32): bf16 without bf16 matrix units, fp16 without AMX-FP16; else None."""
    if compute.device_type != "cpu" or compute.precision == "fp32":
        return None
    if compute.precision == "bf16" and not cpu_has_bf16():
        units = "bf16 matrix units (no amx_bf16 or avx512_bf16 among its flags)"
    elif compute.precision == "fp16" and "amx_fp16" not in (_cpu_flags() or ()):
        units = "fp16 matrix units (no amx_fp16 among its flags)"
    else:
        return None
    return (
        f"precision: {compute.precision} on a CPU without {units}: it is emulated there and "
        "runs several times slower than fp32; set precision: auto or fp32"
    )
