"""Scaling benchmark: the same config on 1 and on N processes (``rlhf run --nproc N``), side by
side: seconds per optimizer step (sft, reward) or per iteration (ppo), and peak memory per process.

    python benchmarks/bench_distributed.py [--nproc 2] [--out bench_out]

Each run is a fresh ``rlhf run`` in a subprocess. On a CPU machine the processes share its cores
(torch's launcher gives each one thread), so this measures the overhead of the collectives more
than a speed-up; on N GPUs the same command measures the real scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf_bench.measure import machine

OVERRIDES = ["stages.sft.train.steps=60", "stages.sft.train.log_every=5", "stages.sft.train.eval_every=0",
             "stages.reward.train.steps=40", "stages.reward.train.log_every=5", "stages.reward.train.eval_every=0",
             "stages.ppo.iterations=12", "stages.ppo.eval_every=0", "stages.ppo.eval_prompts=0"]


def measure(nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = [sys.executable, "-m", "rlhf_core.cli", "run", "--out", str(out), "--nproc", str(nproc)]
        for item in OVERRIDES:
            args += ["--set", item]
        subprocess.run(args, check=True, capture_output=True, text=True, env={**os.environ})
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"nproc": nproc}
    for stage in ("sft", "reward", "ppo"):
        times = [r["time"] for r in rows if r["stage"] == stage and ("loss" in r or "reward_mean" in r)]
        steps = [r["step"] for r in rows if r["stage"] == stage and ("loss" in r or "reward_mean" in r)]
        # seconds per step between logged rows, skipping the first window (start-up, first all-gathers)
        per_step = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(zip(times, steps), zip(times[1:], steps[1:]))][1:]
        result[f"{stage}_s_per_step"] = statistics.median(per_step)
        result[f"{stage}_peak_mb"] = summary["stages"][stage]["peak_memory_mb"]
    result["gold_score_ppo"] = summary.get("gold_score_ppo")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    results = [measure(1), measure(args.nproc)]
    print(f"{'processes':>9} {'sft s/step':>11} {'reward s/step':>14} {'ppo s/iter':>11} {'peak MiB/process':>17}")
    for r in results:
        peak = max(r[f"{s}_peak_mb"] for s in ("sft", "reward", "ppo"))
        print(f"{r['nproc']:>9} {r['sft_s_per_step']:>11.4f} {r['reward_s_per_step']:>14.4f} {r['ppo_s_per_step']:>11.4f} {peak:>17.0f}")
    one, many = results
    print("ratios (N / 1): " + ", ".join(f"{s} {many[f'{s}_s_per_step'] / one[f'{s}_s_per_step']:.2f}x time"
                                         for s in ("sft", "reward", "ppo")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
