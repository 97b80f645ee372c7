"""The fused-linear PPO path (hidden states x LM head, no [B, R, V] logits) equals the logits path:
experience (old/reference log-probs, entropy), the update's loss, gradients, weights and stats."""
from __future__ import annotations

import copy

import pytest
import torch

from ppo_parts import ppo_run, prompts
from rlhf_core import RewardSum
from rlhf_core.config import ModelConfig
from rlhf_core.data import encode_prompt
from rlhf_core.models import load_causal_lm, load_tokenizer, use_fused_linear
from rlhf_plugins.ppo import run as run_module
from rlhf_plugins.ppo.config import KLConfig, PPOConfig

CFG = ModelConfig()


def score(prompts, responses, rows):
    return torch.tensor([float(r.count("a")) - 0.1 * len(r) for r in responses])


REWARD = RewardSum([("reward", 1.0, score)])


def make_run(registry, config, fused: bool, policy, reference):
    return ppo_run(registry, config, copy.deepcopy(policy), reference=reference, rewards=REWARD, fused=fused, lr=1e-3)


TEXTS = ["abc", "hello there", "x", "aaaa b"]


def on_policy_parts(**options):
    """A policy, a frozen reference and an on-policy config (one epoch over one minibatch of 8, KL
    in the loss) with ``options``, for the tests of the update's own old log-probs."""
    torch.manual_seed(0)
    policy = load_causal_lm(CFG, seed=0)
    reference = load_causal_lm(CFG, seed=1).eval().requires_grad_(False)
    config = PPOConfig(prompts_per_batch=4, samples_per_prompt=2, ppo_epochs=1, minibatch_size=8,
                       kl=KLConfig(coef=0.05, estimator="k3", placement="loss"), **options)
    assert run_module.on_policy(config)
    return policy, reference, config


