"""Sampling from a causal LM and the fixed-seed evaluation of its samples: what PPO's rollouts and
evaluation, ``rlhf generate``, ``rlhf eval`` and third-party stages use.

Prompts are left-padded so that every response starts at the same column ``P``; position ids are
derived from the attention mask so that later forward passes see the positions ``generate`` used.
"""
from __future__ import annotations

from typing import Any

import torch

from . import distributed as dist_utils
from .data import IGNORE_INDEX, encode_prompt, pad
from .types import Rollout


#: The supported plugin API of this module (see docs/reference/api.md).
__all__ = ["Rollout", "make_rollout", "concat_rollouts", "pad_prompts", "generate", "evaluate_samples", "position_ids",
           "sample_tokens"]

#: ``generate(..., loop=)``: ``auto`` (rlhf's decode loop where :class:`LeanDecoder` steps the model,
#: else Hugging Face ``generate``), Hugging Face ``generate``, or rlhf's own decode loop.
LOOPS = ("auto", "generate", "rlhf")


def decode_option_problem(loop: str, compile: str | bool) -> str | None:
    """What is wrong with ``generate``'s ``loop`` (one of :data:`LOOPS`) and ``compile`` (``auto``:
    compiled on CUDA, eager elsewhere; or ``true`` / ``false``), or None."""
    if loop not in LOOPS:
        return f"loop must be one of {', '.join(LOOPS)}, got {loop!r}"
    if not (compile == "auto" or isinstance(compile, bool)):
        return f"compile must be auto, true or false, got {compile!r}"
    return None

def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(policy, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
             top_p: float, device: torch.device, loop: str = "auto", compile: str | bool = "auto") -> Rollout:
    """Sample one response per prompt row (KV cache, temperature, nucleus ``top_p``, EOS ends a row).

    ``loop``: ``generate`` = Hugging Face ``generate`` (any model it supports); ``rlhf`` = rlhf's
    own decode loop: the prompt in one forward, then one-token steps through :class:`LeanDecoder`
    (a preallocated K/V buffer per layer, no per-step cache objects or masks) where the model
    qualifies (else the model's forward with a growing cache), sampling with :func:`sample_tokens`
    (one uniform per row; ``generate``'s sampler draws one exponential per vocabulary entry per row
    per step, a third of the decode time at a 32k vocabulary on CPU): the same distribution,
    different random draws. ``auto`` (the default) = ``rlhf`` where :meth:`LeanDecoder.supports`
    the model, else ``generate``.

    ``compile`` (``LeanDecoder`` only; one process): the decode step through ``torch.compile``
    (static shapes: one compile per distinct rows x :data:`LENGTH_BUCKET`-rounded length, at most
    :data:`COMPILED_SHAPES` per process, beyond which it steps eagerly) and, on CUDA, replayed as a
    CUDA graph; ``auto`` = on CUDA only (on CPU a compile costs seconds and pays off only over long
    runs; see docs/rollout-engines.md). Compiled and eager steps agree within fp32 rounding."""
    problem = decode_option_problem(loop, compile)
    if problem:
        raise ValueError(f"generate: {problem}")
    ids, attn = pad_prompts(tokenizer, prompt_ids, device)  # [B, P]
    # Under FSDP every rank must run the same number of forward passes: synced_gpus keeps a rank
    # whose responses all ended stepping until every rank's have. A DDP replica generates alone.
    several = dist_utils.world_size() > 1 and not dist_utils.is_ddp(policy)
    with dist_utils.gathered(policy):
        model = dist_utils.unwrap(policy)
        if loop == "rlhf" or (loop == "auto" and LeanDecoder.supports(model)):
            compiled = (device.type == "cuda") if compile == "auto" else compile
            response = _decode(model, ids, attn, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, synced=several,
                               compiled=compiled and dist_utils.world_size() == 1)
            return make_rollout(tokenizer, ids, attn, response)
        out = model.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            synced_gpus=several,
        )
    return make_rollout(tokenizer, ids, attn, out[:, ids.shape[1]:])


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row ``[B]`` from ``softmax(logits [B, V] / temperature)``, restricted to the
    nucleus (the fewest most likely tokens whose probability reaches ``top_p``, renormalised), by
    inverse-CDF sampling: one uniform per row against the float64 cumulative sum, so a token of
    probability 0 is never drawn. Draws from torch's global RNG on the logits' device.

    Over a large vocabulary the cumulative sum is taken in two levels, which is the same inverse
    CDF: float64 sums of blocks of :data:`CDF_BLOCK` tokens locate the uniform's block, and the
    cumulative sum inside that block locates the token (no ``[B, V]`` float64 copy or scan)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * ((probs.cumsum(dim=-1) - probs) < top_p)  # the mass before a token is below top_p
    if probs.shape[-1] >= 4 * CDF_BLOCK:
        index = _inverse_cdf_blocked(probs)
    else:
        cdf = probs.double().cumsum(dim=-1)
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
        index = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
    return (order.gather(-1, index) if order is not None else index).squeeze(1)


