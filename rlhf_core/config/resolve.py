"""Validation of a whole run: the schema, each stage's own ``config_class`` and ``validate``, every
component name and its options against the registry."""
from __future__ import annotations

import inspect
import typing
from typing import Any

from .coerce import coerce, coerce_dataclass, mentions
from ..errors import ConfigError
from .schema import ComponentSpec, RunConfig, StageSpec


def check_options(entry: Any, spec: ComponentSpec, path: str, problems: list[str]) -> None:
    """Check a component's options against the keyword parameters it accepts (and their types)."""
    accepted = entry.options()
    hints: dict[str, Any] = {}
    try:
        target = entry.obj.__init__ if inspect.isclass(entry.obj) else entry.obj
        hints = typing.get_type_hints(target)
    except Exception:  # plugin annotations that do not resolve: check names only
        pass
    before = len(problems)
    for key, value in spec.options.items():
        if key not in accepted:
            choices = ", ".join(sorted(accepted)) or "(no options)"
            problems.append(f"{path}.{key}: unknown option for {entry.kind} {spec.name!r}; accepted: {choices}")
        elif key in hints:
            spec.options[key] = coerce(hints[key], value, f"{path}.{key}", problems)
    if len(problems) > before:
        return
    # Values: the component's own ``check_options(**options)``, called with every option (the unset
    # ones at the defaults its signature declares, so it repeats none); an advantage estimator (built
    # from its options alone) is simply constructed. Either raises ValueError with a readable message.
    check = getattr(entry.obj, "check_options", None)
    options = entry.with_defaults(spec.options)
    if check is None and entry.kind == "advantage":
        check, options = entry.obj, spec.options
    if check is None:
        return
    try:
        check(**options)
    except (ValueError, TypeError) as exc:
        problems.append(f"{path}: {exc}")
    except Exception as exc:  # a plugin's validator that crashed: still one line, naming the plugin
        problems.append(f"{path}: {entry.kind} {spec.name!r} of plugin {entry.plugin!r} failed to check its "
                        f"options: {type(exc).__name__}: {exc}")


def _cross_field(stage: Any, stage_cfg: Any, registry: Any, run: RunConfig, broken: set[str], path: str) -> list[str]:
    """The stage's ``validate`` problems, in the same pass as the schema's. Checks that involve a
    broken field (or component) are left out and one line says which were skipped."""
    try:
        said = stage.validate(stage_cfg, registry, run)
    except Exception:
        if not broken:
            raise
        said = None  # the checks could not run without the broken fields
    found = [f"{path}.{p}" for p in said or [] if not mentions(p, broken)]
    if said is None or len(found) < len(said):
        names = ", ".join(sorted(broken))
        found.append(f"{path}: cross-field checks that need {names} were skipped until "
                     f"{'it is' if len(broken) == 1 else 'they are'} fixed")
    return found


def resolve(data: dict, registry: Any, source: str = "config") -> RunConfig:
    """Validate ``data`` against the run schema, each stage's ``config_class`` and the registry."""
    problems: list[str] = []
    stages_raw = data.get("stages", None)
    top = {k: v for k, v in data.items() if k != "stages"}
    config = coerce_dataclass(RunConfig, top, "", problems) or RunConfig()
    for i, spec in enumerate(config.tracking or []):
        if spec is None:
            continue
        try:
            check_options(registry.lookup("tracker", spec), spec, f"tracking[{i}]", problems)
        except ValueError as exc:
            problems.append(f"tracking[{i}]: {exc}")
    if not isinstance(stages_raw, list) or not stages_raw:
        problems.append("stages: expected a non-empty list of stages, e.g. [{stage: sft}, {stage: reward}]")
        stages_raw = []
    seen: set[str] = set()
    for i, raw in enumerate(stages_raw):
        path = f"stages[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("stage"), str):
            problems.append(f"{path}: expected a mapping with a 'stage' key naming a stage plugin; available: "
                            f"{', '.join(registry.names('stage'))}")
            continue
        plugin = raw.get("plugin")
        if plugin is not None and not isinstance(plugin, str):
            problems.append(f"{path}.plugin: expected a plugin name, got {plugin!r}")
            continue
        try:
            entry = registry.get("stage", raw["stage"], plugin=plugin)
        except ValueError as exc:
            problems.append(f"{path}.stage: {exc}")
            continue
        name = raw.get("name") or raw["stage"]
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            problems.append(f"{path}.name: expected a plain name (it becomes a directory), got {name!r}")
            continue
        if name in seen:
            problems.append(f"{path}.name: stage name {name!r} is used twice; give each stage a unique 'name'")
        seen.add(name)
        options = {k: v for k, v in raw.items() if k not in ("stage", "name", "plugin")}
        broken: set[str] = set()  # fields (and components) whose value cannot be used
        stage_cfg = coerce_dataclass(entry.obj.config_class, options, path, problems, broken)
        if stage_cfg is None:
            continue
        stage = entry.obj()
        try:
            components = stage.components(stage_cfg)
        except Exception:
            if not broken:
                raise
            components = []  # a half-parsed config; its problems are already listed
        for use in components:
            if use.spec is None:
                continue
            before = len(problems)
            try:
                comp = registry.lookup(use.kind, use.spec, use.families)
            except ValueError as exc:
                problems.append(f"{path}.{use.path}: {exc}")
            else:
                check_options(comp, use.spec, f"{path}.{use.path}", problems)
            if len(problems) > before:
                broken.add(use.path.split(".")[0])
        problems.extend(_cross_field(stage, stage_cfg, registry, config, broken, path))
        config.stages.append(StageSpec(raw["stage"], name, stage_cfg, plugin))
    if problems:
        raise ConfigError(problems, source)
    return config
