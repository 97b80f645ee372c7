"""Triton row kernels for ``rlhf_kernels.fused``: online log-sum-exp forward, one-write backward.

One program per row; offsets are int64 (``row * stride`` overflows int32 at 8 x 4k x 150k);
accumulation is fp32 whatever the input dtype. On CPU these run only under ``TRITON_INTERPRET=1``
(set before triton is imported), which is how CI tests them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, grad_ptr, old_ptr, adv_ptr, coef_out_ptr, n_cols, stride_row,
    grad_stride_row, inv_temp, ignore_index, coef, clip_eps,
    BLOCK: tl.constexpr, WITH_GRAD: tl.constexpr, PPO: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    active = label != ignore_index
    lse = 0.0
    logp = 0.0
    if active:
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32) * inv_temp
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # While every logit so far is -inf, shift by 0 instead: exp(-inf - -inf) would be NaN.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        logp = tl.load(row_ptr + label).to(tl.float32) * inv_temp - lse
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if WITH_GRAD:
        # Gradient of c * logp, written while the row is hot in cache (loss and gradient in one kernel):
        # c = coef, or for PPO the clipped surrogate's derivative -A r (0 where the clip is active).
        c = coef
        if PPO:
            ratio = tl.exp(logp - tl.load(old_ptr + row))
            adv = tl.load(adv_ptr + row)
            unclipped = -adv * ratio
            clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_eps), 1.0 + clip_eps)
            c = tl.where(active & (unclipped >= clipped), unclipped * coef, 0.0)
            tl.store(coef_out_ptr + row, c)
        _write_grad_row(row_ptr, grad_ptr + row * grad_stride_row, n_cols, label, active, lse, c * inv_temp,
                        inv_temp, BLOCK)


@triton.jit
def _write_grad_row(row_ptr, out_row, n_cols, label, active, lse, g, inv_temp, BLOCK: tl.constexpr):
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        prob = tl.exp(x - lse)
        onehot = tl.where(cols == label, 1.0, 0.0)
        # Ignored rows have no lse (stored 0): exp(x - 0) may overflow, so select, never multiply.
        grad = tl.where(active, g * (onehot - prob), 0.0)
        tl.store(out_row + cols, grad.to(out_row.dtype.element_ty), mask=mask)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, grad_ptr, out_ptr, n_cols, stride_row, out_stride_row, inv_temp,
    ignore_index, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    g = tl.load(grad_ptr + row) * inv_temp
    _write_grad_row(logits_ptr + row * stride_row, out_ptr + row * out_stride_row, n_cols, label,
                    label != ignore_index, tl.load(lse_ptr + row), g, inv_temp, BLOCK)


def unavailable_reason() -> str:
    """Empty when Triton can launch kernels here, else why not."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return ""
    return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"


