"""Rollout benchmark: generated tokens per second of the ``hf`` engine (Hugging Face ``generate``;
``hf-loop``: the same engine with ``loop: rlhf``) and the ``vllm`` engine side by side,
and the split of one PPO iteration (generate / score / train) with each, on two models:

- ``tiny``: the builtin tiny model (hidden 64, 4 heads of 16, vocab 384);
- ``larger``: a Llama built from a config (hidden 512, 8 heads of 64, 4 layers, vocab 32000,
  random weights, word-level tokenizer), 64 prompts x 4 samples x 128 new tokens.

The engines run through the PPO stage's own code (``make_experience`` / ``update`` with the
generator plugin). An engine that cannot run a model here is reported with its reason. Used by
``rlhf bench rollout`` and ``benchmarks/bench_rollout.py``.
"""
from __future__ import annotations

import json
import tempfile
import time
import types
from pathlib import Path

import torch


def _models(which: str, tmp: Path):
    from rlhf_core.config import ModelConfig
    from rlhf_core.models import load_causal_lm, load_tokenizer

    if which == "tiny":
        cfg = ModelConfig()
        return load_causal_lm(cfg, seed=0), load_tokenizer(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    from .memory_usage import word_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), word_tokenizer(32000)


def _prompts(tokenizer, n: int, length: int, vocab: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    if vocab == 384:
        letters = "abcdefghijklmnopqrstuvwxyz "
        return ["".join(letters[i] for i in torch.randint(0, 27, (length,), generator=g).tolist()) for _ in range(n)]
    return [" ".join(f"t{i}" for i in torch.randint(3, vocab, (length,), generator=g).tolist()) for _ in range(n)]


def measure(which: str, engine: str, *, prompts: int, samples: int, new_tokens: int, prompt_len: int) -> dict:
    """Tokens/s of one timed generate (after a warm-up), then one PPO iteration's split."""
    from rlhf_core import CheckedGenerator, ComponentSpec, GenerationConfig, encode_prompt
    from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager
    from rlhf_plugins.ppo.advantages import GroupMeanBaseline
    from rlhf_plugins.ppo.config import KLConfig, PolicyOptimConfig, PPOConfig
    from rlhf_plugins.ppo.generators import HFGenerator
    from rlhf_plugins.ppo.run import PPORun

    with tempfile.TemporaryDirectory() as tmp:
        policy, tokenizer = _models(which, Path(tmp))
        ctx = types.SimpleNamespace(device=torch.device("cpu"), seed=0, stage_dir=Path(tmp), name="ppo")
        entry = types.SimpleNamespace(kind="generator", name=engine, plugin="bench")
        try:
            if engine == "vllm":
                from rlhf_plugins.vllm_engine import VLLMGenerator, vllm_unavailable

                if vllm_unavailable():
                    return {"model": which, "engine": engine, "unavailable": vllm_unavailable()}
                gen = VLLMGenerator(ctx, policy, tokenizer)
            else:  # hf: Hugging Face generate; hf-loop: the hf engine's own decode loop (loop: rlhf)
                gen = HFGenerator(ctx, policy, tokenizer, loop="rlhf" if engine == "hf-loop" else "generate")
        except Exception as exc:  # e.g. a head size the CPU engine does not support
            return {"model": which, "engine": engine, "unavailable": f"{type(exc).__name__}: {exc}"}
        generator = CheckedGenerator(entry, gen)
        texts = _prompts(tokenizer, prompts, prompt_len, len(tokenizer))
        ids = [encode_prompt(tokenizer, t) for t in texts for _ in range(samples)]
        settings = dict(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
        torch.manual_seed(0)
        generator.generate(ids[: max(1, len(ids) // 8)], **settings)  # warm-up
        t0 = time.perf_counter()
        roll = generator.generate(ids, **settings)
        seconds = time.perf_counter() - t0
        tokens = int(roll.mask.sum())
        config = PPOConfig(prompts_per_batch=prompts, samples_per_prompt=samples, ppo_epochs=1,
                           minibatch_size=prompts * samples, loss=ComponentSpec("ppo_clip"),
                           optim=PolicyOptimConfig(lr=1e-6, weight_decay=0.01),
                           generation=GenerationConfig(max_new_tokens=new_tokens),
                           kl=KLConfig(coef=0.04, estimator="k3", placement="loss"))
        run = PPORun.from_parts(build_registry(get_plugin_manager(entry_points=False)), config, policy,
                                tokenizer=tokenizer, reference=_frozen_copy(policy), generator=generator, fused=True,
                                rewards=lambda p, r, rows: torch.tensor([float(len(x)) for x in r]),
                                estimator=GroupMeanBaseline())
        batch = [run.prompt(text)[0] for text in texts]
        t1 = time.perf_counter()
        exp = run.make_experience(batch)
        t2 = time.perf_counter()
        run.update(exp)
        run.generator.update_weights(run.policy)
        t3 = time.perf_counter()
        return {"model": which, "engine": engine, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "iteration_s": t3 - t1, "generate_s": exp.time_generate, "score_s": t2 - t1 - exp.time_generate,
                "train_s": t3 - t2, **exp.stats}


def _frozen_copy(model):
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def run(*, out_dir: str | Path = "bench_out", echo=print, larger: bool = True) -> list[dict]:
    from .measure import machine

    shapes = {"tiny": dict(prompts=16, samples=4, new_tokens=32, prompt_len=16),
              "larger": dict(prompts=64, samples=4, new_tokens=128, prompt_len=32)}
    rows = []
    echo(f"{'model':<7} {'engine':<7} {'tokens':>7} {'tokens/s':>9} {'vs hf':>6}  iteration s (generate/score/train)")
    for which in (["tiny", "larger"] if larger else ["tiny"]):
        base = None
        for engine in ("hf", "hf-loop", "vllm"):
            row = measure(which, engine, **shapes[which])
            rows.append(row)
            if "unavailable" in row:
                echo(f"{which:<7} {engine:<7} unavailable: {row['unavailable'][:150]}")
                continue
            base = base or row
            row["vs_hf"] = row["tokens_per_s"] / base["tokens_per_s"]
            echo(f"{which:<7} {engine:<7} {row['tokens']:>7} {row['tokens_per_s']:>9.0f} {row['vs_hf']:>5.2f}x  "
                 f"{row['iteration_s']:.2f} ({row['generate_s']:.2f}/{row['score_s']:.2f}/{row['train_s']:.2f})")
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
