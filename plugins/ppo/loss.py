"""PPO math: the policy loss ``ppo_clip`` (the seed's clipped objective), KL estimators and
control, reward shaping, the whole policy objective, the clipped value loss. Pure functions."""
from __future__ import annotations

import torch

import rlhf_kernels
from rlhf_core import hookimpl
from rlhf_core.distributed import masked_mean



def ppo_clip(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
             backend: str | None = None, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Seed: ``L = E_t[min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t)]`` maximised, i.e. minimise the token
    mean over response tokens of ``max(-A r, -A clip(r))``, ``r = exp(logp - logp_old)``.

    Shapes: ``logits [B, T, V]``, ``labels/old_logprobs/advantages [B, T]`` (labels -100 off the
    response). Computed by ``rlhf_kernels.ppo_clip_loss`` (fused on GPU/CPU backends). Metrics:
    ``clip_frac``, ``ratio_mean``, ``ratio_max``, ``approx_kl``.
    """
    loss, stats = rlhf_kernels.ppo_clip_loss(
        logits, labels, old_logprobs, advantages, clip_eps=clip_eps, return_stats=True, backend=backend
    )
    return loss, {k: float(v) for k, v in stats.items()}


def _check_ppo_clip(*, clip_eps: float = 0.2) -> None:
    if not 0 < clip_eps < 1:
        raise ValueError(f"ppo_clip: clip_eps must be in (0, 1), got {clip_eps}")


ppo_clip.check_options = _check_ppo_clip


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(pi || ref) per token: ``logp - logp_ref`` (unbiased, can be negative)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator per token: ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, always >= 0)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


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
                  placement: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence rewards [B], token rewards [B, R])`` from the reward ``R [B]`` and the per-token KL
    to the reference ``kl_tokens [B, R]`` (0 off ``mask``).

    With ``placement == "reward"`` (Ziegler et al. 2019) the KL penalty is part of the reward:
    ``r_t = -beta * KL_t`` on every response token plus ``R`` on the last one, and the sequence
    reward is ``R - beta * sum_t KL_t``. With ``"loss"`` the rewards are ``R`` alone (the penalty is
    added to the policy loss instead, see :func:`policy_objective`).
    """
    mask = mask.float()
    token_rewards = torch.zeros_like(mask)
    seq_rewards = rewards.float().clone()
    if placement == "reward":
        token_rewards -= beta * kl_tokens
        seq_rewards -= beta * kl_tokens.sum(1)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # [B] index of the last response token
    token_rewards[torch.arange(len(last), device=mask.device), last] += rewards.float()
    return seq_rewards, token_rewards


def policy_objective(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *, loss_fn,
                     loss_options: dict, kl_estimator: str, kl_in_loss: bool, beta: float, entropy_coef: float,
                     backend: str | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss the policy minimises on one minibatch, a token mean over ``mask``:
    ``L_clip + beta * KL`` (when the KL penalty is placed in the loss) ``- entropy_coef * H``.

    Shapes: ``logits [B, R + 1, V]`` (the response positions plus one, see ``response_logits``),
    every other tensor ``[B, R + 1]`` aligned with them (``labels`` -100 off the response).
    """
    loss, metrics = loss_fn(logits, labels, old_logprobs, advantages, backend=backend, **loss_options)
    return add_penalties(loss, metrics, lambda: rlhf_kernels.token_logprobs(logits, labels, backend=backend),
                         lambda: rlhf_kernels.token_entropy(logits, backend=backend), ref_logprobs, mask, kl_estimator=kl_estimator,
                         kl_in_loss=kl_in_loss, beta=beta, entropy_coef=entropy_coef)


def fused_policy_objective(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           old_logprobs: torch.Tensor, advantages: torch.Tensor, ref_logprobs: torch.Tensor,
                           mask: torch.Tensor, *, clip_eps: float, kl_estimator: str, kl_in_loss: bool, beta: float,
                           entropy_coef: float, backend: str | None) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`policy_objective` with the ``ppo_clip`` loss on the last hidden states ``[N, H]`` and
    the LM head's ``weight [V, H]`` (every other tensor ``[N]``): the ``[N, V]`` logits never exist.
    Without an in-loss KL the clipped loss's gradients are computed inside its forward chunk loop
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


@hookimpl
def rlhf_register_losses(register):
    register("ppo_clip", ppo_clip, family="policy")
