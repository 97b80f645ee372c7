"""Advantage estimators (registered plugins). Each returns advantages ``[B, T]``, 0 off the mask.

Outcome estimators (one scalar reward per sequence, broadcast to its response tokens):
- ``batch_mean``: the three-step recipe's ``A = R - baseline`` with the batch mean as baseline (over every
  rank's samples: ``AdvantageInputs.batch_mean``).
- ``ema``: baseline = exponential moving average of past batch means (``decay``); the first batch
  uses its own mean.
- ``group_mean``: baseline = mean reward of the samples of the same prompt; ``scale: std`` also
  divides by the group's std (GRPO, Shao et al. 2024), ``scale: none`` does not (Dr. GRPO, Liu et
  al. 2025, who show the std division weighs prompts by their difficulty).
- ``rloo``: leave-one-out, ``A_i = R_i - mean_{j != i, same prompt} R_j`` (Kool et al. 2019).
Token-level:
- ``reinforce_pp``: REINFORCE++ (Hu et al. 2025): the discounted return of the token rewards (the
  KL penalty per token when ``kl.placement: reward``, the reward on the last token), normalised
  over the whole global batch; ``baseline: group`` first subtracts the prompt's group mean reward
  (REINFORCE++-baseline).
- ``gae``: generalised advantage estimation with a learned critic:
  ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lambda A_{t+1}`` (Schulman et al. 2016),
  with ``V`` after the last response token taken as 0.
"""
from __future__ import annotations

from typing import Literal

import torch

from rlhf_core import hookimpl
from rlhf_core.data import last_index
from rlhf_core.distributed import masked_mean
from rlhf_core import AdvantageInputs


