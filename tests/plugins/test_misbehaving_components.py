"""Components that break their contract are caught and named: rewards that return NaN, a wrong
shape or a non-tensor, or raise; advantage estimators with a wrong shape (even where it would
broadcast); a policy loss that becomes NaN. PPO stops with exit 1 and saves nothing."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from rlhf_core import hookimpl
from rlhf_core.cli import cli

PLUGIN = "misbehaving_components_plugin"


class Reward:
    def __init__(self, ctx=None, *, mode: str = "nan"):
        self.mode = mode

    def __call__(self, prompts, responses):
        n = len(responses)
        if self.mode == "nan":
            return torch.tensor([float("nan")] + [0.5] * (n - 1))
        if self.mode == "inf":
            return torch.full((n,), float("inf"))
        if self.mode == "2d":
            return torch.zeros(n, 3)
        if self.mode == "short":
            return torch.zeros(n - 1)
        if self.mode == "list":
            return [0.0] * n
        raise KeyError("judge service unavailable")


class PerSequenceAdvantage:
    """Returns [B] (forgets to broadcast over tokens)."""

    needs_values = False

    def __call__(self, inputs):
        return inputs.rewards - inputs.rewards.mean()


def nan_policy_loss(inputs):
    return inputs.logprobs * float("nan"), {}


@hookimpl
def rlhf_register_rewards(register):
    register("bad_reward", Reward)


@hookimpl
def rlhf_register_advantages(register):
    register("per_sequence", PerSequenceAdvantage)


@hookimpl
def rlhf_register_losses(register):
    register("nan_policy", nan_policy_loss, family="policy")


@pytest.fixture
def run_ppo(tmp_path, monkeypatch):
    module = types.ModuleType(PLUGIN)
    for fn in (rlhf_register_rewards, rlhf_register_advantages, rlhf_register_losses):
        setattr(module, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, PLUGIN, module)

    def run(reward="length", advantage="batch_mean", loss="ppo_clip", batch=4):
        cfg = tmp_path / "ppo.yaml"
        cfg.write_text(f"""
plugins: [{PLUGIN}]
stages:
  - stage: ppo
    data: {{train: "builtin:letters", builtin_size: 40}}
    reward: {reward}
    advantage: {advantage}
    loss: {loss}
    iterations: 2
    prompts_per_batch: {batch}
    minibatch_size: {batch}
    ppo_epochs: 1
    generation: {{max_new_tokens: 4}}
    eval_prompts: 0
""")
        out = tmp_path / "run"
        result = CliRunner().invoke(cli, ["run", str(cfg), "--out", str(out), "--overwrite"], obj={})
        assert "Traceback" not in result.output
        return result, out

    return run


@pytest.mark.parametrize("mode, message", [
    ("nan", "reward 'bad_reward' (plugin 'misbehaving_components_plugin') returned a non-finite score (nan) for 1 of 4 "
            "responses, first for response 0"),
    ("inf", "returned a non-finite score (inf) for 4 of 4 responses"),
    ("2d", "reward 'bad_reward' (plugin 'misbehaving_components_plugin') returned shape [4, 3]; expected [4] "
           "(one score per response)"),
    ("short", "returned shape [3]; expected [4]"),
    ("list", "returned list; expected a float tensor of shape [4]"),
    ("raise", "reward 'bad_reward' (plugin 'misbehaving_components_plugin') raised KeyError: 'judge service unavailable'"),
])
def test_misbehaving_reward_stops_ppo_naming_it(run_ppo, mode, message):
    result, out = run_ppo(reward=f"{{name: bad_reward, mode: {mode}}}")
    assert result.exit_code == 1 and message in result.output
    assert json.loads((out / "summary.json").read_text())["status"].startswith("failed: reward 'bad_reward'")
    assert not (out / "ppo").exists()  # no policy saved from a broken run


def test_advantage_of_wrong_shape_is_an_error_even_when_it_would_broadcast(run_ppo):
    # B = 4 prompts and T = 4 response tokens: a [B] result would silently broadcast over [B, T].
    result, _ = run_ppo(advantage="per_sequence")
    assert result.exit_code == 1
    assert "advantage estimator 'per_sequence' (plugin 'misbehaving_components_plugin') returned shape [4]; expected [4, " in result.output


def test_non_finite_policy_loss_stops_ppo_with_advice(run_ppo):
    result, out = run_ppo(loss="nan_policy")
    assert result.exit_code == 1
    assert ("stage 'ppo': the policy loss became nan; lower optim.lr, set optim.mixed_precision: no, or lower kl.coef "
            "or entropy_coef, or check the reward's scale") in result.output
    assert not (out / "ppo").exists()
