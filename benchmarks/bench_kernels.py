"""Kernel benchmark script: ``python benchmarks/bench_kernels.py [options]`` (same as ``rlhf bench kernels``)."""
from __future__ import annotations

import sys

from rlhf_bench.commands import bench

if __name__ == "__main__":
    bench(["kernels", *sys.argv[1:]])
