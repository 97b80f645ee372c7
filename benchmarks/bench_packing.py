"""SFT padded vs packed, and against TRL's SFTTrainer (:mod:`rlhf_bench.packing`):

    python benchmarks/bench_packing.py [--out bench_out] [--examples 160] [--vocab 384] [--config NAME ...]
"""
from __future__ import annotations

import argparse

from rlhf_bench.measure import machine
from rlhf_bench.packing import CONFIGS, PackingShape, run, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--vocab", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="Rounds over the configurations; the fastest counts.")
    parser.add_argument("--config", action="append", choices=CONFIGS, help=f"Default: {', '.join(CONFIGS)}.")
    args = parser.parse_args()
    result = run(PackingShape(vocab=args.vocab, examples=args.examples, batch_size=args.batch_size),
                 args.config or CONFIGS, args.repeats)
    print("wrote", ", ".join(str(p) for p in save(result, {"machine": machine()}, args.out)))


if __name__ == "__main__":
    main()
