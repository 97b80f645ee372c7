"""MkDocs hooks: the reference pages that come from the code, generated at every build.

- ``reference/config.md``: every config key with its type, default and documentation line, read
  from the config dataclasses (:mod:`rlhf_core.config.reference`);
- ``reference/components.md``: every registered component with its options and defaults.

The command-line reference (``mkdocs-click``) documents ``rlhf_core.cli.cli``; the commands that
plugins add (``rlhf bench``) are registered on it here first, as ``rlhf`` itself does.
"""
from __future__ import annotations

from typing import Any

import yaml
from mkdocs.structure.files import File, Files

from rlhf_core.cli import cli
from rlhf_core.config import StageSpec
from rlhf_core.config.reference import KeyDoc, component_rows, config_keys, field_docs, run_keys
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager

#: Component kinds in the order the components page lists them, with a sentence on how each is chosen.
KINDS = {
    "stage": "A pipeline entry's `stage:`. Options: see the [config reference](config.md).",
    "loss": "A stage's `loss:`; the family says which stage takes it (token: sft, score and pairwise: reward, "
            "policy: ppo).",
    "advantage": "`ppo.advantage:`. See [Algorithms](../algorithms.md) for the equations.",
    "reward": "`ppo.reward:` and `ppo.gold:`, and `rlhf eval --reward/--gold`.",
    "generator": "`ppo.generator:`. See [Rollout engines](../rollout-engines.md).",
    "environment": "`ppo.environment:`. See [Multi-turn episodes and tools](../recipes/multi-turn.md).",
    "tool": "`ppo.environment.tools:`. See [Multi-turn episodes and tools](../recipes/multi-turn.md#tools).",
    "tracker": "The top-level `tracking:` list. See [Experiment tracking](../tracking.md).",
    "dataset": "`data.train: builtin:NAME`.",
}


def on_config(config: Any) -> Any:
    """Let plugins add their commands to the CLI before ``mkdocs-click`` documents it."""
    if "bench" not in cli.commands:
        get_plugin_manager(entry_points=False).hook.rlhf_register_commands(cli=cli)
    return config


def on_files(files: Files, config: Any) -> Files:
    """Add the generated reference pages to the build."""
    registry = build_registry(get_plugin_manager(entry_points=False))
    files.append(File.generated(config, "reference/config.md", content=config_page(registry)))
    files.append(File.generated(config, "reference/components.md", content=components_page(registry)))
    return files


def _cell(text: str) -> str:
    """Table-safe text: a ``|`` would end the cell."""
    return text.replace("|", "or")


def _yaml(value: Any) -> str:
    """``value`` as one line of YAML flow style (``null``, ``[0.9, 0.999]``, ``{}``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _table(keys: list[KeyDoc]) -> list[str]:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key in keys:
        default = f"`{_cell(_yaml(key.default))}`"
        if key.section:
            default = "*(section)*" if key.default is not None else "`null` *(section)*"
        kind = _cell(key.type).replace("ComponentSpec", "component")  # a name or {name: ..., options}
        lines.append(f"| `{key.path}` | `{kind}` | {default} | {_cell(key.doc)} |")
    return lines


def config_page(registry: Any) -> str:
    """The config reference as Markdown."""
    out = [
        "# Config reference",
        "",
        "Generated from the config dataclasses at every docs build; a test fails when a key has no",
        "documentation line. Defaults are those a key takes when the config leaves it out (`rlhf run",
        "--print-config` shows a whole resolved config). A *component* is written `name` or",
        "`{name: NAME, OPTION: VALUE, ...}`; the [components page](components.md) lists every registered one",
        "with its options.",
        "",
        "## Top level",
        "",
        *_table(run_keys()),
        "",
        "## Every stage entry",
        "",
        "Each entry of `stages:` names its stage and holds that stage's options beside it:",
        "",
        "| key | meaning |",
        "| --- | --- |",
    ]
    docs = field_docs(StageSpec)
    out += [f"| `{name}` | {_cell(docs[name])} |" for name in ("stage", "name", "plugin")]
    for entry in registry.entries("stage"):
        out += ["", f"## Stage `{entry.name}`", "", f"Plugin `{entry.plugin}`. "
                + (entry.obj.config_class.__doc__ or "").strip(), "", *_table(config_keys(entry.obj.config_class()))]
    return "\n".join(out) + "\n"


def components_page(registry: Any) -> str:
    """Every registered component of the built-in plugins as Markdown."""
    out = [
        "# Components",
        "",
        "Generated from the plugin registry at every docs build (built-in plugins; `rlhf plugins` lists",
        "what is installed on your machine, third-party plugins included). Options are keyword arguments:",
        "`loss: {name: huber, delta: 2.0}`.",
    ]
    for kind, how in KINDS.items():
        out += ["", f"## {kind.capitalize()}s" if kind != "loss" else "## Losses", "", how, ""]
        if kind == "stage":
            out += ["| name | plugin | what it does |", "| --- | --- | --- |"]
            out += [f"| `{e.name}` | `{e.plugin}` | {_cell((e.obj.__doc__ or '').strip().splitlines()[0])} |"
                    for e in registry.entries("stage")]
            continue
        family = kind == "loss"
        out += ["| name | plugin |" + (" family |" if family else "") + " options (defaults) | what it does |",
                "| --- | --- |" + (" --- |" if family else "") + " --- | --- |"]
        for row in component_rows(registry, kind):
            options = ", ".join(f"`{k}: {_cell(_yaml(v))}`" for k, v in row["options"].items()) or "none"
            out.append(f"| `{row['name']}` | `{row['plugin']}` |" + (f" {row['family']} |" if family else "")
                       + f" {options} | {_cell(row['doc'])} |")
    return "\n".join(out) + "\n"
