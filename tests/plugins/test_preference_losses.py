"""Preference losses (the DPO family, SimPO, ORPO, KTO): each against a float64 reference written
here from its paper's equation, values and gradients; ties, length normalisation, extreme
log-probs, ORPO's log-odds as p -> 1, KTO's weights and reference point, the registered names and
their meta, and the option checks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.plugin_system.registry import RegistryError
from rlhf_plugins.preference.losses import (
    KTOInputs, PreferenceInputs, dpo_loss, hinge_loss, ipo_loss, kto_loss, kto_reference_point, orpo_loss,
    robust_dpo_loss, simpo_loss,
)

LN3 = math.log(3.0)  # sigma(ln 3) = 3/4: hand-checkable sigmoids


def pairs(pi_c, pi_r, ref_c=None, ref_r=None, tokens_c=None, tokens_r=None, dtype=torch.float64) -> PreferenceInputs:
    """Inputs from lists; the policy's log-probs are leaves that require grad, token counts int64."""
    def t(v):
        return None if v is None else torch.tensor(v, dtype=dtype)

    ones = [1] * len(pi_c)
    return PreferenceInputs(t(pi_c).requires_grad_(), t(pi_r).requires_grad_(), t(ref_c), t(ref_r),
                            torch.tensor(tokens_c or ones), torch.tensor(tokens_r or ones))


def grads(loss: torch.Tensor, x: PreferenceInputs) -> tuple[list[float], list[float]]:
    """d(sum of the per-pair losses) / d(chosen_logps, rejected_logps)."""
    gc, gr = torch.autograd.grad(loss.sum(), [x.chosen_logps, x.rejected_logps])
    return gc.tolist(), gr.tolist()


def sigma(x):
    """The logistic function written out, 1 / (1 + e^-x)."""
    return 1.0 / (1.0 + torch.exp(-x))


# ---- float64 references, straight from each paper's equation (naive forms, moderate inputs) ----

def ref_dpo(pc, pr, rc, rr, tc, tr, beta, label_smoothing):
    """Rafailov et al. eq. 7; cDPO (Mitchell 2023): the loss averaged over a label flip of prob eps."""
    x = beta * ((pc - rc) - (pr - rr))
    return -(1 - label_smoothing) * torch.log(sigma(x)) - label_smoothing * torch.log(sigma(-x))


def ref_ipo(pc, pr, rc, rr, tc, tr, beta):
    """Azar et al.'s (h - 1/(2 tau))^2 with each log-ratio averaged over its tokens (TRL's convention)."""
    return ((pc - rc) / tc - (pr - rr) / tr - 1 / (2 * beta)) ** 2


def ref_hinge(pc, pr, rc, rr, tc, tr, beta):
    """max(0, 1 - beta h)."""
    x = 1 - beta * ((pc - rc) - (pr - rr))
    return torch.where(x > 0, x, torch.zeros_like(x))


def ref_robust(pc, pr, rc, rr, tc, tr, beta, label_smoothing):
    """Chowdhury et al. 2024: ((1 - eps) l(beta h) - eps l(-beta h)) / (1 - 2 eps), l(x) = -log sigma(x)."""
    x, e = beta * ((pc - rc) - (pr - rr)), label_smoothing
    return ((1 - e) * -torch.log(sigma(x)) - e * -torch.log(sigma(-x))) / (1 - 2 * e)


def ref_simpo(pc, pr, rc, rr, tc, tr, beta, gamma):
    """Meng et al. eq. 6: -log sigma(beta/|y_c| pi_c - beta/|y_r| pi_r - gamma)."""
    return -torch.log(sigma(beta / tc * pc - beta / tr * pr - gamma))


def ref_orpo(pc, pr, rc, rr, tc, tr, beta):
    """Hong et al. eqs. 6-7: -(1/m) log P(y_c) - lambda log sigma(log(odds_c / odds_r)), P = exp(mean logp)."""
    p_c, p_r = torch.exp(pc / tc), torch.exp(pr / tr)
    odds_c, odds_r = p_c / (1 - p_c), p_r / (1 - p_r)
    return -pc / tc - beta * torch.log(sigma(torch.log(odds_c / odds_r)))


