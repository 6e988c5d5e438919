"""How the numbers are computed: one resolved setting (device, precision, decoder, batch,
compile), bf16 where the CPU has AMX, and bf16 vectors that agree with fp32's."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from conftest import FAST_CONFIG, REPO, make_image, write_config

from snakembed import devices

sys.path.insert(0, str(REPO / "bench"))
from precision import real_photos  # noqa: E402 - the benchmark's photos

from snakembed.cli import main
from snakembed.config import load_config
from snakembed.devices import Compute, resolve_compute
from snakembed.embed import Embedder, autocast, prepare_model
from snakembed.plan import plan_run


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU has the given flags (``/proc/cpuinfo``)."""

    def pretend(*flags: str) -> None:
        monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset(flags))

    return pretend


def test_auto_precision_is_bf16_only_where_the_cpu_has_amx(cpu_flags):
    for flags, precision in [
        (("avx2", "amx_tile", "amx_bf16", "avx512_bf16"), "bf16"),  # Sapphire Rapids
        (("avx2", "avx512f", "avx512_bf16"), "fp32"),  # Zen 4: bf16 gains too little
        (("avx2", "avx512f", "avx512_vnni"), "fp32"),  # Ice Lake: no bf16 units
        (("avx2", "fma"), "fp32"),  # this kind of machine
    ]:
        cpu_flags(*flags)
        got = resolve_compute("auto", "auto", gpu=False)
        assert (got.device, got.precision, got.decode) == ("cpu", precision, "pillow"), flags
        # asked for, it is what was asked, whatever the CPU
        assert resolve_compute("cpu", "fp32").precision == "fp32"
        assert resolve_compute("cpu", "bf16").precision == "bf16"
        # a GPU: bf16 whatever the CPU has
        assert resolve_compute("auto", "auto", gpu=True).precision == "bf16"


def test_one_resolved_setting_holds_every_part(cpu_flags):
    cpu_flags("avx2")
    cpu = resolve_compute("auto", "auto", gpu=False)
    assert cpu == Compute("cpu", "fp32", "pillow", 32, compile=False, optimize=True)
    assert cpu.traced and cpu.describe() == "cpu, fp32, pillow decoding, batch 32, traced"
    gpu = resolve_compute("auto", "auto", gpu=True, images=10**6)
    assert gpu == Compute("cuda", "bf16", "torchvision", 512, compile=True, optimize=True)
    assert not gpu.traced
    # compile: auto only repays itself for a large run, on a GPU or in bf16 on a CPU (in fp32
    # the CPU runs the trace)
    assert not resolve_compute("cuda", "auto", images=1000).compile
    assert not resolve_compute("cpu", "auto", images=10**7).compile
    assert resolve_compute("cpu", "bf16", images=10**5).compile
    assert not resolve_compute("cpu", "bf16", images=1000).compile
    assert resolve_compute("cpu", "auto", compile=True).compile
    # bf16 on the CPU runs the network itself under autocast, never its trace
    assert not resolve_compute("cpu", "bf16").traced


@pytest.mark.parametrize(
    ("model", "in_fp32"), [("efficientnet_lite0", 2), ("resnet18", 1), ("timm/resnet10t", 1)]
)
def test_bf16_on_the_cpu_keeps_the_stem_in_fp32(model, in_fp32):
    """The first convolution (and depthwise ones right after it) compute in fp32 under bf16
    autocast; the rest in bf16."""
    from snakembed.backbones import create_backbone

    backbone = create_backbone(model, weights="none")
    net = prepare_model(backbone.model, resolve_compute("cpu", "bf16"), 64)
    seen = []
    for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.inference_mode(), autocast("cpu", "bf16"):
        net(torch.randn(2, 3, 64, 64))
    assert seen[:in_fp32] == [torch.float32] * in_fp32
    assert set(seen[in_fp32:]) == {torch.bfloat16}


