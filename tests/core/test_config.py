"""Config loading: all problems reported together, with paths and choices; overrides."""
from __future__ import annotations

import pytest

from rlhf_core.config import ConfigError, ModelConfig, apply_override, coerce_dataclass, load_raw, resolve


def problems_of(data, registry):
    with pytest.raises(ConfigError) as info:
        resolve(data, registry)
    return info.value.problems


def test_all_problems_reported_together_with_choices(registry):
    data = {
        "seed": "zero",
        "modle": {},
        "stages": [
            {"stage": "sft", "train": {"lr": "fast", "stepz": 3}, "loss": "crossentropy"},
            {"stage": "ppo", "advantage": "rlo", "kl": {"estimator": "k4"}},
            {"stage": "grpo"},
        ],
    }
    problems = problems_of(data, registry)
    text = "\n".join(problems)
    assert "seed: expected an integer, got 'zero'" in text
    assert "modle: unknown key; accepted:" in text and "model" in text
    assert "stages[0].train.lr: expected a number, got 'fast'" in text
    assert "stages[0].train.stepz: unknown key" in text
    assert "stages[0].loss: unknown loss 'crossentropy'; available: cross_entropy" in text
    assert "stages[1].advantage: unknown advantage estimator 'rlo'; available: batch_mean, ema, gae, group_mean, reinforce_pp, rloo" in text
    assert "stages[1].kl.estimator: expected one of 'k1', 'k2', 'k3', got 'k4'" in text
    assert "stages[2].stage: unknown stage 'grpo'; available: dpo, kto, ppo, reward, sft" in text
    # PPO's cross-field checks need the estimator: they say they were skipped instead of vanishing.
    assert "stages[1]: cross-field checks that need advantage, kl were skipped until they are fixed" in text
    assert len(problems) == 9


def test_schema_and_cross_field_problems_are_reported_in_one_pass(registry):
    """An unknown key or a bad value elsewhere does not hide a stage's cross-field problems."""
    problems = problems_of({"stages": [{"stage": "ppo", "bogus": 1, "advantage": "rloo", "samples_per_prompt": 1,
                                        "optim": {"lr": -1.0}, "generation": {"max_new_tokens": "many"}}]}, registry)
    assert problems == [
        "stages[0].bogus: unknown key; accepted: " + problems[0].split("accepted: ")[1],
        "stages[0].optim.lr: must be a finite number > 0, got -1.0",
        "stages[0].generation.max_new_tokens: expected an integer, got 'many'",
        "stages[0].samples_per_prompt: advantage estimator 'rloo' compares samples of the same prompt and needs "
        "samples_per_prompt >= 2, got 1",
    ]
    # A check that reads a broken field is left out, and says so.
    problems = problems_of({"stages": [{"stage": "ppo", "advantage": "rloo", "samples_per_prompt": "x"}]}, registry)
    assert problems == ["stages[0].samples_per_prompt: expected an integer, got 'x'",
                        "stages[0]: cross-field checks that need samples_per_prompt were skipped until it is fixed"]


def test_wrong_loss_family_names_the_family(registry):
    problems = problems_of({"stages": [{"stage": "sft", "loss": "mse"}]}, registry)
    assert problems == ["stages[0].loss: loss 'mse' is a 'score' loss, but this stage needs 'token'; available: cross_entropy"]


def test_a_key_of_an_earlier_release_names_the_key_it_became(registry):
    """PPO's optimizer options moved into its optim: block (one optimizer step for every stage)."""
    problems = problems_of({"stages": [{"stage": "ppo", "lr": 1e-4, "critic_lr": 1e-4, "mixed_precision": "no"}]},
                           registry)
    assert problems == ["stages[0].lr: unknown key; it moved to optim.lr (see the changelog)",
                        "stages[0].critic_lr: unknown key; it moved to critic_optim.lr (see the changelog)",
                        "stages[0].mixed_precision: unknown key; it moved to optim.mixed_precision (see the changelog)"]


def test_component_options_checked(registry):
    problems = problems_of({"stages": [{"stage": "reward", "loss": {"name": "huber", "delt": 2}}]}, registry)
    assert problems == ["stages[0].loss.delt: unknown option for loss 'huber'; accepted: delta"]
    problems = problems_of({"stages": [{"stage": "reward", "loss": {"name": "huber", "delta": "big"}}]}, registry)
    assert problems == ["stages[0].loss.delta: expected a number, got 'big'"]


def test_builtin_dataset_names_checked(registry):
    problems = problems_of({"stages": [{"stage": "sft", "data": {"train": "builtin:letterz"}}]}, registry)
    assert problems == ["stages[0].data.train: unknown dataset 'letterz'; available: arith, arith_tools, guess, letters"]


def test_an_empty_reward_list_is_refused_with_what_to_write(registry):
    assert problems_of({"stages": [{"stage": "ppo", "reward": []}]}, registry) == [
        "stages[0].reward: an empty list; name at least one reward, or null for none"]


def test_duplicate_stage_names_and_empty_stages(registry):
    assert problems_of({"stages": []}, registry)[0].startswith("stages: expected a non-empty list")
    problems = problems_of({"stages": [{"stage": "sft"}, {"stage": "sft"}]}, registry)
    assert "stages[1].name: stage name 'sft' is used twice" in problems[0]


def test_overrides_by_name_and_index():
    data = load_raw(None, ["stages.sft.train.lr=0.5", "stages.2.iterations=3", "seed=7", "model.dtype=bfloat16"])
    assert data["seed"] == 7 and data["model"]["dtype"] == "bfloat16"
    assert data["stages"][0]["train"]["lr"] == 0.5 and data["stages"][2]["iterations"] == 3
    with pytest.raises(ConfigError, match="no list entry 'dpo'.*sft, reward, ppo"):
        load_raw(None, ["stages.dpo.lr=1"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_raw(None, ["seed"])


def test_exponent_without_dot_is_a_number(registry):
    config = resolve(load_raw(None, ["stages.sft.train.lr=3e-4"]), registry)
    assert config.stages[0].config.train.lr == 3e-4


def test_apply_override_creates_nested_keys():
    data = {}
    apply_override(data, ["a", "b"], 1)
    assert data == {"a": {"b": 1}}


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 0\nstages: [\n  - stage: sft\n")
    with pytest.raises(ConfigError) as info:
        load_raw(str(path))
    assert str(path) in str(info.value) and "line" in info.value.problems[0]


def test_literal_and_types():
    problems = []
    cfg = coerce_dataclass(ModelConfig, {"dtype": "float8", "trust_remote_code": "yes"}, "model", problems)
    assert cfg is not None
    assert problems == ["model.dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16', got 'float8'",
                        "model.trust_remote_code: expected true or false, got 'yes'"]


def test_embedded_default_resolves_and_every_example_config_resolves(registry):
    """One source for the default pipeline (rlhf_core/configs/default.yaml, shown by --print-config);
    the example configs next to it are variations that must stay valid."""
    from pathlib import Path

    from rlhf_core.config import to_plain

    default = to_plain(resolve(load_raw(None), registry))
    assert [s["stage"] for s in default["stages"]] == ["sft", "reward", "ppo"]
    examples = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))
    assert examples
    for path in examples:
        assert resolve(load_raw(str(path)), registry).stages, path
