"""Preference losses, pure functions on sequence log-probs: the ``preference`` family (DPO and its
relatives, paired) and the ``kto`` family (KTO, unpaired).

The ``preference`` contract::

    loss(inputs: PreferenceInputs, **options) -> (per_pair_loss [B], metrics)

``inputs`` carries, per pair ``b`` of the micro-batch, the policy's summed log-probs of the
response tokens ``chosen_logps`` / ``rejected_logps`` (differentiable), the frozen reference's
``ref_chosen_logps`` / ``ref_rejected_logps`` (``None`` for a loss registered with
``reference_free=True``: the stage then never runs the reference) and the response token counts
``chosen_tokens`` / ``rejected_tokens`` (> 0), which the length-normalised losses divide by: the
mean per-token log-prob is ``chosen_logps / chosen_tokens``, so ORPO's NLL term needs no field of
its own. The loss returns one loss per pair, ``[B]``; the host averages it over the global batch
(every rank, every micro-batch). ``metrics``: name -> a detached ``[B]`` tensor (the host averages
it over the global batch) or a float. Every ``preference`` loss reports the implicit rewards it
compares: ``rewards_chosen`` and ``rewards_rejected`` (``beta * (pi - ref)`` for the losses with a
reference, per token for ``ipo``; ``beta * pi / |y|`` for the reference-free ones), ``margin`` =
``rewards_chosen - rewards_rejected`` and ``accuracy`` = ``margin > 0`` as 0/1.

The ``kto`` contract::

    loss(inputs: KTOInputs, **options) -> (per_example_loss [B], metrics)

``inputs`` carries one completion per example: ``logps`` / ``ref_logps`` (summed over the
response tokens), ``desirable`` (bool) and ``kl_ref_point`` (a detached scalar from
:func:`kto_reference_point`). The host averages the loss over the global batch; ``rewards`` [B]
is ``beta * (pi - ref)``, which the host averages over the desirable and the undesirable examples
separately (it holds ``desirable``).

Keyword-only parameters with defaults are a loss's options (the defaults are written once, in its
signature); ``loss.check_options(**options)`` raises ``ValueError`` for a bad value. Registered as
``register(name, fn, family="preference" | "kto", reference_free=bool)``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rlhf_core import hookimpl


@dataclass
class PreferenceInputs:
    """One micro-batch of preference pairs, every field ``[B]``: sequence log-probs summed over the
    response tokens (the policy's differentiable; the reference's ``None`` for a reference-free
    loss) and the response token counts."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class KTOInputs:
    """One micro-batch of unpaired examples: ``logps`` and ``ref_logps`` ``[B]`` summed over the
    response tokens, ``desirable`` ``[B]`` bool, ``kl_ref_point`` ``[]`` the detached z0 of
    :func:`kto_reference_point`."""

    logps: torch.Tensor
    ref_logps: torch.Tensor
    desirable: torch.Tensor
    kl_ref_point: torch.Tensor


def log_ratios(inputs: PreferenceInputs, *, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pi_c - ref_c, pi_r - ref_r)`` ``[B]`` each, divided by the response token counts when
    ``per_token``."""
    if inputs.ref_chosen_logps is None or inputs.ref_rejected_logps is None:
        raise ValueError("this preference loss needs the reference's log-probs (it is not reference-free)")
    chosen = inputs.chosen_logps - inputs.ref_chosen_logps
    rejected = inputs.rejected_logps - inputs.ref_rejected_logps
    if per_token:
        return chosen / inputs.chosen_tokens, rejected / inputs.rejected_tokens
    return chosen, rejected


def mean_logps(inputs: PreferenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's mean per-token log-probs ``(pi_c / |y_c|, pi_r / |y_r|)``, ``[B]`` each."""
    return inputs.chosen_logps / inputs.chosen_tokens, inputs.rejected_logps / inputs.rejected_tokens


