"""Algorithm comparison script: ``python benchmarks/bench_algorithms.py [--seeds 3] [--algorithm grpo ...]``
(same as ``rlhf bench algorithms``)."""
from __future__ import annotations

import sys

from rlhf_bench.commands import bench

if __name__ == "__main__":
    bench(["algorithms", *sys.argv[1:]])
