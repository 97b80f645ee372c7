"""End-to-end benchmark: SFT tokens/s and one PPO iteration (generate / score / train) on the
builtin tiny model, ``reference`` kernels vs the fastest available backend, side by side; with
``--trl``, one RL iteration of rlhf against one step of TRL's GRPOTrainer at equal work
(:mod:`rlhf_bench.vs_trl`): on the tiny model, or with ``--shape realistic`` on a Llama of hidden 512
and vocabularies 128256 and 32000 with DAPO's loss, each configuration in its own process, with the
iteration's split and peak memory (``--shape small``: the same script on a shape that runs in about
a minute).

    python benchmarks/bench_e2e.py [--out bench_out] [--trl [--shape realistic|small] [--steps N] [--warmup N]
                                   [--config NAME ...]]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rlhf_core.runtime.pipeline import prepare, run_pipeline
from rlhf_core.runtime.run_dir import make_run_dir
from rlhf_bench.measure import machine
from rlhf_bench.vs_trl import DEFAULT_CONFIGS, RLHF_CONFIGS, SHAPES, TRL, run, run_shapes
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
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny",
                        help="With --trl: the tiny model (default), or the realistic shapes (V=128256 and 32000).")
    parser.add_argument("--steps", type=int, default=3, help="With --shape: measured iterations (median).")
    parser.add_argument("--warmup", type=int, default=1, help="With --shape: warm-up iterations.")
    parser.add_argument("--vocab", type=int, action="append",
                        help="With --shape: only the shapes of this vocabulary size (repeatable).")
    parser.add_argument("--config", action="append", choices=[*RLHF_CONFIGS, TRL],
                        help=f"With --shape (repeatable); default: {', '.join(DEFAULT_CONFIGS)}.")
    args = parser.parse_args()
    out = Path(args.out)
    if args.trl and args.shape != "tiny":
        shapes = [shape for shape in SHAPES[args.shape] if not args.vocab or shape.vocab in args.vocab]
        if not shapes:
            parser.error(f"--vocab: {args.shape} has vocabularies {', '.join(str(s.vocab) for s in SHAPES[args.shape])}")
        results = run_shapes(shapes, args.config or DEFAULT_CONFIGS, args.warmup, args.steps)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"e2e_trl_{args.shape}.json"
        path.write_text(json.dumps({"machine": machine(), "shapes": results}, indent=2))
        print(f"wrote {path}")
        return
    if args.trl:
        results = run()
        out.mkdir(parents=True, exist_ok=True)
        (out / "e2e_trl.json").write_text(json.dumps({"machine": machine(), "seconds_per_iteration": results}, indent=2))
        return
    fast = [b for b in ("cpp", "triton") if available_backends("cpu")[b] == ""][:1]
    results = [measure(b) for b in ["reference", *fast]]
    print(f"{'backend':<10} {'SFT tok/s':>10} {'PPO gen s':>10} {'score s':>8} {'train s':>8}")
    for r in results:
        print(f"{r['backend']:<10} {r['sft_tokens_per_s']:>10.0f} {r['time_generate']:>10.4f} {r['time_score']:>8.4f} {r['time_train']:>8.4f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
