"""The built-in rollout engine ``hf``: sampling from the live policy module with the Hugging Face
model (KV cache, ``synced_gpus``-style lockstep under FSDP). Selected with ``ppo.generator: hf``
(the default); other engines are plugins (hook ``rlhf_register_generators``)."""
from __future__ import annotations

import torch

from rlhf_core import hookimpl
from rlhf_core.sampling import Rollout, decode_option_problem, generate


class HFGenerator:
    """Samples from the policy module itself, so there are no weights to sync and nothing to free:
    ``update_weights``, ``sleep`` and ``wake`` do nothing. Reports no sampling log-probs (the
    trainer's own are exact for it). ``loop``: ``auto`` (the default: rlhf's own decode loop where
    its lean step supports the model, i.e. Llama, Qwen2, Mistral; else Hugging Face ``generate``),
    ``rlhf`` or ``generate`` (Hugging Face ``generate``, any model it supports). ``compile``: the
    decode step through ``torch.compile`` (and a CUDA graph on GPU); ``auto`` = on CUDA only. See
    :func:`rlhf_core.sampling.generate`."""

    #: It samples from the trainer's own weights: no separate engine log-probs (losses needing them refuse it).
    reports_logprobs = False

    def __init__(self, ctx, policy, tokenizer, *, loop: str = "auto", compile: str | bool = "auto"):
        self.check_options(loop=loop, compile=compile)
        self.policy, self.tokenizer, self.device, self.loop, self.compile = policy, tokenizer, ctx.device, loop, compile

    @staticmethod
    def check_options(*, loop: str = "auto", compile: str | bool = "auto") -> None:
        """``loop`` and ``compile`` as :func:`rlhf_core.sampling.decode_option_problem` accepts them."""
        problem = decode_option_problem(loop, compile)
        if problem:
            raise ValueError(f"hf: {problem}")

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float) -> Rollout:
        return generate(self.policy, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, device=self.device, loop=self.loop,
                        compile=self.compile)

    def update_weights(self, policy: torch.nn.Module) -> None:
        self.policy = policy


@hookimpl
def rlhf_register_generators(register):
    register("hf", HFGenerator)
