"""Plain PyTorch ground truth for every fused op.

These functions define what the fast backends must compute; they are written to be read, not to
be fast. Shapes: ``logits [..., V]``, ``labels [...]`` (integer), outputs fp32 ``[...]``.
All math is done in fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> torch.Tensor:
    """``log softmax(logits / temperature)[label]`` per position; 0 where ``label == ignore_index``."""
    x = logits.float() / temperature  # [..., V]
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0).long()
    picked = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [...]
    return (picked - torch.logsumexp(x, dim=-1)).masked_fill(ignored, 0.0)


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``p = softmax(logits / temperature)`` per position, fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def linear_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``token_entropy(hidden @ weight.T)``."""
    return token_entropy(hidden @ weight.t(), temperature=temperature)


def reduce_tokens(values: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-token ``values`` over ``valid`` positions.

    ``mean`` divides by the number of valid tokens (0 when there is none, so an all-padding batch
    contributes nothing instead of NaN), ``sum`` adds them, ``none`` returns ``values`` as is.
    """
    if reduction == "none":
        return values
    total = (values * valid).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / valid.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; accepted: mean, sum, none")


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Token cross-entropy ``-log p(label)``, reduced over non-ignored tokens (see ``reduce_tokens``)."""
    nll = -token_logprobs(logits, labels, ignore_index=ignore_index)
    return reduce_tokens(nll, (labels != ignore_index).float(), reduction)


def ppo_clip_terms(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The three-step recipe's clipped surrogate on per-token log-probs.

    ``r = exp(logp - logp_old)``; per token ``max(-A*r, -A*clip(r, 1-eps, 1+eps))`` (the negation of
    the recipe's ``min(r*A, clip(r)*A)``, so that it is minimised), averaged over valid tokens.
    Returns the loss and statistics: ``clip_frac`` (share of valid tokens where the clipped branch
    is taken and the gradient vanishes), ``ratio_mean``, ``ratio_max``, ``approx_kl`` (k3 of old vs new).
    ``old_logprobs`` and ``advantages`` are constants: no gradient flows into them.
    """
    valid = valid.float()
    log_ratio = (logprobs - old_logprobs.detach().float()) * valid
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    n = valid.sum().clamp(min=1)
    loss = (per_token * valid).sum() / n
    with torch.no_grad():
        stats = {
            "clip_frac": ((clipped > unclipped).float() * valid).sum() / n,
            "ratio_mean": (ratio * valid).sum() / n,
            "ratio_max": torch.where(valid > 0, ratio, torch.zeros_like(ratio)).max() if valid.any() else ratio.new_ones(()),
            "approx_kl": ((ratio - 1 - log_ratio) * valid).sum() / n,
        }
    return loss, stats


def ppo_clip_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    ignore_index: int = -100,
    return_stats: bool = False,
):
    """PPO clipped loss from logits: ``ppo_clip_terms(token_logprobs(logits, labels), ...)``."""
    logp = token_logprobs(logits, labels, ignore_index=ignore_index)
    loss, stats = ppo_clip_terms(logp, old_logprobs, advantages, labels != ignore_index, clip_eps)
    return (loss, stats) if return_stats else loss


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> torch.Tensor:
    """``token_logprobs(hidden @ weight.T, labels)`` with ``hidden [N, H]``, ``weight [V, H]``."""
    return token_logprobs(hidden @ weight.t(), labels, temperature=temperature, ignore_index=ignore_index)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, labels)``."""
    return cross_entropy(hidden @ weight.t(), labels, ignore_index=ignore_index, reduction=reduction)


def linear_ppo_clip_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    ignore_index: int = -100,
    return_stats: bool = False,
):
    """``ppo_clip_loss(hidden @ weight.T, ...)``."""
    return ppo_clip_loss(
        hidden @ weight.t(), labels, old_logprobs, advantages,
        clip_eps=clip_eps, ignore_index=ignore_index, return_stats=return_stats,
    )
