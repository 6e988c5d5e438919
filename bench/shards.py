"""What a run costs against what changed: many small folders, a big plan, a one-image rerun,
and the fixed cost of a quick run.

Five measurements, each on a tree made here, with the default model and settings (the report
included), ``snakemake --cores N`` as a user runs it:

- ``many``: the same photos (500x375 JPEGs) as a few big folders and as many small ones, timed
  A B B A (few, many, many, few); prints each and the ratio many / few (the best of two each).
- ``worker``: the many-small-folders tree with the long-lived embed worker and with each shard
  job loading the model itself (``worker.enabled: false``), A B B A.
- ``plan``: a dry run of ``--folders`` one-image folders (discovery, manifests, Snakemake's
  plan), then a second one with nothing changed; prints seconds and the peak memory.
- ``rerun``: ``--folders`` folders of ``--per-folder`` photos computed once; then one image is
  added to one folder and the rerun is timed, each rule's seconds (Snakemake's benchmark
  files) with it; a rerun with nothing changed is the baseline.
- ``quick``: one folder of two photos into a new results folder, no worker running (each try
  in its own ``TMPDIR``), best of three: when Snakemake's plan line, each job's end, its
  "Elapsed time" line and its exit came, against ``snakemake --version`` (Snakemake's start).

Usage::

    python bench/shards.py many                      # 2,000 photos: 4 x 500 against 400 x 5
    python bench/shards.py worker                    # 400 x 5: shard jobs with and without workers
    python bench/shards.py plan --folders 100000
    python bench/shards.py plan --folders 1000000    # 10^6 (a few GB of small files)
    python bench/shards.py rerun --folders 400 --per-folder 5
    python bench/shards.py quick
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from throughput import make_tree, picture  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"


def _snakemake(
    workdir: Path, images: Path, cores: int, *extra: str, settings: dict | None = None
) -> float:
    """Run the workflow on ``images`` (results in ``workdir/results``, ``settings`` added to
    the config); its wall seconds."""
    configfile = workdir / "config.yaml"
    config = {"images": str(images), "results": "results", **(settings or {})}
    configfile.write_text(yaml.safe_dump(config))
    cmd = [
        SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        str(cores),
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


def _rules(results: Path, since: float) -> dict[str, float]:
    """Seconds per rule of the jobs that ran after ``since`` (``time.time()``), from
    Snakemake's benchmark files."""
    seconds: dict[str, float] = {}
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        if path.stat().st_mtime < since:
            continue
        rule = path.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        value = float(path.read_text().splitlines()[-1].split("\t")[0])
        seconds[rule] = seconds.get(rule, 0.0) + value
    return seconds


def _abba(a: str, b: str, run: Callable[[str], float]) -> tuple[float, float]:
    """``run`` timed as a, b, b, a, each from clean results; the best of two of each."""
    times: dict[str, list[float]] = {a: [], b: []}
    for name in (a, b, b, a):
        seconds = run(name)
        times[name].append(seconds)
        print(f"{name}: {seconds:.1f} s", flush=True)
    return min(times[a]), min(times[b])


def _fresh(workdir: Path) -> Path:
    """``workdir`` without the results and Snakemake's state of an earlier run."""
    shutil.rmtree(workdir / "results", ignore_errors=True)
    shutil.rmtree(workdir / ".snakemake", ignore_errors=True)
    return workdir