def broadcast(per_sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, T]`` on the mask, 0 elsewhere."""
    return per_sequence.float().unsqueeze(1) * mask.float()


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element (group sum, group count, group sum of squares) for ``values [B]``."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1
    sums = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, inverse, values.double())
    sq = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, inverse, values.double() ** 2)
    counts = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, inverse, torch.ones_like(values, dtype=torch.float64))
    return sums[inverse], counts[inverse], sq[inverse]


class BatchMeanBaseline:
    """``A_i = R_i - mean_j R_j`` over the rollout batch (the three-step recipe's reward - baseline)."""

    needs_values = False
    min_group_size = 1

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        rewards = inputs.rewards.float()
        return broadcast(rewards - inputs.batch_mean(rewards), inputs.mask)


class EMABaseline:
    """``A_i = R_i - b`` with ``b`` a running mean: ``b <- decay * b + (1 - decay) * mean(R)`` after each
    batch (the first batch initialises ``b`` to its mean)."""

    needs_values = False
    min_group_size = 1

    def __init__(self, *, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.baseline: float | None = None

    def state_dict(self) -> dict:
        """The running baseline (saved in checkpoints, so a resumed run continues it)."""
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.baseline = state["baseline"]

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        rewards = inputs.rewards.float()
        mean = float(inputs.batch_mean(rewards))
        baseline = mean if self.baseline is None else self.baseline
        self.baseline = mean if self.baseline is None else self.decay * self.baseline + (1 - self.decay) * mean
        return broadcast(rewards - baseline, inputs.mask)


class GroupMeanBaseline:
    """``A_i = R_i - mean(R of the same prompt)``; with ``scale: std``, divided by the group's
    (unbiased) std + ``eps`` (GRPO); ``scale: none`` keeps the raw difference (Dr. GRPO). A group
    whose rewards are all equal gets advantage 0 either way. ``true`` / ``false`` are accepted as
    the older spelling of ``std`` / ``none``."""

    needs_values = False
    min_group_size = 2

    def __init__(self, *, scale: Literal["std", "none"] | bool = "none", eps: float = 1e-6):
        if scale not in ("std", "none", True, False):
            raise ValueError(f"group_mean: scale must be 'std' (GRPO) or 'none' (Dr. GRPO), got {scale!r}")
        if not eps >= 0:
            raise ValueError(f"group_mean: eps must be >= 0, got {eps}")
        self.scale, self.eps = scale in ("std", True), eps

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        rewards = inputs.rewards.double()
        sums, counts, sq = group_stats(rewards, inputs.group_ids)
        mean = sums / counts
        adv = rewards - mean
        if self.scale:
            var = (sq / counts - mean**2).clamp(min=0) * counts / (counts - 1).clamp(min=1)
            adv = adv / (var.sqrt() + self.eps)
        return broadcast(adv.float(), inputs.mask)


class RLOOBaseline:
    """Leave-one-out: ``A_i = R_i - (sum_group R - R_i) / (n_group - 1)``; 0 for a group of one."""

    needs_values = False
    min_group_size = 2

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        rewards = inputs.rewards.double()
        sums, counts, _ = group_stats(rewards, inputs.group_ids)
        others = (sums - rewards) / (counts - 1).clamp(min=1)
        adv = torch.where(counts > 1, rewards - others, torch.zeros_like(rewards))
        return broadcast(adv.float(), inputs.mask)


class GAE:
    """Generalised advantage estimation over ``token_rewards [B, T]`` and critic ``values [B, T]``:
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lambda A_{t+1}`` over the masked
    tokens, ``t + 1`` being the next masked token (a multi-turn episode's environment tokens between
    two turns are not steps), and ``V = 0`` after the last."""

    needs_values = True
    min_group_size = 1

    def __init__(self, *, gamma: float = 1.0, lam: float = 0.95):
        for name, value in (("gamma", gamma), ("lam", lam)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"gae: {name} must be in [0, 1], got {value}")
        self.gamma, self.lam = gamma, lam

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        if inputs.values is None:
            raise ValueError("gae needs critic values (inputs.values)")
        mask = inputs.mask.float()
        rewards, values = inputs.token_rewards.float() * mask, inputs.values.float() * mask
        adv = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        next_value = torch.zeros_like(running)
        # The steps are the masked tokens: in a multi-turn episode the next step after a policy token
        # may lie past the environment's tokens (mask 0), which the recursion skips.
        for t in reversed(range(rewards.shape[1])):
            valid = mask[:, t] > 0
            delta = rewards[:, t] + self.gamma * next_value - values[:, t]
            running = torch.where(valid, delta + self.gamma * self.lam * running, running)
            next_value = torch.where(valid, values[:, t], next_value)
            adv[:, t] = running
        return adv * mask


class ReinforcePP:
    """REINFORCE++ (Hu et al. 2025): per token, the discounted return of the token rewards
    ``G_t = sum_{s >= t} gamma^(s-t) r_s`` (``r_s``: ``-beta KL_s`` when the KL is placed in the
    reward, plus the sequence reward on the last response token), then normalised over every valid
    token of the global batch: ``A_t = (G_t - mean G) / (std G + eps)`` (``normalize: false`` keeps
    ``G_t``). ``baseline: group`` (REINFORCE++-baseline) first subtracts the mean sequence reward
    of the prompt's group from the last token's reward, so that ``G_0 = R_i - mean_group R``.

    ``gamma: 0`` with ``normalize: false`` makes the advantage the token's own reward, which is
    on-policy distillation's per-token reverse KL (see the ``distill`` option of the PPO stage)."""

    needs_values = False
    min_group_size = 1  # 2 with baseline: group (set from the options)

    def __init__(self, *, baseline: Literal["none", "group"] = "none", gamma: float = 1.0, normalize: bool = True,
                 eps: float = 1e-8):
        if baseline not in ("none", "group"):
            raise ValueError(f"reinforce_pp: baseline must be 'none' or 'group', got {baseline!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"reinforce_pp: gamma must be in [0, 1], got {gamma}")
        if not eps >= 0:
            raise ValueError(f"reinforce_pp: eps must be >= 0, got {eps}")
        self.baseline, self.gamma, self.normalize, self.eps = baseline, gamma, normalize, eps
        self.min_group_size = 2 if baseline == "group" else 1

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        mask = inputs.mask.float()
        rewards = inputs.token_rewards.double() * mask  # [B, T]
        if self.baseline == "group":
            sums, counts, _ = group_stats(inputs.rewards, inputs.group_ids)
            rewards[torch.arange(len(mask), device=mask.device), last_index(mask)] -= sums / counts
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            running = rewards[:, t] + self.gamma * running
            returns[:, t] = running
        returns = returns * mask
        if self.normalize:
            stats = inputs.all_reduce(torch.stack([returns.sum(), (returns ** 2).sum(), mask.double().sum()]))
            count = stats[2].clamp(min=1)
            mean = stats[0] / count
            var = (stats[1] / count - mean ** 2).clamp(min=0)
            returns = (returns - mean) / (var.sqrt() + self.eps)
        return returns.float() * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to zero mean, unit variance over the masked entries of the whole batch (every
    rank's, with several processes), 0 elsewhere."""
    mean = masked_mean(values, mask, global_=True)
    var = masked_mean((values - mean) ** 2, mask, global_=True)
    return (values - mean) * torch.rsqrt(var + eps) * mask.float()


@hookimpl
def rlhf_register_advantages(register):
    register("batch_mean", BatchMeanBaseline)
    register("ema", EMABaseline)
    register("group_mean", GroupMeanBaseline)
    register("rloo", RLOOBaseline)
    register("reinforce_pp", ReinforcePP)
    register("gae", GAE)
