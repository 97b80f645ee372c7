"""Rollouts that overlap training: one PPO stage with and without ``async: {max_staleness: 1}``,
side by side in one run, on a Llama of hidden 256 x 4 layers over the byte tokenizer (the
builtin-sized shape of the rollout issue), 16 prompts x 4 samples x 32 new tokens per iteration.

Each configuration runs as its own ``rlhf run`` (the async one starts its rollout worker process);
reported: seconds per iteration over the iterations after the first two (which carry start-up),
and the split the PPO stage logs (generate or, with async, the wait for the worker / score /
train). On CPU the async run's worker takes ``async.threads`` (1) of the cores and the trainer the
rest; the synchronous run uses every core for both phases.

    python benchmarks/bench_async.py [--iterations 10] [--out bench_out]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

STAGE = {"stage": "ppo", "init": "base", "data": {"train": "builtin:letters", "builtin_size": 200},
         "reward": "length", "prompts_per_batch": 16, "samples_per_prompt": 4, "minibatch_size": 64,
         "ppo_epochs": 1, "advantage": "group_mean", "generation": {"max_new_tokens": 32},
         "kl": {"coef": 0.05, "placement": "loss"}, "optim": {"lr": 1.0e-5}, "eval_prompts": 0,
         "generator": {"name": "hf", "loop": "rlhf"}, "save": False}


def model_dir(root: Path) -> Path:
    """A random Llama (hidden 256, 4 layers, 4 heads of 64, vocab 384) and the byte tokenizer."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def stage_run(name: str, extra: dict, model: Path, iterations: int, root: Path) -> dict:
    config = {"seed": 0, "model": {"name_or_path": str(model)}, "stages": [{**STAGE, **extra, "iterations": iterations}]}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / name
    done = subprocess.run([sys.executable, "-m", "rlhf_core.cli", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "ppo" and "policy_loss" in r]
    steady = rows[2:]
    per_iteration = (steady[-1]["time"] - rows[1]["time"]) / len(steady)
    mean = lambda key: sum(r.get(key, 0.0) for r in steady) / len(steady)  # noqa: E731
    return {"name": name, "seconds_per_iteration": per_iteration, "generate_or_wait_s": mean("time_generate"),
            "score_s": mean("time_score"), "train_s": mean("time_train"), "staleness": mean("staleness")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = model_dir(root)
        runs = [stage_run("sync", {}, model, args.iterations, root),
                stage_run("async", {"async": {"max_staleness": 1}, "rollout_correction": {"type": "tis"}}, model,
                          args.iterations, root)]
    base = runs[0]["seconds_per_iteration"]
    print(f"{'run':<6} {'s/iteration':>11} {'vs sync':>8}  generate-or-wait / score / train s  staleness")
    for r in runs:
        r["speedup"] = base / r["seconds_per_iteration"]
        print(f"{r['name']:<6} {r['seconds_per_iteration']:>11.3f} {r['speedup']:>7.2f}x  "
              f"{r['generate_or_wait_s']:.3f} / {r['score_s']:.3f} / {r['train_s']:.3f}  {r['staleness']:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "async.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
