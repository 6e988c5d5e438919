"""Where the packaged workflow lies: its Snakefile, profiles and schema.

The workflow's files stay at the top of the repository (``Snakefile``, ``config.yaml``,
``workflow/``, ``scripts/``, ``envs/``, ``profiles/``); ``snakembed/_workflow`` links to them,
and a wheel holds copies of them there. Either way these functions give real paths, which
``snakemake --snakefile`` and a Snakemake ``module`` take.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PROFILES", "profile", "schema_file", "snakefile", "workflow_dir"]

#: The profiles that come with the workflow (``workflow/profiles/<name>``).
PROFILES = ("local", "slurm")


def workflow_dir() -> Path:
    """The folder that holds the workflow's Snakefile (the repository in a clone).

    Returns:
        An absolute path with links resolved: in a clone or an editable install the
        repository, in an installed wheel ``site-packages/snakembed/_workflow``.

    Example:
        >>> (workflow_dir() / "workflow" / "rules" / "common.smk").is_file()
        True
    """
    return (Path(__file__).parent / "_workflow" / "Snakefile").resolve().parent


def snakefile() -> Path:
    """The workflow's Snakefile, for ``snakemake --snakefile`` or a Snakemake module.

    Returns:
        Its absolute path.

    Example:
        >>> snakefile().name
        'Snakefile'
    """
    return workflow_dir() / "Snakefile"


def profile(name: str) -> Path:
    """The folder of a profile that comes with the workflow.

    Args:
        name: one of :data:`PROFILES`.

    Returns:
        Its absolute path, for ``snakemake --profile``.

    Example:
        >>> profile("slurm").name
        'slurm'
    """
    if name not in PROFILES:
        raise ValueError(f"no profile {name!r} comes with snakembed; choose one of {PROFILES}")
    return workflow_dir() / "workflow" / "profiles" / name


def schema_file() -> Path:
    """The config's JSON schema (every key, its description and its default).

    Returns:
        The path of ``workflow/schemas/config.schema.yaml``.

    Example:
        >>> schema_file().name
        'config.schema.yaml'
    """
    return workflow_dir() / "workflow" / "schemas" / "config.schema.yaml"
