"""``rlhf bench algorithms``: every built-in RL algorithm on the builtin ``arith`` task, the same
sample budget and the same seeds, from the same SFT warm-up.

Each algorithm is its recipe's algorithm keys (``examples/configs/<name>.yaml``: advantage
estimator, policy loss and its aggregation, KL, dynamic sampling, overlong shaping, whitening;
the letters task's budget keys are dropped) on the arith task of ``examples/configs/grpo_arith.yaml``
(the ``math`` and ``format`` rewards, held-out accuracy as the gold score). Fairness: every run
samples ``samples_per_iteration`` responses of at most ``generation.max_new_tokens`` tokens per
iteration for the same number of iterations, with one optimizer step per iteration (group
algorithms take 8 samples per prompt, the others 1 sample for 8x as many prompts), from the SFT
model of its seed. A third-party algorithm joins by name: ``--algorithm 'mine={loss: my_loss,
advantage: group_mean}'`` (keys of the ppo stage).

Writes ``algorithms.json`` (every run: curves, final numbers, wall time), ``algorithms.png``
(held-out accuracy per iteration, mean over seeds) and prints a table of mean +- std over seeds.
"""
from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "configs"
TASK = RECIPES / "grpo_arith.yaml"
BUILT_IN = ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce_pp", "ppo_gae")
#: The keys of a recipe's RL stage that define its algorithm (the rest is the task and its budget).
ALGORITHM_KEYS = ("advantage", "loss", "loss_agg", "kl", "dynamic_sampling", "overlong", "whiten_advantages",
                  "entropy_coef", "rollout_correction", "critic_optim", "vf_clip")
GROUP_SIZE = 8


def recipe_algorithm(name: str) -> dict[str, Any]:
    """The algorithm keys of recipe ``name``'s RL stage (see :data:`ALGORITHM_KEYS`), plus
    ``samples_per_prompt`` > 1 where the recipe samples groups."""
    path = RECIPES / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"no recipe {path}; built-in algorithms: {', '.join(BUILT_IN)} (or give --algorithm NAME=YAML)")
    stage = next(s for s in yaml.safe_load(path.read_text())["stages"] if s["stage"] == "ppo")
    keys = {k: stage[k] for k in ALGORITHM_KEYS if k in stage}
    keys["grouped"] = stage.get("samples_per_prompt", 1) > 1
    return keys