def rewards_vs_reference(pc, pr, rc, rr, tc, tr, beta):
    return beta * (pc - rc), beta * (pr - rr)


def rewards_per_token_vs_reference(pc, pr, rc, rr, tc, tr, beta):
    return beta * ((pc - rc) / tc), beta * ((pr - rr) / tr)


def rewards_reference_free(pc, pr, rc, rr, tc, tr, beta):
    return beta * (pc / tc), beta * (pr / tr)


REFERENCE_FREE = {"simpo", "orpo"}
FLIP = st.floats(0.0, 0.45)
CASES = {  # loss, reference, its implicit rewards, strategies for its options besides beta
    "sigmoid": (dpo_loss, ref_dpo, rewards_vs_reference, {"label_smoothing": FLIP}),
    "ipo": (ipo_loss, ref_ipo, rewards_per_token_vs_reference, {}),
    "hinge": (hinge_loss, ref_hinge, rewards_vs_reference, {}),
    "robust": (robust_dpo_loss, ref_robust, rewards_vs_reference, {"label_smoothing": FLIP}),
    "simpo": (simpo_loss, ref_simpo, rewards_reference_free, {"gamma": st.floats(0.0, 3.0)}),
    "orpo": (orpo_loss, ref_orpo, rewards_reference_free, {}),
}


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=20, deadline=None)
@given(data=st.data(), size=st.integers(1, 5), beta=st.floats(0.01, 2.0))
def test_every_preference_loss_matches_its_float64_reference(name, data, size, beta):
    fn, reference, rewards, option_strategies = CASES[name]
    options = {k: data.draw(s, label=k) for k, s in option_strategies.items()}
    # Mean per-token log-probs in [-4, -0.01] (p < 1 for ORPO's odds), summed over up to 20 tokens,
    # references in [-60, 0]: |beta h| <= 280, where the naive references' gradients stay exact
    # ((1 + e^280)^2 is still a float64). Larger values have their own tests below.
    tokens = st.lists(st.integers(1, 20), min_size=size, max_size=size)
    means = st.lists(st.floats(-4.0, -0.01), min_size=size, max_size=size)
    tc, tr = data.draw(tokens, label="chosen_tokens"), data.draw(tokens, label="rejected_tokens")
    pi_c = [m * n for m, n in zip(data.draw(means, label="chosen_means"), tc)]
    pi_r = [m * n for m, n in zip(data.draw(means, label="rejected_means"), tr)]
    refs = st.lists(st.floats(-60.0, 0.0), min_size=size, max_size=size)
    ref_c, ref_r = data.draw(refs, label="ref_chosen"), data.draw(refs, label="ref_rejected")
    x = pairs(pi_c, pi_r, None, None, tc, tr) if name in REFERENCE_FREE else pairs(pi_c, pi_r, ref_c, ref_r, tc, tr)
    loss, metrics = fn(x, beta=beta, **options)

    leaves = [x.chosen_logps.detach().clone().requires_grad_(), x.rejected_logps.detach().clone().requires_grad_()]
    args = (*leaves, torch.tensor(ref_c, dtype=torch.float64), torch.tensor(ref_r, dtype=torch.float64),
            x.chosen_tokens.double(), x.rejected_tokens.double())
    expected = reference(*args, beta=beta, **options)
    assert loss.shape == (size,)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    got = torch.autograd.grad(loss.sum(), [x.chosen_logps, x.rejected_logps])
    torch.testing.assert_close(got, torch.autograd.grad(expected.sum(), leaves), rtol=1e-9, atol=1e-9)
    want_c, want_r = rewards(*args, beta=beta)
    torch.testing.assert_close(metrics["rewards_chosen"], want_c.detach())
    torch.testing.assert_close(metrics["rewards_rejected"], want_r.detach())
    torch.testing.assert_close(metrics["margin"], (want_c - want_r).detach())
    assert metrics["accuracy"].tolist() == [float(m > 0) for m in (want_c - want_r).tolist()]
    assert not any(v.requires_grad for v in metrics.values() if isinstance(v, torch.Tensor))


