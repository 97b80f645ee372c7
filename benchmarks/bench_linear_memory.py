"""Peak extra memory of the fused-linear ops vs the unfused reference (logits materialised).

    python benchmarks/bench_linear_memory.py [--n 1024] [--h 1024] [--v 128256]
"""
from __future__ import annotations

import argparse
import time

import torch

import rlhf_kernels as K
from rlhf_bench.measure import PeakRSS


def measure(fn, hidden, weight, labels) -> tuple[float, float]:
    hidden.grad = weight.grad = None
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        fn(hidden, weight, labels).backward()
        sec = time.perf_counter() - t0
    return sec, rss.extra / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--v", type=int, default=128256)
    args = parser.parse_args()
    torch.manual_seed(0)
    hidden = torch.randn(args.n, args.h, requires_grad=True)
    weight = (torch.randn(args.v, args.h) * 0.02).requires_grad_()
    labels = torch.randint(0, args.v, (args.n,))
    grads_mb = (hidden.numel() + weight.numel()) * 4 / 2**20
    print(f"N={args.n} H={args.h} V={args.v}; logits would be {args.n * args.v * 4 / 2**20:.0f} MB; "
          f"parameter gradients {grads_mb:.0f} MB")
    backends = ["reference"] + [b for b in ("cpp",) if K.available_backends("cpu")[b] == ""]
    for backend in backends:
        fn = lambda h, w, y: K.linear_cross_entropy(h, w, y, backend=backend)  # noqa: E731
        measure(fn, hidden, weight, labels)  # warm-up
        sec, extra = measure(fn, hidden, weight, labels)
        print(f"{backend:<10} fwd+bwd {sec * 1e3:8.0f} ms   peak extra {extra:8.0f} MB   "
              f"(beyond gradients {max(0.0, extra - grads_mb):8.0f} MB)")


if __name__ == "__main__":
    main()
