"""The config reference, read from the code: every key of a config dataclass with its type, default
and documentation line, and every registered component with its options.

A field's documentation is the string literal written right below it (an attribute docstring, the
form Python tools such as mkdocstrings read):

    lr: float = 1e-4
    \"\"\"AdamW learning rate.\"\"\"

The docs site renders :func:`config_keys` and :func:`component_rows` into its reference pages, and
a test fails when a key has no documentation line.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

from .schema import ComponentSpec, RunConfig, to_plain, yaml_key


@dataclass
class KeyDoc:
    """One config key: its dotted ``path``, annotated ``type``, ``default`` (plain YAML data) and
    ``doc``; a ``section`` (a nested dataclass such as ``train``) has its keys listed after it."""

    path: str
    type: str
    default: Any
    doc: str
    section: bool = False


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``field name -> documentation`` from the attribute docstrings in the source of ``cls`` and
    of the dataclasses it extends (a subclass's own line wins; one paragraph, whitespace
    collapsed); a field without one is absent."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # the class statement's body
        for stmt, following in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def config_keys(config: Any, prefix: str = "") -> list[KeyDoc]:
    """Every key of the config dataclass instance ``config`` (nested sections flattened to dotted
    paths; defaults are ``config``'s own values, so a stage's ``train.lr`` shows that stage's
    default). An optional section (``model.lora``) is listed with its keys under it."""
    docs = field_docs(type(config))
    out: list[KeyDoc] = []
    for f in dataclasses.fields(config):
        path = f"{prefix}{yaml_key(f.name)}"
        value = getattr(config, f.name)
        if value is None:
            section = _optional_section(f.type, type(config))
        else:
            section = value if dataclasses.is_dataclass(value) and not isinstance(value, ComponentSpec) else None
        out.append(KeyDoc(path, str(f.type), to_plain(value), docs.get(f.name, ""), section is not None))
        if section is not None:
            out += config_keys(section, f"{path}.")
    return out


def _optional_section(annotation: Any, owner: type) -> Any:
    """A default instance of the dataclass in an ``X | None`` annotation (``lora: LoraConfig | None``),
    else None."""
    if not isinstance(annotation, str):
        return None
    module = inspect.getmodule(owner)
    for part in annotation.replace(" ", "").split("|"):
        candidate = getattr(module, part, None)
        if dataclasses.is_dataclass(candidate) and not issubclass(candidate, ComponentSpec):
            return _defaults_of(candidate)
    return None


#: The default shown for a key that has none (``distill.teacher``).
REQUIRED = "(required)"


def _defaults_of(cls: type) -> Any:
    """An instance of dataclass ``cls`` holding its defaults, :data:`REQUIRED` where a field has none
    (not a valid config: it only lists the keys)."""
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = REQUIRED
        object.__setattr__(obj, f.name, value)
    return obj


def run_keys() -> list[KeyDoc]:
    """The top-level keys of a run (``stages`` entries are documented per stage)."""
    return [k for k in config_keys(RunConfig()) if k.path != "stages"]


def component_rows(registry: Any, kind: str) -> list[dict[str, Any]]:
    """The registered components of ``kind``: ``name``, ``plugin``, ``family`` (losses), ``options``
    (``name -> default``) and ``doc`` (the first line of the component's docstring)."""
    rows = []
    for entry in registry.entries(kind):
        doc = inspect.getdoc(entry.obj) or ""
        rows.append({
            "name": entry.name, "plugin": entry.plugin, "family": entry.meta.get("family"),
            "options": {name: to_plain(p.default) for name, p in entry.options().items()},
            "doc": doc.split("\n\n")[0].replace("\n", " "),
        })
    return rows