def test_dpo_by_hand_tie_and_cdpo_stationary_point():
    # Pair 0: pi_c - ref_c = ln 3, pi_r - ref_r = -ln 3, so h = 2 ln 3 and beta h = ln 3 at beta 0.5:
    # loss = -log(3/4) = log(4/3). Pair 1 is a tie (both log-ratios -1, h = 0): loss = log 2.
    x = pairs([-10.0 + LN3, -5.0], [-12.0 - LN3, -7.0], [-10.0, -4.0], [-12.0, -6.0])
    loss, metrics = dpo_loss(x, beta=0.5)
    assert loss.tolist() == pytest.approx([math.log(4 / 3), math.log(2)], rel=1e-12)
    # d/dpi_c of -log sigma(beta h) = -beta (1 - sigma(beta h)): -0.5/4 and -0.5/2; pi_r the opposite.
    assert grads(loss, x) == (pytest.approx([-0.125, -0.25]), pytest.approx([0.125, 0.25]))
    # rewards beta (pi - ref): 0.5 ln 3 and -0.5; -0.5 ln 3 and -0.5; a tie is not counted as right.
    assert metrics["rewards_chosen"].tolist() == pytest.approx([0.5 * LN3, -0.5])
    assert metrics["rewards_rejected"].tolist() == pytest.approx([-0.5 * LN3, -0.5])
    assert metrics["margin"].tolist() == pytest.approx([LN3, 0.0])
    assert metrics["accuracy"].tolist() == [1.0, 0.0]
    # cDPO with eps = 0.25 at sigma(beta h) = 3/4: loss = -0.75 log(3/4) - 0.25 log(1/4), and the
    # gradient -(1 - eps)(1 - sigma) + eps sigma = -0.75/4 + 0.25 * 3/4 = 0: sigma = 1 - eps is the minimum.
    x = pairs([-10.0 + LN3], [-12.0 - LN3], [-10.0], [-12.0])
    loss, _ = dpo_loss(x, beta=0.5, label_smoothing=0.25)
    assert loss.item() == pytest.approx(-0.75 * math.log(0.75) - 0.25 * math.log(0.25), rel=1e-12)
    assert grads(loss, x) == (pytest.approx([0.0], abs=1e-15), pytest.approx([0.0], abs=1e-15))


def test_ipo_by_hand_and_its_per_token_normalisation():
    # beta 0.25: the target margin 1/(2 beta) = 2. Pair 0: (pi_c - ref_c)/|y_c| = 6/3 = 2 and
    # (pi_r - ref_r)/|y_r| = -4/4 = -1, h = 3: loss (3 - 2)^2 = 1. Pair 1 (same totals, |y_c| = 6):
    # h = 1 + 1 = 2, loss 0. Pair 2 is a tie (h = 0): (1/(2 beta))^2 = 4.
    x = pairs([-4.0, -4.0, -3.0], [-9.0, -9.0, -3.0], [-10.0, -10.0, -3.0], [-5.0, -5.0, -3.0], [3, 6, 2], [4, 4, 5])
    loss, metrics = ipo_loss(x, beta=0.25)
    assert loss.tolist() == pytest.approx([1.0, 0.0, 4.0], abs=1e-12)
    # d/dpi_c = 2 (h - 2) / |y_c|, d/dpi_r = -2 (h - 2) / |y_r|: 2/3 and -1/2; 0; -4/2 and 4/5.
    assert grads(loss, x) == (pytest.approx([2 / 3, 0.0, -2.0]), pytest.approx([-0.5, 0.0, 0.8]))
    # rewards per token, beta (pi - ref)/|y|: 0.25 * 2, 0.25 * -1.
    assert metrics["rewards_chosen"][0].item() == pytest.approx(0.5)
    assert metrics["rewards_rejected"][0].item() == pytest.approx(-0.25)
    # DPO reads the totals only: pairs 0 and 1 have the same loss whatever their lengths.
    dpo, _ = dpo_loss(x, beta=0.25)
    assert dpo[0].item() == dpo[1].item()


