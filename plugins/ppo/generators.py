"""The built-in rollout engine ``hf``: Hugging Face ``generate`` on the live policy (KV cache,
sampling, ``synced_gpus`` under FSDP). Selected with ``ppo.generator: hf`` (the default); other
engines are plugins (hook ``rlhf_register_generators``)."""
from __future__ import annotations

import torch

from rlhf_core import hookimpl
from rlhf_core.sampling import Rollout, generate


class HFGenerator:
    """Samples from the policy module itself, so there are no weights to sync and nothing to free:
    ``update_weights``, ``sleep`` and ``wake`` do nothing. Reports no sampling log-probs (the
    trainer's own are exact for it)."""

    def __init__(self, ctx, policy, tokenizer):
        self.policy, self.tokenizer, self.device = policy, tokenizer, ctx.device

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float) -> Rollout:
        return generate(self.policy, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, device=self.device)

    def update_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy


@hookimpl
def rlhf_register_generators(register):
    register("hf", HFGenerator)