def parse_algorithm(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` (a built-in recipe) or ``NAME=YAML`` (a mapping of ppo-stage keys, e.g. a third
    party's ``{loss: my_loss, advantage: group_mean}``) -> ``(name, keys)``."""
    if "=" not in text:
        return text, recipe_algorithm(text)
    name, _, body = text.partition("=")
    keys = yaml.safe_load(body)
    if not isinstance(keys, dict):
        raise ValueError(f"--algorithm {text!r}: after NAME= give a YAML mapping of ppo-stage keys, e.g. "
                         "'mine={loss: my_loss, advantage: group_mean}'")
    keys.setdefault("grouped", keys.get("samples_per_prompt", GROUP_SIZE) > 1)
    keys.pop("samples_per_prompt", None)
    return name, keys


def task_config(seed: int) -> dict[str, Any]:
    """The arith task (``grpo_arith.yaml``) with ``seed``."""
    config = yaml.safe_load(TASK.read_text())
    config["seed"] = seed
    return config


def ppo_config(seed: int, sft_dir: str, algorithm: dict[str, Any], *, iterations: int,
               samples_per_iteration: int, eval_every: int) -> dict[str, Any]:
    """One run: the task's RL stage with ``algorithm``'s keys, the shared budget, from ``sft_dir``."""
    config = task_config(seed)
    stage = next(s for s in config["stages"] if s["stage"] == "ppo")
    for key in ALGORITHM_KEYS:
        stage.pop(key, None)
    keys = {k: v for k, v in copy.deepcopy(algorithm).items() if k != "grouped"}
    stage.update(keys)
    group = GROUP_SIZE if algorithm.get("grouped", True) else 1
    stage.update(name="rl", init=sft_dir, iterations=iterations, samples_per_prompt=group,
                 prompts_per_batch=samples_per_iteration // group, minibatch_size=samples_per_iteration,
                 ppo_epochs=1, eval_every=eval_every)
    stage.setdefault("kl", {"coef": 0.0})
    config["stages"] = [stage]
    return config


def rlhf_run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run ``config`` with ``rlhf run`` in its own process; ``(summary, metrics rows, seconds)``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rlhf_core.cli", "run", str(path), "--out", str(out / "run"),
                           "--overwrite"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"rlhf run {path} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads((out / "run" / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": summary, "rows": rows, "seconds": seconds}


def measure(name: str, seed: int, result: dict[str, Any], samples_per_iteration: int) -> dict[str, Any]:
    """One run's numbers: held-out accuracy at start and end and per evaluation, the last
    iteration's reward, KL and response length, generated tokens and wall time."""
    rows = [r for r in result["rows"] if r.get("stage") == "rl"]
    train = [r for r in rows if "reward_mean" in r]
    evals = [(r["step"], r["eval_gold"]) for r in rows if "eval_gold" in r]
    stage = result["summary"]["stages"]["rl"]
    return {
        "algorithm": name, "seed": seed, "accuracy_start": stage["eval_gold_start"], "accuracy": stage["eval_gold_end"],
        "reward": train[-1]["reward_mean"], "kl": train[-1]["kl"], "response_length": train[-1]["response_length"],
        "generated_tokens": sum(r["response_length"] for r in train) * samples_per_iteration,
        "seconds": stage["seconds"], "curve": evals,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per algorithm, in the order first run."""
    out = []
    for name in dict.fromkeys(r["algorithm"] for r in runs):
        mine = [r for r in runs if r["algorithm"] == name]
        row: dict[str, Any] = {"algorithm": name, "seeds": len(mine)}
        for key in ("accuracy_start", "accuracy", "reward", "kl", "response_length", "generated_tokens", "seconds"):
            values = [r[key] for r in mine]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (mean +- std over seeds)."""
    lines = ["| algorithm | held-out accuracy (SFT -> RL) | reward | KL | response length | generated tokens | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['algorithm']} | {r['accuracy_start']:.3f} -> **{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}** "
                     f"| {r['reward']:.3f} ± {r['reward_std']:.3f} | {r['kl']:.4f} | {r['response_length']:.1f} "
                     f"| {r['generated_tokens']:,.0f} | {r['seconds']:.1f} ± {r['seconds_std']:.1f} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Held-out accuracy per iteration, the mean over seeds per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["algorithm"] for r in runs):
        curves = [dict(r["curve"]) for r in runs if r["algorithm"] == name]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], marker="o", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out accuracy (mean over seeds)")
    ax.set_title("RL algorithms on builtin:arith")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(algorithms: list[str], seeds: list[int], *, iterations: int = 100, samples_per_iteration: int = 256,
        eval_every: int = 25, out_dir: str | Path = "bench_out", echo: Callable[[str], None] = print) -> list[dict]:
    """Run every algorithm with every seed (the SFT warm-up once per seed); print the table, write
    ``algorithms.json`` and ``algorithms.png`` under ``out_dir``. Returns the per-algorithm summary."""
    from .measure import machine

    if samples_per_iteration % GROUP_SIZE:
        raise ValueError(f"samples_per_iteration must be a multiple of {GROUP_SIZE}, got {samples_per_iteration}")
    chosen = [parse_algorithm(a) for a in algorithms]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            warmup = task_config(seed)
            warmup["stages"] = [s for s in warmup["stages"] if s["stage"] == "sft"]
            sft = rlhf_run(warmup, Path(tmp) / f"sft-{seed}")
            sft_dir = sft["summary"]["outputs"]["sft"]["model_dir"]
            echo(f"seed {seed}: SFT warm-up in {sft['seconds']:.0f} s")
            for name, keys in chosen:
                config = ppo_config(seed, sft_dir, keys, iterations=iterations,
                                    samples_per_iteration=samples_per_iteration, eval_every=eval_every)
                runs.append(measure(name, seed, rlhf_run(config, Path(tmp) / f"{name}-{seed}"), samples_per_iteration))
                r = runs[-1]
                echo(f"  {name:<14} seed {seed}: accuracy {r['accuracy_start']:.3f} -> {r['accuracy']:.3f}, "
                     f"{r['seconds']:.0f} s")
    summary = summarise(runs)
    echo(table(summary))
    (out / "algorithms.json").write_text(json.dumps({
        "machine": machine(), "task": "builtin:arith (examples/configs/grpo_arith.yaml)", "seeds": seeds,
        "iterations": iterations, "samples_per_iteration": samples_per_iteration, "summary": summary, "runs": runs,
    }, indent=2))
    plot(runs, out / "algorithms.png")
    echo(f"wrote {out / 'algorithms.json'} and {out / 'algorithms.png'}")
    return summary