def test_hinge_by_hand():
    # beta 0.5; h = 1, 4, 0: 1 - beta h = 0.5, -1 (clipped to 0), 1 (the tie).
    x = pairs([-1.0, 2.0, -3.0], [-2.0, -2.0, -3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    loss, _ = hinge_loss(x, beta=0.5)
    assert loss.tolist() == [0.5, 0.0, 1.0]
    # d/dpi_c = -beta where the hinge is active, 0 past the margin.
    assert grads(loss, x) == ([-0.5, 0.0, -0.5], [0.5, 0.0, 0.5])


def test_robust_dpo_is_unbiased_and_reduces_to_dpo():
    x = pairs([-10.0 + LN3, -5.0], [-12.0 - LN3, -7.5], [-10.0, -4.0], [-12.0, -6.0])
    flipped = pairs([-12.0 - LN3, -7.5], [-10.0 + LN3, -5.0], [-12.0, -6.0], [-10.0, -4.0])
    eps = 0.3
    clean, _ = robust_dpo_loss(x, beta=0.5, label_smoothing=eps)
    noisy, _ = robust_dpo_loss(flipped, beta=0.5, label_smoothing=eps)
    # Chowdhury et al.'s defining property: over a label flipped with probability eps, the expected
    # robust loss is the clean DPO loss -log sigma(beta h): log(4/3) for pair 0 (beta h = ln 3),
    # -log sigma(0.5 * 0.5) for pair 1 (h = -1 - (-1.5) = 0.5).
    expected = [math.log(4 / 3), math.log(1 + math.exp(-0.25))]
    assert ((1 - eps) * clean + eps * noisy).tolist() == pytest.approx(expected, rel=1e-12)
    # At eps = 0 it is DPO.
    torch.testing.assert_close(robust_dpo_loss(x, beta=0.5, label_smoothing=0.0)[0], dpo_loss(x, beta=0.5)[0])


def test_simpo_by_hand_and_its_length_normalisation():
    # beta 2, gamma 1. Pair 0: pi_c/|y_c| = -6/3 = -2, pi_r/|y_r| = -12/4 = -3: z = 2 (1) - 1 = 1,
    # loss log(1 + e^-1). Pair 1, same totals but |y_r| = 12: -12/12 = -1, z = 2 (-1) - 1 = -3,
    # loss log(1 + e^3). Pair 2 ties the per-token means (-1 and -1): loss log(1 + e^gamma).
    x = pairs([-6.0, -6.0, -2.0], [-12.0, -12.0, -5.0], None, None, [3, 3, 2], [4, 12, 5])
    loss, metrics = simpo_loss(x, beta=2.0, gamma=1.0)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.exp(3)), math.log1p(math.e)])
    # d/dpi_c = -sigma(-z) beta / |y_c|; d/dpi_r = +sigma(-z) beta / |y_r|.
    s = [1 / (1 + math.exp(z)) for z in (1.0, -3.0, -1.0)]
    assert grads(loss, x) == (pytest.approx([-s[0] * 2 / 3, -s[1] * 2 / 3, -s[2] * 2 / 2]),
                              pytest.approx([s[0] * 2 / 4, s[1] * 2 / 12, s[2] * 2 / 5]))
    # Rewards beta pi/|y|: -4 and -6 for pair 0.
    assert metrics["rewards_chosen"][0].item() == pytest.approx(-4.0)
    assert metrics["rewards_rejected"][0].item() == pytest.approx(-6.0)
    # gamma 0 at a tie is log 2.
    assert simpo_loss(x, gamma=0.0)[0][2].item() == pytest.approx(math.log(2))