def scoring_path(monkeypatch, skip: bool, real) -> list:
    """Force :func:`on_policy` to ``skip`` (True: the update's own old log-probs) and record the
    model of every ``score_tokens`` call (the list returned)."""
    monkeypatch.setattr(run_module, "on_policy", lambda c: skip)
    calls = []
    monkeypatch.setattr(run_module, "score_tokens", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    from rlhf_kernels import fused

    monkeypatch.setattr(fused, "LINEAR_CHUNK_BYTES", 4 * 384 * 5)  # 5-row chunks: many chunks per batch
    monkeypatch.setattr(fused, "LINEAR_GRAD_MIN_ROWS", 7)


@pytest.mark.parametrize("placement,entropy_coef", [("reward", 0.0), ("loss", 0.01)])
def test_fused_ppo_equals_logits_path(registry, placement, entropy_coef):
    torch.manual_seed(0)
    policy = load_causal_lm(CFG, seed=0)
    reference = load_causal_lm(CFG, seed=1).eval().requires_grad_(False)
    config = PPOConfig(samples_per_prompt=2, ppo_epochs=2, minibatch_size=4, entropy_coef=entropy_coef,
                       kl=KLConfig(coef=0.05, estimator="k3", placement=placement))
    texts = ["abc", "hello there", "x", "aaaa b"]
    results = {}
    for fused in (False, True):
        run = make_run(registry, config, fused, policy, reference)
        torch.manual_seed(1)  # the same samples for both paths
        exp = run.make_experience(prompts(run, TEXTS))
        torch.manual_seed(2)  # the same minibatch order
        stats = run.update(exp).metrics
        results[fused] = (exp, stats, run.policy)
    (exp_a, stats_a, pol_a), (exp_b, stats_b, pol_b) = results[False], results[True]
    assert torch.equal(exp_a.rollout.sequences, exp_b.rollout.sequences)
    for name in ("old_logprobs", "ref_logprobs", "entropy", "kl_tokens", "advantages"):
        torch.testing.assert_close(getattr(exp_b, name), getattr(exp_a, name), atol=2e-5, rtol=1e-5, msg=name)
    assert stats_a.keys() == stats_b.keys() and ("kl_loss" in stats_a) == (placement == "loss")
    for key in stats_a:
        assert stats_b[key] == pytest.approx(stats_a[key], rel=1e-4, abs=1e-5), key
    for (name, a), b in zip(pol_a.named_parameters(), pol_b.parameters()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)


def test_fused_linear_auto_explains_when_it_is_off(capsys):
    policy = load_causal_lm(CFG, seed=0)
    assert use_fused_linear("auto", "ppo", [policy, None]) is True
    assert use_fused_linear(False, "ppo", [policy]) is False
    biased = load_causal_lm(CFG, seed=0)
    biased.lm_head = torch.nn.Linear(64, biased.config.vocab_size, bias=True)
    assert use_fused_linear("auto", "ppo", [policy, biased]) is False
    assert "ppo: fused_linear off (the LM head of LlamaForCausalLM is not a plain bias-free linear layer)" in capsys.readouterr().out
    from rlhf_core import StageError

    with pytest.raises(StageError, match="ppo.fused_linear: the LM head of LlamaForCausalLM is not a plain"):
        use_fused_linear(True, "ppo", [biased])
    assert use_fused_linear("auto", "sft", [policy], "loss 'my_loss' reads the logits") is False
    assert "sft: fused_linear off (loss 'my_loss' reads the logits)" in capsys.readouterr().out


def test_fused_linear_true_with_any_policy_loss_is_accepted(registry):
    """Every policy loss runs on log-probs, so fused-linear is not special-cased by loss name."""
    from rlhf_core.config import load_raw, resolve
    from rlhf_plugins.ppo.loss import reinforce

    registry.add("loss", "my_loss", reinforce, "test", family="policy")
    config = resolve(load_raw(None, ["stages.ppo.fused_linear=true", "stages.ppo.loss=my_loss"]), registry)
    assert config.stages[2].config.fused_linear is True and config.stages[2].config.loss.name == "my_loss"


def test_reward_and_value_models_never_hold_an_lm_head():
    """The reward model and the critic read the last hidden state through the backbone alone: no
    module of a ScalarHeadModel maps to the vocabulary, so no [B, T, V] tensor can be computed."""
    from rlhf_core.models import ScalarHeadModel

    lm = load_causal_lm(CFG, seed=0)
    model = ScalarHeadModel.from_causal_lm(lm)
    vocab = lm.config.vocab_size
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == vocab for m in model.modules())
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, i, o: shapes.append(getattr(o, "shape", None))) for m in model.modules()]
    ids = torch.tensor([encode_prompt(load_tokenizer(CFG), "hello")])
    model(ids, torch.ones_like(ids), score=True)
    for h in hooks:
        h.remove()
    assert not any(s is not None and len(s) and s[-1] == vocab for s in shapes)