def reward_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics every ``preference`` loss reports, detached ``[B]``: the implicit rewards, their
    ``margin`` and ``accuracy`` (1 where the chosen response's reward is the larger)."""
    chosen, rejected = rewards_chosen.detach(), rewards_rejected.detach()
    margin = chosen - rejected
    return {"rewards_chosen": chosen, "rewards_rejected": rejected, "margin": margin,
            "accuracy": (margin > 0).to(margin.dtype)}


def dpo_loss(inputs: PreferenceInputs, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023, eq. 7), per pair ``[B]``:
    ``-log sigma(beta h)``, ``h = (pi_c - ref_c) - (pi_r - ref_r)``.

    ``label_smoothing`` eps is cDPO (Mitchell 2023), for labels flipped with probability eps:
    ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``, the expected DPO loss under that
    noise; its minimum sits at a finite ``h``, so the policy stops pushing once
    ``sigma(beta h) = 1 - eps``."""
    chosen, rejected = log_ratios(inputs)
    logits = beta * (chosen - rejected)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, reward_metrics(beta * chosen, beta * rejected)


def ipo_loss(inputs: PreferenceInputs, *, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO (Azar et al. 2023, the sampled loss with tau = beta), per pair ``[B]``:
    ``(h_tok - 1 / (2 beta))^2``, ``h_tok = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|``.

    The paper writes ``h`` with sequence log-probs; like TRL (after the discussion in
    eric-mitchell/direct-preference-optimization#40) each log-ratio is averaged over its response's
    tokens, so the target margin ``1 / (2 beta)`` does not depend on the response lengths. The
    rewards are per token as well: ``beta * (pi - ref) / |y|``."""
    chosen, rejected = log_ratios(inputs, per_token=True)
    loss = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return loss, reward_metrics(beta * chosen, beta * rejected)


def hinge_loss(inputs: PreferenceInputs, *, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SLiC's hinge (Zhao et al. 2023) on DPO's reference-normalised log-ratio (the form of Liu et
    al. 2023, RSO, and TRL), per pair ``[B]``: ``max(0, 1 - beta h)``,
    ``h = (pi_c - ref_c) - (pi_r - ref_r)``: SLiC's margin ``delta = 1 / beta``, scaled by beta."""
    chosen, rejected = log_ratios(inputs)
    loss = torch.relu(1.0 - beta * (chosen - rejected))
    return loss, reward_metrics(beta * chosen, beta * rejected)


def robust_dpo_loss(inputs: PreferenceInputs, *, beta: float = 0.1,
                    label_smoothing: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Robust DPO (Chowdhury et al. 2024), per pair ``[B]``, for labels flipped with
    probability eps = ``label_smoothing``:
    ``[(1 - eps) l(beta h) - eps l(-beta h)] / (1 - 2 eps)``, ``l(x) = -log sigma(x)``,
    ``h = (pi_c - ref_c) - (pi_r - ref_r)``.

    Unbiased: averaged over the noise, ``(1 - eps) L(h) + eps L(-h) = l(beta h)``, the clean DPO
    loss (cDPO, ``sigmoid`` with ``label_smoothing``, is instead the noisy loss's expectation). The
    loss can be negative, and it is unbounded below for ``h -> -inf`` when eps > 0. The default eps
    0.1 is the smallest noise level of the paper's experiments; eps = 0 is plain DPO."""
    chosen, rejected = log_ratios(inputs)
    logits = beta * (chosen - rejected)
    eps = label_smoothing
    loss = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return loss, reward_metrics(beta * chosen, beta * rejected)


def simpo_loss(inputs: PreferenceInputs, *, beta: float = 2.0,
               gamma: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024, eq. 6), reference-free, per pair ``[B]``:
    ``-log sigma(beta pi_c / |y_c| - beta pi_r / |y_r| - gamma)``.

    ``gamma`` is the paper's target reward margin, in reward units (TRL's ``simpo_gamma``); the
    SimPO repository's ``gamma_beta_ratio`` is ``gamma / beta`` (its default 0.5 with beta 2.0 is
    this default gamma 1.0). Rewards: ``beta * pi / |y|``."""
    chosen, rejected = mean_logps(inputs)
    loss = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return loss, reward_metrics(beta * chosen, beta * rejected)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` for ``p = exp(mean_logp)``, ``mean_logp <= 0``, any shape.

    ``log(1 - p)`` is ``log(-expm1(x))``, exact as ``p -> 1``; ``x`` is capped at minus the
    dtype's smallest normal number so that ``p = 1`` (every token certain in fp32) gives a large
    finite log-odds and no gradient through the cap instead of ``inf``."""
    x = mean_logp.clamp(max=-torch.finfo(mean_logp.dtype).tiny)
    return x - torch.log(-torch.expm1(x))


def orpo_loss(inputs: PreferenceInputs, *, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free, per pair ``[B]``:
    ``-pi_c / |y_c| - beta log sigma(log odds(y_c) - log odds(y_r))`` with
    ``odds(y) = p / (1 - p)``, ``p = exp(pi / |y|)``; ``beta`` is the paper's lambda.

    The NLL term is the chosen response's mean per-token NLL (the paper's per-example
    ``L_SFT``), averaged over pairs by the host; TRL pools all chosen tokens of the batch into one
    token mean instead, which weights long responses more. Rewards: ``beta * pi / |y|``; metrics
    also ``nll`` and ``log_odds_ratio``."""
    chosen, rejected = mean_logps(inputs)
    log_odds_ratio = log_odds(chosen) - log_odds(rejected)
    nll = -chosen
    loss = nll - beta * F.logsigmoid(log_odds_ratio)
    metrics = reward_metrics(beta * chosen, beta * rejected)
    return loss, {**metrics, "nll": nll.detach(), "log_odds_ratio": log_odds_ratio.detach()}


def kto_reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor,
                        all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda total: total) -> torch.Tensor:
    """KTO's reference point (Ethayarajh et al. 2024, section 4.1), a detached scalar ``[]``:
    ``z0 = max(0, mean_i (pi(y'_i | x_i) - ref(y'_i | x_i)))`` over ``kl_logps`` / ``kl_ref_logps``
    ``[M]``, the summed log-probs of mismatched pairs (each prompt with another example's
    completion), an estimate of ``KL(pi || ref)``.

    The mean is over the global batch: ``all_reduce`` receives ``[sum, count]`` and returns its sum
    over ranks (``rlhf_core.distributed.all_reduce_sum``; the default is this process alone). With
    no pair anywhere, z0 is 0. No gradient flows through z0 (the paper does not backpropagate
    through it)."""
    diff = (kl_logps - kl_ref_logps).detach()
    count = torch.tensor(float(diff.numel()), dtype=diff.dtype, device=diff.device)
    total = all_reduce(torch.stack([diff.sum(), count]))  # [sum, count] over every rank
    return (total[0] / total[1].clamp(min=1.0)).clamp(min=0.0)


def kto_loss(inputs: KTOInputs, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """KTO (Ethayarajh et al. 2024), per example ``[B]``: ``lambda_y - v(x, y)`` with
    ``r = pi - ref``, z0 = ``kl_ref_point``:
    ``desirable_weight * (1 - sigma(beta (r - z0)))`` for a desirable example,
    ``undesirable_weight * (1 - sigma(beta (z0 - r)))`` for an undesirable one.

    z0 is detached here as well. The paper advises weights with
    ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` in ``[1, 4/3]``.
    Metrics: ``rewards`` ``[B]`` = ``beta r`` (detached); z0 itself is the stage's to log (it
    computed it)."""
    reward = inputs.logps - inputs.ref_logps
    z0 = inputs.kl_ref_point.detach()
    loss = torch.where(inputs.desirable, desirable_weight * (1.0 - torch.sigmoid(beta * (reward - z0))),
                       undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - reward))))
    return loss, {"rewards": (beta * reward).detach()}


_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_FLIP_PROBABILITY = (lambda v: 0 <= v < 0.5, "in [0, 0.5) (a label-flip probability; 0.5 means no signal)")


def _option_check(name: str, fn: Callable[..., Any],
                  **rules: tuple[Callable[[float], bool], str]) -> Callable[..., None]:
    """A ``check_options(**options)`` for loss ``name``: each ruled option, given or ``fn``'s
    default, must satisfy its rule, else ``ValueError``."""

    def check_options(**options: Any) -> None:
        bound = inspect.signature(fn).bind_partial(**options)
        bound.apply_defaults()
        for key, (ok, what) in rules.items():
            if not ok(bound.arguments[key]):
                raise ValueError(f"{name}: {key} must be {what}, got {bound.arguments[key]!r}")

    return check_options


dpo_loss.check_options = _option_check("sigmoid", dpo_loss, beta=_POSITIVE, label_smoothing=_FLIP_PROBABILITY)
ipo_loss.check_options = _option_check("ipo", ipo_loss, beta=_POSITIVE)
hinge_loss.check_options = _option_check("hinge", hinge_loss, beta=_POSITIVE)
robust_dpo_loss.check_options = _option_check("robust", robust_dpo_loss, beta=_POSITIVE,
                                              label_smoothing=_FLIP_PROBABILITY)
simpo_loss.check_options = _option_check("simpo", simpo_loss, beta=_POSITIVE, gamma=_NON_NEGATIVE)
orpo_loss.check_options = _option_check("orpo", orpo_loss, beta=_POSITIVE)
kto_loss.check_options = _option_check("kto", kto_loss, beta=_POSITIVE, desirable_weight=_POSITIVE,
                                       undesirable_weight=_POSITIVE)


@hookimpl
def rlhf_register_losses(register):
    register("sigmoid", dpo_loss, family="preference", reference_free=False)
    register("ipo", ipo_loss, family="preference", reference_free=False)
    register("hinge", hinge_loss, family="preference", reference_free=False)
    register("robust", robust_dpo_loss, family="preference", reference_free=False)
    register("simpo", simpo_loss, family="preference", reference_free=True)
    register("orpo", orpo_loss, family="preference", reference_free=True)
    register("kto", kto_loss, family="kto", reference_free=False)