#: Tokens per block of :func:`sample_tokens`'s two-level cumulative sum.
CDF_BLOCK = 256


def _inverse_cdf_blocked(probs: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` token indices: :func:`sample_tokens`'s inverse CDF through block sums."""
    rows, vocab = probs.shape
    blocks = -(-vocab // CDF_BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * CDF_BLOCK - vocab)).view(rows, blocks, CDF_BLOCK)
    block_cdf = padded.sum(-1, dtype=torch.float64).cumsum(-1)  # [B, blocks]
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device) * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, u, right=True).clamp_(max=blocks - 1)  # [B, 1]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(u))
    inside = padded.gather(1, block[:, :, None].expand(rows, 1, CDF_BLOCK)).squeeze(1)  # [B, CDF_BLOCK]
    cdf = inside.double().cumsum(-1)
    offset = torch.searchsorted(cdf, u - before, right=True)
    # The block's float64 sum and its running sum may differ in the last bit: never step past the
    # block's last token of nonzero probability.
    last = (CDF_BLOCK - 1 - (inside > 0).flip(-1).long().argmax(-1, keepdim=True))
    return (block * CDF_BLOCK + torch.minimum(offset, last)).clamp_(max=vocab - 1)


#: Model types whose decoder layers :class:`LeanDecoder` steps itself (Llama's layer: RMSNorm,
#: rotary attention with grouped K/V heads, gated MLP, residuals).
LEAN_MODEL_TYPES = ("llama", "qwen2", "mistral")


class LeanDecoder:
    """One-token decode steps of a Llama-family causal LM that call its own modules (embedding,
    norms, projections, rotary embedding, MLP, LM head: LoRA adapters and all) without the Hugging
    Face forward around them: no mask construction, cache objects or output dataclasses per step,
    and a preallocated K/V buffer per layer written in place (static shapes: every step attends
    over the whole buffer, columns past the current one masked) instead of a cache grown by
    concatenation. The numbers are those of the model's own forward (the same modules and rotary
    function, attention through ``scaled_dot_product_attention`` over the valid positions).

    ``compiled``: the step runs through ``torch.compile`` (see :func:`generate`); its shapes are
    the rows and the buffer length, rounded up to a multiple of :data:`LENGTH_BUCKET`, so a run
    compiles once per distinct pair (at most :data:`COMPILED_SHAPES` per process, after which new
    shapes step eagerly). On CUDA the compiled step is captured once per call as a CUDA graph and
    replayed for every token. :meth:`supports` says which models qualify (else the loop steps the
    model's forward)."""

    def __init__(self, model, mask: torch.Tensor, *, compiled: bool = False):
        import sys

        self.model = model
        first = model.get_decoder().layers[0].self_attn
        self.rotate = sys.modules[type(first).__module__].apply_rotary_pos_emb
        self.length = -(-mask.shape[1] // LENGTH_BUCKET) * LENGTH_BUCKET if compiled else mask.shape[1]
        # [B, length]: the prompt's mask, then every response column (bucket padding never attended)
        self.valid = torch.nn.functional.pad(mask.bool(), (0, self.length - mask.shape[1]))
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.step_fn = _compiled_step(mask.shape[0], self.length, mask.device) if compiled else _lean_step
        self.graph: _GraphedStep | None = None

    @staticmethod
    def supports(model) -> bool:
        """A Llama-family model (:data:`LEAN_MODEL_TYPES`) with plain attention (no sliding window,
        no query/key norms) and the modules the step calls."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in LEAN_MODEL_TYPES or getattr(config, "sliding_window", None):
            return False
        try:
            layer = model.get_decoder().layers[0]
        except (AttributeError, IndexError, TypeError):
            return False
        attn = layer.self_attn
        return (all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
                and not hasattr(attn, "q_norm") and hasattr(model.get_decoder(), "rotary_emb")
                and hasattr(model, "lm_head"))

    def prefill(self, cache) -> None:
        """Take the prompt's keys and values from the prefill forward's cache into the buffers."""
        for layer in cache.layers:
            keys, values = layer.keys, layer.values
            shape = (keys.shape[0], keys.shape[1], self.length, keys.shape[3])
            self.keys.append(keys.new_zeros(shape))
            self.values.append(values.new_zeros(shape))
            self.keys[-1][:, :, :keys.shape[2]] = keys
            self.values[-1][:, :, :values.shape[2]] = values

    def step(self, token: torch.Tensor, position: torch.Tensor, column: int) -> torch.Tensor:
        """Logits ``[B, V]`` after ``token [B]`` at ``position [B, 1]``, written to ``column``."""
        column = torch.tensor(column, device=token.device)
        if token.device.type == "cuda" and self.step_fn is not _lean_step:
            if self.graph is None:
                self.graph = _GraphedStep(self, token, position, column)
            return self.graph(token, position, column)
        return self.step_fn(self.model, self.rotate, self.keys, self.values, self.valid, token, position, column)


#: The K/V buffers of a compiled :class:`LeanDecoder` are a multiple of this many columns long.
LENGTH_BUCKET = 64
#: Distinct (rows, length) shapes compiled per process; later shapes step eagerly.
COMPILED_SHAPES = 8
_COMPILED: dict = {"shapes": set(), "fn": {}}


def _lean_step(model, rotate, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor,
               token: torch.Tensor, position: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """:meth:`LeanDecoder.step` as a function of tensors (what ``torch.compile`` traces): writes
    the token's keys and values at ``column`` (a 0-d tensor) and attends over the buffer's columns
    up to it that ``valid`` allows."""
    inner = model.get_decoder()
    batch = token.shape[0]
    hidden = inner.embed_tokens(token[:, None])
    cos, sin = inner.rotary_emb(hidden, position)
    mask = (valid & (torch.arange(valid.shape[1], device=valid.device) <= column))[:, None, None, :]
    where = column.view(1)
    for index, layer in enumerate(inner.layers):
        attn = layer.self_attn
        heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        normed = layer.input_layernorm(hidden)
        q = attn.q_proj(normed).view(batch, 1, heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, 1, kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(batch, 1, kv_heads, attn.head_dim).transpose(1, 2)
        q, k = rotate(q, k, cos, sin)
        keys[index].index_copy_(2, where, k)
        values[index].index_copy_(2, where, v)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys[index], values[index], attn_mask=mask, scale=attn.scaling, enable_gqa=kv_heads != heads)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))[:, -1]


def _compiled_step(rows: int, length: int, device: torch.device):
    """The ``torch.compile``-d :func:`_lean_step` (static shapes; C++ wrapper on CPU), or the eager
    one once :data:`COMPILED_SHAPES` shapes have been compiled in this process."""
    shape = (rows, length, device.type)
    if shape not in _COMPILED["shapes"]:
        if len(_COMPILED["shapes"]) >= COMPILED_SHAPES:
            return _lean_step
        _COMPILED["shapes"].add(shape)
    if device.type not in _COMPILED["fn"]:
        import torch._dynamo

        # One entry per compiled shape (and per model the process decodes with).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * COMPILED_SHAPES)
        options = {"cpp_wrapper": True} if device.type == "cpu" else {}
        _COMPILED["fn"][device.type] = torch.compile(_lean_step, dynamic=False, options=options)
    return _COMPILED["fn"][device.type]


class _GraphedStep:
    """A compiled decode step captured as one CUDA graph (per :class:`LeanDecoder`, i.e. per
    ``generate`` call: the K/V buffers are the graph's fixed addresses) and replayed per token;
    the token, position and column are copied into its static inputs. The capture runs the first
    step itself (writing the same K/V to the same column each time), so no step is lost."""

    def __init__(self, lean: LeanDecoder, token: torch.Tensor, position: torch.Tensor, column: torch.Tensor):
        self.token, self.position, self.column = token.clone(), position.clone(), column.clone()
        args = (lean.model, lean.rotate, lean.keys, lean.values, lean.valid)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and warm up outside the capture
                lean.step_fn(*args, self.token, self.position, self.column)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = lean.step_fn(*args, self.token, self.position, self.column)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.position.copy_(position)
        self.column.copy_(column)
        self.graph.replay()
        return self.logits.clone()


def _decode(model, ids: torch.Tensor, attn: torch.Tensor, *, max_new_tokens: int, temperature: float, top_p: float,
            eos: int, pad: int, synced: bool, compiled: bool = False) -> torch.Tensor:
    """Response tokens ``[B, R]`` (pad after a row's EOS) from left-padded prompts: the prompt in
    one forward, then one step per token, through :class:`LeanDecoder` where the model qualifies
    (else the model's forward with a growing cache); ``synced``: every rank keeps stepping until
    every rank's rows have ended (sharded models); ``compiled``: see :func:`generate`."""
    from transformers import DynamicCache

    batch, width = ids.shape
    positions = position_ids(attn)
    mask = torch.ones(batch, width + max_new_tokens, dtype=attn.dtype, device=attn.device)
    mask[:, :width] = attn
    cache = DynamicCache(config=model.config)
    cached = {_cache_keyword(model): cache, "use_cache": True}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=1, **cached).logits[:, -1]
    positions = positions[:, -1:]
    lean = LeanDecoder(model, mask, compiled=compiled) if LeanDecoder.supports(model) else None
    if lean is not None:
        lean.prefill(cache)
        del cache
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    tokens = []
    for step in range(max_new_tokens):
        token = sample_tokens(logits, temperature, top_p).masked_fill_(done, pad)
        tokens.append(token)
        done |= token == eos
        remaining = (~done).sum()
        if synced:
            remaining = dist_utils.all_reduce_sum(remaining)
        if step == max_new_tokens - 1 or int(remaining) == 0:
            break
        positions = positions + 1
        if lean is not None:
            logits = lean.step(token, positions, width + step)
            continue
        logits = model(input_ids=token.unsqueeze(1), attention_mask=mask[:, :width + step + 1], position_ids=positions,
                       **cached).logits[:, -1]
    return torch.stack(tokens, dim=1)


def _cache_keyword(model) -> str:
    """The forward's name for the KV cache: ``cache`` (recent transformers) or ``past_key_values`` (older ones)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


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


def concat_rollouts(rollouts: list[Rollout], pad_id: int, rows: torch.Tensor | None = None) -> Rollout:
    """One :class:`Rollout` holding the rows of several (``rows``: which of the concatenated rows
    to keep, in that order; all when None). Prompts are left-padded to the widest prompt and
    responses right-padded to the longest, with ``pad_id`` (attention 0, labels -100, mask 0,
    engine log-probs 0), so every response still starts at one column and positions derived from
    the attention mask are unchanged. Engine log-probs are kept only when every rollout has them."""
    prompt_len = max(r.prompt_len for r in rollouts)
    width = max(r.sequences.shape[1] - r.prompt_len for r in rollouts)

    def widened(t: torch.Tensor, left: int, right: int, value: float | int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    parts: dict[str, list[torch.Tensor]] = {"sequences": [], "attention_mask": [], "labels": [], "mask": [], "logprobs": []}
    for r in rollouts:
        left, right = prompt_len - r.prompt_len, width - (r.sequences.shape[1] - r.prompt_len)
        parts["sequences"].append(widened(r.sequences, left, right, pad_id))
        parts["attention_mask"].append(widened(r.attention_mask, left, right, 0))
        parts["labels"].append(widened(r.labels, 0, right, IGNORE_INDEX))
        parts["mask"].append(widened(r.mask, 0, right, 0))
        if r.logprobs is not None:
            parts["logprobs"].append(widened(r.logprobs, 0, right, 0.0))
    joined = {k: torch.cat(v) for k, v in parts.items() if v and (k != "logprobs" or len(v) == len(rollouts))}
    texts = [t for r in rollouts for t in r.responses]
    if rows is not None:
        joined = {k: v[rows] for k, v in joined.items()}
        texts = [texts[i] for i in rows.tolist()]
    return Rollout(joined["sequences"], joined["attention_mask"], prompt_len, joined["labels"], joined["mask"], texts,
                   joined.get("logprobs"))


def pad_prompts(tokenizer, prompt_ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids ``[B, P]`` and their attention mask, so responses start at column P."""
    ids = pad(prompt_ids, tokenizer.pad_token_id, left=True).to(device)
    attn = pad([[1] * len(p) for p in prompt_ids], 0, left=True).to(device)
    return ids, attn


@torch.no_grad()
def evaluate_samples(policy, tokenizer, prompts: list[str], judges: dict[str, Any], *, max_new_tokens: int,
                     temperature: float, top_p: float, device: torch.device, seed: int,
                     rows: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Mean score of fresh samples under each judge (``name ->`` a
    :class:`~rlhf_core.contracts.RewardSum`, scoring ``(prompts, responses, rows)``), one sample
    per prompt, drawn with the RNG seeded with ``seed`` (``seed + rank``) inside a forked RNG, so
    that two policies are compared on the same random stream and the caller's RNG is untouched.
    ``rows``: each prompt's data record (the fields rewards read), aligned with ``prompts``. With
    several processes each rank samples its share of ``prompts``; the means are over all of them.
    PPO's held-out evaluation is this function."""
    rows = rows if rows is not None else [{} for _ in prompts]
    share, share_rows = dist_utils.shard(prompts), dist_utils.shard(rows)
    real = 1.0 if share else 0.0
    if not share:  # a rank without prompts still takes part in the sharded forwards
        share, share_rows = prompts[:1], rows[:1]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + dist_utils.rank())
        policy.eval()
        roll = generate(policy, tokenizer, [encode_prompt(tokenizer, p) for p in share],
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, device=device)
    sums = torch.tensor([real * float(fn.score(share, roll.responses, share_rows)[0].double().sum())
                         for fn in judges.values()]
                        + [real * len(share)], dtype=torch.float64, device=device)
    sums = dist_utils.all_reduce_sum(sums)
    return {name: float(sums[i] / sums[-1]) for i, name in enumerate(judges)}
