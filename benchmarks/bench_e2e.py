"""End-to-end benchmark: SFT tokens/s and one PPO iteration (generate / score / train) on the
builtin tiny model, ``reference`` kernels vs the fastest available backend, side by side; with
``--trl``, one RL iteration of rlhf against one step of TRL's GRPOTrainer at equal work
(:mod:`rlhf_bench.vs_trl`).

    python benchmarks/bench_e2e.py [--out bench_out] [--trl]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rlhf_core.engine import make_run_dir, prepare, run_pipeline
from rlhf_bench.measure import machine
from rlhf_kernels import available_backends


def measure(backend: str) -> dict:
    overrides = [f"kernels.backend={backend}", "stages.sft.train.steps=60", "stages.reward.train.steps=20",
                 "stages.ppo.iterations=10", "stages.ppo.eval_every=0", "stages.ppo.eval_prompts=0"]
    prepared = prepare(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run_dir(str(Path(tmp) / "run"), False)
        run_pipeline(prepared, run_dir, echo=lambda *_: None)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [r["tokens_per_s"] for r in rows if r["stage"] == "sft" and "tokens_per_s" in r]
    ppo = [r for r in rows if r["stage"] == "ppo" and "time_generate" in r][1:]  # skip warm-up iteration
    return {
        "backend": backend, "sft_tokens_per_s": sft[-1],
        **{k: statistics.median(r[k] for r in ppo) for k in ("time_generate", "time_score", "time_train")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--trl", action="store_true", help="Only the comparison with TRL's GRPOTrainer.")
    args = parser.parse_args()
    if args.trl:
        from rlhf_bench.vs_trl import run

        results = run()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "e2e_trl.json").write_text(json.dumps({"machine": machine(), "seconds_per_iteration": results}, indent=2))
        return
    fast = [b for b in ("cpp", "triton") if available_backends("cpu")[b] == ""][:1]
    results = [measure(b) for b in ["reference", *fast]]
    print(f"{'backend':<10} {'SFT tok/s':>10} {'PPO gen s':>10} {'score s':>8} {'train s':>8}")
    for r in results:
        print(f"{r['backend']:<10} {r['sft_tokens_per_s']:>10.0f} {r['time_generate']:>10.4f} {r['time_score']:>8.4f} {r['time_train']:>8.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
