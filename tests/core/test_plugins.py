"""Plugin loading: entry points one at a time, broken plugins, strict mode, duplicates, typos."""
from __future__ import annotations

import importlib.metadata as md
import sys
import types

import pytest

from rlhf_core import Stage, hookimpl
from rlhf_core.plugin_system import manager as plugmod
from rlhf_core.plugin_system.manager import PluginLoadError, build_registry, get_plugin_manager
from rlhf_core.config import ConfigError, resolve
from rlhf_core.plugin_system.registry import RegistryError


class FakeDist:
    def __init__(self, name, version):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    def __init__(self, name, loader, dist="rlhf-fake", version="1.2.3"):
        self.name, self._loader, self.dist = name, loader, FakeDist(dist, version)

    def load(self):
        return self._loader()


def install_fake_entry_points(monkeypatch, eps):
    real = md.entry_points

    def fake(**kwargs):
        if kwargs.get("group") == plugmod.ENTRY_POINT_GROUP:
            return eps
        return real(**kwargs)

    monkeypatch.setattr(md, "entry_points", fake)


def make_module(name, **attrs):
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def good_plugin():
    @hookimpl
    def rlhf_register_losses(register):
        register("zero_loss", lambda pred, target: (pred.sum() * 0, {}), family="score")

    return make_module("good", rlhf_register_losses=rlhf_register_losses)


def broken_plugin():
    raise ImportError("No module named 'missing_dependency'")


def test_entry_point_plugin_registers_and_is_listed(monkeypatch):
    install_fake_entry_points(monkeypatch, [FakeEntryPoint("good", good_plugin)])
    pm = get_plugin_manager()
    registry = build_registry(pm)
    assert registry.get("loss", "zero_loss").plugin == "good"
    info = pm.rlhf_info["good"]
    assert (info.version, info.source, info.error) == ("1.2.3", "entry point of rlhf-fake", "")


def test_broken_plugin_warns_once_and_host_keeps_working(monkeypatch, capsys):
    install_fake_entry_points(monkeypatch, [FakeEntryPoint("broken", broken_plugin), FakeEntryPoint("good", good_plugin)])
    monkeypatch.delenv(plugmod.ENV_STRICT, raising=False)
    pm = get_plugin_manager()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "plugin 'broken' from rlhf-fake 1.2.3 failed to load: ImportError: No module named 'missing_dependency'" in err[0]
    assert "RLHF_DISABLE_PLUGINS=broken" in err[0]
    assert "zero_loss" in build_registry(pm).names("loss")
    assert pm.rlhf_info["broken"].error.startswith("ImportError")


def test_strict_mode_raises(monkeypatch):
    install_fake_entry_points(monkeypatch, [FakeEntryPoint("broken", broken_plugin)])
    monkeypatch.setenv(plugmod.ENV_STRICT, "1")
    with pytest.raises(PluginLoadError, match="plugin 'broken' from rlhf-fake 1.2.3 failed to load"):
        get_plugin_manager()


def test_disable_by_env_and_argument(monkeypatch):
    install_fake_entry_points(monkeypatch, [FakeEntryPoint("broken", broken_plugin)])
    monkeypatch.setenv(plugmod.ENV_STRICT, "1")
    monkeypatch.setenv(plugmod.ENV_DISABLE, "broken")
    pm = get_plugin_manager()  # would raise if 'broken' were loaded
    assert "broken" not in pm.rlhf_info
    monkeypatch.delenv(plugmod.ENV_DISABLE)
    pm = get_plugin_manager(disabled={"broken", "ppo"})
    assert "ppo" not in build_registry(pm).names("stage")


def test_duplicate_component_names_both_plugins(monkeypatch):
    def clash():
        @hookimpl
        def rlhf_register_losses(register):
            register("mse", lambda p, t: (p.sum(), {}), family="score")

        return make_module("clash", rlhf_register_losses=rlhf_register_losses)

    install_fake_entry_points(monkeypatch, [FakeEntryPoint("clash", clash)])
    registry = build_registry(get_plugin_manager())  # a contested name breaks nothing by itself
    assert registry.conflicts() == [
        "loss 'mse' is registered by plugins 'reward' and 'clash'; a config that uses it must pick one "
        "({name: mse, plugin: reward}) or disable one plugin"]
    assert registry.get("loss", "huber").plugin == "reward"  # other names unaffected
    with pytest.raises(RegistryError, match="loss 'mse' is registered by plugins 'reward' and 'clash'; say which one"):
        registry.get("loss", "mse")
    assert registry.get("loss", "mse", plugin="clash").plugin == "clash"
    with pytest.raises(RegistryError, match="plugin 'nope' registers no loss 'mse'; it is registered by: reward, clash"):
        registry.get("loss", "mse", plugin="nope")
    # A config picks the winner explicitly; without the pick the error names both plugins.
    with pytest.raises(ConfigError, match="stages\\[0\\].loss: loss 'mse' is registered by plugins"):
        resolve({"stages": [{"stage": "reward", "loss": "mse"}]}, registry)
    chosen = resolve({"stages": [{"stage": "reward", "loss": {"name": "mse", "plugin": "clash"}}]}, registry)
    assert chosen.stages[0].config.loss.plugin == "clash"
    assert registry.lookup("loss", chosen.stages[0].config.loss).plugin == "clash"


