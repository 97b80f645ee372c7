"""The generic type-coercion engine: plain YAML data -> typed dataclasses, every problem collected
with its dotted path and what is accepted."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

from .schema import ComponentSpec, component_keys, yaml_key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, ComponentSpec):
        extra = "".join(f", {k}: ..." for k in component_keys(tp) if k not in ("name", "plugin"))
        return f"a name or {{name: ...{extra}, options...}}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert YAML ``value`` to type ``tp``; append ``path: message`` to ``problems`` on failure."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(classes) == 1:  # e.g. LoraConfig | None: report its own field problems
            return coerce(classes[0], value, path, problems)
        lists = [a for a in args if typing.get_origin(a) is list]
        if isinstance(value, list) and len(lists) == 1:  # e.g. a reward list: report each item's own problems
            return coerce(lists[0], value, path, problems)
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = coerce(arg, value, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return []
        (item,) = typing.get_args(tp)
        return [coerce(item, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, ComponentSpec):
        if isinstance(value, str) and value:
            return tp(value)
        if isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]:
            plugin = value.get("plugin")
            if plugin is not None and not isinstance(plugin, str):
                problems.append(f"{path}.plugin: expected a plugin name, got {plugin!r}")
                return None
            keys = component_keys(tp)
            hints = typing.get_type_hints(tp)
            own = {k: coerce(hints[k], value[k], f"{path}.{k}", problems)
                   for k in keys if k not in ("name", "plugin") and k in value}
            options = {k: v for k, v in value.items() if k not in keys}
            return tp(value["name"], options, plugin, **own)
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        return coerce_dataclass(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string; accept any spelling Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _default_component(f: dataclasses.Field) -> ComponentSpec | None:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return default if isinstance(default, ComponentSpec) else None


def mentions(problem: str, names: set[str]) -> bool:
    """True when ``problem`` names one of the fields ``names`` (as a dotted-path segment or word)."""
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", problem) for n in names)


def _breaks(new: list[str]) -> bool:
    """Whether new problems leave a field without a usable value (an unknown key does not)."""
    return any(": unknown key;" not in p for p in new)


def coerce_dataclass(cls: type, value: Any, path: str, problems: list[str], broken: set[str] | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys are errors that list the known ones (or,
    for a key listed in the class's ``renamed`` mapping, the key it became).

    A field whose value cannot be used is left at its default and added to ``broken``; the
    dataclass's own ``problems()`` (value and cross-field checks) still run, and only what they say
    about a broken field is left out, so one pass reports every problem that can be known."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {value!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f.name): f for f in dataclasses.fields(cls) if f.init}
    hints = {yaml_key(name): hint for name, hint in hints.items()}
    kwargs = {}
    unusable: set[str] = set()
    for key, raw in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            moved = getattr(cls, "renamed", {}).get(key)
            if moved is not None:  # a key an earlier release had: say where it went
                problems.append(f"{sub}: unknown key; it moved to {moved} (see the changelog)")
            else:
                problems.append(f"{sub}: unknown key; accepted: {', '.join(sorted(fields))}")
            continue
        if isinstance(raw, dict) and "name" not in raw and _default_component(fields[key]) is not None:
            # Options set on a component the config left at its default: ``loss.clip_eps=0.1``.
            raw = {"name": _default_component(fields[key]).name, **raw}
        before = len(problems)
        out = coerce(hints[key], raw, sub, problems)
        if _breaks(problems[before:]):
            unusable.add(key)  # left at its default: no later check reads a value that failed
        else:
            kwargs[key] = out
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in kwargs]
    for name in required:
        if name not in unusable:
            problems.append(f"{path}.{name}: required" if path else f"{name}: required")
    if broken is not None:
        broken |= unusable
    if required:
        return None
    try:
        obj = cls(**{fields[key].name: value for key, value in kwargs.items()})
    except (TypeError, ValueError) as exc:
        problems.append(f"{path or 'config'}: {exc}")
        return None
    if hasattr(obj, "problems"):
        found = [p for p in obj.problems() if not mentions(p, unusable)]
        problems.extend(f"{path}.{p}" if path else p for p in found)
    return obj
