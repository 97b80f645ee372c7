"""Rollout benchmark script: ``python benchmarks/bench_rollout.py [--small-only] [--engine NAME ...]`` (same as ``rlhf bench rollout``)."""
from __future__ import annotations

import sys

from rlhf_bench.commands import bench

if __name__ == "__main__":
    bench(["rollout", *sys.argv[1:]])