def test_orpo_tie_and_log_odds_as_p_goes_to_one():
    # A tie of per-token means (-0.5 each): log odds ratio 0, loss = NLL 0.5 + lambda log 2.
    x = pairs([-1.0], [-2.5], None, None, [2], [5])
    loss, metrics = orpo_loss(x, beta=0.1)
    assert loss.item() == pytest.approx(0.5 + 0.1 * math.log(2), rel=1e-12)
    assert metrics["nll"].item() == 0.5 and metrics["log_odds_ratio"].item() == pytest.approx(0.0, abs=1e-12)
    # p -> 1: per-token means -1e-9 and -1e-30 against -1. log(1 - e^a) ~ log(-a) (relative error
    # |a|/2), so log odds ~ a - log(-a); log odds(-1) = -1 - log(1 - 1/e).
    x = pairs([-1e-9, -1e-30], [-1.0, -1.0], None, None)
    loss, metrics = orpo_loss(x, beta=0.1)
    expected = [a - math.log(-a) - (-1 - math.log(1 - math.exp(-1))) for a in (-1e-9, -1e-30)]
    assert metrics["log_odds_ratio"].tolist() == pytest.approx(expected, rel=1e-8)
    gc, gr = grads(loss, x)
    assert all(math.isfinite(g) for g in gc + gr)
    # p = 1 exactly (every token certain, common in fp32): finite loss and gradients, in fp32 too.
    for dtype in (torch.float64, torch.float32):
        x = pairs([0.0, -1e-8], [-1.0, 0.0], None, None, dtype=dtype)
        loss, _ = orpo_loss(x, beta=0.1)
        assert torch.isfinite(loss).all()
        gc, gr = grads(loss, x)
        assert all(math.isfinite(g) for g in gc + gr)


@pytest.mark.parametrize("name", list(CASES))
def test_extreme_log_probs_stay_finite_in_fp32(name):
    fn = CASES[name][0]
    refs = (None, None) if name in REFERENCE_FREE else ([0.0, -1e4], [-1e4, 0.0])
    x = pairs([-1e4, -1e4], [-1e4, -1.0], *refs, [1, 1], [1, 1], dtype=torch.float32)
    loss, metrics = fn(x, beta=0.1)
    assert torch.isfinite(loss).all() and all(torch.isfinite(v).all() for v in metrics.values())
    gc, gr = grads(loss, x)
    assert all(math.isfinite(g) for g in gc + gr)


def test_dpo_asymptotes_at_extreme_log_ratios():
    # beta h = -1000: -log sigma(-1000) = 1000 (a naive log(sigmoid) is inf in fp32), gradient
    # -beta (1 - sigma) = -0.1. beta h = +1000: loss 0, gradient 0.
    x = pairs([-1e4, 0.0], [0.0, -1e4], [0.0, 0.0], [0.0, 0.0], dtype=torch.float32)
    loss, _ = dpo_loss(x, beta=0.1)
    assert loss.tolist() == pytest.approx([1000.0, 0.0], rel=1e-6)
    assert grads(loss, x) == (pytest.approx([-0.1, 0.0]), pytest.approx([0.1, 0.0]))


def test_kto_by_hand_with_weights_and_a_detached_reference_point():
    # beta 0.5, z0 0.2. Desirable r = z0 + 2 ln 3: beta (r - z0) = ln 3, loss w_d (1 - 3/4) = 2/4.
    # Undesirable r = z0 - 2 ln 3: beta (z0 - r) = ln 3, loss w_u / 4 = 3/4; undesirable at r = z0: w_u / 2.
    logps = torch.tensor([0.2 + 2 * LN3 - 7.0, 0.2 - 2 * LN3 - 7.0, 0.2 - 7.0], dtype=torch.float64, requires_grad=True)
    z0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    x = KTOInputs(logps, torch.full((3,), -7.0, dtype=torch.float64), torch.tensor([True, False, False]), z0)
    loss, metrics = kto_loss(x, beta=0.5, desirable_weight=2.0, undesirable_weight=3.0)
    assert loss.tolist() == pytest.approx([0.5, 0.75, 1.5], rel=1e-12)
    # d/dr: desirable -w_d beta sigma(1 - sigma) = -2 * 0.5 * 3/16; undesirable +w_u beta sigma(1 - sigma)
    # = 3 * 0.5 * 3/16 and 3 * 0.5 * 1/4.
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-3 / 16, 9 / 32, 3 / 8])
    assert z0.grad is None  # detached: no gradient flows into the reference point
    assert metrics["rewards"].tolist() == pytest.approx([0.5 * r for r in (0.2 + 2 * LN3, 0.2 - 2 * LN3, 0.2)])


