"""Checking a configuration against the image tree and the plugins before any job runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .backbones import BACKBONES, WeightsError, is_local_weights
from .config import ConfigError, numbers_fingerprint, validate_config
from .heads import HEADS
from .images import ROOT_FOLDER, DiscoveryError, discover_folders
from .store import folder_stem

# The errors are re-exported so that callers can catch every planning error from here.
__all__ = ["ConfigError", "DiscoveryError", "Plan", "WeightsError", "plan_run"]


@dataclass
class Plan:
    """What the workflow will do.

    Attributes:
        images: the image root.
        results: the results folder.
        folders: ``{folder key: sorted image file names}``.
        stems: ``{file stem: folder key}`` (the ``{folder}`` wildcard's values).
        weights_file: the local checkpoint, when ``model.weights`` is one.
        numbers: everything that changes the embeddings (see ``numbers_fingerprint``).
    """

    images: Path
    results: Path
    folders: dict[str, list[str]]
    stems: dict[str, str]
    weights_file: str | None
    numbers: dict


def plan_run(config: dict) -> Plan:
    """Validate ``config``, discover the image folders and check the named plugins.

    Args:
        config: the workflow's configuration (defaults are filled in place).

    Returns:
        The plan.

    Raises:
        ConfigError: for anything that would make the run fail, naming the key and the fix.
        DiscoveryError: for an image tree that cannot be used.
    """
    validate_config(config)
    model = config["model"]
    for registry, name, key in (
        (BACKBONES, model["name"], "model.name"),
        (HEADS, config["classify"]["head"], "classify.head"),
    ):
        if key == "classify.head" and name == "none":
            continue
        try:
            registry.factory(name)
        except LookupError as exc:
            raise ConfigError(f"config key {key!r}: {exc}") from None
    weights_file = None
    if is_local_weights(model["weights"]):
        weights_file = model["weights"]
        if not Path(weights_file).is_file():
            raise ConfigError(
                f"config key 'model.weights': checkpoint {weights_file!r} does not exist; give an "
                "existing file, a weights name, `default` or `none`"
            )
    folders = discover_folders(config["images"], config["extensions"], exclude=config["results"])
    stems = {folder_stem(key): key for key in folders}
    if len(stems) != len(folders):
        raise DiscoveryError(
            f"images lie directly in {config['images']!r} and in a top-level folder named "
            f"{folder_stem(ROOT_FOLDER)!r}; move one of them"
        )
    return Plan(
        images=Path(config["images"]),
        results=Path(config["results"]),
        folders=folders,
        stems=stems,
        weights_file=weights_file,
        numbers=numbers_fingerprint(config),
    )
