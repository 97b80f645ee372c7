"""Rollouts: score the tokens of sampled responses (sampling itself is :mod:`rlhf_core.sampling`).

Prompts are left-padded so that every response starts at the same column ``P``; position ids are
derived from the attention mask so that the forward passes here see the same positions as
``generate`` did. All per-token tensors cover the response only: ``[B, R]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import rlhf_kernels
from rlhf_core.data import IGNORE_INDEX, append_column
from rlhf_core import with_last_hidden
from rlhf_core import Rollout, position_ids


@dataclass
class Samples:
    """Responses sampled for a batch of prompts and their rewards, before any scoring forward.

    ``rollout`` (a prompt's samples in consecutive rows); ``rewards [B]``: the reward component's
    scores plus the overlong shaping (zeros with ``reward: null``); ``group_ids [B]``: the prompt
    each row answers; ``truncated [B]``: no EOS within ``max_new_tokens``; ``overlong [B]``: the
    overlong penalty included in ``rewards`` (0 without it); ``time_generate``: seconds spent
    sampling; ``stats``: what the sampling logs (dynamic sampling's rounds and groups);
    ``reward_parts``: with several weighted rewards, each one's unweighted scores ``[B]`` by name.
    """

    rollout: Rollout
    rewards: torch.Tensor
    group_ids: torch.Tensor
    truncated: torch.Tensor
    overlong: torch.Tensor
    time_generate: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Experience:
    """One rollout batch with everything the update needs (this rank's share with several processes).

    ``rollout``: the sampled sequences (see :class:`Rollout`); ``rewards [B]``: the reward component's
    scores; ``old_logprobs [B, R]`` and ``ref_logprobs [B, R]``: log-probs of the response tokens
    under the policy that sampled them and under the frozen reference (None without a reference);
    ``entropy [B, R]``: the sampling policy's; on-policy (one epoch over one minibatch) the old
    log-probs and the entropy are the update's own and both are None here
    (:class:`~rlhf_plugins.ppo.run.PolicyUpdate` holds them); ``kl_tokens [B, R]``: the per-token KL
    estimate to the reference that the reward was shaped with (0 off the mask, and everywhere when
    the KL is in the loss or there is no reference);
    ``advantages [B, R]`` (0 off the mask); ``values [B, R]`` and ``returns [B, R]``: the critic's
    values and value targets (None without a critic); ``time_generate``: seconds spent sampling;
    ``stats``: batch statistics logged with the iteration (already means over every rank), e.g.
    with a generator that reports its log-probs ``engine_logprob_gap`` (mean absolute difference
    to the trainer's) and the rollout correction's ``is_*``; dynamic sampling's ``ds_*``;
    ``overlong_penalty_mean``, ``truncated_frac``; ``distill_kl``. ``loss_mask [B, R]``: the tokens
    the policy loss sees: the response mask less what a rollout correction or
    ``overlong.mask_truncated`` took out (None: the response mask).
    """

    rollout: Rollout
    rewards: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    kl_tokens: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None
    returns: torch.Tensor | None
    time_generate: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    loss_mask: torch.Tensor | None = None

    def policy_mask(self) -> torch.Tensor:
        """``[B, R]`` float: the tokens of the policy loss (see ``loss_mask``)."""
        return (self.loss_mask if self.loss_mask is not None else self.rollout.mask).float()


def response_logits(model, rollout_sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits ``[B, R + 1, V]`` of the last prompt position and every response position: column t
    predicts response token t; the last column predicts past the response and is never a target.
    Only these positions are computed, and the tensor is used unsliced (per-token tensors get a column more: ``append_column``)."""
    n_response = rollout_sequences.shape[1] - prompt_len
    out = model(input_ids=rollout_sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=n_response + 1)
    return out.logits


def response_hidden(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, then):
    """``then(hidden [B, R + 1, H], head weight [V, H])`` for the fused-linear path: the last hidden
    states at the positions of :func:`response_logits` and the LM head they are multiplied with
    (cast to the hidden dtype), computed inside the model's forward (:func:`with_last_hidden`, so a
    sharded head is gathered, and its gradient reduced), without the ``[B, R + 1, V]`` logits.
    Returns what ``then`` returns."""
    return with_last_hidden(model, lambda hidden, weight: then(hidden[:, prompt_len - 1:], weight.to(hidden.dtype)),
                     sequences, attention_mask, position_ids(attention_mask))


@torch.no_grad()
def token_scores(out: torch.Tensor, head: torch.Tensor | None, labels: torch.Tensor, backend: str | None,
                 with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logprobs, entropy or None)``, both ``labels.shape``, from a forward's output: logits
    ``[b, T, V]`` (``head`` None), or last hidden states ``[b, T, H]`` and the LM head ``[V, H]``
    (fused-linear: one pass over each logits chunk gives both, and the logits never exist)."""
    if head is None:
        logp = rlhf_kernels.token_logprobs(out, labels, backend=backend)
        return logp, rlhf_kernels.token_entropy(out, backend=backend) if with_entropy else None
    flat = out.reshape(-1, out.shape[-1])
    if not with_entropy:
        return rlhf_kernels.linear_token_logprobs(flat, head, labels.reshape(-1), backend=backend).view(labels.shape), None
    logp, entropy = rlhf_kernels.linear_token_logprobs(flat, head, labels.reshape(-1), backend=backend, with_entropy=True)
    return logp.view(labels.shape), entropy.view(labels.shape)


@torch.no_grad()
def score_tokens(model, rollout: Rollout, backend: str | None, with_entropy: bool = False, fused: bool = False):
    """``(logprobs [B, R], entropy [B, R] or None)`` of the response tokens under ``model``; with
    ``fused``, from the last hidden states and the LM head without building the logits."""
    args = (model, rollout.sequences, rollout.attention_mask, rollout.prompt_len)
    labels = append_column(rollout.labels, IGNORE_INDEX)
    if fused:
        logp, entropy = response_hidden(*args, lambda out, head: token_scores(out, head, labels, backend, with_entropy))
    else:
        logp, entropy = token_scores(response_logits(*args), None, labels, backend, with_entropy)
    return logp[:, :-1], entropy[:, :-1] * rollout.mask if entropy is not None else None


def response_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Critic values ``[B, R]``: V at the context before each response token (differentiable)."""
    values = critic(sequences, attention_mask, position_ids(attention_mask))  # [B, P+R]
    return values[:, prompt_len - 1: -1]


@torch.no_grad()
def critic_values(critic, rollout: Rollout) -> torch.Tensor:
    """:func:`response_values` of a rollout under no_grad, 0 off the response mask."""
    return response_values(critic, rollout.sequences, rollout.attention_mask, rollout.prompt_len) * rollout.mask
