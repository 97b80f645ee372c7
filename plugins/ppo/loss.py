"""Policy-gradient math, pure functions: the policy losses on per-token log-probs (``ppo_clip``, the
three-step recipe's clipped objective, with DAPO's clip-higher and dual clip; ``gspo``; ``cispo``;
``reinforce``), the host-side loss aggregation modes, KL estimators and control, reward shaping,
``ppo_clip``'s fused form, the clipped value loss."""
from __future__ import annotations

import math
from typing import Any

import torch

import rlhf_kernels
from rlhf_core import hookimpl
from rlhf_core.data import last_index
from rlhf_core.distributed import masked_mean
from rlhf_core import FusedPolicyLoss, PolicyLossInputs


def _ratio_stats(log_ratio: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Per-token diagnostics shared by the ratio-based losses (logged as masked means; ``ratio_max``
    as the micro-batch's maximum)."""
    log_ratio, ratio = log_ratio.detach(), ratio.detach()
    return {"ratio_mean": ratio, "approx_kl": ratio - 1 - log_ratio,  # k3 of old vs new
            "ratio_max": float(torch.where(mask > 0, ratio, torch.zeros_like(ratio)).max()) if mask.any() else 1.0}


def ppo_clip(inputs: PolicyLossInputs, *, clip_eps: float = 0.2, clip_eps_low: float | None = None,
             clip_eps_high: float | None = None, dual_clip: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The three-step recipe's clipped objective (Schulman et al. 2017), per token:
    ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = exp(logp - logp_old)``, the
    negation of ``min(r A, clip(r) A)`` so that it is minimised.

    ``clip_eps_low`` / ``clip_eps_high`` default to ``clip_eps``; DAPO's clip-higher (Yu et al.
    2025) widens the upper side, e.g. 0.2 / 0.28. ``dual_clip`` ``c > 1`` (Ye et al. 2020) bounds the
    loss of a negative advantage: for ``A < 0`` the term is ``min(term, -c A)``. Metrics:
    ``clip_frac`` (share of tokens where a clip removes the gradient), ``ratio_mean``, ``ratio_max``,
    ``approx_kl``. Its registered fused form (:data:`PPO_CLIP_FUSED`) computes the symmetric,
    token-mean case in one sweep over the logits (or the LM head's chunks)."""
    low = clip_eps if clip_eps_low is None else clip_eps_low
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (inputs.logprobs - inputs.old_logprobs) * inputs.mask
    ratio = torch.exp(log_ratio)
    adv = inputs.advantages
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    terms = torch.maximum(unclipped, clipped)
    clip_taken = (clipped > unclipped).float()
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual = (adv < 0) & (terms > bound)
        terms = torch.where(dual, bound, terms)
        clip_taken = torch.maximum(clip_taken, dual.float())
    return terms, {"clip_frac": clip_taken, **_ratio_stats(log_ratio, ratio, inputs.mask)}


def _check_clip_range(name: str, low: float, high: float) -> None:
    if not (0 < low < 1 and high > 0 and math.isfinite(high)):
        raise ValueError(f"{name}: the clip range needs 0 < clip_eps_low < 1 and 0 < clip_eps_high, got "
                         f"clip_eps_low={low}, clip_eps_high={high}")


def _check_ppo_clip(*, clip_eps: float, clip_eps_low: float | None, clip_eps_high: float | None,
                    dual_clip: float | None) -> None:
    if not 0 < clip_eps < 1:
        raise ValueError(f"ppo_clip: clip_eps must be in (0, 1), got {clip_eps}")
    _check_clip_range("ppo_clip", clip_eps if clip_eps_low is None else clip_eps_low,
                      clip_eps if clip_eps_high is None else clip_eps_high)
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"ppo_clip: dual_clip must be > 1 (Ye et al. use 3), got {dual_clip}")


ppo_clip.check_options = _check_ppo_clip


def _ppo_clip_fast_options(options: dict, loss_agg: str) -> dict | None:
    """Where ``ppo_clip``'s fused form computes what it would (``options``: every option, as the host
    passes them): the symmetric clip without dual clip under ``token_mean``; its kernels then take
    ``clip_eps``."""
    symmetric = options["clip_eps_low"] is None and options["clip_eps_high"] is None
    if loss_agg != "token_mean" or not symmetric or options["dual_clip"] is not None:
        return None
    return {"clip_eps": options["clip_eps"]}


def gspo(inputs: PolicyLossInputs, *, clip_eps_low: float = 3e-4, clip_eps_high: float = 4e-4,
         variant: str = "sequence") -> tuple[torch.Tensor, dict[str, Any]]:
    """GSPO (Zheng et al. 2025): the sequence-level ratio ``s_i = exp(mean_t(logp - logp_old))``
    (length-normalised), clipped per sequence: ``max(-A_i s_i, -A_i clip(s_i, 1 - lo, 1 + hi))``
    with ``A_i`` the sequence's advantage (the mean of its token advantages; a group estimator's
    is one value per sequence). The term is repeated over the sequence's tokens, so
    ``loss_agg: seq_mean_token_mean`` gives the paper's mean over sequences.

    ``variant: token`` is GSPO-token: ``s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]`` (equal to ``s_i``
    in value) with the token's own advantage, so per-token advantages can be used. Clip ranges are
    small (the paper's 3e-4 / 4e-4) because ``s_i`` is a geometric mean. Metrics: ``clip_frac`` (share
    of sequences clipped, per token), ``seq_ratio_mean``."""
    mask = inputs.mask
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    log_ratio = (inputs.logprobs - inputs.old_logprobs) * mask
    log_s = log_ratio.sum(1, keepdim=True) / lengths  # [B, 1]
    if variant == "token":
        ratio = torch.exp(log_s.detach() + inputs.logprobs - inputs.logprobs.detach())  # [B, T], value s_i
        adv = inputs.advantages
    else:
        ratio = torch.exp(log_s).expand_as(mask)
        adv = ((inputs.advantages * mask).sum(1, keepdim=True) / lengths).expand_as(mask)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    terms = torch.maximum(unclipped, clipped)
    return terms, {"clip_frac": (clipped > unclipped).float(), "seq_ratio_mean": ratio.detach()}


def _check_gspo(*, clip_eps_low: float, clip_eps_high: float, variant: str) -> None:
    _check_clip_range("gspo", clip_eps_low, clip_eps_high)
    if variant not in ("sequence", "token"):
        raise ValueError(f"gspo: variant must be 'sequence' or 'token', got {variant!r}")


gspo.check_options = _check_gspo


def cispo(inputs: PolicyLossInputs, *, clip_eps_low: float = 1.0, clip_eps_high: float = 0.28) -> tuple[torch.Tensor, dict[str, Any]]:
    """CISPO (MiniMax-M1, 2025): the importance weight is clipped and detached, and every token keeps
    its gradient: ``-sg[clip(r, 1 - lo, 1 + hi)] * A * logp``, ``r = exp(logp - logp_old)``. The
    paper leaves the lower side open (``clip_eps_low: 1.0``, i.e. ``r >= 0``) and tunes the upper.
    Metrics: ``clip_frac`` (tokens whose weight was capped), ``ratio_mean``, ``ratio_max``, ``approx_kl``."""
    log_ratio = (inputs.logprobs - inputs.old_logprobs) * inputs.mask
    ratio = torch.exp(log_ratio)
    weight = ratio.detach().clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    terms = -weight * inputs.advantages * inputs.logprobs
    capped = ((ratio.detach() > 1.0 + clip_eps_high) | (ratio.detach() < 1.0 - clip_eps_low)).float()
    return terms, {"clip_frac": capped, **_ratio_stats(log_ratio, ratio, inputs.mask)}


def _check_cispo(*, clip_eps_low: float, clip_eps_high: float) -> None:
    if not (0 < clip_eps_low <= 1 and clip_eps_high > 0 and math.isfinite(clip_eps_high)):
        raise ValueError(f"cispo: needs 0 < clip_eps_low <= 1 and 0 < clip_eps_high, got clip_eps_low={clip_eps_low}, "
                         f"clip_eps_high={clip_eps_high}")


cispo.check_options = _check_cispo


def reinforce(inputs: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, Any]]:
    """The on-policy policy gradient (Williams 1992): ``-A * logp`` per token, no ratio and no clip;
    for the REINFORCE-style estimators (``reinforce_pp``, ``rloo``, ``group_mean``) with one
    update per batch. Metric: ``approx_kl`` of old vs new (0 on-policy)."""
    log_ratio = ((inputs.logprobs - inputs.old_logprobs) * inputs.mask).detach()
    return -inputs.advantages * inputs.logprobs, {"approx_kl": torch.exp(log_ratio) - 1 - log_ratio}


#: How the host turns per-token terms into the loss (see :func:`aggregate`).
LOSS_AGG = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")


def local_normaliser(mode: str, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """This rank's share of the normaliser of ``mode`` for a minibatch with response ``mask [B, T]``;
    the host sums it over ranks (once, before the micro-batches run): valid tokens for
    ``token_mean``, sequences with at least one token in the loss for the ``seq_mean_*`` modes
    (a response masked out whole, e.g. a truncated one, leaves the mean), every sampled sequence
    x ``max_new_tokens`` for ``token_sum_norm`` (Dr. GRPO's constant)."""
    if mode == "token_mean":
        return mask.sum().double()
    if mode == "token_sum_norm":  # a constant: every sampled sequence, whatever left the loss
        return torch.tensor(float(mask.shape[0] * max_new_tokens), dtype=torch.float64, device=mask.device)
    return (mask.sum(1) > 0).sum().double()  # sequences with a token in the loss


def aggregate(terms: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """The loss of one micro-batch as its share of the global minibatch loss: summing this over the
    micro-batches (and ranks) gives, with ``normaliser`` the global total of :func:`local_normaliser`,

    - ``token_mean``: ``sum_{i,t} m l / sum_{i,t} m`` (every token of the batch weighs the same);
    - ``seq_mean_token_mean``: ``(1/N) sum_i (sum_t m l / sum_t m)`` (GRPO, Shao et al. 2024);
    - ``seq_mean_token_sum``: ``(1/N) sum_i sum_t m l``;
    - ``token_sum_norm``: ``sum_{i,t} m l / (N * max_new_tokens)`` (Dr. GRPO, Liu et al. 2025).

    So the gradient is the same whatever the minibatch's split into micro-batches or ranks."""
    masked = terms * mask
    if mode == "seq_mean_token_mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / normaliser
    return masked.sum() / normaliser


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 estimator per token: ``0.5 * (logp - logp_ref)^2`` (biased, low variance, >= 0; its
    gradient is that of the reverse KL's, as used in the loss by GRPO-style recipes)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(pi || ref) per token: ``logp - logp_ref`` (unbiased, can be negative)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator per token: ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, always >= 0)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


class KLController:
    """The KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019): after each batch
    ``beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, coef: float, adaptive: bool, target: float, horizon: int):
        self.value, self.adaptive, self.target, self.horizon = coef, adaptive, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        """Adjust beta from the last batch's mean sequence KL."""
        if self.adaptive and self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * n_samples / self.horizon


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """``0.5 * mean_mask max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(per_token, mask)


def shape_rewards(rewards: torch.Tensor, kl_tokens: torch.Tensor, mask: torch.Tensor, beta: float,
                  placement: str, dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence rewards [B], token rewards [B, R])`` from the reward ``R [B]`` and the per-token KL
    to the reference ``kl_tokens [B, R]`` (0 off ``mask``).

    With ``placement == "reward"`` (Ziegler et al. 2019) the KL penalty is part of the reward:
    ``r_t = -beta * KL_t`` on every response token plus ``R`` on the last one, and the sequence
    reward is ``R - beta * sum_t KL_t``. With ``"loss"`` the rewards are ``R`` alone (the penalty is
    added to the policy loss's terms instead, see :func:`policy_loss_terms`). ``dense [B, R]``:
    per-token rewards from elsewhere (on-policy distillation's ``-coef (log pi - log pi_teacher)``,
    see :func:`distill_rewards`), added to the token rewards and, summed, to the sequence reward.
    """
    mask = mask.float()
    token_rewards = torch.zeros_like(mask)
    seq_rewards = rewards.float().clone()
    if placement == "reward":
        token_rewards -= beta * kl_tokens
        seq_rewards -= beta * kl_tokens.sum(1)
    if dense is not None:
        token_rewards += dense * mask
        seq_rewards += (dense * mask).sum(1)
    last = last_index(mask)  # [B]
    token_rewards[torch.arange(len(last), device=mask.device), last] += rewards.float()
    return seq_rewards, token_rewards


def distill_rewards(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                    coef: float) -> torch.Tensor:
    """On-policy distillation's per-token reward ``[B, R]`` (Agarwal et al. 2024, GKD; Lu et al.
    2025): ``-coef * (log pi(y_t) - log pi_teacher(y_t))`` on the student's own samples, whose
    sum over a response is ``-coef`` times a one-sample estimate of the reverse KL
    ``KL(pi || pi_teacher)``; 0 off ``mask``."""
    return -coef * (logprobs - teacher_logprobs) * mask


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, cache: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025) per response ``[B]``, from its length in
    tokens ``lengths [B]``: 0 up to ``L_max - cache`` tokens, then linear down to ``-penalty`` at
    ``L_max = max_new_tokens``: ``penalty * (L_max - cache - L) / cache`` (``-penalty`` beyond, which
    a capped sampler never reaches). ``cache`` 0 disables it."""
    if cache <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_new_tokens - cache)).clamp(min=0, max=cache)
    return -penalty * over / cache


def truncated_responses(labels: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``[B]`` bool: responses the sampling budget cut off, i.e. whose last token is not EOS."""
    return labels.gather(1, last_index(mask).unsqueeze(1)).squeeze(1) != eos_id


def rollout_correction(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, kind: str, *,
                       cap: float, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(advantage weight [B, R], loss mask [B, R], per-token metrics)`` correcting for the gap
    between the trainer's probability of each sampled token before the update (``old_logprobs``)
    and the engine's that sampled it (``engine_logprobs``), ``rho_t = pi_old / pi_engine``:

    - ``tis``: truncated importance sampling per token, weight ``min(rho_t, cap)`` (Yao et al. 2025);
    - ``seq_tis``: per sequence, ``min(prod_t rho_t, cap)`` on each of its tokens;
    - ``mask``: masked IS, tokens with ``rho_t`` outside ``[low, high]`` leave the loss (weight 1);
    - ``seq_mask``: the whole sequence leaves the loss when its geometric-mean ratio
      ``exp(mean_t log rho_t)`` is outside ``[low, high]``.

    Metrics (masked means, logged per batch): ``is_weight_mean``, and ``is_capped_frac`` (tokens
    whose weight hit ``cap``) or ``is_masked_frac`` (tokens that left the loss)."""
    log_rho = (old_logprobs - engine_logprobs) * mask
    ones = torch.ones_like(mask)
    if kind in ("tis", "seq_tis"):
        rho = torch.exp(log_rho) if kind == "tis" else torch.exp(log_rho.sum(1, keepdim=True)).expand_as(mask)
        weight = rho.clamp(max=cap) * mask
        return weight, mask, {"is_weight_mean": weight, "is_capped_frac": (rho > cap).float()}
    rho = torch.exp(log_rho) if kind == "mask" else torch.exp(
        log_rho.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(mask)
    keep = ((rho >= low) & (rho <= high)).float() * mask
    return ones * mask, keep, {"is_weight_mean": ones, "is_masked_frac": mask - keep}


def ppo_clip_logits_objective(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                              advantages: torch.Tensor, ref_logprobs: torch.Tensor | None, mask: torch.Tensor, *,
                              clip_eps: float, kl_estimator: str, kl_in_loss: bool, beta: float, entropy_coef: float,
                              backend: str | None) -> tuple[torch.Tensor, dict[str, float]]:
    """``ppo_clip``'s fused form on logits: the token mean over ``mask`` of the clipped loss in one
    sweep (``rlhf_kernels.ppo_clip_loss``), ``+ beta * KL`` (when the KL penalty is placed in the
    loss) ``- entropy_coef * H``.

    Shapes: ``logits [B, R + 1, V]`` (the response positions plus one, see ``response_logits``),
    every other tensor ``[B, R + 1]`` aligned with them (``labels`` -100 off the response).
    """
    loss, stats = rlhf_kernels.ppo_clip_loss(logits, labels, old_logprobs, advantages, clip_eps=clip_eps,
                                             return_stats=True, backend=backend)
    return add_penalties(loss, {k: float(v) for k, v in stats.items()},
                         lambda: rlhf_kernels.token_logprobs(logits, labels, backend=backend),
                         lambda: rlhf_kernels.token_entropy(logits, backend=backend), ref_logprobs, mask,
                         kl_estimator=kl_estimator, kl_in_loss=kl_in_loss, beta=beta, entropy_coef=entropy_coef)


def ppo_clip_linear_objective(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              old_logprobs: torch.Tensor, advantages: torch.Tensor, ref_logprobs: torch.Tensor | None,
                              mask: torch.Tensor, *, clip_eps: float, kl_estimator: str, kl_in_loss: bool, beta: float,
                              entropy_coef: float, backend: str | None) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`ppo_clip_logits_objective` on the last hidden states ``[N, H]`` and the LM head's
    ``weight [V, H]`` (every other tensor ``[N]``): the ``[N, V]`` logits never exist. Without an
    in-loss KL the clipped loss's gradients are computed inside its forward chunk loop
    (``rlhf_kernels.linear_ppo_clip_loss``); with one, the log-probs it needs come from the same
    chunked pass (``linear_token_logprobs``) and the clipped loss is built on them."""
    if kl_in_loss:
        logp = rlhf_kernels.linear_token_logprobs(hidden, weight, labels, backend=backend)
        loss, stats = rlhf_kernels.ppo_clip_terms(logp, old_logprobs, advantages, labels != -100, clip_eps)
    else:
        logp = None
        loss, stats = rlhf_kernels.linear_ppo_clip_loss(hidden, weight, labels, old_logprobs, advantages,
                                                        clip_eps=clip_eps, return_stats=True, backend=backend)
    return add_penalties(loss, {k: float(v) for k, v in stats.items()}, lambda: logp,
                         lambda: rlhf_kernels.linear_token_entropy(hidden, weight, backend=backend), ref_logprobs, mask,
                         kl_estimator=kl_estimator, kl_in_loss=kl_in_loss, beta=beta, entropy_coef=entropy_coef)


def policy_loss_terms(loss_fn, options: dict, inputs: PolicyLossInputs, *, kl_estimator: str, kl_in_loss: bool,
                      beta: float, entropy_coef: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-token terms ``[B, T]`` the host aggregates: the registered loss's, ``+ beta * KL_t`` when
    the KL penalty is placed in the loss, ``- entropy_coef * H_t`` with an entropy bonus."""
    terms, metrics = loss_fn(inputs, **options)
    metrics = dict(metrics)
    if kl_in_loss:
        kl = KL_ESTIMATORS[kl_estimator](inputs.logprobs, inputs.ref_logprobs)
        terms = terms + beta * kl
        metrics["kl_loss"] = kl.detach()
    if entropy_coef > 0:
        terms = terms - entropy_coef * inputs.entropy
    return terms, metrics


def add_penalties(loss: torch.Tensor, metrics: dict[str, float], logprobs, entropy, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, *, kl_estimator: str, kl_in_loss: bool, beta: float,
                  entropy_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss + beta * KL - entropy_coef * H`` (token means over ``mask``); ``logprobs()`` and
    ``entropy()`` are called only when their term is on."""
    if kl_in_loss:
        kl_loss = masked_mean(KL_ESTIMATORS[kl_estimator](logprobs(), ref_logprobs), mask)
        loss = loss + beta * kl_loss
        metrics["kl_loss"] = float(kl_loss.detach())
    if entropy_coef > 0:
        loss = loss - entropy_coef * masked_mean(entropy(), mask)
    return loss, metrics


#: ``ppo_clip``'s faster form, registered with it.
PPO_CLIP_FUSED = FusedPolicyLoss(_ppo_clip_fast_options, ppo_clip_logits_objective, ppo_clip_linear_objective)


@hookimpl
def rlhf_register_losses(register):
    register("ppo_clip", ppo_clip, family="policy", fused=PPO_CLIP_FUSED)
    register("gspo", gspo, family="policy")
    register("cispo", cispo, family="policy")
    register("reinforce", reinforce, family="policy")