def test_misspelled_hook_is_an_error(monkeypatch):
    def typo():
        @hookimpl
        def rlhf_register_loses(register):
            pass

        return make_module("typo", rlhf_register_loses=rlhf_register_loses)

    install_fake_entry_points(monkeypatch, [FakeEntryPoint("typo", typo)])
    with pytest.raises(PluginLoadError, match="rlhf_register_loses.*hooks must be one of: .*rlhf_register_losses"):
        get_plugin_manager()


def test_bad_loss_family_and_error_inside_registration(monkeypatch):
    def bad_family():
        @hookimpl
        def rlhf_register_losses(register):
            register("weird", lambda: None, family="vibes")

        return make_module("badfam", rlhf_register_losses=rlhf_register_losses)

    install_fake_entry_points(monkeypatch, [FakeEntryPoint("badfam", bad_family)])
    with pytest.raises(RegistryError, match="plugin 'badfam' registered loss 'weird' with family 'vibes'; accepted: token"):
        build_registry(get_plugin_manager())

    def raises():
        @hookimpl
        def rlhf_register_rewards(register):
            raise KeyError("oops")

        return make_module("raiser", rlhf_register_rewards=rlhf_register_rewards)

    install_fake_entry_points(monkeypatch, [FakeEntryPoint("raiser", raises)])
    with pytest.raises(PluginLoadError, match="plugin 'raiser' failed in rlhf_register_rewards: KeyError"):
        build_registry(get_plugin_manager())


def test_config_module_plugin(monkeypatch):
    module = good_plugin()
    monkeypatch.setitem(sys.modules, "my_local_plugin", module)
    pm = get_plugin_manager(modules=["my_local_plugin"], entry_points=False)
    assert build_registry(pm).get("loss", "zero_loss").plugin == "my_local_plugin"
    with pytest.raises(PluginLoadError, match="plugin module 'no_such_module_x' \\(config 'plugins' or --plugins\\) failed to import"):
        get_plugin_manager(modules=["no_such_module_x"], entry_points=False)



LOCAL_REWARD = """
from rlhf_core import hookimpl
import torch
from docs_local_helper import CONSTANT  # a neighbour module: the file's folder is on sys.path


class ConstantReward:
    def __init__(self, ctx=None):
        pass

    def __call__(self, prompts, responses):
        return torch.full((len(responses),), CONSTANT)


@hookimpl
def rlhf_register_rewards(register):
    register("docs_constant", ConstantReward)
"""


