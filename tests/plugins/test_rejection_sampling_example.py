"""The "Writing stages" example (docs/stages.md): rejection-sampling fine-tuning, a stage rlhf does
not ship, in its own pip package (examples/rlhf-rejection-sampling), found through its entry point
and trained by config alone, reusing generation, rewards and the Trainer through the public API."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "rlhf-rejection-sampling"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(EXAMPLE)], check=True, capture_output=True, text=True)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))


def rlhf(env, *args):
    return subprocess.run([sys.executable, "-m", "rlhf_core.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_stage_package_learns_from_its_best_samples(installed, tmp_path):
    """SFT on the letters task, then two rounds of best-of-4 by the gold rater: the policy's gold
    score rises (the kept samples are better than the policy's average ones)."""
    rows = {r["name"]: r for r in json.loads(rlhf(installed, "plugins", "--json").stdout)}
    assert rows["rejection_sampling"]["source"] == "entry point of rlhf-rejection-sampling"
    assert rows["rejection_sampling"]["registered"] == {"stage": ["rejection_sampling"]}
    config = tmp_path / "rs.yaml"
    config.write_text("""
seed: 0
stages:
  - stage: sft
    data: {train: "builtin:letters", builtin_size: 1200, max_length: 32}
    train: {steps: 80, batch_size: 32, lr: 3.0e-3, warmup_steps: 10}
  - stage: rejection_sampling
    data: {train: "builtin:letters", builtin_size: 300}
    reward: letters_gold
    gold: letters_gold
    rounds: 2
    prompts_per_round: 64
    samples_per_prompt: 4
    generation: {max_new_tokens: 12}
    train: {steps: 15, batch_size: 32, lr: 1.0e-3, log_every: 5}
    eval_prompts: 48
""")
    result = rlhf(installed, "run", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    stage = summary["stages"]["rejection_sampling"]
    assert summary["status"] == "finished" and stage["kept"] == 64.0
    assert stage["eval_gold_end"] > stage["eval_gold_start"] + 0.05, stage


def test_bad_options_are_reported_before_anything_trains(installed, tmp_path):
    result = rlhf(installed, "run", "--out", str(tmp_path / "r"), "--set",
                  "stages=[{stage: rejection_sampling, reward: length, samples_per_prompt: 0}]")
    assert result.returncode == 1
    assert "stages[0].samples_per_prompt: must be at least 1, got 0" in result.stderr


def test_a_round_where_no_response_reaches_min_reward_stops_with_its_message(installed, tmp_path):
    """A threshold no sample can reach: the stage ends with a message naming the round and the
    threshold, and the run is not marked finished."""
    result = rlhf(installed, "run", "--out", str(tmp_path / "r"), "--set",
                  "stages=[{stage: rejection_sampling, data: {train: 'builtin:letters', builtin_size: 40}, "
                  "reward: letters_gold, min_reward: 1000.0, rounds: 1, prompts_per_round: 4, samples_per_prompt: 2, "
                  "generation: {max_new_tokens: 4}, train: {steps: 1, batch_size: 4}, eval_prompts: 2}]")
    assert result.returncode == 1
    assert ("stage 'rejection_sampling': round 1 of 1: no response reached min_reward 1000.0; lower min_reward or "
            "raise samples_per_prompt") in result.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] != "finished"
