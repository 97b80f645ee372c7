"""Advantage estimators, KL estimators and the PPO loss against hand-computed values and properties."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import rlhf_kernels
from rlhf_core import AdvantageInputs
from rlhf_plugins.ppo.advantages import (GAE, BatchMeanBaseline, EMABaseline, GroupMeanBaseline, ReinforcePP, RLOOBaseline,
                                         whiten)
from rlhf_core.distributed import masked_mean
from rlhf_core import PolicyLossInputs
from rlhf_plugins.ppo.loss import (KLController, aggregate, clipped_value_loss, kl_k1, kl_k3, ppo_clip,
                                   ppo_clip_logits_objective)


def inputs(rewards, groups=None, mask=None, token_rewards=None, values=None):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    mask = torch.ones(len(rewards), 2) if mask is None else torch.tensor(mask, dtype=torch.float32)
    groups = torch.zeros(len(rewards), dtype=torch.long) if groups is None else torch.tensor(groups)
    tr = torch.zeros_like(mask) if token_rewards is None else torch.tensor(token_rewards)
    return AdvantageInputs(rewards, tr, mask, groups, None if values is None else torch.tensor(values))


def test_batch_mean_hand_computed():
    adv = BatchMeanBaseline()(inputs([1.0, 2.0, 6.0], mask=[[1, 1], [1, 0], [0, 0]]))
    # mean 3 -> A = -2, -1, 3, broadcast on the mask
    assert adv.tolist() == [[-2.0, -2.0], [-1.0, 0.0], [0.0, 0.0]]


def test_ema_hand_computed():
    est = EMABaseline(decay=0.5)
    assert est(inputs([2.0, 4.0]))[:, 0].tolist() == [-1.0, 1.0]  # first batch: its own mean 3
    # baseline is still 3 for the second batch (updated after), then becomes 0.5*3 + 0.5*5 = 4
    assert est(inputs([5.0, 5.0]))[:, 0].tolist() == [2.0, 2.0]
    assert est.baseline == 4.0
    with pytest.raises(ValueError, match="decay must be in"):
        EMABaseline(decay=1.0)


def test_group_mean_and_rloo_hand_computed():
    inp = inputs([1.0, 3.0, 10.0, 20.0], groups=[0, 0, 1, 1])
    assert GroupMeanBaseline()(inp)[:, 0].tolist() == [-1.0, 1.0, -5.0, 5.0]
    # rloo: 1 - 3, 3 - 1, 10 - 20, 20 - 10
    assert RLOOBaseline()(inp)[:, 0].tolist() == [-2.0, 2.0, -10.0, 10.0]
    # scale: group std (unbiased) of (1, 3) is sqrt(2) -> A = -1/sqrt 2
    scaled = GroupMeanBaseline(scale=True, eps=0.0)(inp)[:, 0]
    assert torch.allclose(scaled, torch.tensor([-1, 1, -1, 1]) / math.sqrt(2))
    three = inputs([0.0, 3.0, 6.0], groups=[4, 4, 4])
    assert RLOOBaseline()(three)[:, 0].tolist() == [-4.5, 0.0, 4.5]
    # The named scales: std is GRPO's (the older `true`), none is Dr. GRPO's (`false`, the default).
    torch.testing.assert_close(GroupMeanBaseline(scale="std", eps=0.0)(inp)[:, 0], scaled)
    assert GroupMeanBaseline(scale="none")(inp)[:, 0].tolist() == [-1.0, 1.0, -5.0, 5.0]
    assert GroupMeanBaseline(scale=False)(inp)[:, 0].tolist() == [-1.0, 1.0, -5.0, 5.0]
    with pytest.raises(ValueError, match="scale must be 'std' \\(GRPO\\) or 'none' \\(Dr. GRPO\\), got 'mean'"):
        GroupMeanBaseline(scale="mean")


def test_all_equal_group_rewards_give_zero_advantage_in_every_group_estimator():
    tied = inputs([0.5, 0.5, 1.0, 1.0], groups=[0, 0, 1, 1])
    for estimator in (GroupMeanBaseline(scale="std"), GroupMeanBaseline(), RLOOBaseline()):
        assert estimator(tied).abs().sum() == 0, estimator


def test_reinforce_pp_hand_computed():
    # Two sequences: lengths 3 and 2 (T = 3). Token rewards -beta KL per token, R on the last token:
    # row 0: (-0.1, -0.2, 1.0 - 0.1) ; row 1: (-0.3, 2.0 - 0.1, [pad 5.0]).
    # gamma 1 returns: row 0: (0.6, 0.7, 0.9) ; row 1: (1.6, 1.9).
    tr = [[-0.1, -0.2, 0.9], [-0.3, 1.9, 5.0]]
    inp = inputs([0.6, 1.6], mask=[[1, 1, 1], [1, 1, 0]], token_rewards=tr)
    raw = ReinforcePP(normalize=False)(inp)
    torch.testing.assert_close(raw, torch.tensor([[0.6, 0.7, 0.9], [1.6, 1.9, 0.0]]))
    # Normalised over the 5 valid tokens: mean 5.7/5 = 1.14, population std sqrt(mean(G^2) - 1.14^2).
    g = [0.6, 0.7, 0.9, 1.6, 1.9]
    mean = sum(g) / 5
    std = math.sqrt(sum(x * x for x in g) / 5 - mean ** 2)
    want = torch.tensor([[(x - mean) / std for x in g[:3]], [(g[3] - mean) / std, (g[4] - mean) / std, 0.0]])
    torch.testing.assert_close(ReinforcePP(eps=0.0)(inp), want)
    # gamma 0.5: row 0: G_2 = 0.9, G_1 = -0.2 + 0.45 = 0.25, G_0 = -0.1 + 0.125 = 0.025.
    torch.testing.assert_close(ReinforcePP(gamma=0.5, normalize=False)(inp)[0], torch.tensor([0.025, 0.25, 0.9]))
    # gamma 0 without normalising: the advantage is the token's own reward (on-policy distillation).
    torch.testing.assert_close(ReinforcePP(gamma=0.0, normalize=False)(inp), torch.tensor(tr) * inp.mask)


def test_reinforce_pp_group_baseline_hand_computed():
    # Groups {0, 1} and {2, 3}, one token each, sequence rewards (1, 3 | 10, 10): the group mean is
    # subtracted from the last token's reward: (-1, 1 | 0, 0); then normalised globally (mean 0,
    # population std sqrt(2/4)).
    inp = inputs([1.0, 3.0, 10.0, 10.0], groups=[0, 0, 1, 1], mask=[[1]] * 4, token_rewards=[[1.0], [3.0], [10.0], [10.0]])
    assert ReinforcePP(baseline="group", normalize=False)(inp)[:, 0].tolist() == [-1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(ReinforcePP(baseline="group", eps=0.0)(inp)[:, 0],
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]) / math.sqrt(0.5))
    assert ReinforcePP(baseline="group").min_group_size == 2 and ReinforcePP().min_group_size == 1
    with pytest.raises(ValueError, match="reinforce_pp: baseline must be 'none' or 'group', got 'leave_one_out'"):
        ReinforcePP(baseline="leave_one_out")


def test_gae_hand_computed():
    # One sequence, 3 tokens, last token masked. r = (0, 1), V = (0.5, 0.25); gamma 0.9, lambda 0.5.
    # delta_1 = 1 + 0.9*0 - 0.25 = 0.75 ; A_1 = 0.75
    # delta_0 = 0 + 0.9*0.25 - 0.5 = -0.275 ; A_0 = -0.275 + 0.45*0.75 = 0.0625
    inp = inputs([1.0], mask=[[1, 1, 0]], token_rewards=[[0.0, 1.0, 7.0]], values=[[0.5, 0.25, 9.0]])
    adv = GAE(gamma=0.9, lam=0.5)(inp)
    assert torch.allclose(adv, torch.tensor([[0.0625, 0.75, 0.0]]))
    with pytest.raises(ValueError, match="gae needs critic values"):
        GAE()(inputs([1.0]))


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    inp = inputs([1.0], mask=[[1, 1, 1]], token_rewards=[[0.1, 0.2, 0.7]], values=[[0.3, 0.2, 0.1]])
    adv = GAE(gamma=1.0, lam=1.0)(inp)
    returns = torch.tensor([[1.0, 0.9, 0.7]])
    assert torch.allclose(adv, returns - torch.tensor([[0.3, 0.2, 0.1]]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=24), st.integers(1, 6))
@example([5.0, 5.0], 1)
def test_group_baselines_zero_mean_per_group(rewards, n_groups):
    groups = [i % n_groups for i in range(len(rewards))]
    inp = inputs(rewards, groups=groups)
    for est in (GroupMeanBaseline(), RLOOBaseline()):
        adv = est(inp)[:, 0].double()
        for g in set(groups):
            members = [i for i, x in enumerate(groups) if x == g]
            assert abs(float(adv[members].sum())) <= 1e-3 * (1 + max(abs(r) for r in rewards))


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    assert kl_k1(logp, ref).tolist() == [1.0, -1.0]
    # d = ref - logp = (-1, 1): e^-1 + 1 - 1 = e^-1 ; e^1 - 1 - 1 = e - 2
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([math.exp(-1), math.e - 2]))
    assert kl_k3(logp, logp).abs().max() == 0


def test_adaptive_kl_controller():
    ctl = KLController(0.1, adaptive=True, target=1.0, horizon=100)
    ctl.update(kl=3.0, n_samples=10)  # error clipped to +0.2 -> beta * (1 + 0.02)
    assert math.isclose(ctl.value, 0.102)
    fixed = KLController(0.1, adaptive=False, target=1.0, horizon=100)
    fixed.update(kl=3.0, n_samples=10)
    assert fixed.value == 0.1


def test_ppo_loss_parity_with_formula_on_recorded_tensors():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = -100
    old = rlhf_kernels.token_logprobs(logits, labels) + 0.3 * torch.randn(3, 5)
    adv = torch.randn(3, 5)
    valid_f = (labels != -100).float()
    inputs = PolicyLossInputs(rlhf_kernels.token_logprobs(logits, labels, backend="reference"), old, adv, valid_f)
    terms, per_token = ppo_clip(inputs, clip_eps=0.2)
    loss = aggregate(terms, valid_f, "token_mean", float(valid_f.sum()))
    metrics = {k: float(masked_mean(v, valid_f)) if torch.is_tensor(v) else v for k, v in per_token.items()}
    # ppo_clip's fused form (one sweep over the logits) gives the same loss and statistics.
    fast, fast_metrics = ppo_clip_logits_objective(logits, labels, old, adv, None, valid_f, clip_eps=0.2, kl_estimator="k1",
                                                   kl_in_loss=False, beta=0.0, entropy_coef=0.0, backend="reference")
    assert torch.allclose(fast, loss, atol=1e-6)
    for key in ("clip_frac", "ratio_mean", "ratio_max", "approx_kl"):
        assert math.isclose(fast_metrics[key], metrics[key], rel_tol=1e-5, abs_tol=1e-6), key
    # The formula written out longhand.
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    valid = labels != -100
    r = torch.exp(logp - old)
    per = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    expected = per[valid].mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert math.isclose(metrics["clip_frac"], float((-adv * r.clamp(0.8, 1.2) > -adv * r)[valid].float().mean()), abs_tol=1e-6)
    assert math.isclose(metrics["ratio_mean"], float(r[valid].mean()), rel_tol=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.floats(-3, 3), st.floats(-5, 5), st.floats(0.05, 0.5))
def test_clipping_bounds_the_ratio_effect(log_ratio, advantage, eps):
    """Per token, the objective never credits a ratio beyond 1 +- eps in the advantage's direction,
    and where the clip is active the gradient vanishes."""
    logits = torch.tensor([[0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0])
    logp = math.log(0.5)
    old = torch.tensor([logp - log_ratio])
    adv = torch.tensor([advantage])
    loss = rlhf_kernels.ppo_clip_loss(logits, labels, old, adv, clip_eps=eps, backend="reference")
    r = math.exp(log_ratio)
    objective, tol = -loss.item(), 1e-4 * (1 + abs(advantage) * r)
    # min(r A, clip(r) A) is bounded by both terms: a ratio outside [1-eps, 1+eps] earns no more
    # than the clipped ratio would.
    assert objective <= advantage * min(max(r, 1 - eps), 1 + eps) + tol
    assert objective <= advantage * r + tol
    loss.backward()
    if (advantage > 0 and r > 1 + eps) or (advantage < 0 and r < 1 - eps):
        assert logits.grad.abs().max() == 0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 9), st.integers(0, 10_000))
def test_unclipped_first_step_gradient_equals_reinforce(batch, steps, vocab, seed):
    """At r = 1 (one PPO epoch, first step), grad of the clipped loss = grad of -mean(A * logp)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, steps, vocab, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, steps), generator=g)
    adv = torch.randn(batch, steps, generator=g)
    old = rlhf_kernels.token_logprobs(logits, labels, backend="reference").detach()
    logp = rlhf_kernels.token_logprobs(logits, labels, backend="reference")
    ones = torch.ones_like(adv)
    terms, _ = ppo_clip(PolicyLossInputs(logp, old, adv, ones))
    (grad_ppo,) = torch.autograd.grad(aggregate(terms, ones, "token_mean", float(ones.sum())), logits, retain_graph=True)
    (grad_pg,) = torch.autograd.grad(-(adv * logp).mean(), logits)
    assert torch.allclose(grad_ppo, grad_pg, atol=1e-6)