def supports(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors in the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


#: Column block per loop iteration: the interpreter pays per iteration, the GPU per register.
BLOCK_CAP = {"cpu": 65536, "cuda": 4096}


def _block(n_cols: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(n_cols), BLOCK_CAP[device.type])


def new_grad(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient buffer (the CUDA caching allocator makes this cheap)."""
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int):
    """``(logp [N], lse [N])`` in fp32 for a 2-D ``logits`` view with unit column stride."""
    logp, lse, _, _ = _forward(logits, labels, temperature, ignore_index)
    return logp, lse


def forward_with_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, coef: float):
    """``(logp, lse, grad)``: ``grad`` is the gradient of ``coef * sum(logp)``, from the same kernel."""
    return _forward(logits, labels, 1.0, ignore_index, new_grad(logits), coef)[:3]


def ppo_forward_with_grad(logits, labels, ignore_index: int, old_logprobs, advantages, clip_eps: float, scale: float):
    """``(logp, lse, grad, coef)`` for the PPO clipped loss (see ``rlhf_kernels.fused.PPOClipFn``)."""
    coef = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    return _forward(logits, labels, 1.0, ignore_index, new_grad(logits), scale, old_logprobs.float().contiguous(),
                    advantages.float().contiguous(), clip_eps, coef)


def _forward(logits, labels, temperature, ignore_index, grad=None, coef=0.0, old=None, adv=None, clip_eps=0.0,
             coef_out=None):
    n_rows, n_cols = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = _block(n_cols, logits.device)
    ppo = old is not None
    _logprobs_fwd_kernel[(n_rows,)](
        logits, labels, logp, lse, grad if grad is not None else logp, old if ppo else logp, adv if ppo else logp,
        coef_out if ppo else logp, n_cols, logits.stride(0), grad.stride(0) if grad is not None else 0,
        1.0 / temperature, ignore_index, coef, clip_eps,
        BLOCK=block, WITH_GRAD=grad is not None, PPO=ppo, num_warps=8 if block >= 2048 else 4,
    )
    return logp, lse, grad, coef_out


def backward(logits, labels, lse, grad, temperature: float, ignore_index: int, out: torch.Tensor):
    """Write ``grad * (onehot - softmax(logits/T)) / T`` into ``out`` (may alias ``logits``)."""
    n_rows, n_cols = logits.shape
    block = _block(n_cols, logits.device)
    _logprobs_bwd_kernel[(n_rows,)](
        logits, labels, lse, grad, out, n_cols, logits.stride(0), out.stride(0), 1.0 / temperature, ignore_index,
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return out


@triton.jit
def _entropy_fwd_kernel(logits_ptr, h_ptr, lse_ptr, n_cols, stride_row, inv_temp, BLOCK: tl.constexpr):
    # One sweep with an online max m, sum s = sum exp(z - m) and d = sum exp(z - m) (z - m), both
    # rescaled when m grows: H = log s - d / s, relative to the max, so a near-certain row (H ~ 0,
    # large logits) does not lose H to cancellation.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    running_max = -float("inf")
    running_sum = 0.0
    running_dot = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32) * inv_temp
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        scale = tl.exp(running_max - shift)
        e = tl.exp(x - shift)
        # old terms: exp(z - m_old)(z - m_old) -> exp(z - m_new)(z - m_new) = scale * (term - (m_new - m_old) * exp)
        moved = tl.where(running_sum > 0, (running_dot - (shift - running_max) * running_sum) * scale, 0.0)
        running_dot = moved + tl.sum(tl.where(e > 0, e * (x - shift), 0.0), axis=0)
        running_sum = running_sum * scale + tl.sum(e, axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + row, lse)
    tl.store(h_ptr + row, tl.log(running_sum) - running_dot / running_sum)


@triton.jit
def _entropy_bwd_kernel(logits_ptr, lse_ptr, h_ptr, grad_ptr, out_ptr, n_cols, stride_row, out_stride_row, inv_temp,
                        BLOCK: tl.constexpr):
    # d H / d x_j = -p_j (z_j - lse + H) / T, times the row's upstream gradient.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row = out_ptr + row * out_stride_row
    lse = tl.load(lse_ptr + row)
    ent = tl.load(h_ptr + row)
    g = -tl.load(grad_ptr + row) * inv_temp
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < n_cols
        zl = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse  # log p, formed first
        p = tl.exp(zl)
        grad = tl.where(p > 0, g * p * (zl + ent), 0.0)
        tl.store(out_row + cols, grad.to(out_row.dtype.element_ty), mask=mask)


def entropy_forward(logits: torch.Tensor, temperature: float):
    """``(entropy [N], lse [N])`` in fp32 of ``softmax(logits / T)`` for a 2-D view with unit column stride."""
    n_rows, n_cols = logits.shape
    h = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = _block(n_cols, logits.device)
    _entropy_fwd_kernel[(n_rows,)](logits, h, lse, n_cols, logits.stride(0), 1.0 / temperature, BLOCK=block,
                                   num_warps=8 if block >= 2048 else 4)
    return h, lse


def entropy_backward(logits, lse, entropy, grad, temperature: float, out: torch.Tensor):
    """Write ``grad * dH/dlogits`` into ``out`` (may alias ``logits``)."""
    n_rows, n_cols = logits.shape
    block = _block(n_cols, logits.device)
    _entropy_bwd_kernel[(n_rows,)](logits, lse, entropy, grad.float().contiguous(), out, n_cols, logits.stride(0),
                                   out.stride(0), 1.0 / temperature, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out
