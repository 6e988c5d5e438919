"""Plugins found through Python entry points, one group per kind.

An entry point's object is either a factory, registered under the entry point's name, or a
*family*: an object with ``names()`` and ``create(name, **kwargs)`` that provides many names at
once (torchvision's classifiers, for example). Built-ins register exactly like third-party
plugins, in ``pyproject.toml``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["Registry", "PluginError", "import_object"]


class PluginError(LookupError):
    """An unknown or duplicate plugin name; the message lists what exists."""


class Registry:
    """The plugins of one entry-point group.

    Args:
        group: the entry-point group, for example ``"snakembed.backbones"``.
        kind: what a plugin of this group is, for messages (``"backbone"``).

    Example:
        >>> Registry("snakembed.heads", "head").names()
        ['knn', 'linear', 'pretrained']
    """

    def __init__(self, group: str, kind: str) -> None:
        self.group = group
        self.kind = kind
        self._extra: dict[str, Any] = {}

    def add(self, name: str, plugin: Any) -> None:
        """Register a plugin in this process (tests, notebooks); entry points are the usual way."""
        if name in self._entry_points() or name in self._extra:
            raise PluginError(f"{self.kind} {name!r} is already registered")
        self._extra[name] = plugin

    def _entry_points(self) -> dict[str, EntryPoint]:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=self.group):
            if ep.name in found and found[ep.name].value != ep.value:
                raise PluginError(
                    f"two plugins register the {self.kind} name {ep.name!r} in entry-point group "
                    f"{self.group!r}: {found[ep.name].value} and {ep.value}; uninstall one"
                )
            found[ep.name] = ep
        return found

    def _providers(self) -> dict[str, Any]:
        providers = {name: ep.load() for name, ep in self._entry_points().items()}
        providers.update(self._extra)
        return providers

    def _table(self, want: str | None = None) -> dict[str, tuple[str, Callable[..., Any]]]:
        """name -> (provider name, factory).

        Families are expanded only when needed (listing, or a name that no plain plugin has),
        and a lookup skips families whose ``prefix`` the name lacks and stops at the first
        family that has it, since asking a family for its names may import a large library
        (torchvision: 1.5 s, timm: 2.5 s).
        """
        providers = self._providers()
        plain = {n: (n, obj) for n, obj in providers.items() if not _is_family(obj)}
        if want is not None and want in plain:
            return plain
        table = dict(plain)
        for provider, obj in providers.items():
            if not _is_family(obj):
                continue
            if want is not None and not want.startswith(getattr(obj, "prefix", "")):
                continue  # a family whose names all start otherwise
            for name in obj.names():
                if name in table:
                    raise PluginError(
                        f"the {self.kind} name {name!r} is provided twice, by {table[name][0]!r} "
                        f"and by {provider!r}; uninstall one of them"
                    )
                table[name] = (provider, _bind(obj.create, name))
            if want is not None and want in table:
                return table
        return table

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._table())

    def factory(self, name: str) -> Callable[..., Any]:
        """The factory registered as ``name``.

        Raises:
            PluginError: for an unknown name, listing the known ones.
        """
        table = self._table(want=name)
        if name not in table:
            table = self._table()  # every family, to list what exists
        if name not in table:
            raise PluginError(f"unknown {self.kind} {name!r}; {_choices(name, self.kind, table)}")
        return table[name][1]


def _choices(name: str, kind: str, table: dict[str, tuple[str, Any]], limit: int = 40) -> str:
    """What exists: every name when few, else the closest names and each provider's count."""
    known = sorted(table)
    if len(known) <= limit:
        return f"known {kind}s: {', '.join(known)}"
    close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
    by_provider: dict[str, list[str]] = {}
    for known_name, (provider, _) in table.items():
        by_provider.setdefault(provider, []).append(known_name)
    parts = []
    for provider, names in sorted(by_provider.items()):
        names.sort()
        if names == [provider]:
            parts.append(provider)
        else:
            parts.append(f"{provider} ({len(names):,} names, {names[0]} … {names[-1]})")
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{hint}known: {'; '.join(parts)}; `snakembed list` shows every name"


def _is_family(obj: Any) -> bool:
    return hasattr(obj, "names") and hasattr(obj, "create")


def _bind(create: Callable[..., Any], name: str) -> Callable[..., Any]:
    def factory(**kwargs: Any) -> Any:
        return create(name, **kwargs)

    return factory


def import_object(path: str):
    """The class or function at ``package.module:Name``.

    Raises:
        ValueError: naming the problem and the fix (a bad form, a module that cannot be
            imported, a name the module does not have, listing the classes and functions it has).

    Example:
        >>> import_object("torch.nn:Linear").__name__
        'Linear'
    """
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not of the form `package.module:Name`")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way
        raise ValueError(
            f"cannot import {module_name!r} ({type(exc).__name__}: {exc}); install the package "
            "that holds it or put its folder on PYTHONPATH"
        ) from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and n[0] != "_")
            raise ValueError(
                f"{module_name!r} has no {attr!r}; its classes and functions: {', '.join(names)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not a class or function")
    return obj