def test_the_embedder_computes_with_the_one_setting_it_resolved(tmp_path):
    make_image(tmp_path / "a.jpg")
    config = load_config(overrides={**FAST_CONFIG, "batch_size": "auto", "optimize": True})
    embedder = Embedder(config, threads=1)
    assert embedder.compute == resolve_compute("cpu", "fp32", batch_size="auto")
    assert embedder.batch_size == embedder.forward.limit == 32
    assert isinstance(embedder.forward.model, torch.jit.ScriptModule)  # traced: fp32 on the CPU
    assert embedder([tmp_path / "a.jpg"]).meta["precision"] == "fp32"
    bf16 = Embedder({**config, "precision": "bf16"}, threads=1)
    assert bf16.forward.model is bf16.backbone.model  # eager, under autocast
    assert bf16([tmp_path / "a.jpg"]).meta["precision"] == "bf16"


def test_bf16_on_a_cpu_without_bf16_units_warns_that_it_is_slow(tmp_path, cpu_flags, caplog):
    cpu_flags("avx2", "fma")
    make_image(tmp_path / "images" / "a" / "x.jpg")
    config = {
        "images": str(tmp_path / "images"),
        "results": str(tmp_path / "results"),
        "precision": "bf16",
        "device": "cpu",
    }
    warnings = plan_run(config).warnings()
    assert any("bf16 on a CPU without bf16 matrix units" in line for line in warnings)
    assert any("set precision: auto or fp32" in line for line in warnings)
    # the command line says so too, unless the precision is a run's (--results)
    configfile = write_config(tmp_path / "c.yaml", precision="bf16")
    with caplog.at_level(logging.WARNING, logger="snakembed"):
        assert (
            main(
                ["embed", str(tmp_path / "images" / "a" / "x.jpg"), "--configfile", str(configfile)]
            )
            == 0
        )
    assert "several times slower than fp32" in caplog.text
    # fp16 is emulated on CPUs without AMX-FP16
    cpu_flags("avx2", "amx_bf16")
    assert any(
        "without fp16 matrix units" in line
        for line in plan_run({**config, "precision": "fp16"}).warnings()
    )
    # where the units exist, or in fp32, nothing to say
    cpu_flags("amx_bf16")
    assert not any("bf16" in line for line in plan_run(dict(config)).warnings())
    cpu_flags("avx2")
    assert not any("bf16" in line for line in plan_run({**config, "precision": "fp32"}).warnings())


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bf16_vectors_and_labels_agree_with_fp32s_on_real_photos(tmp_path, compile):
    """The default model in bf16 (as ``precision: auto`` is on a GPU and on CPUs with AMX;
    compiled, as ``compile: auto`` is for large runs) against fp32, on real photos:
    median cosine >= 0.999, minimum >= 0.995, top-1 labels >= 99 % the same, and each image's
    10 nearest neighbours >= 90 % the same."""
    from snakembed.classify import predict
    from snakembed.heads import create_head

    paths = real_photos(tmp_path)  # what bench/precision.py measures
    config = load_config(overrides={"device": "cpu", "threads": 2})
    runs = {}
    for precision in ("fp32", "bf16"):
        embedder = Embedder(
            {**config, "precision": precision, "compile": compile and precision == "bf16"}
        )
        assert embedder.compute.compile == (compile and precision == "bf16")
        result = embedder(paths)
        head = create_head("pretrained", config, embedder.backbone)
        runs[precision] = (
            _unit(result.vectors),
            predict(head, "pretrained", result.ids, result.vectors, 2),
        )
    (fp32, fp32_labels), (bf16, bf16_labels) = runs["fp32"], runs["bf16"]
    assert len(fp32) == len(paths) == 30
    cosine = (fp32 * bf16).sum(axis=1)
    assert np.median(cosine) >= 0.999 and cosine.min() >= 0.995, np.sort(cosine)[:5]
    pairs = zip(fp32_labels.labels, bf16_labels.labels, strict=True)
    same = np.array([a[0] == b[0] for a, b in pairs])
    # A near tie (the first label ahead of the second by under 0.01 of probability; the
    # Hubble deep field: 'nematode' 0.072, 'spotlight' 0.071) flips under any rounding.
    clear = np.array([s[0] - s[1] >= 0.01 for s in fp32_labels.scores])
    assert clear.sum() >= 25 and same[clear].mean() >= 0.99, fp32_labels.labels[~same]
    assert same.mean() >= 0.9

    def neighbours(unit: np.ndarray) -> np.ndarray:
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :10]

    overlap = [
        len(set(a) & set(b)) / 10 for a, b in zip(neighbours(fp32), neighbours(bf16), strict=True)
    ]
    assert min(overlap) >= 0.9, overlap
