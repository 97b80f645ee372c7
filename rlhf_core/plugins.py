"""Plugin manager factory: hookspecs -> blocked names -> built-ins -> entry points; a config's
``plugins:`` modules are added afterwards (:func:`add_modules`), so one manager serves a whole command.

Entry points (group ``rlhf``) load one at a time: a broken third-party plugin prints one line and
the host keeps working, unless ``RLHF_STRICT_PLUGINS=1``. ``RLHF_DISABLE_PLUGINS=a,b`` (or the CLI's
``--disable``) blocks plugins by name before they load.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass

import pluggy

from . import __version__, hookspecs
from .errors import UserError
from .registry import Registry, RegistryError

ENTRY_POINT_GROUP = "rlhf"
ENV_DISABLE = "RLHF_DISABLE_PLUGINS"
ENV_STRICT = "RLHF_STRICT_PLUGINS"

#: Built-in plugins, registered exactly like third-party ones.
BUILTINS = {
    "sft": "rlhf_plugins.sft",
    "reward": "rlhf_plugins.reward_regression",
    "ppo": "rlhf_plugins.ppo.stage",
    "ppo-losses": "rlhf_plugins.ppo.loss",
    "ppo-advantages": "rlhf_plugins.ppo.advantages",
    "ppo-rewards": "rlhf_plugins.ppo.rewards",
    "ppo-generators": "rlhf_plugins.ppo.generators",
    "letters": "rlhf_plugins.letters",
    "trackers": "rlhf_plugins.trackers",
    "vllm": "rlhf_plugins.vllm_engine",
    "bench": "rlhf_bench.commands",
}


class PluginLoadError(UserError, RuntimeError):
    """A plugin failed to import or register (raised in strict mode or for config modules)."""


@dataclass
class PluginInfo:
    """What ``rlhf plugins`` shows for one plugin."""

    name: str
    version: str
    source: str
    error: str = ""


def disabled_from_env() -> set[str]:
    """Plugin names listed in ``RLHF_DISABLE_PLUGINS`` (comma separated)."""
    return {n.strip() for n in os.environ.get(ENV_DISABLE, "").split(",") if n.strip()}


def get_plugin_manager(
    disabled: set[str] | frozenset[str] = frozenset(), modules: list[str] | tuple[str, ...] = (),
    entry_points: bool = True,
) -> pluggy.PluginManager:
    """Build a fresh manager. ``disabled`` adds to ``RLHF_DISABLE_PLUGINS``; ``modules`` are import
    paths of local plugin modules (a config's ``plugins:`` list). ``pm.rlhf_info`` holds a
    :class:`PluginInfo` per plugin, failures included."""
    pm = pluggy.PluginManager("rlhf")
    pm.add_hookspecs(hookspecs)
    pm.rlhf_info = {}
    version = __version__
    blocked = set(disabled) | disabled_from_env()
    for name in blocked:
        pm.set_blocked(name)
    strict = os.environ.get(ENV_STRICT, "") not in ("", "0")
    pm.rlhf_blocked = blocked
    for name, module in BUILTINS.items():
        if name not in blocked:
            pm.register(importlib.import_module(module), name=name)
            pm.rlhf_info[name] = PluginInfo(name, version, "builtin")
    if entry_points:
        _load_entry_points(pm, blocked, strict)
    _check_pending(pm)
    add_modules(pm, modules)
    return pm


def add_modules(pm: pluggy.PluginManager, modules: list[str] | tuple[str, ...]) -> pluggy.PluginManager:
    """Register local plugin modules (a config's ``plugins:`` list) by import path; a module that
    is already registered or disabled is skipped, one that fails to import is an error."""
    for module in modules:
        if module in pm.rlhf_blocked or pm.has_plugin(module):
            continue
        try:
            pm.register(importlib.import_module(module), name=module)
        except Exception as exc:
            raise PluginLoadError(f"plugin module {module!r} (config 'plugins') failed to import: {type(exc).__name__}: {exc}") from exc
        pm.rlhf_info[module] = PluginInfo(module, "-", "config module")
    _check_pending(pm)
    return pm


def _check_pending(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"{exc}; hooks must be one of: {', '.join(_hook_names())}") from exc


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("rlhf_"))


def _load_entry_points(pm: pluggy.PluginManager, blocked: set[str], strict: bool) -> None:
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in blocked or pm.has_plugin(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        dist_name, dist_version = (dist.metadata["Name"], dist.version) if dist is not None else ("?", "?")
        source = f"entry point of {dist_name}"
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:
            message = (
                f"plugin {ep.name!r} from {dist_name} {dist_version} failed to load: {type(exc).__name__}: {exc} "
                f"(disable it with {ENV_DISABLE}={ep.name} or 'rlhf --disable {ep.name}')"
            )
            if strict:
                raise PluginLoadError(message) from exc
            print(f"rlhf: warning: {message}", file=sys.stderr)
            pm.rlhf_info[ep.name] = PluginInfo(ep.name, dist_version, source, error=f"{type(exc).__name__}: {exc}")
            continue
        pm.rlhf_info[ep.name] = PluginInfo(ep.name, dist_version, source)


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Ask every plugin, one at a time, to register its components; errors name the plugin."""
    registry = Registry()
    hooks = [
        ("rlhf_register_stages", "stage"), ("rlhf_register_losses", "loss"), ("rlhf_register_rewards", "reward"),
        ("rlhf_register_advantages", "advantage"), ("rlhf_register_datasets", "dataset"),
        ("rlhf_register_trackers", "tracker"), ("rlhf_register_generators", "generator"),
    ]
    for hook_name, kind in hooks:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order
            plugin = impl.plugin_name

            def register(name, obj, _kind=kind, _plugin=plugin, **meta):
                registry.add(_kind, name, obj, _plugin, **meta)

            try:
                impl.function(register=register)
            except RegistryError:
                raise
            except Exception as exc:
                raise PluginLoadError(f"plugin {plugin!r} failed in {hook_name}: {type(exc).__name__}: {exc} "
                                      f"(disable it with {ENV_DISABLE}={plugin} or 'rlhf --disable {plugin}')") from exc
    return registry


def registered_by(registry: Registry, plugin: str) -> dict[str, list[str]]:
    """What ``plugin`` registered, by kind (for ``rlhf plugins``)."""
    from .registry import KINDS

    return {kind: [e.name for e in registry.entries(kind) if e.plugin == plugin] for kind in KINDS}
