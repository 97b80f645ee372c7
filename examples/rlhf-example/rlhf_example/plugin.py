"""Four components, each a small function or class, registered through rlhf's hooks."""
from __future__ import annotations

import torch

import rlhf_kernels
from rlhf_core import AdvantageInputs, PolicyLossInputs, hookimpl, masked_mean


def label_smoothed_ce(logits, labels, *, backend=None, smoothing: float = 0.1):
    """Token loss: ``(1 - s) * CE + s * mean_v(-log p_v)`` over response tokens (logits [B, T, V])."""
    valid = labels != -100
    nll = rlhf_kernels.cross_entropy(logits, labels, reduction="mean", backend=backend)
    uniform = -torch.log_softmax(logits.float(), dim=-1).mean(-1)  # [B, T]
    smooth = masked_mean(uniform, valid)
    return (1 - smoothing) * nll + smoothing * smooth, {"smooth_term": float(smooth)}


def capped_pg(inputs: PolicyLossInputs, *, cap: float = 2.0):
    """Policy loss on per-token log-probs: the policy gradient with the importance ratio capped and
    detached, ``-min(r, cap) * A * logp`` per token (the host aggregates and runs it fused)."""
    ratio = torch.exp(inputs.logprobs - inputs.old_logprobs).detach().clamp(max=cap)
    return -ratio * inputs.advantages * inputs.logprobs, {"capped_ratio": ratio}


class RepeatReward:
    """Rule-based reward: share of response characters equal to the prompt's first character."""

    def __init__(self, ctx=None, *, scale: float = 1.0):
        self.scale = scale

    def __call__(self, prompts, responses):
        scores = [sum(ch == p[:1] for ch in r) / max(1, len(r)) for p, r in zip(prompts, responses)]
        return self.scale * torch.tensor(scores, dtype=torch.float32)


class MedianBaseline:
    """Advantage estimator: ``A_i = R_i - median_j R_j`` (robust to outlier rewards)."""

    needs_values = False
    min_group_size = 1

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        adv = inputs.rewards.float() - inputs.rewards.float().median()
        return adv.unsqueeze(1) * inputs.mask.float()


@hookimpl
def rlhf_register_losses(register):
    register("label_smoothed_ce", label_smoothed_ce, family="token")
    register("capped_pg", capped_pg, family="policy")


@hookimpl
def rlhf_register_rewards(register):
    register("repeat", RepeatReward)


@hookimpl
def rlhf_register_advantages(register):
    register("median", MedianBaseline)
