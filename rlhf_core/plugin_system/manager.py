"""Plugin manager factory: hookspecs -> blocked names -> built-ins -> entry points; a config's
``plugins:`` modules are added afterwards (:func:`add_modules`), so one manager serves a whole command.

Entry points (group ``rlhf``) load one at a time: a broken third-party plugin prints one line and
the host keeps working, unless ``RLHF_STRICT_PLUGINS=1``. ``RLHF_DISABLE_PLUGINS=a,b`` (or the CLI's
``--disable``) blocks plugins by name before they load.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pluggy

from ..version import __version__
from . import hookspecs
from ..errors import PluginLoadError, RegistryError
from .registry import KINDS, Registry

ENTRY_POINT_GROUP = "rlhf"
ENV_DISABLE = "RLHF_DISABLE_PLUGINS"
ENV_STRICT = "RLHF_STRICT_PLUGINS"

#: The registration hooks and the component kind each fills, in the order the registry is built.
REGISTRATION_HOOKS = {
    "rlhf_register_stages": "stage", "rlhf_register_losses": "loss", "rlhf_register_rewards": "reward",
    "rlhf_register_advantages": "advantage", "rlhf_register_datasets": "dataset",
    "rlhf_register_trackers": "tracker", "rlhf_register_generators": "generator",
    "rlhf_register_environments": "environment", "rlhf_register_tools": "tool",
}

#: Built-in plugins, registered exactly like third-party ones.
BUILTINS = {
    "sft": "rlhf_plugins.sft",
    "reward": "rlhf_plugins.reward",
    "ppo": "rlhf_plugins.ppo.stage",
    "ppo-losses": "rlhf_plugins.ppo.loss",
    "ppo-advantages": "rlhf_plugins.ppo.advantages",
    "ppo-rewards": "rlhf_plugins.ppo.rewards",
    "ppo-generators": "rlhf_plugins.ppo.generators",
    "ppo-environments": "rlhf_plugins.ppo.environments",
    "tools": "rlhf_plugins.tools",
    "preference": "rlhf_plugins.preference.stage",
    "preference-losses": "rlhf_plugins.preference.losses",
    "rewards-verifiable": "rlhf_plugins.rewards.verifiable",
    "rewards-remote": "rlhf_plugins.rewards.remote",
    "rewards-judge": "rlhf_plugins.rewards.judge",
    "rewards-code": "rlhf_plugins.rewards.code",
    "letters": "rlhf_plugins.letters",
    "arith": "rlhf_plugins.arith",
    "trackers": "rlhf_plugins.trackers",
    "vllm": "rlhf_plugins.vllm_engine",
    "bench": "rlhf_bench.commands",
}


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


def locate_modules(entries: list[str] | tuple[str, ...], base_dir: Path | None) -> list[str]:
    """The ``plugins:`` entries as :func:`add_modules` loads them: a path to a ``.py`` file (relative
    to ``base_dir``, the config file's directory) or a module name that names a ``.py`` file in
    ``base_dir`` becomes that file's absolute path (so a resumed run finds it again from the run's
    ``config.yaml``); any other name stays an import path."""
    out = []
    for entry in entries:
        path = Path(entry)
        if entry.endswith(".py"):
            out.append(str((base_dir or Path.cwd()) / path if not path.is_absolute() else path))
        elif base_dir is not None and (base_dir / f"{entry}.py").is_file():
            out.append(str((base_dir / f"{entry}.py").resolve()))
        else:
            out.append(entry)
    return out


def _import_plugin(entry: str) -> tuple[str, ModuleType]:
    """``(plugin name, module)`` for an import path or a ``.py`` file path (imported under its file
    name, with its folder on ``sys.path`` so that it can import its neighbours)."""
    if not entry.endswith(".py"):
        return entry, importlib.import_module(entry)
    path = Path(entry)
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
        return name, sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    module = importlib.util.module_from_spec(spec)
    if str(path.resolve().parent) not in sys.path:
        sys.path.insert(0, str(path.resolve().parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return name, module


def add_modules(pm: pluggy.PluginManager, modules: list[str] | tuple[str, ...]) -> pluggy.PluginManager:
    """Register local plugin modules (a config's ``plugins:`` list, or ``--plugins``) by import path
    or ``.py`` file path (see :func:`locate_modules`); a module that is already registered or
    disabled is skipped, one that fails to import is an error naming what is accepted."""
    for entry in modules:
        if entry in pm.rlhf_blocked or Path(entry).stem in pm.rlhf_blocked or pm.has_plugin(entry):
            continue
        try:
            name, module = _import_plugin(entry)
        except Exception as exc:
            raise PluginLoadError(
                f"plugin module {entry!r} (config 'plugins' or --plugins) failed to import: {type(exc).__name__}: {exc} "
                "(an entry is an importable module name, a NAME.py next to the config file, or a path to a .py "
                "file)") from exc
        if pm.has_plugin(name) or pm.is_registered(module):
            continue
        pm.register(module, name=name)
        pm.rlhf_info[name] = PluginInfo(name, "-", f"file {entry}" if entry.endswith(".py") else "config module")
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
    for hook_name, kind in REGISTRATION_HOOKS.items():
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
    return {kind: [e.name for e in registry.entries(kind) if e.plugin == plugin] for kind in KINDS}
