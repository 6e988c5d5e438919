"""The configuration: defaults, validation, and the fingerprint of what changes the numbers.

The schema lives beside the workflow (``workflow/schemas/config.schema.yaml``), which the package
carries (:mod:`snakembed.workflow`), so the CLI and the workflow read the very same defaults.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .workflow import schema_file

__all__ = [
    "RESOLVED_KEYS",
    "ConfigError",
    "describe_defaults",
    "library_versions",
    "load_config",
    "merge_config",
    "numbers_fingerprint",
    "resolved",
    "unused_model_keys",
    "validate_config",
]


#: The config keys that ``auto`` leaves to where the run is planned (see :func:`resolved`).
RESOLVED_KEYS = ("device", "precision", "decode", "compile")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


def _schema() -> dict:
    return yaml.safe_load(schema_file().read_text())


def _fill_defaults(schema: dict, instance: dict) -> None:
    """Fill missing keys from the schema's defaults, recursing into nested objects."""
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and isinstance(instance.get(key), dict):
            _fill_defaults(sub, instance[key])


_WORDS = {
    "true": True,
    "yes": True,
    "false": False,
    "no": False,
    "null": None,
    "none": None,
    "~": None,
    "": None,
}


def _coerce_words(schema: dict, instance: dict) -> None:
    """``--config key=true`` arrives as the string 'true', and nested values as strings:
    turn such strings into the boolean, null or number that the schema asks for, and a whole
    float where an integer is asked for (``max_pixels=1e6``) into that integer, so that the
    settings, and so the decision to recompute, do not depend on how a number was written."""
    for key, sub in schema.get("properties", {}).items():
        value = instance.get(key)
        if key in instance and value is None and sub.get("type") == "object":
            instance[key] = value = {}  # a section whose keys are all commented out
        if isinstance(value, dict) and "properties" not in sub:
            instance[key] = _scalar(value)  # free-form (kwargs)
        elif isinstance(value, dict):
            _coerce_words(sub, value)
        elif isinstance(value, list) and isinstance(sub.get("items"), dict):
            instance[key] = [_typed(v, sub["items"]) for v in value]
        elif key in instance:
            instance[key] = _typed(value, sub)


def _typed(value, schema: dict):
    if isinstance(value, str):
        return _from_word(value, schema)
    types = _types(schema)
    if isinstance(value, float) and value.is_integer() and "integer" in types:
        return value if "number" in types else int(value)
    return value


def _types(schema: dict) -> list[str]:
    types = schema.get("type", [])
    return [types] if isinstance(types, str) else types


def _scalar(value):
    """A string that YAML reads as a number, boolean or null becomes one, also inside lists and
    mappings (``--config`` gives them all as strings); anything else stays."""
    if isinstance(value, dict):
        return {k: _scalar(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scalar(v) for v in value]
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, int | float | bool) or parsed is None else value


def _from_word(value: str, schema: dict):
    types = _types(schema)
    word = value.strip().lower()
    if word in _WORDS:
        meaning = _WORDS[word]
        if (meaning is None and "null" in types) or (
            isinstance(meaning, bool) and "boolean" in types
        ):
            return meaning
    if "integer" in types or "number" in types:
        for parse in (int, float):
            try:
                return _typed(parse(word), schema)
            except ValueError:
                continue
    return value


def validate_config(config: dict) -> dict:
    """Validate ``config`` against the schema and fill in every default (in place).

    Args:
        config: a configuration dictionary, possibly partial.

    Returns:
        The same dictionary, complete.

    Raises:
        ConfigError: naming the key, the bad value and what is allowed.

    Example:
        >>> validate_config({"batch_size": 8})["model"]["name"]
        'efficientnet_lite0'
    """
    schema = _schema()
    _coerce_words(schema, config)
    _fill_defaults(schema, config)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    lines = []
    for err in errors:
        if err.validator == "additionalProperties":
            lines += _unknown_keys(err)
            continue
        section = _section_for(err)
        help_ = "" if section else _description(schema, list(err.absolute_path))
        lines.append(
            f"config key {_key(err.absolute_path)!r}: {section or _message(err)}"
            + (f" ({help_})" if help_ else "")
        )
    named = {tuple(err.absolute_path) for err in errors}
    lines += [
        f"config key {_key(path)!r}: {value!r} is not a number: give a finite one"
        for path, value in _leaves(config)
        if isinstance(value, float) and not math.isfinite(value) and path not in named
    ]
    if lines:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    if config["model"]["name"] != "custom":
        # used only by a custom network: left from another config, they change nothing, and so
        # must not change the settings that decide what is recomputed (see unused_model_keys)
        config["model"].update(copy.deepcopy(_CUSTOM_ONLY))
    return config


