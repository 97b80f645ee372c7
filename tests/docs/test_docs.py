"""The docs cannot fall out of step with the code: the site builds strictly, every config key is
documented, every YAML snippet resolves, every Getting-started command runs, and the README's
commands are the ones CI runs."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rlhf_core.cli import cli
from rlhf_core.config import ComponentSpec, StageSpec, resolve
from rlhf_core.config.reference import component_rows, config_keys, field_docs, run_keys
from rlhf_core.plugin_system.registry import KINDS

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def fenced(path: Path, language: str) -> list[str]:
    """The bodies of the ``language`` code blocks of a Markdown file."""
    return [body for lang, body in FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


def test_every_config_key_and_component_is_documented(registry):
    """Every key of the run and of every registered stage has a documentation line (the string
    literal below its field), and every registered component has a docstring."""
    keys = run_keys() + [k for e in registry.entries("stage") for k in config_keys(e.obj.config_class(), f"{e.name}.")]
    assert len(keys) > 100
    missing = [k.path for k in keys if not k.doc]
    assert not missing, f"config keys without a documentation line: {missing}"
    for cls in (StageSpec, ComponentSpec):
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls
    undocumented = [(kind, row["name"]) for kind in KINDS if kind != "stage"
                    for row in component_rows(registry, kind) if not row["doc"]]
    assert not undocumented


def test_a_key_without_a_documentation_line_is_found():
    """The check above can fail: a field with no string literal below it has no documentation."""

    @dataclasses.dataclass
    class Example:
        documented: int = 1
        """Says what it is."""
        forgotten: float = 0.5

    keys = {k.path: k for k in config_keys(Example(), "x.")}
    assert keys["x.documented"].doc == "Says what it is." and keys["x.documented"].default == 1
    assert keys["x.forgotten"].doc == ""


def test_stage_defaults_are_the_stages_own(registry):
    """The reference shows each stage's own defaults (sft trains at lr 1e-3, reward at 5e-4)."""
    keys = {k.path: k for e in registry.entries("stage") for k in config_keys(e.obj.config_class(), f"{e.name}.")}
    assert keys["sft.train.lr"].default == 1e-3 and keys["reward.train.lr"].default == 5e-4
    assert keys["ppo.kl"].section and keys["ppo.kl.estimator"].default == "k1"
    assert keys["ppo.rollout_correction"].section and keys["ppo.rollout_correction"].default is None


def test_every_yaml_snippet_in_the_docs_resolves(registry):
    """Each ```yaml block of the docs is a whole config that validates against the built-in plugins
    (as examples/configs/ are); a block whose first line is ``# needs: MODULE`` is skipped only where
    that optional package is missing."""
    checked = 0
    for page in sorted(DOCS.rglob("*.md")):
        for i, body in enumerate(fenced(page, "yaml")):
            need = re.match(r"# needs: (\w+)", body)
            if need and importlib.util.find_spec(need.group(1)) is None:
                continue
            where = f"{page.relative_to(ROOT)} yaml block {i + 1}"
            data = yaml.safe_load(body)
            assert isinstance(data, dict) and data.get("stages"), f"{where}: not a whole config with stages"
            assert resolve(data, registry, where).stages, where
            checked += 1
    assert checked >= 15


def getting_started_commands() -> list[str]:
    """The shell lines of the first code block under Getting started's "Run the pipeline", in order."""
    section = (DOCS / "getting-started.md").read_text(encoding="utf-8").split("## Run the pipeline", 1)[1]
    lang, block = FENCE.findall(section)[0]
    assert lang == "bash"
    return [line for line in block.splitlines() if line.strip()]


def test_getting_started_commands_parse_and_the_quick_ones_run(tmp_path, monkeypatch):
    """The default suite's share of the check below: every Getting-started command is a valid
    invocation of today's CLI (its options exist and parse), and the two that train nothing run."""
    monkeypatch.chdir(tmp_path)
    commands = getting_started_commands()
    assert [shlex.split(c)[:2] for c in commands] == [["rlhf", "doctor"], ["rlhf", "run"], ["rlhf", "run"],
                                                      ["rlhf", "generate"], ["rlhf", "eval"]]
    for line in commands:
        argv = shlex.split(line)[1:]
        with cli.make_context("rlhf", list(argv), obj={}, resilient_parsing=False) as ctx:
            command = cli.get_command(ctx, argv[0])
            command.make_context(argv[0], argv[1:], parent=ctx)  # raises on an unknown or malformed option
    for line in commands[:2]:
        result = CliRunner().invoke(cli, shlex.split(line)[1:], obj={"disabled": set()})
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_getting_started_commands_run_in_order(tmp_path, monkeypatch):
    """Every command of Getting started, exactly as written, in a fresh directory: the doctor's
    table, the dry run's plan, the default pipeline (PPO beats SFT on the gold judge), then sampling
    and scoring from its output. (Slow: the default pipeline takes about 20 s on 2 idle cores.)"""
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in getting_started_commands():
        argv = shlex.split(line)
        assert argv[0] == "rlhf", line
        result = CliRunner().invoke(cli, argv[1:], obj={"disabled": set()})
        assert result.exit_code == 0, f"{line}\n{result.output}"
        outputs.append(result.output)
    doctor, dry_run, run, generate, evaluate = outputs
    assert "torch" in doctor and "C++ kernels" in doctor
    assert "stage 2 'ppo'" in dry_run and "optimizer steps: 150" in dry_run and not (tmp_path / "runs" / "x").exists()
    summary = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["gold_score_ppo"] > summary["gold_score_sft"] + 0.15
    assert generate.startswith("### c=") and generate.count("  -> ") == 3
    reward = float(re.search(r"^reward\s+([\d.]+)", evaluate, re.M).group(1))
    assert reward > 0.7  # the trained policy, judged by the rater (SFT alone scores about 0.56)


def test_install_and_test_commands_are_the_ones_ci_runs():
    """What the README and Getting started say to type is what .ci/run runs."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install, test = 'pip install torch==2.13.0 -e ".[test]"', "python -m pytest -q"
    assert f"\n{install}\n" in ci and f"\n{test}\n" in ci
    assert install in readme and test in readme
    assert install in fenced(DOCS / "getting-started.md", "bash")[0]


def test_nothing_points_outside_the_repository():
    """No page, README line or source file refers to a path above the repository."""
    files = [ROOT / "README.md", *DOCS.rglob("*.md"), *ROOT.glob("rlhf_core/**/*.py"), *ROOT.glob("plugins/**/*.py")]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text and "shared/seed" not in text, path


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="the docs extra is not installed")
def test_docs_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: no warning, no broken link or anchor, every page in the nav, and
    the generated reference pages (config, components, CLI, hooks, plugin API) render."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # no end-of-life banner from Material
    assert done.returncode == 0, done.stderr[-5000:]
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text(encoding="utf-8")
    for key in ("model.lora.target_modules", "checkpoint.on_signal", "kl.estimator", "train.warmup_steps"):
        assert key in config, key
    cli_page = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert all(f"rlhf {command}" in cli_page for command in ("run", "doctor", "eval", "generate", "plugins", "bench"))
    components = (tmp_path / "site" / "reference" / "components" / "index.html").read_text(encoding="utf-8")
    assert all(name in components for name in ("rloo", "ppo_clip", "trackio", "letters_gold"))