def test_local_plugins_by_file_next_to_the_config_and_by_flag(tmp_path, monkeypatch):
    """``plugins:`` takes a module next to the config file and a path to a .py file (no PYTHONPATH, no
    packaging); both are recorded by absolute path so that a resumed run (which reads the run's
    config.yaml from elsewhere) finds them; ``rlhf plugins`` and ``rlhf eval`` take ``--plugins``."""
    import json

    import yaml
    from click.testing import CliRunner

    from rlhf_core.cli import cli
    from rlhf_core.config import to_plain
    from rlhf_core.runtime.pipeline import prepare

    project = tmp_path / "project"
    (project / "more").mkdir(parents=True)
    (project / "docs_local_helper.py").write_text("CONSTANT = 0.75\n")
    (project / "docs_local_reward.py").write_text(LOCAL_REWARD)
    (project / "more" / "docs_local_loss.py").write_text(
        "from rlhf_core import hookimpl\n\n@hookimpl\ndef rlhf_register_losses(register):\n"
        "    register('docs_zero', lambda pred, target: (pred.sum() * 0, {}), family='score')\n")
    config = project / "run.yaml"
    config.write_text("plugins: [docs_local_reward, more/docs_local_loss.py]\n"
                      "stages:\n  - stage: reward\n    loss: docs_zero\n  - stage: ppo\n    reward: docs_constant\n")
    monkeypatch.chdir(tmp_path)  # neither the config's folder nor on sys.path
    for name in ("docs_local_reward", "docs_local_loss", "docs_local_helper"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    prepared = prepare(str(config))
    assert prepared.config.plugins == [str(project / "docs_local_reward.py"), str(project / "more" / "docs_local_loss.py")]
    assert prepared.registry.get("reward", "docs_constant").plugin == "docs_local_reward"
    saved = tmp_path / "elsewhere" / "config.yaml"  # what --resume reads
    saved.parent.mkdir()
    saved.write_text(yaml.safe_dump(to_plain(prepared.config)))
    assert prepare(str(saved)).registry.get("loss", "docs_zero").plugin == "docs_local_loss"

    rows = json.loads(CliRunner().invoke(cli, ["plugins", "--json", "--plugins", "project/docs_local_reward.py"],
                                         obj={"disabled": set()}).output)
    assert {"name": "docs_local_reward", "version": "-", "source": "file " + str(project / "docs_local_reward.py"),
            "registered": {"reward": ["docs_constant"]}} in rows
    result = CliRunner().invoke(cli, ["eval", "builtin:tiny", "--prompts", "builtin:letters", "--limit", "4",
                                      "--max-new-tokens", "2", "--reward", "docs_constant", "--json",
                                      "--plugins", "project/docs_local_reward.py"], obj={"disabled": set()})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["reward"] == pytest.approx(0.75)
    bad = CliRunner().invoke(cli, ["plugins", "--plugins", "project/nope.py"], obj={"disabled": set()})
    assert bad.exit_code == 1 and "no such file" in bad.output and "a path to a .py file" in bad.output


def test_every_hook_documented_and_tested():
    """The datasette pattern: each hook has a docstring, a place in the plugin guide (docs/plugins.md)
    and a test that names it."""
    from pathlib import Path

    from rlhf_core.plugin_system import hookspecs
    from rlhf_core.plugin_system.manager import REGISTRATION_HOOKS
    from rlhf_core.plugin_system.registry import KINDS

    root = Path(__file__).parents[2]
    guide = (root / "docs" / "plugins.md").read_text()
    tests = "\n".join(p.read_text() for p in (root / "tests").rglob("test_*.py"))
    hooks = [n for n in dir(hookspecs) if n.startswith("rlhf_")]
    # every registration hook fills one registry kind, every kind has its hook; the CLI's is the one more
    assert set(hooks) == set(REGISTRATION_HOOKS) | {"rlhf_register_commands"}
    assert sorted(REGISTRATION_HOOKS.values()) == sorted(KINDS)
    for name in hooks:
        assert getattr(hookspecs, name).__doc__ and ":param" in getattr(hookspecs, name).__doc__, name
        assert f"`{name}`" in guide, f"{name} missing from the plugin guide"
        # a test implements the hook (so the host really calls it), not just mentions its name
        assert f"def {name}(" in tests, f"{name} has no test that implements it"


def test_rlhf_register_commands_adds_a_cli_command(monkeypatch):
    import click
    from click.testing import CliRunner

    from rlhf_core import cli as climod

    def with_command():
        @click.command("hello")
        def hello():
            click.echo("hello from plugin")

        @hookimpl
        def rlhf_register_commands(cli):
            cli.add_command(hello)

        return make_module("cmdplug", rlhf_register_commands=rlhf_register_commands)

    install_fake_entry_points(monkeypatch, [FakeEntryPoint("cmdplug", with_command)])
    group = click.Group(name="rlhf", commands=dict(climod.cli.commands))
    get_plugin_manager().hook.rlhf_register_commands(cli=group)
    assert CliRunner().invoke(group, ["hello"]).output == "hello from plugin\n"


def test_rlhf_register_datasets_builtin_used_by_stage(registry):
    from rlhf_core.data import load_records

    records = load_records("builtin:letters", "reward", registry, seed=1, builtin_size=5)
    assert len(records) == 5 and set(records[0].fields) == {"prompt", "response", "score"}


def test_each_registration_hook_registers_under_its_kind(monkeypatch):
    """rlhf_register_stages, rlhf_register_losses, rlhf_register_rewards, rlhf_register_advantages and
    rlhf_register_datasets each land in their own registry table, tagged with the plugin."""

    class MyStage(Stage):
        config_class = dict

    def plugin():
        @hookimpl
        def rlhf_register_stages(register):
            register("my_stage", MyStage)

        @hookimpl
        def rlhf_register_losses(register):
            register("my_loss", lambda logits, labels, *, backend=None: (logits.sum(), {}), family="token")

        @hookimpl
        def rlhf_register_rewards(register):
            register("my_reward", type("R", (), {"__init__": lambda self, ctx, *, k=1: None}))

        @hookimpl
        def rlhf_register_advantages(register):
            register("my_adv", type("A", (), {"needs_values": False}))

        @hookimpl
        def rlhf_register_datasets(register):
            register("my_data", lambda kind, n, seed: [{"prompt": "p"}] * n)

        return make_module("mine", **{f.__name__: f for f in (
            rlhf_register_stages, rlhf_register_losses, rlhf_register_rewards, rlhf_register_advantages, rlhf_register_datasets)})

    install_fake_entry_points(monkeypatch, [FakeEntryPoint("mine", plugin)])
    registry = build_registry(get_plugin_manager())
    for kind, name in [("stage", "my_stage"), ("loss", "my_loss"), ("reward", "my_reward"), ("advantage", "my_adv"), ("dataset", "my_data")]:
        assert registry.get(kind, name).plugin == "mine"
    assert list(registry.get("reward", "my_reward").options()) == ["k"]


def _run_main(monkeypatch, capsys, *argv):
    from rlhf_core import cli as climod

    monkeypatch.setattr(sys, "argv", ["rlhf", *argv])
    with pytest.raises(SystemExit) as info:
        climod.main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_plugins_load_once_per_command_and_disable_is_honoured_everywhere(monkeypatch, capsys):
    calls = []

    def counted_broken():
        calls.append(1)
        raise ImportError("No module named 'missing_dependency'")

    install_fake_entry_points(monkeypatch, [FakeEntryPoint("broken", counted_broken)])
    monkeypatch.delenv(plugmod.ENV_STRICT, raising=False)
    code, out, err = _run_main(monkeypatch, capsys, "plugins")
    assert code == 0 and len(calls) == 1 and err.count("plugin 'broken' from rlhf-fake 1.2.3 failed to load") == 1
    # Strict mode: the suggested --disable really gets past the first load.
    monkeypatch.setenv(plugmod.ENV_STRICT, "1")
    code, out, err = _run_main(monkeypatch, capsys, "plugins")
    assert code == 1 and "rlhf --disable broken" in err
    calls.clear()
    code, out, err = _run_main(monkeypatch, capsys, "--disable", "broken", "plugins", "--json")
    assert code == 0 and calls == [] and err == "" and "broken" not in out


def test_contested_name_warns_but_every_command_works(monkeypatch, capsys):
    def clash():
        @hookimpl
        def rlhf_register_rewards(register):
            register("length", lambda ctx=None, **kw: None)

        return make_module("clash", rlhf_register_rewards=rlhf_register_rewards)

    install_fake_entry_points(monkeypatch, [FakeEntryPoint("clash", clash)])
    code, out, err = _run_main(monkeypatch, capsys, "plugins")
    assert code == 0 and "reward 'length' is registered by plugins 'ppo-rewards' and 'clash'" in err
    code, out, err = _run_main(monkeypatch, capsys, "run", "--print-config")  # the default never uses 'length'
    assert code == 0 and "stages:" in out
    code, out, err = _run_main(monkeypatch, capsys, "run", "--print-config", "--set", "stages.ppo.reward=length")
    assert code == 1 and "stages[2].reward: reward 'length' is registered by plugins 'ppo-rewards' and 'clash'; " \
                          "say which one: {name: length, plugin: ppo-rewards}" in err
    code, out, err = _run_main(monkeypatch, capsys, "run", "--print-config", "--set",
                               "stages.ppo.reward={name: length, plugin: ppo-rewards, target: 8}")
    assert code == 0 and "plugin: ppo-rewards" in out


def test_plugin_api_is_declared_documented_and_listed_in_the_docs():
    """Every module of the supported plugin API declares __all__; every name in it exists and every
    class and function has a docstring; the Plugin API page names every module and documents it."""
    import importlib
    import inspect
    from pathlib import Path

    section = (Path(__file__).parents[2] / "docs" / "reference" / "api.md").read_text()
    for name in ("types", "contracts", "errors", "config", "data", "training", "packing", "models", "sampling",
                 "distributed", "checkpoint"):
        module = importlib.import_module(f"rlhf_core.{name}")
        assert f"`rlhf_core.{name}`" in section and f"\n::: rlhf_core.{name}\n" in section, name  # listed and rendered
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert obj.__doc__, f"rlhf_core.{name}.{attr} has no docstring"


def test_built_in_components_satisfy_the_published_protocols(registry):
    """The Protocols in rlhf_core.interfaces are the contract the built-ins are held to."""
    from rlhf_core import AdvantageEstimator, Stage

    for entry in registry.entries("stage"):
        assert isinstance(entry.obj(), Stage), entry.name
        assert hasattr(entry.obj, "config_class") and hasattr(entry.obj, "components"), entry.name
    for entry in registry.entries("advantage"):
        estimator = entry.obj()
        assert isinstance(estimator, AdvantageEstimator), entry.name
        assert isinstance(entry.obj.needs_values, bool) and entry.obj.min_group_size >= 1, entry.name