#: The ``model`` keys that only ``name: custom`` uses, with their defaults.
_CUSTOM_ONLY = {"module": None, "kwargs": {}}


def unused_model_keys(config: dict) -> list[str]:
    """The keys of ``config["model"]`` (not yet validated) that only a custom network uses, set
    for another network: validation clears them, and the workflow says so.

    Example:
        >>> unused_model_keys({"model": {"name": "resnet18", "kwargs": {"width": 8}}})
        ['model.kwargs']
    """
    model = config.get("model")
    if not isinstance(model, dict) or model.get("name") == "custom":
        return []
    return [f"model.{key}" for key in _CUSTOM_ONLY if model.get(key)]


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def _leaves(value, path: tuple = ()):
    """Every (path, value) below ``value`` that is neither a mapping nor a list."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _leaves(sub, (*path, key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _leaves(sub, (*path, i))
    else:
        yield path, value


def _unknown_keys(err) -> list[str]:
    """One line per key the schema does not know: a dotted key's section (``model.name`` is
    ``name`` in ``model``), the sections that hold a key of that name (``pool`` is in
    ``model``), the closest known key, or else every key that is known there."""
    properties = err.schema.get("properties", {})
    known = sorted(properties)
    lines = []
    for name in sorted(set(err.instance) - set(known), key=str):
        section, dot, sub = str(name).partition(".")
        holders = [k for k, sub in properties.items() if name in sub.get("properties", {})]
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        before, colon, after = str(name).partition(":")
        if dot and section in known:
            inside = sorted(properties[section].get("properties", {}))
            sub = (difflib.get_close_matches(sub, inside, n=1, cutoff=0.6) or [sub])[0]
            fix = f"give it inside its section, as {section}: {{{sub}: VALUE}}"
        elif colon and before in known:  # {name:resnet18} is one key in YAML
            fix = f"put a space after the colon, as {{{before}: {after}}}"
        elif holders:
            fix = f"it belongs in {' or '.join(holders)}, as {holders[0]}: {{{name}: VALUE}}"
        elif close:
            fix = f"did you mean {close[0]!r}?"
        else:
            fix = f"known keys here: {', '.join(known)}"
        lines.append(f"config key {_key([*err.absolute_path, name])!r} is unknown: {fix}")
    return lines


def _message(err) -> str:
    """The validator's message, or for a key that takes ``auto`` or another type (``batch_size``,
    ``worker.shared``) both choices, which the message of its pattern alone would hide."""
    if err.validator in ("pattern", "type") and err.schema.get("pattern") == "^auto$":
        words = {"integer": ["an integer"], "boolean": ["true", "false"], "number": ["a number"]}
        if "minimum" in err.schema:
            words["integer"] = [f"an integer of at least {err.schema['minimum']}"]
        choices = ["auto"]
        for kind in err.schema.get("type", []):
            choices += words.get(kind, [])
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        return f"{err.instance!r} is not allowed: use {listed}"
    return err.message


def _section_for(err) -> str:
    """For one value given where a section is asked for (``worker: false``, ``model:
    resnet18``), the section's first key that takes it: ``give worker: {enabled: false}``."""
    if err.validator != "type" or err.validator_value != "object":
        return ""
    for name, sub in err.schema.get("properties", {}).items():
        if jsonschema.Draft202012Validator(sub).is_valid(err.instance):
            return (
                f"{err.instance!r} is not a section: give {_key(err.absolute_path)}: "
                f"{{{name}: {_inline_yaml(err.instance)}}}"
            )
    return ""


