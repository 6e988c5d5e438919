"""snakembed as a tool people install: the wheel in a fresh environment, ``snakembed run``.

The wheel is built from the repository and installed without ``-e`` into a new environment,
whose other packages (torch, Snakemake, ...) are the test environment's, reached through a
``.pth`` file so that nothing is installed twice. Every command runs from a folder outside
the repository, with the environment's ``snakembed`` executable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, folder_shard, make_image, make_tree, run_snakemake, write_config

import snakembed

pytestmark = pytest.mark.slow

#: What is not part of the package, left out of the copy the wheel is built from.
_NOT_PACKAGED = (".venv", ".git", "results", ".snakemake", "build", "dist", "*.egg-info")
_SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+)")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh environment with snakembed's wheel installed; returns its ``bin`` folder."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    ignore = shutil.ignore_patterns(*_NOT_PACKAGED, "__pycache__", ".*_cache")
    shutil.copytree(REPO, source, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    wheels = base / "wheels"
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source]
    subprocess.run(build, check=True, timeout=600)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    install = [*pip, "--python", python, "install", "--no-deps", "--no-index"]
    subprocess.run([*install, *wheels.glob("snakembed-*.whl")], check=True, timeout=600)
    site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    )
    # After the install, so that pip sees none of the test environment's packages.
    Path(site.strip(), "test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin"


def _environment(bin_dir: Path) -> dict[str, str]:
    """This environment with the installed one first, and the repository off the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def _tool(bin_dir: Path, cwd: Path, *args: str, check: bool = True):
    """Run the installed ``snakembed`` in ``cwd``, with no trace of the repository around."""
    proc = subprocess.run(
        [bin_dir / "snakembed", *args],
        cwd=cwd,
        env=_environment(bin_dir),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakembed {args} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def tool_run(installed, tmp_path_factory):
    """``snakembed run`` from an empty folder, and a clone's ``snakemake`` on the same images."""
    base = tmp_path_factory.mktemp("tool")
    make_tree(base / "images")
    config = write_config(base / "fast.yaml")
    work = base / "work"
    work.mkdir()
    proc = _tool(installed, work, "run", "../images", "--configfile", "../fast.yaml", "-c", "2")
    clone = write_config(
        base / "clone.yaml", images=str(base / "images"), results=str(base / "clone")
    )
    run_snakemake(base, clone)
    return {"base": base, "work": work, "config": config, "proc": proc, "bin": installed}


def _assert_same_results(a: Path, b: Path) -> None:
    left, right = snakembed.open_store(a), snakembed.open_store(b)
    assert left.folders() == right.folders() and left.folders()
    for key in left.folders():
        with left[key] as x, right[key] as y:
            assert x.ids() == y.ids(), key
            assert np.allclose(x.matrix(), y.matrix(), rtol=1e-5, atol=1e-5), key
            assert [r.label for r in x] == [r.label for r in y], key


def test_the_installed_package_runs_its_own_copy_of_the_workflow(tool_run):
    code = "import snakembed, snakembed.workflow as w; print(snakembed.__file__, w.snakefile())"
    python = tool_run["bin"] / "python"
    env = _environment(tool_run["bin"])
    out = subprocess.check_output([python, "-c", code], cwd=tool_run["work"], env=env, text=True)
    package, snakefile = out.split()
    venv = tool_run["bin"].parent
    assert Path(package).is_relative_to(venv) and Path(snakefile).is_relative_to(venv), out
    assert Path(snakefile).is_file() and not Path(snakefile).is_symlink()
    assert f"--snakefile {snakefile} " in tool_run["proc"].stderr
    for part in ("Snakefile", "workflow", "scripts", "snakembed"):  # no file of the clone's
        assert str(REPO / part) not in tool_run["proc"].stderr


def test_snakembed_run_from_an_empty_folder_equals_a_clone_run(tool_run):
    results = tool_run["work"] / "results"
    _assert_same_results(results, tool_run["base"] / "clone")
    assert (results / ".snakemake").is_dir()  # Snakemake's records live with the results
    assert not (tool_run["work"] / ".snakemake").exists()
    info = _tool(tool_run["bin"], tool_run["work"], "info")
    assert "folders: 4, images: 8, failed: 0" in info.stdout


def test_a_second_run_has_nothing_to_do_from_any_folder(tool_run):
    work = tool_run["work"]
    again = _tool(tool_run["bin"], work, "run", "../images", "--configfile", "../fast.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr, again.stderr[-3000:]
    # The same tree and results, given from elsewhere: Snakemake's records are found.
    base = tool_run["base"]
    elsewhere = _tool(
        tool_run["bin"],
        base.parent,
        "run",
        f"{base.name}/images",
        "-r",
        f"{base.name}/work/results",
        "--configfile",
        f"{base.name}/fast.yaml",
        "--dry-run",
    )
    assert "Nothing to be done" in elsewhere.stdout + elsewhere.stderr, elsewhere.stderr


def test_dry_run_shows_only_the_changed_folder_and_changes_nothing(tool_run):
    work, base = tool_run["work"], tool_run["base"]
    added = make_image(base / "images" / "alpha" / "new.jpg", seed=77)
    try:
        index = (work / "results" / "index.h5").stat().st_mtime_ns
        proc = _tool(
            tool_run["bin"], work, "run", "../images", "--configfile", "../fast.yaml", "-n"
        )
        jobs = re.findall(
            r"rule embed_classify_store:\n(?:.*\n)*?\s+wildcards: shard=(.*)", proc.stdout
        )
        assert jobs == [folder_shard(work / "results", "alpha")], proc.stdout[-3000:]
        assert "1 folder changed: alpha (+1 image); 1 shard to run" in proc.stdout + proc.stderr
        assert "This was a dry-run" in proc.stdout
        assert (work / "results" / "index.h5").stat().st_mtime_ns == index
    finally:
        added.unlink()


def test_config_overrides_pass_through(tool_run, tmp_path):
    """--config as Snakemake takes it (YAML values): here no classifier, and no report."""
    bin_dir = tool_run["bin"]
    images = tool_run["base"] / "images"
    config = tool_run["config"]
    proc = _tool(
        bin_dir,
        tmp_path,
        "run",
        str(images),
        "--configfile",
        str(config),
        "--config",
        "classify={head: none}",
        "report={enabled: false}",
    )
    assert not (tmp_path / "results" / "report").exists(), proc.stderr[-2000:]
    info = _tool(bin_dir, tmp_path, "info")
    assert "classify: none" in info.stdout and "None" not in info.stdout


def test_run_errors_are_one_line_and_name_the_fix(installed, tmp_path):
    missing = _tool(installed, tmp_path, "run", "no-such-images", check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "snakembed: error: IMAGES no-such-images: no such folder; give the root of your images"
    ]
    (tmp_path / "images").mkdir()
    twice = _tool(installed, tmp_path, "run", "images", "--config", "images=x", check=False)
    assert twice.returncode == 2 and "IMAGES argument" in twice.stderr
    # A bad config value: named in one line before Snakemake starts.
    make_image(tmp_path / "images" / "a" / "0.jpg")
    bad = _tool(installed, tmp_path, "run", "images", "--config", "threads=0", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr[-2000:]
    assert "config key 'threads': 0 is less than the minimum of 1" in bad.stderr
    assert not (tmp_path / "results").exists()
    # An unknown model: the workflow's planning names it, and Snakemake's status is the tool's.
    unknown = _tool(
        installed, tmp_path, "run", "images", "--config", "model={name: resnet99}", check=False
    )
    assert unknown.returncode == 1, unknown.stderr[-2000:]
    assert "unknown backbone 'resnet99'; did you mean resnet50" in unknown.stderr


def test_version_and_config(installed, tmp_path):
    version = _tool(installed, tmp_path, "--version")
    assert version.stdout.strip() == f"snakembed {snakembed.__version__}"
    defaults = _tool(installed, tmp_path, "config").stdout
    (tmp_path / "defaults.yaml").write_text(defaults.replace("threads: 2", "threads: 1"))
    make_image(tmp_path / "images" / "a" / "0.jpg")
    dry = _tool(installed, tmp_path, "run", "images", "--configfile", "defaults.yaml", "--dry-run")
    assert "embed_classify_store" in dry.stdout


def test_the_slurm_profile_submits_to_the_cluster(slurm, tool_run, tmp_path):
    base = tool_run["base"]
    # The test cluster's GPU is fake: the folder jobs, which ask for one, compute on the CPU.
    proc = _tool(
        tool_run["bin"],
        tmp_path,
        "run",
        str(base / "images"),
        "--profile",
        "slurm",
        "--configfile",
        str(tool_run["config"]),
        "--config",
        "device=cpu",
        "--",
        "--slurm-no-account",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
    )
    out = proc.stdout + proc.stderr
    assert _SUBMITTED.findall(out), out[-3000:]
    _assert_same_results(tmp_path / "results", base / "clone")
