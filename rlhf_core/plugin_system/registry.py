"""Name -> component tables for every kind a plugin can register.

Two plugins may register the same name: the name is then *contested*. Nothing breaks until a
config selects it; then the config must say which plugin's component it means
(``{name: length, plugin: my-plugin}``), otherwise the lookup is an error naming both plugins.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from ..contracts import Stage
from ..errors import RegistryError

KINDS = ("stage", "loss", "reward", "advantage", "dataset", "tracker", "generator", "environment", "tool")
LOSS_FAMILIES = ("token", "score", "pairwise", "policy", "preference", "kto")
_HUMAN = {"stage": "stage", "loss": "loss", "reward": "reward", "advantage": "advantage estimator", "dataset": "dataset",
          "tracker": "tracker", "generator": "generator", "environment": "environment", "tool": "tool"}

#: Parameters the host passes itself, by component kind: never options a config can set.
HOST_PARAMETERS = {"stage": (), "dataset": (), "loss": ("backend",), "reward": ("ctx",), "advantage": (),
                   "tracker": ("run_dir", "config"), "generator": ("ctx", "policy", "tokenizer"), "environment": ("ctx",), "tool": ()}
#: Names an option may not have: what the host passes to any kind, and the keys of a component
#: mapping that are the host's (``{name: ..., plugin: ..., weight: ...}``).
RESERVED_OPTIONS = frozenset({p for names in HOST_PARAMETERS.values() for p in names} | {"name", "plugin", "weight"})


@dataclass
class Entry:
    """One registered component and the plugin that registered it."""

    kind: str
    name: str
    obj: Any
    plugin: str
    meta: dict[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, inspect.Parameter]:
        """The options a config may set: the keyword parameters with defaults of the component's
        function (or its class's ``__init__``), less what the host passes itself
        (:data:`HOST_PARAMETERS`). Each default is written once, there."""
        return {p.name: p for p in _keyword_defaults(self.obj) if p.name not in HOST_PARAMETERS.get(self.kind, ())}

    def with_defaults(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` as the component will see them: every option, the unset ones at their defaults."""
        return {**{name: p.default for name, p in self.options().items()}, **options}


def _keyword_defaults(obj: Any) -> list[inspect.Parameter]:
    """Keyword parameters with defaults of a function, or of a class's ``__init__``."""
    if inspect.isclass(obj):
        if obj.__init__ is object.__init__:
            return []
        target = obj.__init__
    elif callable(obj):
        target = obj
    else:
        return []
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p for p in params if p.default is not inspect.Parameter.empty
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


class Registry:
    """Components by kind and name; unknown and contested names raise errors that list choices."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, list[Entry]]] = {k: {} for k in KINDS}

    def add(self, kind: str, name: str, obj: Any, plugin: str, **meta: Any) -> None:
        """Register ``obj`` under ``name``. A name another plugin already registered becomes
        contested (see :meth:`conflicts`); the same plugin registering it twice is an error."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"plugin {plugin!r} registered a {_HUMAN[kind]} with an invalid name {name!r}")
        if kind == "loss" and meta.get("family") not in LOSS_FAMILIES:
            raise RegistryError(
                f"plugin {plugin!r} registered loss {name!r} with family {meta.get('family')!r}; "
                f"accepted: {', '.join(LOSS_FAMILIES)}"
            )
        if kind == "stage" and not (inspect.isclass(obj) and issubclass(obj, Stage)):
            raise RegistryError(f"plugin {plugin!r} registered stage {name!r} as {obj!r}; a stage is a subclass of "
                                "rlhf_core.Stage (see its docstring and the README's 'Writing a stage')")
        if kind not in ("stage", "dataset", "tool"):  # a tool's parameters are the policy's arguments, not options
            reserved = sorted(p.name for p in _keyword_defaults(obj)
                              if p.name in RESERVED_OPTIONS and p.name not in HOST_PARAMETERS[kind])
            if reserved:
                raise RegistryError(
                    f"plugin {plugin!r} registered {_HUMAN[kind]} {name!r} with an option named "
                    f"{', '.join(repr(r) for r in reserved)}, a name the host reserves ({', '.join(sorted(RESERVED_OPTIONS))}): "
                    "a config could never set it; rename the option")
        entries = self._tables[kind].setdefault(name, [])
        if any(e.plugin == plugin for e in entries):
            raise RegistryError(f"plugin {plugin!r} registered {_HUMAN[kind]} {name!r} twice")
        entries.append(Entry(kind, name, obj, plugin, dict(meta)))

    def conflicts(self) -> list[str]:
        """One line per contested name: which plugins registered it and how to choose."""
        out = []
        for kind, table in self._tables.items():
            for name, entries in sorted(table.items()):
                if len(entries) > 1:
                    plugins = " and ".join(repr(e.plugin) for e in entries)
                    out.append(
                        f"{_HUMAN[kind]} {name!r} is registered by plugins {plugins}; a config that uses it must "
                        f"pick one ({_pick_hint(kind, name, entries[0].plugin)}) or disable one plugin"
                    )
        return out

    def names(self, kind: str, family: str | None = None) -> list[str]:
        """Sorted names of ``kind`` (losses optionally filtered by family)."""
        return sorted(n for n, es in self._tables[kind].items()
                      if family is None or any(e.meta.get("family") == family for e in es))

    def entries(self, kind: str) -> list[Entry]:
        """All entries of ``kind`` sorted by name (every plugin's entry for a contested name)."""
        return [e for n in sorted(self._tables[kind]) for e in self._tables[kind][n]]

    def get(self, kind: str, name: str, family: str | tuple[str, ...] | None = None, *,
            plugin: str | None = None) -> Entry:
        """The entry for ``name`` (from ``plugin`` when given). An unknown name, a loss of the wrong
        family, or a contested name without ``plugin`` is an error listing what is available."""
        families = (family,) if isinstance(family, str) else family
        entries = self._tables[kind].get(name, [])
        allowed = sorted({n for f in families for n in self.names(kind, f)}) if families else self.names(kind)
        if not entries:
            raise RegistryError(f"unknown {_HUMAN[kind]} {name!r}; available: {', '.join(allowed) or '(none)'}")
        if plugin is not None:
            chosen = [e for e in entries if e.plugin == plugin]
            if not chosen:
                raise RegistryError(f"plugin {plugin!r} registers no {_HUMAN[kind]} {name!r}; it is registered by: "
                                    f"{', '.join(e.plugin for e in entries)}")
            entry = chosen[0]
        elif len(entries) > 1:
            raise RegistryError(
                f"{_HUMAN[kind]} {name!r} is registered by plugins {' and '.join(repr(e.plugin) for e in entries)}; "
                f"say which one: {_pick_hint(kind, name, entries[0].plugin)}"
            )
        else:
            entry = entries[0]
        if families and entry.meta.get("family") not in families:
            raise RegistryError(
                f"loss {name!r} is a {entry.meta.get('family')!r} loss, but this stage needs "
                f"{' or '.join(repr(f) for f in families)}; available: {', '.join(allowed) or '(none)'}"
            )
        return entry

    def lookup(self, kind: str, spec: Any, family: str | tuple[str, ...] | None = None) -> Entry:
        """:meth:`get` for a config's :class:`~rlhf_core.config.ComponentSpec` (its name and plugin)."""
        return self.get(kind, spec.name, family, plugin=getattr(spec, "plugin", None))


def _pick_hint(kind: str, name: str, plugin: str) -> str:
    if kind == "stage":
        return f"{{stage: {name}, plugin: {plugin}}}"
    return f"{{name: {name}, plugin: {plugin}}}"