def many(args: argparse.Namespace, base: Path) -> None:
    total = args.images
    layouts = {"few": (4, total // 4), "many": (total // 5, 5)}
    for name, (folders, per) in layouts.items():
        make_tree(base / name / "images", folders, per, "standard")

    def run(name: str) -> float:
        return _snakemake(_fresh(base / name), base / name / "images", args.cores)

    few, lots = _abba("few", "many", run)
    print(f"\n{total} photos, --cores {args.cores}, best of two each (A B B A)")
    print(f"  few  ({layouts['few'][0]} folders):  {few:.1f} s  ({total / few:.1f} images/s)")
    print(f"  many ({layouts['many'][0]} folders): {lots:.1f} s  ({total / lots:.1f} images/s)")
    print(f"  many / few: {lots / few:.2f}x")


def worker(args: argparse.Namespace, base: Path) -> None:
    """Shard jobs through the long-lived embed worker against each job loading the model."""
    images = base / "images"
    make_tree(images, args.images // 5, 5, "standard")

    def run(name: str) -> float:
        settings = {"worker": {"enabled": name == "worker"}}
        return _snakemake(_fresh(base), images, args.cores, settings=settings)

    served, alone = _abba("worker", "in-process", run)
    print(f"\n{args.images} photos in {args.images // 5} folders of 5, --cores {args.cores}")
    print(f"  through workers:      {served:.1f} s")
    print(f"  each job in-process:  {alone:.1f} s")
    print(f"  in-process / worker: {alone / served:.2f}x")


def plan(args: argparse.Namespace, base: Path) -> None:
    images = base / "images"
    path = base / "one.jpg"
    picture((64, 48), 0).save(path, quality=90)
    data = path.read_bytes()
    start = time.perf_counter()
    for i in range(args.folders):
        folder = images / f"camera_{i // 1000:04d}" / f"day_{i % 1000:03d}"
        folder.mkdir(parents=True)
        (folder / "0.jpg").write_bytes(data)
    print(f"made {args.folders:,} one-image folders in {time.perf_counter() - start:.0f} s")
    first = _snakemake(base, images, args.cores, "--dry-run", "--quiet")
    again = _snakemake(base, images, args.cores, "--dry-run", "--quiet")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    shards = len(list((base / "results" / "manifests").glob("*.json")))
    print(f"\n{args.folders:,} one-image folders in {shards} shards, --cores {args.cores}")
    print(f"  first dry run (manifests written): {first:.1f} s")
    print(f"  second dry run (nothing changed):  {again:.1f} s")
    print(f"  peak memory of the plan: {peak:,.0f} MiB")


def rerun(args: argparse.Namespace, base: Path) -> None:
    images = base / "images"
    make_tree(images, args.folders, args.per_folder, "standard")
    results = base / "results"
    full = _snakemake(base, images, args.cores)
    nothing = _snakemake(base, images, args.cores)
    target = sorted(images.iterdir())[len(list(images.iterdir())) // 2]
    picture((500, 375), 12345).save(target / "added.jpg", quality=90)
    before = {p: p.stat().st_mtime_ns for p in (results / "embeddings").rglob("*.h5")}
    since = time.time()
    seconds = _snakemake(base, images, args.cores)
    changed = [p for p, t in before.items() if p.stat().st_mtime_ns != t]
    rules = _rules(results, since)
    print(f"\n{args.folders} folders of {args.per_folder} photos, --cores {args.cores}")
    print(f"  first run: {full:.1f} s; a rerun with nothing changed: {nothing:.1f} s")
    print(f"  one image added to {target.name}: the rerun took {seconds:.1f} s")
    print(f"  folder files rewritten: {len(changed)} ({', '.join(p.stem for p in changed)})")
    for rule, value in sorted(rules.items()):
        print(f"    {rule}: {value:.1f} s")
    print(f"  ratio to the rerun with nothing changed: {seconds / nothing:.2f}x")


#: The lines of a run's stderr that ``quick`` times, by what they mark.
_MARKS = {
    "plan": "snakembed: 1 folder to compute",
    "folder job": "(Rule: embed_classify_store)",
    "index": "(Rule: index)",
    "report": "(Rule: report_pages)",
    "Elapsed line": "Elapsed time:",
}


def _phases(workdir: Path, images: Path, cores: int) -> dict[str, float]:
    """Seconds from the start of a run with no worker running to each of ``_MARKS`` and to
    its exit."""
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump({"images": str(images), "results": "results"}))
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)]
    cmd += ["--configfile", str(configfile), "--cores", str(cores)]
    seen: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sq", dir="/tmp") as tmp:
        start = time.perf_counter()
        with subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": tmp},
        ) as proc:
            for line in proc.stderr:
                for name, mark in _MARKS.items():
                    if mark in line:
                        seen.setdefault(name, time.perf_counter() - start)
        seen["exit"] = time.perf_counter() - start
        for pid in Path(tmp).glob("snakembed-workers-*/*.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
    if proc.returncode != 0 or len(seen) != len(_MARKS) + 1:
        raise SystemExit(f"the quick run failed or said something else (seen: {seen})")
    return seen


def quick(args: argparse.Namespace, base: Path) -> None:
    images = base / "images"
    make_tree(images, 1, 2, "standard")
    version = []
    for _ in range(3):
        begin = time.perf_counter()
        subprocess.run([SNAKEMAKE, "--version"], check=True, capture_output=True)
        version.append(time.perf_counter() - begin)
    runs = [_phases(_fresh(base), images, args.cores) for _ in range(3)]
    best = min(runs, key=lambda phases: phases["exit"])
    print(f"\none folder of 2 photos into new results, --cores {args.cores}, best of three")
    print(f"  snakemake --version: {min(version):.2f} s (Snakemake's start)")
    before = 0.0
    for name, at in best.items():
        print(f"  {name}: at {at:.2f} s (+{at - before:.2f} s)")
        before = at
    print(f"  beyond Snakemake's start: {best['exit'] - min(version):.2f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("many", "worker", "plan", "rerun", "quick"))
    parser.add_argument("--images", type=int, default=2000, help="many: photos in all")
    parser.add_argument("--folders", type=int, help="plan: 100,000; rerun: 400")
    parser.add_argument("--per-folder", type=int, default=5, help="rerun: photos per folder")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the trees (printed)")
    args = parser.parse_args(argv)
    args.folders = args.folders or (100_000 if args.what == "plan" else 400)
    base = Path(tempfile.mkdtemp(prefix="snakembed-bench-"))
    try:
        parts = {"many": many, "worker": worker, "plan": plan, "rerun": rerun, "quick": quick}
        parts[args.what](args, base)
    finally:
        if args.keep:
            print(f"kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
