"""Kernel benchmark script: ``python benchmarks/bench_kernels.py [--quick]`` (same as ``rlhf bench kernels``)."""
from __future__ import annotations

import sys

from rlhf_core.cli import cli

if __name__ == "__main__":
    cli(["bench", "kernels", *sys.argv[1:]], obj={})
