"""Python side of the C++ CPU backend (``rlhf_kernels._cpu``, built by setup.py)."""
from __future__ import annotations

import torch

try:
    from . import _cpu
    _IMPORT_ERROR = ""
except ImportError as exc:  # not built: no compiler at install time, or an unsupported platform
    _cpu = None
    _IMPORT_ERROR = f"the C++ extension rlhf_kernels._cpu is not built ({exc}); reinstall with a C++ compiler present"

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def unavailable_reason() -> str:
    """Empty when the extension is importable, else why not."""
    return _IMPORT_ERROR


def supports(device: torch.device) -> bool:
    """The C++ kernels run CPU tensors only."""
    return device.type == "cpu"


def _dtype_code(t: torch.Tensor) -> int:
    if t.dtype not in _DTYPES:
        raise TypeError(f"cpp backend: unsupported logits dtype {t.dtype}; accepted: float32, bfloat16, float16")
    return _DTYPES[t.dtype]


def forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int):
    """``(logp [N], lse [N])`` in fp32 for a 2-D ``logits`` view with unit column stride."""
    n_rows, n_cols = logits.shape
    labels = labels.to(torch.int64).contiguous()
    logp = torch.empty(n_rows, dtype=torch.float32)
    lse = torch.empty(n_rows, dtype=torch.float32)
    _cpu.logprobs_forward(
        logits.data_ptr(), _dtype_code(logits), n_rows, n_cols, logits.stride(0), labels.data_ptr(),
        logp.data_ptr(), lse.data_ptr(), 1.0 / temperature, ignore_index, torch.get_num_threads(),
    )
    return logp, lse


def backward(logits, labels, lse, grad, temperature: float, ignore_index: int, out: torch.Tensor):
    """Write ``grad * (onehot - softmax(logits/T)) / T`` into ``out`` (may alias ``logits``)."""
    n_rows, n_cols = logits.shape
    labels = labels.to(torch.int64).contiguous()
    if out.dtype != logits.dtype or out.stride(1) != 1:
        raise ValueError("cpp backend: out must match the logits dtype and have unit column stride")
    _cpu.logprobs_backward(
        logits.data_ptr(), _dtype_code(logits), n_rows, n_cols, logits.stride(0), labels.data_ptr(),
        lse.data_ptr(), grad.data_ptr(), out.data_ptr(), out.stride(0), 1.0 / temperature, ignore_index,
        torch.get_num_threads(),
    )
    return out
