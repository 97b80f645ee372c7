"""Fused-linear cross-entropy vs the unfused op (logits materialised), time and peak extra memory,
side by side in one run (forward + backward, gradients for hidden and weight):

- ``unfused``: ``cross_entropy(hidden @ weight.T, labels)`` with the fastest kernel backend;
- ``fused``: ``linear_cross_entropy`` (gradients computed inside the forward chunk loop);
- ``fused-recompute``: ``linear_token_logprobs`` + mean (the backward recomputes each chunk's logits).

    python benchmarks/bench_linear_memory.py [--n 4096] [--h 1024] [--v 128256] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rlhf_kernels as K
from rlhf_bench.measure import PeakRSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--v", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    hidden = torch.randn(args.n, args.h, requires_grad=True)
    weight = (torch.randn(args.v, args.h) * 0.02).requires_grad_()
    labels = torch.randint(0, args.v, (args.n,))
    backend = None  # the fastest available
    cases = {
        "unfused": lambda: K.cross_entropy(hidden @ weight.t(), labels, backend=backend),
        "fused": lambda: K.linear_cross_entropy(hidden, weight, labels, backend=backend),
        "fused-recompute": lambda: -K.linear_token_logprobs(hidden, weight, labels, backend=backend).mean(),
    }
    grads_mb = (hidden.numel() + weight.numel()) * 4 / 2**20
    print(f"N={args.n} H={args.h} V={args.v} fp32, backend {K.resolve_backend(None, hidden.device)[0]}; logits would be "
          f"{args.n * args.v * 4 / 2**20:.0f} MB; parameter gradients {grads_mb:.0f} MB")
    results = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for name, fn in cases.items():
            hidden.grad = weight.grad = None
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                fn().backward()
                results[name].append((time.perf_counter() - t0, rss.extra / 2**20))
    base = statistics.median(s for s, _ in results["unfused"])
    base_mb = max(m for _, m in results["unfused"])
    for name, runs in results.items():
        sec, extra = statistics.median(s for s, _ in runs), max(m for _, m in runs)
        print(f"{name:<16} fwd+bwd {sec * 1e3:8.0f} ms ({base / sec:4.2f}x the speed of unfused)   peak extra "
              f"{extra:7.0f} MB ({extra / base_mb:4.2f}x)")


if __name__ == "__main__":
    main()