def test_clipped_value_loss_hand_computed():
    values, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    # token 0: unclipped (1-2)^2 = 1, clipped V = 0.2 -> (0.2-2)^2 = 3.24 -> 3.24 ; token 1: 1 and 1 -> 1
    assert math.isclose(clipped_value_loss(values, old, ret, torch.ones(1, 2), 0.2).item(), 0.5 * (3.24 + 1) / 2, rel_tol=1e-6)


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    w = whiten(x, torch.tensor([[1, 1, 1, 0]]))
    assert torch.allclose(w[0, :3].mean(), torch.tensor(0.0), atol=1e-6) and w[0, 3] == 0
    assert torch.allclose((w[0, :3] ** 2).mean(), torch.tensor(1.0), atol=1e-4)


def test_gae_over_a_multi_turn_episode_skips_the_environments_tokens():
    """Policy tokens at 0, 1 and 4 (2, 3: an environment's turn): GAE must equal GAE over the three
    policy tokens side by side. By hand with gamma 0.9, lambda 0.8, r = (0, 0, 1), V = (0.5, 0.2, 0.4):
    delta_2 = 1 - 0.4 = 0.6; delta_1 = 0 + 0.9 * 0.4 - 0.2 = 0.16; delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32;
    A_2 = 0.6; A_1 = 0.16 + 0.72 * 0.6 = 0.592; A_0 = -0.32 + 0.72 * 0.592 = 0.10624."""
    gae = GAE(gamma=0.9, lam=0.8)
    holes = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 7.0, 7.0, 1.0]])  # whatever sits on the environment's tokens is ignored
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, 0.4]])
    adv = gae(AdvantageInputs(rewards.sum(1), rewards, holes, torch.zeros(1), values))
    assert torch.allclose(adv, torch.tensor([[0.10624, 0.592, 0.0, 0.0, 0.6]]))
    packed = gae(AdvantageInputs(torch.ones(1), torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), torch.zeros(1),
                                 torch.tensor([[0.5, 0.2, 0.4]])))
    assert torch.allclose(adv[:, [0, 1, 4]], packed)
