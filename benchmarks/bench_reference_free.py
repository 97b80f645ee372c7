"""What ``kl.coef: 0`` saves: the PPO stage with a KL penalty (a frozen reference copy is loaded and
scores every rollout) against the same stage without one (no reference at all), side by side in
one run, each in a fresh process. The policy is a Llama of hidden 512, 4 layers (byte vocabulary),
saved to a temporary directory and loaded through ``from_pretrained``; the reward is the rule-based
``length`` reward, so the reference is the only model that differs. Reports the median seconds per
iteration (and its score / train split; the reference forward is part of ``score``) after the
first iteration, and the process's peak resident memory.

    python benchmarks/bench_reference_free.py [--iterations 6] [--out bench_out]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf_bench.measure import machine


def save_model(where: Path, hidden: int, layers: int) -> Path:
    """A random Llama with the byte tokenizer, saved like any Hugging Face checkpoint."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def run_stage(model: Path, out: Path, coef: float, iterations: int) -> dict:
    """One PPO stage in a fresh process; its per-iteration timings and peak memory."""
    stage = (f"stages=[{{stage: ppo, init: base, data: {{train: 'builtin:letters', builtin_size: 200}}, "
             f"iterations: {iterations}, prompts_per_batch: 32, minibatch_size: 16, ppo_epochs: 2, reward: length, "
             f"generation: {{max_new_tokens: 32}}, eval_every: 0, eval_prompts: 0, save: false, kl: {{coef: {coef}}}}}]")
    done = subprocess.run([sys.executable, "-m", "rlhf_core.cli", "run", "--out", str(out), "--set",
                           f"model.name_or_path={model}", "--set", stage, "--set", "checkpoint.every=0"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time_train" in r][1:]  # the first iteration warms up
    summary = json.loads((out / "summary.json").read_text())["stages"]["ppo"]
    split = {k: statistics.median(r[k] for r in steps) for k in ("time_generate", "time_score", "time_train")}
    return {"kl_coef": coef, "seconds_per_iteration": sum(split.values()), **split,
            "peak_memory_mb": summary["peak_memory_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_model(Path(tmp) / "model", args.hidden, args.layers)
        results = [run_stage(model, Path(tmp) / f"run-{coef}", coef, args.iterations) for coef in (0.05, 0.0)]
    with_ref, without = results
    print(f"{'kl.coef':>8} {'s/iter':>8} {'generate':>9} {'score':>7} {'train':>7} {'peak MB':>8}")
    for r in results:
        print(f"{r['kl_coef']:>8} {r['seconds_per_iteration']:>8.3f} {r['time_generate']:>9.3f} {r['time_score']:>7.3f} "
              f"{r['time_train']:>7.3f} {r['peak_memory_mb']:>8.1f}")
    print(f"kl.coef 0 vs 0.05: time per iteration x{without['seconds_per_iteration'] / with_ref['seconds_per_iteration']:.2f}, "
          f"score phase x{without['time_score'] / with_ref['time_score']:.2f}, "
          f"peak memory x{without['peak_memory_mb'] / with_ref['peak_memory_mb']:.2f} "
          f"({with_ref['peak_memory_mb'] - without['peak_memory_mb']:.0f} MB less)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference_free.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
