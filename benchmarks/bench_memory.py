"""Memory benchmark script: ``python benchmarks/bench_memory.py [options]`` (same as ``rlhf bench memory``)."""
from __future__ import annotations

import sys

from rlhf_bench.commands import bench

if __name__ == "__main__":
    bench(["memory", *sys.argv[1:]])
