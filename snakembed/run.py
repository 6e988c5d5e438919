"""``snakembed run``: the packaged workflow on a user's image tree, with Snakemake underneath.

Snakemake runs in the results folder (``--directory``), so the records it keeps of every job
(``.snakemake/``, which tell a rerun what changed) live with the results: any later run on the
same results, from any folder, finds them.
Paths the user gives (the image tree, config files, a labels CSV, a local checkpoint,
``PYTHONPATH``) are made absolute first, against the folder the command was typed in.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from .buckets import BUCKET_FORM, is_bucket, is_misspelt_bucket
from .workflow import PROFILES, profile, snakefile, workflow_dir

__all__ = ["run", "snakemake_command"]

#: Config keys whose values may be files, relative to where the command was typed.
_PATH_KEYS = {"model": ("weights",), "classify": ("labels",), "finetune": ("weights",)}
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
#: Snakemake options that ``snakembed run`` sets itself, and what to give instead: given again
#: after ``--``, Snakemake would take them in place of snakembed's (a later ``--config`` replaces
#: the images and the results, a later ``--configfile`` the user's config files, a later
#: ``--cores`` skips snakembed's check of it).
_OWN_OPTIONS = {
    "--config": "give --config KEY=VALUE before the --",
    "-C": "give --config KEY=VALUE before the --",
    "--configfile": "give --configfile FILE before the --",
    "--configfiles": "give --configfile FILE before the --",
    "--directory": "give the results folder as --results",
    "-d": "give the results folder as --results",
    "--snakefile": "snakembed run runs snakembed's workflow; run another with snakemake itself",
    "-s": "snakembed run runs snakembed's workflow; run another with snakemake itself",
    "--cores": "give --cores N before the --",
    "-c": "give --cores N before the --",
}


def snakemake_command(
    images: str | Path,
    results: str | Path | None = None,
    *,
    cores: str | None = None,
    profile_name: str | None = None,
    configfiles: Sequence[str | Path] = (),
    config: Sequence[str] = (),
    dry_run: bool = False,
    snakemake_args: Sequence[str] = (),
    base: Path | None = None,
) -> list[str]:
    """The ``snakemake`` command line that runs the packaged workflow.

    Args:
        images: the image tree.
        results: the results folder, also Snakemake's working directory; None takes the last
            config file's ``results``, else ``results``.
        cores: Snakemake's ``--cores`` (a number, or ``all``); None gives ``all`` unless a
            profile is given.
        profile_name: ``local`` or ``slurm`` (the workflow's own profiles), or a profile's
            folder or name as Snakemake takes it.
        configfiles: YAML files with config keys (``snakembed config`` prints them all).
        config: ``KEY=VALUE`` overrides, as ``snakemake --config`` takes them.
        dry_run: only show what would run.
        snakemake_args: more of Snakemake's own arguments, passed as they are.
        base: the folder relative paths are taken against (default: the current one).

    Returns:
        The arguments, starting with the Python interpreter.

    Example:
        >>> cmd = snakemake_command("/data/photos", "/data/out", cores="8")
        >>> cmd[cmd.index("--directory") + 1], cmd[cmd.index("--cores") + 1]
        ('/data/out', '8')
    """
    _refuse_own_options(snakemake_args)
    if cores is not None and cores != "all" and not (cores.isdigit() and int(cores) > 0):
        file = " (a config file is --configfile FILE)" if Path(cores).suffix else ""
        raise ValueError(f"--cores {cores}: give a number of cores, 1 or more, or all{file}")
    base = Path(base or os.getcwd())
    configfiles = [_absolute(f, base) for f in configfiles]
    for file in configfiles:
        if not file.is_file():
            raise FileNotFoundError(f"--configfile {file}: no such file")
    files = list(map(_load_yaml, configfiles))
    if results is None:
        results = _results_of(files, configfiles)
    results = _absolute(results, base)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(snakefile()),
        "--workflow-profile",
        str(workflow_dir() / "profiles" / "default"),
        "--directory",
        str(results),
    ]
    if profile_name:
        cmd += ["--profile", _profile_path(profile_name, base)]
    if cores or not profile_name:
        cmd += ["--cores", cores or "all"]
    if configfiles:
        cmd += ["--configfile", *map(str, configfiles)]
    images = str(images) if is_bucket(images) else str(_absolute(images, base))
    sources = [*files, *map(_config_entry, config)]
    _check_config(sources, images, results)
    for name, path in (("IMAGES", images), ("--results", str(results))):
        if _snakemake_value(path) != path:  # ': ', ' #', quotes: Snakemake reads them as YAML
            raise ValueError(
                f"{name} {path}: Snakemake's --config would not read this path whole (': ', "
                "' #' and quotes mean something in it); choose a path without them, a "
                "symbolic link will do"
            )
    paths = [f"images={images}", f"results={results}"]
    for values in sources:
        for section, subkeys in _absolute_paths(values, base).items():
            paths.append(f"{section}={yaml.safe_dump(subkeys, default_flow_style=True).strip()}")
    cmd += ["--config", *config, *paths]
    if dry_run:
        cmd.append("--dry-run")
    return cmd + list(snakemake_args)


def run(images: str | Path, results: str | Path | None = None, **options) -> int:
    """Run the packaged workflow on an image tree, as ``snakembed run`` does.

    Args:
        images: the image tree (every folder in it that holds images is one unit of work).
        results: the results folder (None: a config file's ``results``, else ``results``).
        **options: as :func:`snakemake_command` takes them.

    Returns:
        Snakemake's exit status (0: done, or nothing to do).

    Example:
        >>> run("photos", "out", cores="4", dry_run=True)  # doctest: +SKIP
        0
    """
    images_dir = Path(images)
    if not is_bucket(images) and not images_dir.is_dir():
        what = "not a folder" if images_dir.exists() else "no such folder"
        if is_misspelt_bucket(images):
            what += f" (a bucket is written {BUCKET_FORM})"
        raise FileNotFoundError(f"IMAGES {images}: {what}; give the root of your images")
    cmd = snakemake_command(images, results, **options)
    results_dir = Path(cmd[cmd.index("--directory") + 1])
    if results_dir.exists() and not results_dir.is_dir():
        raise ValueError(f"--results {results or results_dir}: a file, not a folder; give a folder")
    inside = results_dir.resolve()
    if not is_bucket(images) and (
        inside == images_dir.resolve() or images_dir.resolve() in inside.parents
    ):
        raise ValueError(
            f"--results {results or results_dir} lies inside IMAGES {images}: choose a results "
            "folder outside the image tree (--results ../results, for example)"
        )
    results_dir.mkdir(parents=True, exist_ok=True)
    print(f"snakembed: {shlex.join(['snakemake', *cmd[3:]])}", file=sys.stderr, flush=True)
    process = subprocess.Popen(cmd, env=_environment())
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # Snakemake has the signal too, and stops its jobs
            continue


def _profile_path(name: str, base: Path) -> str:
    """A profile that comes with snakembed, a folder, or one of the user's Snakemake profiles."""
    if name in PROFILES:
        if name == "slurm" and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
            raise ModuleNotFoundError(
                "--profile slurm needs Snakemake's SLURM executor plugin: pip install "
                '"snakembed[slurm]" (or snakemake-executor-plugin-slurm)'
            )
        return str(profile(name))
    path = base / name
    if path.exists():
        return str(path)
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    for folder in (Path(config_home) / "snakemake", Path("/etc/xdg/snakemake")):
        if (folder / name).is_dir():
            return name
    raise FileNotFoundError(
        f"--profile {name}: no such profile; choose {' or '.join(PROFILES)} (they come with "
        "snakembed), or give a profile's folder"
    )


def _environment() -> dict[str, str]:
    """This environment, with ``PYTHONPATH`` absolute: Snakemake works in the results folder."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        entries = env["PYTHONPATH"].split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else p for p in entries)
    return env


def _refuse_own_options(args: Sequence[str]) -> None:
    """Raise ValueError for an option among Snakemake's ``args`` that snakembed run sets itself.

    Written out (``--directory``, ``-d``) it is seen at once. Snakemake also reads an
    abbreviation (``--dir``) and a short option inside a group (``-nCthreads=3``): where an
    argument could hide one, Snakemake's own parser reads the arguments, as Snakemake will.
    """
    for arg in args:
        name = arg.partition("=")[0] if arg.startswith("--") else arg[:2]
        if name in _OWN_OPTIONS:
            raise ValueError(f"{arg} after --: {_OWN_OPTIONS[name]}")
    found = _own_options_read(args) if any(map(_may_hide_own_option, args)) else []
    if found:
        raise ValueError(
            f"{shlex.join(args)} after --: Snakemake reads {found[0]} in it, which snakembed "
            f"run sets itself; {_OWN_OPTIONS[found[0]]}"
        )


def _may_hide_own_option(arg: str) -> bool:
    if arg.startswith("--"):
        name = arg.partition("=")[0]
        return len(name) > 2 and any(own.startswith(name) for own in _OWN_OPTIONS)
    return arg.startswith("-") and any(f"-{letter}" in _OWN_OPTIONS for letter in arg[2:])


def _own_options_read(args: Sequence[str]) -> list[str]:
    """The options of :data:`_OWN_OPTIONS` that Snakemake's parser finds in ``args``; none
    where it cannot read them (Snakemake then says why itself)."""
    try:
        from snakemake.cli import get_argument_parser

        parser = get_argument_parser()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            namespace, _ = parser.parse_known_args(list(args))
    except (Exception, SystemExit):
        return []
    return [
        option
        for option in _OWN_OPTIONS
        if option.startswith("--")
        and getattr(namespace, option[2:], None) != parser.get_default(option[2:])
    ]


def _absolute(path: str | Path, base: Path) -> Path:
    """``path`` against ``base``, with ``~`` (which a config file does not expand) expanded."""
    return Path(os.path.abspath(base / os.path.expanduser(path)))


def _results_of(files: list[dict], paths: list[Path]) -> str:
    """The ``results`` of the last config file that sets it, else ``results``."""
    for values, path in zip(reversed(files), reversed(paths), strict=True):
        value = values.get("results")
        if value is not None:
            if not isinstance(value, str) or not value:
                raise ValueError(f"--configfile {path}: results: {value!r}; give a folder path")
            return value
    return "results"


def _load_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"--configfile {path} is not valid YAML: {exc}") from None
    if values is None:  # Snakemake refuses an empty config file
        raise ValueError(
            f"--configfile {path} is empty: give KEY: VALUE lines (snakembed config prints "
            "every key), or leave the file out"
        )
    if not isinstance(values, dict):
        raise ValueError(
            f"--configfile {path} holds a {type(values).__name__}, not KEY: VALUE lines"
        )
    return values


def _check_config(sources: list[dict], images: str, results: Path) -> None:
    """The configuration Snakemake will see (the packaged ``config.yaml``, the config files, the
    ``--config`` entries, in that order) checked against the schema before Snakemake starts, so
    that a mistyped key or value is named in one line; the workflow checks the rest (plugin
    names, checkpoints, labels, the image tree) when it starts."""
    from .config import load_config, merge_config

    overrides: dict = {}
    for values in sources:
        merge_config(overrides, values)
    load_config(
        workflow_dir() / "config.yaml", {**overrides, "images": images, "results": str(results)}
    )


def _config_entry(entry: str) -> dict:
    """``KEY=VALUE`` as a dict, its value read as ``snakemake --config`` reads it (see
    :func:`_snakemake_value`)."""
    key, sep, value = entry.partition("=")
    if not sep or not key:
        raise ValueError(f"--config {entry!r}: give KEY=VALUE, for example --config threads=4")
    if key in ("images", "results"):
        raise ValueError(
            f"--config {entry!r}: give the {key} as snakembed run's "
            f"{'IMAGES argument' if key == 'images' else '--results option'}"
        )
    try:
        return {key: _snakemake_value(value)}
    except yaml.YAMLError as exc:  # meant as a mapping or list: say what broke
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ValueError(
            f"--config {entry!r}: {problem}; check its braces, commas and quotes"
        ) from None


def _snakemake_value(value: str):
    """A ``--config`` value as Snakemake reads it: quotes at its ends dropped, then an integer,
    a float, True or False, else YAML whose scalars stay strings (the schema's types are
    applied when the configuration is validated), else the text.

    Raises:
        yaml.YAMLError: for broken YAML that was meant as a mapping or a list.
    """
    value = value.strip("'\"")
    if not value:
        return None
    for parse in (int, float, {"True": True, "False": False}.__getitem__):
        with contextlib.suppress(ValueError, KeyError):
            return parse(value)
    try:
        return yaml.load(value, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        if value.lstrip()[:1] in ("{", "["):
            raise
        return value


def _absolute_paths(values: dict, base: Path) -> dict[str, dict[str, str]]:
    """The relative file paths among ``values`` (labels, local checkpoints), made absolute."""
    found: dict[str, dict[str, str]] = {}
    for section, keys in _PATH_KEYS.items():
        block = values.get(section)
        if not isinstance(block, dict):
            continue
        for key in keys:
            value = block.get(key)
            if isinstance(value, str) and value and _is_relative_file(section, value, base):
                found.setdefault(section, {})[key] = os.path.abspath(base / value)
    return found


def _is_relative_file(section: str, value: str, base: Path) -> bool:
    if os.path.isabs(value):
        return False
    if section == "classify":  # labels: always a CSV or a folder
        return True
    return "/" in value or value.endswith(_CHECKPOINT_SUFFIXES) or (base / value).is_file()
