"""Kernel benchmark: every op x backend x shape against PyTorch eager and torch.compile of the
reference, forward-only and forward+backward; median of repeats, peak extra memory, ratio to the
best PyTorch baseline and to the machine's physical floor. Used by ``rlhf bench kernels`` and
``benchmarks/bench_kernels.py``; never run as a test.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_kernels import available_backends, cross_entropy, ppo_clip_loss, reference, token_logprobs

from .measure import PeakRSS, machine

#: This 2-core CPU's limits (DESIGN.md): one read pass at ~36 GB/s, ~2.4 G exp/s.
CPU_READ_BYTES_PER_S = 36e9
CPU_EXP_PER_S = 2.4e9
OPS = ("token_logprobs", "cross_entropy", "ppo_clip_loss")


def _callable(op: str, impl: str, logits, labels, old, adv):
    """A zero-argument function computing ``op`` with ``impl`` (a backend or a baseline)."""
    if impl == "torch_ce":
        return lambda: F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
    if impl in ("eager", "compile"):
        fn = {"token_logprobs": reference.token_logprobs, "cross_entropy": reference.cross_entropy,
              "ppo_clip_loss": reference.ppo_clip_loss}[op]
        if impl == "compile":
            # A fresh cache per case: one function compiled for many shapes would otherwise hit
            # Dynamo's recompile limit and silently fall back to eager.
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
    else:
        fn = {"token_logprobs": lambda *a: token_logprobs(*a, backend=impl),
              "cross_entropy": lambda *a: cross_entropy(*a, backend=impl),
              "ppo_clip_loss": lambda *a: ppo_clip_loss(*a, backend=impl)}[op]
    if op == "ppo_clip_loss":
        return lambda: fn(logits, labels, old, adv)
    return lambda: fn(logits, labels)


def _time(fn, backward: bool, logits, repeats: int, device) -> tuple[float, int]:
    def step():
        logits.grad = None
        out = fn()
        if backward:
            out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (and compilation)
    times, peak = [], 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            logits.grad = None
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            peak = max(peak, rss.extra)
    return statistics.median(times), peak


def physical_floor(n: int, v: int, elem: int, backward: bool, device) -> float | None:
    """Seconds the machine needs at least: CPU = exp throughput and read bandwidth; GPU = HBM bytes."""
    if device.type == "cuda":
        return None
    exps = n * v * (2 if backward else 1)
    reads = n * v * elem * (2 if backward else 1) + (n * v * elem if backward else 0)  # + gradient write
    return max(exps / CPU_EXP_PER_S, reads / CPU_READ_BYTES_PER_S)


def run(shapes, dtypes, ops=OPS, backends=None, repeats=5, compile_baseline=True, device="cpu",
        out_dir: str | Path = "bench_out", echo=print) -> list[dict]:
    """Benchmark and return rows; also prints a table and writes ``kernels.json`` and ``kernels.png``."""
    device = torch.device(device)
    status = available_backends(device)
    backends = [b for b in (backends or ("triton", "cpp")) if status.get(b) == ""]
    impls = backends + ["eager"] + (["compile"] if compile_baseline else [])
    rows = []
    for n, v in shapes:
        for dtype in dtypes:
            gen = torch.Generator(device="cpu").manual_seed(0)
            logits = torch.randn(n, v, generator=gen).to(device=device, dtype=dtype)
            labels = torch.randint(0, v, (n,), generator=gen).to(device)
            labels[::16] = -100
            old = torch.randn(n, generator=gen).to(device) - 10
            adv = torch.randn(n, generator=gen).to(device)
            for op in ops:
                for backward in (False, True):
                    names = impls + (["torch_ce"] if op == "cross_entropy" else [])
                    results = {}
                    for impl in names:
                        x = logits.detach().requires_grad_(backward)
                        fn = _callable(op, impl, x, labels, old, adv)
                        try:
                            results[impl] = _time(fn, backward, x, repeats, device)
                        except Exception as exc:  # e.g. torch.compile unavailable
                            echo(f"  skip {impl} {op}: {type(exc).__name__}: {str(exc)[:120]}")
                    baselines = [results[k][0] for k in ("eager", "compile", "torch_ce") if k in results]
                    best = min(baselines) if baselines else None
                    floor = physical_floor(n, v, logits.element_size(), backward, device)
                    for impl, (sec, peak) in results.items():
                        row = {"op": op, "impl": impl, "n": n, "v": v, "dtype": str(dtype).replace("torch.", ""),
                               "mode": "fwd+bwd" if backward else "fwd", "median_s": sec, "peak_extra_mb": peak / 2**20,
                               "logits_mb": n * v * logits.element_size() / 2**20,
                               # beyond the returned gradient (a logits-sized tensor when backward)
                               "temporaries_mb": max(0.0, peak / 2**20 - (n * v * logits.element_size() / 2**20 if backward else 0)),
                               "speedup_vs_best_torch": best / sec if best else None,
                               "speedup_vs_eager": results["eager"][0] / sec if "eager" in results else None,
                               "x_physical_floor": sec / floor if floor else None}
                        rows.append(row)
                        echo(_fmt(row))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    _plot(rows, out / "kernels.png")
    echo(f"wrote {out / 'kernels.json'} and {out / 'kernels.png'}")
    return rows


def header() -> str:
    """The table header."""
    return (f"{'op':<15} {'mode':<8} {'N x V':<14} {'dtype':<9} {'impl':<9} {'median ms':>10} {'extra MB':>9} {'temp MB':>8} "
            f"{'vs eager':>9} {'vs best':>8} {'x floor':>8}")


def _fmt(row: dict) -> str:
    f = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    return (f"{row['op']:<15} {row['mode']:<8} {str(row['n']) + 'x' + str(row['v']):<14} {row['dtype']:<9} "
            f"{row['impl']:<9} {row['median_s'] * 1e3:>10.1f} {row['peak_extra_mb']:>9.0f} {row['temporaries_mb']:>8.0f} "
            f"{f(row['speedup_vs_eager'], '>8.2f')}x {f(row['speedup_vs_best_torch'], '>7.2f')}x {f(row['x_physical_floor'], '>7.2f')}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["op"], r["mode"], r["n"], r["v"], r["dtype"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for i, g in enumerate(groups):
            match = [r for r in rows if (r["op"], r["mode"], r["n"], r["v"], r["dtype"]) == g and r["impl"] == impl]
            if match:
                xs.append(i + k * width)
                ys.append(match[0]["median_s"] * 1e3)
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{g[0]}\n{g[1]} {g[2]}x{g[3]}\n{g[4]}" for g in groups], fontsize=7)
    ax.set_ylabel("median ms (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
