"""Name -> component tables for every kind a plugin can register."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

KINDS = ("stage", "loss", "reward", "advantage", "dataset")
LOSS_FAMILIES = ("token", "score", "pairwise", "policy")
_HUMAN = {"stage": "stage", "loss": "loss", "reward": "reward", "advantage": "advantage estimator", "dataset": "dataset"}


class RegistryError(ValueError):
    """A duplicate, unknown or malformed component."""


@dataclass
class Entry:
    """One registered component and the plugin that registered it."""

    kind: str
    name: str
    obj: Any
    plugin: str
    meta: dict[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, inspect.Parameter]:
        """The keyword options a config may set: keyword parameters with defaults (not the
        host-supplied ``ctx`` and ``backend``)."""
        target = self.obj.__init__ if inspect.isclass(self.obj) else self.obj
        params = inspect.signature(target).parameters.values()
        return {
            p.name: p for p in params
            if p.default is not inspect.Parameter.empty and p.name not in ("backend", "self", "ctx")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }


class Registry:
    """Components by kind and name; duplicates and unknown names raise errors that list choices."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}

    def add(self, kind: str, name: str, obj: Any, plugin: str, **meta: Any) -> None:
        """Register ``obj`` under ``name``; a name registered twice names both plugins."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"plugin {plugin!r} registered a {_HUMAN[kind]} with an invalid name {name!r}")
        if kind == "loss" and meta.get("family") not in LOSS_FAMILIES:
            raise RegistryError(
                f"plugin {plugin!r} registered loss {name!r} with family {meta.get('family')!r}; "
                f"accepted: {', '.join(LOSS_FAMILIES)}"
            )
        table = self._tables[kind]
        if name in table:
            raise RegistryError(
                f"{_HUMAN[kind]} {name!r} is registered twice: by plugin {table[name].plugin!r} and by "
                f"plugin {plugin!r}; disable one of them (RLHF_DISABLE_PLUGINS=NAME or --disable NAME)"
            )
        table[name] = Entry(kind, name, obj, plugin, dict(meta))

    def names(self, kind: str, family: str | None = None) -> list[str]:
        """Sorted names of ``kind`` (losses optionally filtered by family)."""
        return sorted(n for n, e in self._tables[kind].items() if family is None or e.meta.get("family") == family)

    def entries(self, kind: str) -> list[Entry]:
        """All entries of ``kind`` sorted by name."""
        return [self._tables[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str, family: str | tuple[str, ...] | None = None) -> Entry:
        """The entry for ``name``; an unknown name or a loss of the wrong family lists what is available."""
        families = (family,) if isinstance(family, str) else family
        entry = self._tables[kind].get(name)
        allowed = sorted(n for f in families for n in self.names(kind, f)) if families else self.names(kind)
        if entry is None:
            raise RegistryError(f"unknown {_HUMAN[kind]} {name!r}; available: {', '.join(allowed) or '(none)'}")
        if families and entry.meta.get("family") not in families:
            raise RegistryError(
                f"loss {name!r} is a {entry.meta.get('family')!r} loss, but this stage needs "
                f"{' or '.join(repr(f) for f in families)}; available: {', '.join(allowed) or '(none)'}"
            )
        return entry