def _description(schema: dict, path: list) -> str:
    """The description of the deepest schema property along ``path``: what is allowed."""
    found = ""
    for part in path:
        schema = schema.get("properties", {}).get(part, {}) if isinstance(part, str) else {}
        found = " ".join(schema.get("description", "").split()) or found
    return found


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a YAML config file (optional), apply overrides, validate and fill defaults.

    Args:
        path: a YAML file, or None for the defaults alone.
        overrides: nested keys that replace the file's values.

    Returns:
        The complete configuration.

    Example:
        >>> load_config(overrides={"classify": {"topk": 3}})["classify"]["topk"]
        3
    """
    config: dict = {}
    if path is not None:
        path = Path(path)
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise ConfigError(
                f"config file {path} is not valid YAML{where}: {problem}; fix the file "
                "(`snakembed config` prints a valid one)"
            ) from exc
        if not isinstance(config, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {config!r}")
    merge_config(config, overrides or {})
    return validate_config(config)


def describe_defaults(width: int = 96) -> str:
    """The default configuration as YAML, each key under its description as a comment.

    Args:
        width: the longest comment line.

    Returns:
        A config file that, as it is, gives the defaults: a start for ``--configfile``.

    Example:
        >>> text = describe_defaults()
        >>> yaml.safe_load(text) == validate_config({})
        True
        >>> "threads: 2" in text.splitlines()
        True
    """
    schema = _schema()
    lines = [f"# {line}" for line in textwrap.wrap(" ".join(schema["description"].split()), width)]
    _describe(schema, lines, "", width)
    return "\n".join(lines) + "\n"


def _describe(schema: dict, lines: list[str], indent: str, width: int) -> None:
    for key, sub in schema["properties"].items():
        text = " ".join(sub.get("description", "").split())
        if not indent:
            lines.append("")
        lines += [f"{indent}# {line}" for line in textwrap.wrap(text, width - len(indent))]
        if sub.get("type") == "object" and "properties" in sub:
            lines.append(f"{indent}{key}:")
            _describe(sub, lines, indent + "  ", width)
        else:
            lines.append(f"{indent}{key}: {_inline_yaml(sub['default'])}")


def _inline_yaml(value) -> str:
    """``value`` as YAML on one line: ``false``, ``[.jpg, .png]``, ``{enabled: false}``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n...\n").strip()


def merge_config(base: dict, extra: dict) -> dict:
    """Merge ``extra`` into ``base`` (in place) as Snakemake merges ``--configfile`` and
    ``--config`` over a workflow's config: nested blocks key by key, anything else replaced.

    Args:
        base: the configuration to change.
        extra: the keys that take precedence.

    Returns:
        ``base``.

    Example:
        >>> merge_config({"model": {"name": "resnet18", "layer": "pre_logits"}},
        ...              {"model": {"name": "resnet50"}})
        {'model': {'name': 'resnet50', 'layer': 'pre_logits'}}
    """
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def library_versions() -> dict[str, str]:
    """Versions of the libraries that change the numbers, read without importing them (once
    per process: the libraries a process has loaded do not change while it runs).

    Returns:
        ``{"snakembed": ..., "torch": ..., "torchvision": ..., "timm": ...}``.
    """
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("snakembed", "torch", "torchvision", "timm"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolved(config: dict, *, gpu: bool | None = None) -> dict:
    """``config`` with ``device``, ``precision``, ``decode`` and ``compile`` concrete (see
    :func:`snakembed.devices.resolve_compute`): itself when they are, else a copy.

    Args:
        config: a validated configuration.
        gpu: whether the computing machine has a GPU; None asks torch here.

    Example:
        >>> c = resolved(validate_config({"precision": "fp32"}), gpu=False)
        >>> c["device"], c["precision"], c["compile"]
        ('cpu', 'fp32', False)
    """
    from .devices import resolve_compute

    compute = resolve_compute(
        config["device"],
        config["precision"],
        config["decode"],
        compile=config.get("compile", "auto"),
        gpu=gpu,
    ).to_dict()
    concrete = {key: compute[key] for key in RESOLVED_KEYS}
    if all(config.get(key) == value for key, value in concrete.items()):
        return config
    return {**config, **concrete}


def numbers_fingerprint(config: dict) -> dict[str, Any]:
    """Everything in a config that changes the stored embeddings, plus library versions.

    The workflow passes this as rule ``params`` so that Snakemake recomputes every folder when
    the model, its weights, the preprocessing, the patches, the kind of device, the precision, the
    decoder or a library version change. ``auto`` device, precision and decoder count as what
    they resolve to here (the workflow resolves them first, where it plans), so ``auto`` on a
    CPU and ``fp32`` give the same fingerprint, and ``auto`` on a GPU another.

    Args:
        config: a validated configuration.

    Returns:
        A JSON-serialisable dict with the relevant keys and a short ``hash`` of them.
    """
    from .devices import device_type

    config = resolved(config)
    relevant = {
        "model": config["model"],
        "preprocess": config["preprocess"],
        "patches": config["patches"],
        "device": device_type(config["device"]),
        "precision": config["precision"],
        "decode": config["decode"],
        "extensions": sorted(e.lower() for e in config["extensions"]),
        "max_pixels": config["max_pixels"],
        "versions": library_versions(),
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
    return {**relevant, "hash": digest}
