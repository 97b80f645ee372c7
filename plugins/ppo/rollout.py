"""Rollouts: sample responses from the policy and score their tokens.

Prompts are left-padded so that every response starts at the same column ``P``; position ids are
derived from the attention mask so that the forward passes here see the same positions as
``generate`` did. All per-token tensors cover the response only: ``[B, R]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_kernels
from rlhf_core import distributed as dist_utils
from rlhf_core.data import IGNORE_INDEX, append_column, pad


@dataclass
class Rollout:
    """One batch of sampled sequences.

    ``sequences [B, P+R]`` (left-padded prompt, then response, pad after EOS), ``attention_mask``
    ``[B, P+R]``, ``prompt_len`` = P, ``labels [B, R]`` (response ids, -100 after EOS),
    ``mask [B, R]`` (1 on response tokens up to and including EOS), ``responses`` (decoded text).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    labels: torch.Tensor
    mask: torch.Tensor
    responses: list[str]


@dataclass
class Experience:
    """One rollout batch with everything the update needs (this rank's share with several processes).

    ``rollout``: the sampled sequences (see :class:`Rollout`); ``rewards [B]``: the reward component's
    scores; ``old_logprobs [B, R]`` and ``ref_logprobs [B, R]``: log-probs of the response tokens
    under the policy that sampled them and under the frozen reference; ``entropy [B, R]``;
    ``kl_tokens [B, R]``: per-token KL estimate to the reference (0 off the mask);
    ``advantages [B, R]`` (0 off the mask); ``values [B, R]`` and ``returns [B, R]``: the critic's
    values and value targets (None without a critic); ``time_generate``: seconds spent sampling.
    """

    rollout: Rollout
    rewards: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    kl_tokens: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None
    returns: torch.Tensor | None
    time_generate: float = 0.0


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(policy, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
             top_p: float, device: torch.device) -> Rollout:
    """Sample one response per prompt row with HF ``generate`` (KV cache, sampling)."""
    ids = pad(prompt_ids, tokenizer.pad_token_id, left=True).to(device)  # [B, P]
    attn = pad([[1] * len(p) for p in prompt_ids], 0, left=True).to(device)
    # Under FSDP every rank must run the same number of forward passes: synced_gpus keeps a rank
    # whose responses all ended stepping until every rank's have. A DDP replica generates alone.
    several = dist_utils.world_size() > 1
    with dist_utils.gathered(policy):
        out = dist_utils.unwrap(policy).generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            synced_gpus=several and not dist_utils.is_ddp(policy),
        )
    prompt_len = ids.shape[1]
    response = out[:, prompt_len:]  # [B, R]
    is_eos = response == tokenizer.eos_token_id
    # Keep tokens up to and including the first EOS.
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = (~after_eos).long()
    response = response.masked_fill(after_eos, tokenizer.pad_token_id)
    labels = response.masked_fill(mask == 0, IGNORE_INDEX)
    texts = tokenizer.batch_decode(response.masked_fill(is_eos | after_eos, tokenizer.pad_token_id), skip_special_tokens=True)
    sequences = torch.cat([ids, response], dim=1)
    attention = torch.cat([attn, mask], dim=1)
    return Rollout(sequences, attention, prompt_len, labels, mask, texts)


def response_logits(model, rollout_sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits ``[B, R + 1, V]`` of the last prompt position and every response position: column t
    predicts response token t; the last column predicts past the response and is never a target.
    Only these positions are computed, and the tensor is used unsliced (see :func:`widen`)."""
    n_response = rollout_sequences.shape[1] - prompt_len
    out = model(input_ids=rollout_sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=n_response + 1)
    return out.logits


def widen(t: torch.Tensor, value: float | int) -> torch.Tensor:
    """A per-response-token ``[B, R]`` tensor aligned with :func:`response_logits` (``[B, R + 1]``)."""
    return append_column(t, value)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution ``[B, R]`` (0 off the mask)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1) * mask


@torch.no_grad()
def score_tokens(model, rollout: Rollout, backend: str | None, with_entropy: bool = False):
    """``(logprobs [B, R], entropy [B, R] or None)`` of the response tokens under ``model``."""
    logits = response_logits(model, rollout.sequences, rollout.attention_mask, rollout.prompt_len)
    logp = rlhf_kernels.token_logprobs(logits, widen(rollout.labels, IGNORE_INDEX), backend=backend)[:, :-1]
    return logp, token_entropy(logits, widen(rollout.mask, 0))[:, :-1] if with_entropy else None


def response_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Critic values ``[B, R]``: V at the context before each response token (differentiable)."""
    values = critic(sequences, attention_mask, position_ids(attention_mask))  # [B, P+R]
    return values[:, prompt_len - 1: -1]


@torch.no_grad()
def critic_values(critic, rollout: Rollout) -> torch.Tensor:
    """:func:`response_values` of a rollout under no_grad, 0 off the response mask."""
    return response_values(critic, rollout.sequences, rollout.attention_mask, rollout.prompt_len) * rollout.mask
