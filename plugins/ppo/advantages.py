"""Advantage estimators (registered plugins). Each returns advantages ``[B, T]``, 0 off the mask.

Outcome estimators (one scalar reward per sequence, broadcast to its response tokens):
- ``batch_mean``: the seed's ``A = R - baseline`` with the batch mean as baseline (over every
  rank's samples: ``AdvantageInputs.batch_mean``).
- ``ema``: baseline = exponential moving average of past batch means (``decay``); the first batch
  uses its own mean.
- ``group_mean``: baseline = mean reward of the samples of the same prompt (``scale=True`` also
  divides by the group's std, as GRPO does).
- ``rloo``: leave-one-out, ``A_i = R_i - mean_{j != i, same prompt} R_j`` (Kool et al. 2019).
Token-level:
- ``gae``: generalised advantage estimation with a learned critic:
  ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lambda A_{t+1}`` (Schulman et al. 2016),
  with ``V`` after the last response token taken as 0.
"""
from __future__ import annotations

import torch

from rlhf_core import hookimpl
from rlhf_core.distributed import masked_mean
from rlhf_core.interfaces import AdvantageInputs


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
    """``A_i = R_i - mean_j R_j`` over the rollout batch (the seed's reward - baseline)."""

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
    """``A_i = R_i - mean(R of the same prompt)``; with ``scale``, divided by the group std + ``eps``."""

    needs_values = False
    min_group_size = 2

    def __init__(self, *, scale: bool = False, eps: float = 1e-6):
        if not eps >= 0:
            raise ValueError(f"group_mean: eps must be >= 0, got {eps}")
        self.scale, self.eps = scale, eps

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
    """Generalised advantage estimation over ``token_rewards [B, T]`` and critic ``values [B, T]``."""

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
        for t in reversed(range(rewards.shape[1])):
            next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
            delta = rewards[:, t] + self.gamma * next_value - values[:, t]
            running = delta + self.gamma * self.lam * running * (mask[:, t + 1] if t + 1 < rewards.shape[1] else 0.0)
            adv[:, t] = running
        return adv * mask


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
    register("gae", GAE)
