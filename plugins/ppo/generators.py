"""The built-in rollout engine ``hf``: sampling from the live policy module with the Hugging Face
model (KV cache, ``synced_gpus``-style lockstep under FSDP). Selected with ``ppo.generator: hf``
(the default); other engines are plugins (hook ``rlhf_register_generators``)."""
from __future__ import annotations

import torch

from rlhf_core import hookimpl
from rlhf_core.sampling import LOOPS, Rollout, generate


class HFGenerator:
    """Samples from the policy module itself, so there are no weights to sync and nothing to free:
    ``update_weights``, ``sleep`` and ``wake`` do nothing. Reports no sampling log-probs (the
    trainer's own are exact for it). ``loop``: ``generate`` (Hugging Face ``generate``, any model
    it supports) or ``rlhf`` (rlhf's decode loop with one-uniform-per-row sampling, faster on CPU
    at large vocabularies; see :func:`rlhf_core.sampling.generate`)."""

    #: It samples from the trainer's own weights: no separate engine log-probs (losses needing them refuse it).
    reports_logprobs = False

    def __init__(self, ctx, policy, tokenizer, *, loop: str = "generate"):
        self.check_options(loop=loop)
        self.policy, self.tokenizer, self.device, self.loop = policy, tokenizer, ctx.device, loop

    @staticmethod
    def check_options(*, loop: str) -> None:
        """``loop`` is one of :data:`rlhf_core.sampling.LOOPS`."""
        if loop not in LOOPS:
            raise ValueError(f"hf: loop must be one of {', '.join(LOOPS)}, got {loop!r}")

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float) -> Rollout:
        return generate(self.policy, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, device=self.device, loop=self.loop)

    def update_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy


@hookimpl
def rlhf_register_generators(register):
    register("hf", HFGenerator)
