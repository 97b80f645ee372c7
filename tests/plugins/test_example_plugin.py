"""The plugin tutorial's third-party package (docs/plugins.md): pip-installed, found through its entry point, and
used by a pipeline by config alone (custom loss, reward and advantage estimator)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "rlhf-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, text=True,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    return env


def rlhf(env, *args):
    return subprocess.run([sys.executable, "-c", "from rlhf_core.cli import main; main()", *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_plugin_is_listed_with_its_components(installed):
    rows = {r["name"]: r for r in json.loads(rlhf(installed, "plugins", "--json").stdout)}
    example = rows["example"]
    assert example["version"] == "0.1.0" and example["source"] == "entry point of rlhf-example"
    assert example["registered"] == {"loss": ["capped_pg", "label_smoothed_ce"], "reward": ["repeat"],
                                     "advantage": ["median"]}


def test_pipeline_uses_the_plugin_by_config_alone(installed, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("""
model: {name_or_path: builtin:tiny}
stages:
  - stage: sft
    data: {train: "builtin:letters", builtin_size: 600, max_length: 32}
    loss: {name: label_smoothed_ce, smoothing: 0.05}
    train: {steps: 100, batch_size: 32, lr: 3.0e-3, warmup_steps: 5}
  - stage: ppo
    data: {train: "builtin:letters", builtin_size: 200}
    reward: repeat
    advantage: median
    loss: {name: capped_pg, cap: 2.0}
    gold: letters_gold
    iterations: 25
    prompts_per_batch: 32
    minibatch_size: 32
    optim: {lr: 5.0e-4}
    generation: {max_new_tokens: 12}
""")
    result = rlhf(installed, "run", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("smooth_term" in r for r in rows if r["stage"] == "sft")
    assert all(r["capped_ratio"] > 0 for r in rows if r["stage"] == "ppo" and "reward_mean" in r)  # the plugin's loss ran
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gold_score_ppo"] > summary["gold_score_sft"]


def test_unknown_option_of_plugin_component_is_reported(installed, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("stages:\n  - stage: sft\n    loss: {name: label_smoothed_ce, smoothin: 0.1}\n")
    result = rlhf(installed, "run", str(config))
    assert result.returncode == 1
    assert "stages[0].loss.smoothin: unknown option for loss 'label_smoothed_ce'; accepted: smoothing" in result.stderr


def test_the_example_depends_on_this_distribution_not_the_unrelated_pypi_rlhf():
    import tomllib

    root = Path(__file__).parents[2]
    ours = tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"]
    example = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert ours == "rlhf-kit" and example["dependencies"] == [ours]
    assert list(example["entry-points"]) == ["rlhf"]
