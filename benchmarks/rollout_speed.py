"""Rollout benchmark: generated tokens per second of the ``hf`` engine's decode loops and the
``vllm`` engine side by side, the decode floor beside each, and the split of one PPO iteration
(generate / score / train) with each, on two models:

- ``small``: the builtin-sized Llama of the TRL comparison (4 layers, hidden 256, 4 heads of 64,
  MLP 688, byte vocabulary 384, random weights), 4 prompts x 4 samples x 32 new tokens;
- ``larger``: a Llama built from a config (hidden 512, 8 heads of 64, 4 layers, vocab 32000,
  random weights, word-level tokenizer), 64 prompts x 4 samples x 128 new tokens.

Engines: ``hf`` (Hugging Face ``generate``, ``loop: generate``); ``hf-forward`` (rlhf's decode loop
stepping the model's own forward with a growing cache: ``loop: rlhf`` before ``LeanDecoder``);
``hf-loop`` (``loop: rlhf``, ``LeanDecoder`` eager); ``hf-compiled`` (``loop: rlhf, compile:
true``; its compile is timed apart, as ``compile_s``); ``vllm``. The engines run through the PPO
stage's own code (``make_experience`` / ``update`` with the generator plugin). An engine that cannot
run a model here is reported with its reason.

The floor: a decode step's FLOPs (matrix products and attention at the mean context) over the
matrix-product rate measured in the same run, twice: at the step's own shapes (its GEMMs with as
many rows as the batch, which is what a step can reach) and at a large GEMM (the update's rate).
Used by ``rlhf bench rollout`` and ``benchmarks/bench_rollout.py``.
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
import types
from pathlib import Path

import torch

from .measure import timed_iteration


def _models(which: str, tmp: Path):
    if which == "small":
        from .vs_trl import _model

        return _model()
    from transformers import LlamaConfig, LlamaForCausalLM

    from .memory_usage import word_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), word_tokenizer(32000)


#: engine -> the hf engine's options (``hf-forward`` also steps the model's forward instead of LeanDecoder)
HF_ENGINES = {"hf": {"loop": "generate"}, "hf-forward": {"loop": "rlhf", "compile": False},
              "hf-loop": {"loop": "rlhf", "compile": False}, "hf-compiled": {"loop": "rlhf", "compile": True}}


def step_flops(config, rows: int, context: float) -> float:
    """FLOPs of one decode step of ``rows`` rows: 2 per multiply-add of every projection, MLP and
    the LM head, plus attention's two products over ``context`` positions."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config.intermediate_size
    attention = 2 * 2 * config.num_attention_heads * head_dim * context
    return rows * (2 * (layers * per_layer + hidden * config.vocab_size) + layers * attention)


def gemm_rates(config, rows: int, repeats: int = 20) -> dict[str, float]:
    """Matrix-product FLOP/s measured now: the decode step's GEMMs (``rows`` x hidden against each
    weight shape of a layer and the LM head), and one large GEMM (4096 rows, hidden x MLP)."""
    import torch.nn.functional as F

    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    weights = [(torch.randn(rows, i), torch.randn(o, i)) for i, o in shapes] + [(torch.randn(rows, hidden),
                                                                              torch.randn(vocab, hidden))]

    def timed(fn, flops):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return flops / best

    step = timed(lambda: [F.linear(x, w) for x, w in weights], sum(2 * x.shape[0] * w.numel() for x, w in weights))
    big_x, big_w = torch.randn(4096, hidden), torch.randn(inter, hidden)
    return {"step_gemm_flops": step, "large_gemm_flops": timed(lambda: F.linear(big_x, big_w), 2 * 4096 * big_w.numel())}