def test_kto_reference_point_is_a_clamped_detached_global_mean():
    kl_logps = torch.tensor([-1.0, -2.0, 4.0], dtype=torch.float64, requires_grad=True)
    # pi - ref = 1, 0, 5: mean 2.
    z0 = kto_reference_point(kl_logps, torch.tensor([-2.0, -2.0, -1.0], dtype=torch.float64))
    assert z0.item() == pytest.approx(2.0) and z0.shape == () and not z0.requires_grad
    # A negative mean (-1) is clamped to 0.
    assert kto_reference_point(kl_logps, torch.tensor([0.0, -1.0, 5.0], dtype=torch.float64)).item() == 0.0
    # Another rank holding 7 pairs that sum to 10: the global mean is (6 + 10) / (3 + 7) = 1.6, not
    # the mean of the two ranks' means (2 + 10/7) / 2.
    other_rank = torch.tensor([10.0, 7.0], dtype=torch.float64)
    z0 = kto_reference_point(kl_logps, torch.tensor([-2.0, -2.0, -1.0], dtype=torch.float64),
                             all_reduce=lambda total: total + other_rank)
    assert z0.item() == pytest.approx(1.6)
    # No mismatched pair anywhere: 0.
    assert kto_reference_point(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_registered_names_families_meta_and_options(registry):
    assert registry.names("loss", "preference") == sorted(CASES)
    assert registry.names("loss", "kto") == ["kto"]
    for name in CASES:
        entry = registry.get("loss", name, "preference")
        assert entry.obj is CASES[name][0] and entry.plugin == "preference-losses"
        assert entry.meta["reference_free"] is (name in REFERENCE_FREE)
    assert registry.get("loss", "kto", "kto").meta["reference_free"] is False
    # A preference loss asked for by a stage of another family is a config error.
    with pytest.raises(RegistryError, match="'preference' loss"):
        registry.get("loss", "sigmoid", "kto")
    # The options a config may set, with their defaults (written once, in the signatures).
    options = {e.name: {k: p.default for k, p in e.options().items()} for e in registry.entries("loss")
               if e.plugin == "preference-losses"}
    assert options == {
        "sigmoid": {"beta": 0.1, "label_smoothing": 0.0}, "ipo": {"beta": 0.1}, "hinge": {"beta": 0.1},
        "robust": {"beta": 0.1, "label_smoothing": 0.1}, "simpo": {"beta": 2.0, "gamma": 1.0}, "orpo": {"beta": 0.1},
        "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    }


@pytest.mark.parametrize("name, options, message", [
    ("sigmoid", {"beta": 0.0}, "sigmoid: beta must be a finite number > 0, got 0.0"),
    ("sigmoid", {"beta": float("inf")}, "beta must be a finite number > 0"),
    ("ipo", {"beta": float("nan")}, "ipo: beta must be a finite number > 0"),
    ("hinge", {"beta": -1.0}, "hinge: beta"),
    ("sigmoid", {"label_smoothing": 0.5}, r"sigmoid: label_smoothing must be in \[0, 0.5\)"),
    ("robust", {"label_smoothing": -0.1}, "robust: label_smoothing"),
    ("simpo", {"gamma": -0.5}, "simpo: gamma must be a finite number >= 0"),
    ("orpo", {"beta": 0}, "orpo: beta"),
    ("kto", {"desirable_weight": 0.0}, "kto: desirable_weight"),
    ("kto", {"undesirable_weight": float("inf")}, "kto: undesirable_weight"),
])
def test_check_options_rejects_bad_values(registry, name, options, message):
    entry = registry.get("loss", name)
    with pytest.raises(ValueError, match=message):
        entry.obj.check_options(**options)


def test_check_options_accepts_the_defaults_and_boundaries(registry):
    for name in [*CASES, "kto"]:
        registry.get("loss", name).obj.check_options()
    dpo_loss.check_options(beta=1e-3, label_smoothing=0.0)
    simpo_loss.check_options(gamma=0.0)


def test_a_reference_loss_without_the_reference_says_so():
    with pytest.raises(ValueError, match="needs the reference's log-probs"):
        dpo_loss(pairs([-1.0], [-2.0]))
