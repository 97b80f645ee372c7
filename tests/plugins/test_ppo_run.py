"""The PPO run object: its optimizer steps follow the ``optim:`` block's schedule (PPO had none
before), an iteration leaves its Experience as scoring filled it, and its state carries the
schedule across a checkpoint."""
from __future__ import annotations

import copy

import pytest
import torch

from ppo_parts import prompts
from rlhf_core import GenerationConfig, ModelConfig
from rlhf_core.models import load_causal_lm
from rlhf_plugins.ppo.config import KLConfig, PolicyOptimConfig, PPOConfig
from rlhf_plugins.ppo.run import PPORun

TEXTS = ["abc", "hello there", "x", "aaaa b"]


def reward(prompts, responses, rows):
    return torch.tensor([float(r.count("a")) - 0.1 * len(r) for r in responses])


def make_run(registry, **optim) -> PPORun:
    config = PPOConfig(prompts_per_batch=4, samples_per_prompt=2, ppo_epochs=2, minibatch_size=4, iterations=3,
                       generation=GenerationConfig(max_new_tokens=6), kl=KLConfig(coef=0.05),
                       optim=PolicyOptimConfig(lr=1e-3, **optim))
    policy = load_causal_lm(ModelConfig(), seed=0)
    return PPORun.from_parts(registry, config, policy, reference=copy.deepcopy(policy).eval().requires_grad_(False),
                             rewards=reward)


def test_the_policy_learning_rate_follows_the_optim_schedule(registry):
    """3 iterations x 2 epochs x 2 minibatches = 12 optimizer steps; warm-up 2, then linear to 0."""
    run = make_run(registry, schedule="linear", warmup_steps=2)
    assert run.config.optimizer_steps() == 12
    lrs = []
    for _ in range(3):
        torch.manual_seed(0)
        exp = run.make_experience(prompts(run, TEXTS))
        lrs.append(run.policy_optim.lr)
        run.update(exp)
    assert lrs == pytest.approx([5e-4, 1e-3 * 8 / 10, 1e-3 * 4 / 10])  # before steps 0, 4 and 8
    assert run.policy_optim.lr == pytest.approx(0.0)
    constant = make_run(registry)  # PPO's default: constant
    constant.update(constant.make_experience(prompts(constant, TEXTS)))
    assert constant.policy_optim.lr == 1e-3


def test_an_iteration_leaves_the_experience_as_scoring_filled_it(registry):
    run = make_run(registry)
    torch.manual_seed(1)
    exp = run.make_experience(prompts(run, TEXTS))
    before = {name: getattr(exp, name).clone() for name in ("old_logprobs", "ref_logprobs", "entropy", "kl_tokens",
                                                            "advantages")}
    update = run.update(exp)
    for name, value in before.items():
        assert torch.equal(getattr(exp, name), value), name
    assert update.old_logprobs is None  # two epochs: off-policy, the Experience's old log-probs are the old ones
    stats = run.stats(exp, update)
    assert stats["kl"] == pytest.approx(float(exp.kl_tokens.sum()) / len(exp.rewards))


def test_the_run_state_continues_the_schedule(registry):
    """What a checkpoint stores beside weights and optimizers: prompt sampler, KL coefficient,
    estimator state and the optimizers' schedules; a run restored from it takes the same steps."""
    run = make_run(registry, schedule="cosine", warmup_steps=1)
    torch.manual_seed(2)
    run.update(run.make_experience(run.draw(prompts(run, TEXTS))))
    state = run.state_dict()
    fresh = make_run(registry, schedule="cosine", warmup_steps=1)
    fresh.load_state_dict(state)
    assert fresh.policy_optim.lr == run.policy_optim.lr != 1e-3
    assert fresh.rng.getstate() == run.rng.getstate() and fresh.kl.value == run.kl.value