@pytest.mark.parametrize("fused", [False, True])
def test_on_policy_update_skips_the_old_forward_and_changes_nothing(registry, fused, monkeypatch):
    """One epoch, one minibatch, KL in the loss: the old log-probs come from the update's own
    forward (no scoring forward of the policy); weights, stats and the experience's old log-probs,
    entropy and KL equal those of the path with the extra forward."""
    policy, reference, config = on_policy_parts(entropy_coef=0.01)
    results = {}
    real = run_module.score_tokens
    for skip in (True, False):
        calls = scoring_path(monkeypatch, skip, real)
        run = make_run(registry, config, fused, policy, reference)
        torch.manual_seed(1)
        exp = run.make_experience(prompts(run, TEXTS))
        assert (exp.old_logprobs is None) == skip and (exp.entropy is None) == skip
        assert sum(c is run.policy for c in calls) == (0 if skip else 1)  # the policy's scoring forward is skipped
        torch.manual_seed(2)
        update = run.update(exp)
        # the old policy's log-probs and entropy: the update's own (on-policy), else the Experience's
        old = update.old_logprobs if skip else exp.old_logprobs
        entropy = update.entropy if skip else exp.entropy
        stats = {**update.metrics, **run.stats(exp, update)}
        results[skip] = (old, entropy, exp.advantages, stats, run.policy)
    (old_a, ent_a, adv_a, stats_a, pol_a), (old_b, ent_b, adv_b, stats_b, pol_b) = results[True], results[False]
    torch.testing.assert_close(old_a, old_b, atol=2e-5, rtol=1e-5, msg="old_logprobs")
    torch.testing.assert_close(ent_a, ent_b, atol=2e-5, rtol=1e-5, msg="entropy")
    torch.testing.assert_close(adv_a, adv_b, atol=2e-5, rtol=1e-5, msg="advantages")
    assert stats_a["kl"] > 0 and stats_a["entropy"] > 0  # the KL and entropy it logs are measured, not zeros
    for key in stats_b:
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-4, abs=1e-5), key
    for (name, a), b in zip(pol_a.named_parameters(), pol_b.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


class NoisyEngine:
    """An engine whose sampling log-probs differ from the trainer's by a fixed per-token noise (what
    a vLLM engine or a stale rollout worker reports): the hf engine's samples, the policy's own
    log-probs of them plus noise of std 0.3."""

    def __init__(self, ctx, policy, tokenizer):
        from rlhf_plugins.ppo.generators import HFGenerator

        self.inner, self.policy = HFGenerator(ctx, policy, tokenizer), policy

    def generate(self, prompt_ids, **settings):
        from rlhf_plugins.ppo.rollout import score_tokens

        roll = self.inner.generate(prompt_ids, **settings)
        with torch.no_grad():
            logp, _ = score_tokens(self.policy, roll, None)
        noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(7)) * 0.3
        roll.logprobs = (logp + noise) * roll.mask
        return roll

    def update_weights(self, policy):
        self.policy = policy


@pytest.mark.parametrize("correction", ["tis", "seq_tis"])
def test_on_policy_rollout_correction_is_applied_inside_the_update(registry, correction, monkeypatch):
    """On-policy with engine log-probs and a TIS correction: no scoring forward of the policy; each
    micro-batch's advantages are weighted from the update's own old log-probs, so the weights, the
    corrected advantages and the logged ``engine_logprob_gap`` / ``is_weight_mean`` /
    ``is_capped_frac`` equal those of the path that scores first (two micro-batches)."""
    from types import SimpleNamespace

    from rlhf_core import CheckedGenerator
    from rlhf_plugins.ppo.config import RolloutCorrection

    policy, reference, config = on_policy_parts(micro_batch_size=4,
                                                rollout_correction=RolloutCorrection(type=correction, cap=1.2))
    results = {}
    real = run_module.score_tokens
    for skip in (True, False):
        calls = scoring_path(monkeypatch, skip, real)
        mine = copy.deepcopy(policy)
        ctx = SimpleNamespace(device=torch.device("cpu"))
        entry = SimpleNamespace(kind="generator", name="noisy", plugin="test")
        engine = CheckedGenerator(entry, NoisyEngine(ctx, mine, load_tokenizer(CFG)))
        run = ppo_run(registry, config, mine, reference=reference, rewards=REWARD, fused=True, lr=1e-3,
                      generator=engine)
        torch.manual_seed(1)
        exp = run.make_experience(prompts(run, TEXTS))
        assert sum(c is run.policy for c in calls) == (0 if skip else 1)
        torch.manual_seed(2)
        update = run.update(exp)
        stats = {**update.metrics, **run.stats(exp, update)}
        results[skip] = (exp.advantages, stats, run.policy)
    (adv_a, stats_a, pol_a), (adv_b, stats_b, pol_b) = results[True], results[False]
    torch.testing.assert_close(adv_a, adv_b, atol=2e-5, rtol=1e-5, msg="corrected advantages")
    assert stats_b["engine_logprob_gap"] > 0.1 and 0 < stats_b["is_capped_frac"] < 1  # the correction does something
    for key in ("engine_logprob_gap", "is_weight_mean", "is_capped_frac", "advantage_mean", "policy_loss", "kl"):
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-4, abs=1e-5), key
    for (name, a), b in zip(pol_a.named_parameters(), pol_b.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
