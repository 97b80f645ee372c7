"""Stage behaviour beyond the default pipeline: fused-linear SFT, determinism, PPO options."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rlhf_core.cli import cli
from rlhf_core.config import ConfigError, ModelConfig, load_raw, resolve
from rlhf_core.data import collate_sft
from rlhf_core.models import load_causal_lm
from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
from rlhf_plugins.ppo.rewards import LengthReward
from rlhf_plugins.sft import sft_loss_terms

CROSS_ENTROPY = build_registry(get_plugin_manager(entry_points=False)).get("loss", "cross_entropy")


def test_fused_linear_sft_loss_and_grads_equal_the_logits_path():
    model = load_causal_lm(ModelConfig(), seed=0)
    batch = collate_sft([
        {"input_ids": [100, 101, 102, 103, 1], "labels": [-100, -100, 102, 103, 1]},
        {"input_ids": [104, 105, 1], "labels": [-100, 105, 1]},
    ], pad_id=0)
    losses, grads = [], []
    for fused, backend in [(False, "reference"), (True, "reference"), (True, None)]:
        model.zero_grad()
        loss, metrics = sft_loss_terms(model, batch, CROSS_ENTROPY, {}, backend, fused)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.lm_head.weight.grad.clone())
        assert metrics["tokens_per_batch"] == 5.0
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, grads[0], atol=1e-5, rtol=1e-4)


def test_fused_linear_needs_plain_cross_entropy(registry):
    data = {"stages": [{"stage": "sft", "fused_linear": True, "loss": {"name": "cross_entropy", "aggregation": "sequence_mean"}}]}
    with pytest.raises(ConfigError, match="stages\\[0\\].fused_linear: the loss .cross_entropy. {.aggregation.: .sequence_mean.} has no fused-linear form for these options"):
        resolve(data, registry)


def run(tmp_path, name, *overrides):
    out = tmp_path / name
    result = CliRunner().invoke(cli, ["run", "--out", str(out), *[x for o in overrides for x in ("--set", o)]], obj={})
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out


MAX_NEW_TOKENS = 12  # the default config's generation.max_new_tokens
SHORT = ["stages.sft.train.steps=20", "stages.reward.train.steps=20", "stages.ppo.iterations=4",
         "stages.ppo.eval_every=0", "stages.ppo.eval_prompts=8", "stages.sft.train.log_every=5"]


def test_same_seed_same_run(tmp_path):
    first, _ = run(tmp_path, "a", *SHORT)
    second, _ = run(tmp_path, "b", *SHORT)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s") and not k.startswith("time_")} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)
    other, _ = run(tmp_path, "c", *SHORT, "seed=1")
    assert strip(other) != strip(first)


def test_ppo_kl_in_loss_k3_adaptive_entropy_whitening(tmp_path):
    rows, out = run(tmp_path, "kl", *SHORT, "stages.ppo.kl.placement=loss", "stages.ppo.kl.estimator=k3",
                    "stages.ppo.kl.adaptive=true", "stages.ppo.kl.target=0.01", "stages.ppo.kl.horizon=100",
                    "stages.ppo.entropy_coef=0.01", "stages.ppo.whiten_advantages=true", "stages.ppo.ppo_epochs=1")
    ppo = [r for r in rows if r["stage"] == "ppo" and "kl" in r]
    assert all("kl_loss" in r and r["entropy"] > 0 for r in ppo)
    assert all(r["kl"] >= 0 for r in ppo)  # k3 is never negative
    # KL above the tiny target -> the adaptive coefficient grows from its start of 0.02
    assert ppo[-1]["kl_coef"] > ppo[0]["kl_coef"] == 0.02
    assert abs(ppo[-1]["advantage_mean"]) < 1e-5  # whitened
    for row in ppo:  # what every iteration logs, in its range
        assert row["time_generate"] > 0 and row["time_score"] > 0 and row["time_train"] > 0
        assert 0 <= row["clip_frac"] <= 1 and abs(row["ratio_mean"] - 1) < 0.5 and row["reward_std"] >= 0
        assert 1 <= row["response_length"] <= MAX_NEW_TOKENS


def test_the_length_reward_by_hand(registry):
    # -scale * |len - target| / target: 4 and 12 characters are both 4 from 8 -> -2 * 0.5
    reward = LengthReward(None, target=8, scale=2.0)
    assert reward(["p"] * 3, ["abcd", "abcdefgh", "abcdefghijkl"]).tolist() == [-1.0, 0.0, -1.0]
    with pytest.raises(ConfigError, match="stages\\[2\\].reward.targett: unknown option for reward 'length'; accepted: scale, target"):
        resolve(load_raw(None, ["stages.ppo.reward={name: length, targett: 8}"]), registry)


def test_ppo_scores_with_the_reward_model_its_path_names(tmp_path):
    """``reward_model`` with ``path: '@reward'`` scores with that stage's trained model (the run
    says which), and a path naming a stage that trains a policy is refused before anything trains."""
    sets = [x for o in SHORT for x in ("--set", o)]
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "rm"), *sets, "--set",
                                      "stages.ppo.reward={name: reward_model, path: '@reward'}"], obj={})
    assert result.exit_code == 0, result.output
    assert f"ppo: reward = the reward model in {tmp_path / 'rm' / 'reward'}" in result.output
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    ppo = [r["reward_mean"] for r in rows if r["stage"] == "ppo" and "reward_mean" in r]
    assert len(set(ppo)) == len(ppo)  # the model's scores of each iteration's own samples
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "bad"), *sets, "--set", "stages.ppo.reward={name: reward_model, path: '@sft'}"], obj={})
    assert result.exit_code == 1 and "== stage" not in result.output
    assert "stages[2].reward.path: '@sft' names stage 'sft', which trains a policy, not a reward model" in result.output


def test_chat_template_is_used_when_the_tokenizer_has_one():
    from transformers import ByT5Tokenizer

    from rlhf_core.data import Record, render_prompt, tokenize_sft

    tok = ByT5Tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    fields = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert render_prompt(tok, fields) == "<user>hi<assistant>"
    items, _ = tokenize_sft([Record("x", fields)], tok, 64, None)
    assert tok.decode([t for t in items[0]["labels"] if t != -100], skip_special_tokens=True) == "yo"


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    """Recomputing activations in the backward changes memory, not the result."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from rlhf_core.cli import cli

    stages = ("stages=[{stage: sft, data: {train: 'builtin:letters', builtin_size: 64, max_length: 16}, "
              "train: {steps: 3, batch_size: 8}}, {stage: reward, data: {train: 'builtin:letters', builtin_size: 64, "
              "max_length: 16}, train: {steps: 2, batch_size: 8}}]")
    for flag in ("false", "true"):
        result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / flag), "--set", stages,
                                          "--set", f"model.gradient_checkpointing={flag}"], obj={})
        assert result.exit_code == 0, result.output
    for stage, file in (("sft", "model.safetensors"), ("reward", "model.safetensors")):
        plain, ckpt = load_file(tmp_path / "false" / stage / file), load_file(tmp_path / "true" / stage / file)
        assert max(float((plain[k] - ckpt[k]).abs().max()) for k in plain) < 1e-6
