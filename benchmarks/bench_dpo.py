"""DPO step benchmark against TRL's DPOTrainer (:mod:`rlhf_bench.vs_trl_dpo`):

    python benchmarks/bench_dpo.py [--out bench_out] [--steps 3] [--warmup 1] [--config NAME ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf_bench.measure import machine
from rlhf_bench.vs_trl_dpo import CONFIGS, DPOShape, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--steps", type=int, default=3, help="Measured optimizer steps (median).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--config", action="append", choices=CONFIGS, help=f"Default: {', '.join(CONFIGS)}.")
    args = parser.parse_args()
    result = run(DPOShape(vocab=args.vocab), args.config or CONFIGS, args.warmup, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dpo_trl.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
