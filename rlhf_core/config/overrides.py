"""Loading: a YAML file (or the embedded default) plus ``--set KEY.PATH=VALUE`` overrides, as plain data."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected KEY.PATH=VALUE"], "command line")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError([f"--set {text!r}: empty key"], "command line")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        if not raw.lstrip().startswith(("[", "{", '"', "'")):
            return key.split("."), raw  # a plain word YAML cannot start with, such as @sft: the text itself
        raise ConfigError([f"--set {key}: the value {raw!r} is not valid YAML ({getattr(exc, 'problem', exc)}); "
                           "quote it, e.g. --set 'KEY=[0.9, 0.95]'"], "command line") from None
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    """Set ``value`` at ``keys`` in ``data``; stages can be addressed by index or by name."""
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key, keys[: i + 1])
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError([f"--set {'.'.join(keys)}: {'.'.join(keys[:i])} is not a mapping"], "command line")
        if last:
            node[key] = value
        else:
            current = node.get(key)
            if isinstance(current, str):
                # A component written as a bare name: ``loss: mse`` + ``loss.delta=2`` keeps the name.
                node[key] = {"name": current}
            elif current is None:
                node[key] = {}
            elif not isinstance(current, (dict, list)):
                raise ConfigError([f"--set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is {current!r}, not a mapping"],
                                  "command line")
            node = node[key]


def _list_index(node: list, key: str, where: list[str]) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    for j, item in enumerate(node):
        if isinstance(item, dict) and (item.get("name") or item.get("stage")) == key:
            return j
    names = [str(it.get("name") or it.get("stage")) for it in node if isinstance(it, dict)]
    raise ConfigError(
        [f"--set {'.'.join(where)}: no list entry {key!r}; use an index below {len(node)} or a name: {', '.join(names)}"],
        "command line",
    )


def load_raw(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """Read YAML (or the embedded default when ``path`` is None) and apply ``--set`` overrides."""
    if path is None:
        text, source = default_config_text(), "embedded default config"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{p}: no such file"], str(p))
        text, source = p.read_text(encoding="utf-8"), str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}invalid YAML: {getattr(exc, 'problem', exc)}"], source) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
    data = copy.deepcopy(data)
    for text_override in overrides:
        keys, value = parse_override(text_override)
        apply_override(data, keys, value)
    return data


def default_config_text() -> str:
    """The embedded default pipeline (what ``rlhf run`` with no config runs)."""
    return (Path(__file__).parent.parent / "configs" / "default.yaml").read_text(encoding="utf-8")