def _prompts(tokenizer, n: int, length: int, vocab: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    if vocab <= 384:
        letters = "abcdefghijklmnopqrstuvwxyz "
        return ["".join(letters[i] for i in torch.randint(0, 27, (length,), generator=g).tolist()) for _ in range(n)]
    return [" ".join(f"t{i}" for i in torch.randint(3, vocab, (length,), generator=g).tolist()) for _ in range(n)]


def _engine(name: str, policy, tokenizer, tmp: str):
    """The generator of engine ``name`` on ``policy`` (a CheckedGenerator), or the reason it cannot run."""
    from rlhf_core import CheckedGenerator
    from rlhf_plugins.ppo.generators import HFGenerator

    ctx = types.SimpleNamespace(device=torch.device("cpu"), seed=0, stage_dir=Path(tmp), name="ppo")
    entry = types.SimpleNamespace(kind="generator", name=name, plugin="bench")
    try:
        if name == "vllm":
            from rlhf_plugins.vllm_engine import VLLMGenerator, vllm_unavailable

            if vllm_unavailable():
                return vllm_unavailable()
            return CheckedGenerator(entry, VLLMGenerator(ctx, policy, tokenizer))
        return CheckedGenerator(entry, HFGenerator(ctx, policy, tokenizer, **HF_ENGINES[name]))
    except Exception as exc:  # e.g. a head size the CPU engine does not support
        return f"{type(exc).__name__}: {exc}"


def _stepping(name: str):
    """``hf-forward`` steps the model's forward: LeanDecoder declines every model while it samples."""
    import contextlib
    from unittest import mock

    from rlhf_core.sampling import LeanDecoder

    if name == "hf-forward":
        return mock.patch.object(LeanDecoder, "supports", staticmethod(lambda model: False))
    return contextlib.nullcontext()


def measure(which: str, engines: tuple[str, ...], *, prompts: int, samples: int, new_tokens: int, prompt_len: int,
            repeats: int = 1) -> list[dict]:
    """Per engine: tokens/s of the median of ``repeats`` timed generates, the engines taking turns
    within each repeat (so a machine that speeds up or slows down affects them alike), after a
    warm-up each (``hf-compiled``'s is the full batch, so the timed ones reuse its compile); the
    floor from matrix-product rates measured between the repeats; then one PPO iteration's split."""
    from rlhf_core import ComponentSpec, GenerationConfig, encode_prompt
    from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
    from rlhf_plugins.ppo.advantages import GroupMeanBaseline
    from rlhf_plugins.ppo.config import KLConfig, PolicyOptimConfig, PPOConfig
    from rlhf_plugins.ppo.run import PPORun

    with tempfile.TemporaryDirectory() as tmp:
        policy, tokenizer = _models(which, Path(tmp))
        pristine = _frozen_copy(policy)  # each engine's PPO iteration starts from these weights, in a fresh copy
        built = {name: _engine(name, policy, tokenizer, tmp) for name in engines}
        rows = {name: {"model": which, "engine": name, "unavailable": g} for name, g in built.items() if isinstance(g, str)}
        live = {name: g for name, g in built.items() if not isinstance(g, str)}
        texts = _prompts(tokenizer, prompts, prompt_len, len(tokenizer))
        ids = [encode_prompt(tokenizer, t) for t in texts for _ in range(samples)]
        settings = dict(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
        warm_up, timed, rates = {}, {name: [] for name in live}, []
        for name, generator in live.items():
            torch.manual_seed(0)
            t0 = time.perf_counter()
            with _stepping(name):
                generator.generate(ids if name == "hf-compiled" else ids[: max(1, len(ids) // 8)], **settings)
            warm_up[name] = time.perf_counter() - t0
        for _ in range(repeats):
            for name, generator in live.items():
                torch.manual_seed(0)
                t0 = time.perf_counter()
                with _stepping(name):
                    roll = generator.generate(ids, **settings)
                timed[name].append((time.perf_counter() - t0, roll))
            rates.append(gemm_rates(policy.config, len(ids)))
        rate = {key: sorted(r[key] for r in rates)[len(rates) // 2] for key in rates[0]}
        config = PPOConfig(prompts_per_batch=prompts, samples_per_prompt=samples, ppo_epochs=1,
                           minibatch_size=prompts * samples, loss=ComponentSpec("ppo_clip"),
                           optim=PolicyOptimConfig(lr=1e-6, weight_decay=0.01),
                           generation=GenerationConfig(max_new_tokens=new_tokens),
                           kl=KLConfig(coef=0.04, estimator="k3", placement="loss"))
        for name, generator in live.items():
            seconds, roll = sorted(timed[name], key=lambda x: x[0])[len(timed[name]) // 2]
            tokens, steps = int(roll.mask.sum()), roll.mask.shape[1]
            row = {"model": which, "engine": name, "rows": len(ids), "tokens": tokens, "steps": steps,
                   "seconds": seconds, "tokens_per_s": tokens / seconds, "ms_per_step": 1e3 * seconds / steps}
            if name == "hf-compiled":
                row["compile_s"] = max(0.0, warm_up[name] - seconds)  # the warm-up's time over a compiled generate
            flops = step_flops(policy.config, len(ids), roll.prompt_len + steps / 2)
            for key, value in rate.items():
                kind = key.split("_")[0]  # step / large
                row[f"{kind}_gemm_gflops"] = value / 1e9
                row[f"floor_ms_{kind}"] = 1e3 * flops / value
                row[f"of_floor_{kind}"] = row[f"floor_ms_{kind}"] / row["ms_per_step"]
            own = copy.deepcopy(pristine).requires_grad_(True)
            run = PPORun.from_parts(build_registry(get_plugin_manager(entry_points=False)), config, own,
                                    tokenizer=tokenizer, reference=_frozen_copy(pristine),
                                    generator=_engine(name, own, tokenizer, tmp),
                                    fused=True, rewards=lambda p, r, rows: torch.tensor([float(len(x)) for x in r]),
                                    estimator=GroupMeanBaseline())
            batch = [run.prompt(text)[0] for text in texts]
            with _stepping(name):
                exp, split = timed_iteration(run, batch)
            rows[name] = {**row, "iteration_s": split["seconds"], "generate_s": split["generate"],
                          "score_s": split["score"], "train_s": split["train"], **exp.stats}
        return [rows[name] for name in engines]


def _frozen_copy(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def run(*, out_dir: str | Path = "bench_out", echo=print, larger: bool = True,
        engines: tuple[str, ...] = ("hf", "hf-forward", "hf-loop", "hf-compiled", "vllm")) -> list[dict]:
    from .measure import machine

    shapes = {"small": dict(prompts=4, samples=4, new_tokens=32, prompt_len=8, repeats=11),
              "larger": dict(prompts=64, samples=4, new_tokens=128, prompt_len=32, repeats=1)}
    rows = []
    echo(f"{'model':<7} {'engine':<12} {'tokens':>6} {'tokens/s':>8} {'vs hf':>6} {'ms/step':>8} "
         f"{'floor ms (step GEMMs / large)':>30}  iteration s (generate/score/train)")
    for which in (["small", "larger"] if larger else ["small"]):
        base = None
        for row in measure(which, engines, **shapes[which]):
            engine = row["engine"]
            rows.append(row)
            if "unavailable" in row:
                echo(f"{which:<7} {engine:<12} unavailable: {row['unavailable'][:150]}")
                continue
            base = base or row
            row["vs_hf"] = row["tokens_per_s"] / base["tokens_per_s"]
            compile_note = f"  (compile {row['compile_s']:.1f} s)" if "compile_s" in row else ""
            echo(f"{which:<7} {engine:<12} {row['tokens']:>6} {row['tokens_per_s']:>8.0f} {row['vs_hf']:>5.2f}x "
                 f"{row['ms_per_step']:>8.2f} {row['floor_ms_step']:>9.2f} ({row['of_floor_step']:.0%}) / "
                 f"{row['floor_ms_large']:.2f} ({row['of_floor_large']:.0%})  "
                 f"{row['iteration_s']:.2f} ({row['generate_s']:.2f}/{row['score_s']:.2f}/{row['train_s']:.2f})"
                 + compile_note)
    echo("floor: the step's FLOPs over the matrix-product rate measured now, at the step's own GEMM shapes / at a "
         "large GEMM (in brackets: the share of it reached)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.json").write_text(json.dumps({"machine": machine(), "shapes": shapes, "rows": rows}, indent=2))
    _plot([r for r in rows if "tokens_per_s" in r], out / "rollout.png")
    echo(f"wrote {out / 'rollout.json'} and {out / 'rollout.png'}")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    labels = [f"{r['model']}\n{r['engine']}" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color=["C0" if r["engine"] == "hf" else "C1" for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("generated tokens/s (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
