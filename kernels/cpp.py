"""Python side of the C++ CPU backend (``rlhf_kernels._cpu``, built by setup.py)."""
from __future__ import annotations

import mmap
import os
import sys
import threading

import torch

try:
    from . import _cpu
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built: no compiler at install time, or an unsupported platform
    _cpu = None
    _IMPORT_ERROR = f"the C++ extension rlhf_kernels._cpu is not built ({exc}); reinstall with a C++ compiler present"

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
LEVELS = {0: "scalar", 1: "avx2", 2: "avx512"}
#: Cap on the instruction set (-1 = the CPU's best); tests lower it to check every code path.
level_cap = -1
#: Gradients at least this large get a transparent-huge-page buffer (see :func:`new_grad`).
HUGEPAGE_MIN_BYTES = 8 * 1024 * 1024
#: Keep the last such buffer for reuse once nothing references it (``RLHF_CPP_GRAD_CACHE=0`` disables).
CACHE_GRAD_BUFFER = os.environ.get("RLHF_CPP_GRAD_CACHE", "1") != "0"
_cache_lock = threading.Lock()
_cached_buffer: mmap.mmap | None = None


def unavailable_reason() -> str:
    """Empty when the extension is importable, else why not."""
    return _IMPORT_ERROR


def supports(device: torch.device) -> bool:
    """The C++ kernels run CPU tensors only."""
    return device.type == "cpu"


def cpu_level() -> str:
    """The instruction set the kernels use on this CPU: ``avx512``, ``avx2`` or ``scalar``."""
    return LEVELS[_cpu.cpu_level()]


def new_grad(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient buffer shaped like ``logits``.

    Large buffers come from an anonymous mapping advised for transparent huge pages: the OS faults
    in 2 MiB pages instead of 4 KiB ones, which halves the cost of a fresh logits-sized buffer (the
    dominant cost of a CPU backward). The last such mapping is kept and handed out again once no
    tensor references it any more (every tensor made from it holds a reference to the mapping), so
    a training loop stops paying for page faults; at most one buffer is kept.
    """
    global _cached_buffer
    nbytes = logits.numel() * logits.element_size()
    if nbytes < HUGEPAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    with _cache_lock:
        buf = _cached_buffer
        # References when idle: the module global, this local and getrefcount's argument.
        if not (CACHE_GRAD_BUFFER and buf is not None and len(buf) >= nbytes and sys.getrefcount(buf) == 3):
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                buf.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP disabled: ordinary pages, still correct
                pass
            _cached_buffer = buf if CACHE_GRAD_BUFFER else None
        return torch.frombuffer(buf, dtype=logits.dtype, count=logits.numel()).view(logits.shape)


def _dtype_code(t: torch.Tensor) -> int:
    if t.dtype not in _DTYPES:
        raise TypeError(f"cpp backend: unsupported logits dtype {t.dtype}; accepted: float32, bfloat16, float16")
    return _DTYPES[t.dtype]


def forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int):
    """``(logp [N], lse [N])`` in fp32 for a 2-D ``logits`` view with unit column stride."""
    logp, lse, _, _ = _forward(logits, labels, temperature, ignore_index)
    return logp, lse


def forward_with_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, coef: float):
    """``(logp, lse, grad)`` where ``grad`` is the gradient of ``coef * sum(logp)`` w.r.t. the logits,
    written in the same sweep as the forward (each row is still in cache)."""
    logp, lse, grad, _ = _forward(logits, labels, 1.0, ignore_index, new_grad(logits), coef)
    return logp, lse, grad


def ppo_forward_with_grad(logits, labels, ignore_index: int, old_logprobs, advantages, clip_eps: float, scale: float):
    """``(logp, lse, grad, coef)`` for the PPO clipped loss: ``coef [N]`` is d loss / d logp (the
    clipped-surrogate derivative times ``scale``) and ``grad`` the logits gradient, in one sweep."""
    coef = torch.empty(logits.shape[0], dtype=torch.float32)
    old = old_logprobs.float().contiguous()
    adv = advantages.float().contiguous()
    return _forward(logits, labels, 1.0, ignore_index, new_grad(logits), scale, old, adv, clip_eps, coef)


def _forward(logits, labels, temperature, ignore_index, out=None, coef=0.0, old=None, adv=None, clip_eps=0.0,
             coef_out=None):
    n_rows, n_cols = logits.shape
    labels = labels.to(torch.int64).contiguous()
    logp = torch.empty(n_rows, dtype=torch.float32)
    lse = torch.empty(n_rows, dtype=torch.float32)
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    _cpu.logprobs_forward(
        logits.data_ptr(), _dtype_code(logits), n_rows, n_cols, logits.stride(0), labels.data_ptr(),
        logp.data_ptr(), lse.data_ptr(), 1.0 / temperature, ignore_index, torch.get_num_threads(), level_cap,
        ptr(out), out.stride(0) if out is not None else 0, coef, ptr(old), ptr(adv), clip_eps, ptr(coef_out),
    )
    return logp, lse, out, coef_out


def backward(logits, labels, lse, grad, temperature: float, ignore_index: int, out: torch.Tensor):
    """Write ``grad * (onehot - softmax(logits/T)) / T`` into ``out`` (may alias ``logits``)."""
    n_rows, n_cols = logits.shape
    labels = labels.to(torch.int64).contiguous()
    if out.dtype != logits.dtype or out.stride(1) != 1:
        raise ValueError("cpp backend: out must match the logits dtype and have unit column stride")
    _cpu.logprobs_backward(
        logits.data_ptr(), _dtype_code(logits), n_rows, n_cols, logits.stride(0), labels.data_ptr(),
        lse.data_ptr(), grad.data_ptr(), out.data_ptr(), out.stride(0), 1.0 / temperature, ignore_index,
        torch.get_num_threads(), level_cap,
    )
    return out


def entropy_forward(logits: torch.Tensor, temperature: float):
    """``(entropy [N], lse [N])`` in fp32 of ``softmax(logits / T)`` for a 2-D view with unit column stride."""
    n_rows, n_cols = logits.shape
    h = torch.empty(n_rows, dtype=torch.float32)
    lse = torch.empty(n_rows, dtype=torch.float32)
    _cpu.entropy_forward(logits.data_ptr(), _dtype_code(logits), n_rows, n_cols, logits.stride(0), h.data_ptr(),
                         lse.data_ptr(), 1.0 / temperature, torch.get_num_threads(), level_cap)
    return h, lse


def entropy_backward(logits, lse, entropy, grad, temperature: float, out: torch.Tensor):
    """Write ``grad * dH/dlogits = -grad * p (z - lse + H) / T`` into ``out`` (may alias ``logits``)."""
    n_rows, n_cols = logits.shape
    if out.dtype != logits.dtype or out.stride(1) != 1:
        raise ValueError("cpp backend: out must match the logits dtype and have unit column stride")
    grad = grad.float().contiguous()
    _cpu.entropy_backward(logits.data_ptr(), _dtype_code(logits), n_rows, n_cols, logits.stride(0), lse.data_ptr(),
                          entropy.data_ptr(), grad.data_ptr(), out.data_ptr(), out.stride(0), 1.0 / temperature,
                          torch.get_num_threads())
    return out
