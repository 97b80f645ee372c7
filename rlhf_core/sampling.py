"""Sampling from a causal LM and the fixed-seed evaluation of its samples: what PPO's rollouts and
evaluation, ``rlhf generate``, ``rlhf eval`` and third-party stages use.

Prompts are left-padded so that every response starts at the same column ``P``; position ids are
derived from the attention mask so that later forward passes see the positions ``generate`` used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed as dist_utils
from .data import IGNORE_INDEX, encode_prompt, pad


#: The supported plugin API of this module (see README "Plugin API").
__all__ = ["Rollout", "make_rollout", "pad_prompts", "generate", "evaluate_samples", "position_ids"]

@dataclass
class Rollout:
    """One batch of sampled sequences.

    ``sequences [B, P+R]`` (left-padded prompt, then response, pad after EOS), ``attention_mask``
    ``[B, P+R]``, ``prompt_len`` = P, ``labels [B, R]`` (response ids, -100 after EOS),
    ``mask [B, R]`` (1 on response tokens up to and including EOS), ``responses`` (decoded text),
    ``logprobs [B, R]``: the sampling engine's own log-probs of the response tokens (0 off the
    mask), when it reports them (None for ``hf``).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    labels: torch.Tensor
    mask: torch.Tensor
    responses: list[str]
    logprobs: torch.Tensor | None = None


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(policy, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
             top_p: float, device: torch.device) -> Rollout:
    """Sample one response per prompt row with HF ``generate`` (KV cache, sampling)."""
    ids, attn = pad_prompts(tokenizer, prompt_ids, device)  # [B, P]
    # Under FSDP every rank must run the same number of forward passes: synced_gpus keeps a rank
    # whose responses all ended stepping until every rank's have. A DDP replica generates alone.
    several = dist_utils.world_size() > 1
    with dist_utils.gathered(policy):
        out = dist_utils.unwrap(policy).generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            synced_gpus=several and not dist_utils.is_ddp(policy),
        )
    return make_rollout(tokenizer, ids, attn, out[:, ids.shape[1]:])


def make_rollout(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response: torch.Tensor,
                 logprobs: torch.Tensor | None = None) -> Rollout:
    """A :class:`Rollout` from left-padded prompts ``[B, P]`` (and their attention mask) and sampled
    responses ``[B, R]`` (anything after the first EOS is ignored), for any generation engine."""
    is_eos = response == tokenizer.eos_token_id
    # Keep tokens up to and including the first EOS.
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = (~after_eos).long()
    response = response.masked_fill(after_eos, tokenizer.pad_token_id)
    labels = response.masked_fill(mask == 0, IGNORE_INDEX)
    texts = tokenizer.batch_decode(response.masked_fill(is_eos | after_eos, tokenizer.pad_token_id), skip_special_tokens=True)
    sequences = torch.cat([prompt_ids, response], dim=1)
    attention = torch.cat([prompt_mask, mask], dim=1)
    if logprobs is not None:
        logprobs = logprobs.float() * mask
    return Rollout(sequences, attention, prompt_ids.shape[1], labels, mask, texts, logprobs)


def pad_prompts(tokenizer, prompt_ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids ``[B, P]`` and their attention mask, so responses start at column P."""
    ids = pad(prompt_ids, tokenizer.pad_token_id, left=True).to(device)
    attn = pad([[1] * len(p) for p in prompt_ids], 0, left=True).to(device)
    return ids, attn


@torch.no_grad()
def evaluate_samples(policy, tokenizer, prompts: list[str], judges: dict[str, Callable[[list[str], list[str]], torch.Tensor]],
                     *, max_new_tokens: int, temperature: float, top_p: float, device: torch.device,
                     seed: int) -> dict[str, float]:
    """Mean score of fresh samples under each judge (``name -> reward(prompts, responses) -> [B]``),
    one sample per prompt, drawn with the RNG seeded with ``seed`` (``seed + rank``) inside a
    forked RNG, so that two policies are compared on the same random stream and the caller's RNG
    is untouched. With several processes each rank samples its share of ``prompts``; the means
    are over all of them. PPO's held-out evaluation is this function."""
    share = dist_utils.shard(prompts)
    real = 1.0 if share else 0.0
    share = share or prompts[:1]  # a rank without prompts still takes part in the sharded forwards
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + dist_utils.rank())
        policy.eval()
        roll = generate(policy, tokenizer, [encode_prompt(tokenizer, p) for p in share],
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, device=device)
    sums = torch.tensor([real * float(fn(share, roll.responses).double().sum()) for fn in judges.values()]
                        + [real * len(share)], dtype=torch.float64, device=device)
    sums = dist_utils.all_reduce_sum(sums)
    return {name: float(sums[i] / sums[-1]) for i, name in enumerate(judges)}
