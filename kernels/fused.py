"""Autograd glue shared by the fast backends.

Every op is ``token_logprobs`` followed by cheap elementwise math on ``[N]`` vectors, so a fast
backend implements just two row kernels over a 2-D ``[N, V]`` view:

- ``forward(logits, labels, temperature, ignore_index) -> (logp [N] fp32, lse [N] fp32)``: one
  sweep per row with an online log-sum-exp; ignored rows give ``logp = 0``.
- ``backward(logits, labels, lse, grad [N] fp32, temperature, ignore_index, out) -> grad_logits``:
  ``grad * (onehot(label) - softmax(logits / T)) / T`` recomputed from ``lse`` and written once
  into ``out`` (which may alias ``logits``); ignored rows get zeros.
- ``new_grad(logits)``: an uninitialised buffer for that gradient (the backend's cheapest).

Cross-entropy and the PPO loss compose on the returned ``[N]`` log-probs with ordinary autograd;
the only logits-sized tensor ever written is the gradient.
"""
from __future__ import annotations

import torch

from .reference import ppo_clip_terms

#: Upper bound on the bytes of the temporary logits chunk of the fused-linear ops; with it the
#: extra memory of those ops is independent of the vocabulary size.
LINEAR_CHUNK_BYTES = 64 * 1024 * 1024


class TokenLogprobsFn(torch.autograd.Function):
    """``token_logprobs`` over a 2-D view, differentiable with respect to the logits.

    ``owned``: the 2-D logits are a private copy (the caller's tensor was not contiguous), so the
    backward writes the gradient over them instead of allocating a second logits-sized buffer. A
    second backward through such a graph is refused, since the copy no longer holds the logits.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, impl, owned=False):
        logp, lse = impl.forward(logits, labels, temperature, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.ignore_index, ctx.impl, ctx.owned, ctx.consumed = temperature, ignore_index, impl, owned, False
        return logp

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        if ctx.consumed:
            raise RuntimeError("rlhf_kernels: a second backward through token_logprobs of a non-contiguous logits view "
                               "is not supported (its gradient reused the private copy); pass contiguous logits")
        ctx.consumed = ctx.owned
        out = logits if ctx.owned else ctx.impl.new_grad(logits)
        grad_logits = ctx.impl.backward(
            logits, labels, lse, grad.float().contiguous(), ctx.temperature, ctx.ignore_index, out
        )
        return grad_logits, None, None, None, None, None


class CrossEntropyFn(torch.autograd.Function):
    """Mean or summed token cross-entropy whose gradient is written during the forward sweep, for
    backends with ``forward_with_grad``: the upstream gradient of a reduced loss is known up front
    (``-1/n_valid`` per valid token for ``mean``), so each row is read from memory once for both.
    The backward only scales that buffer; a second backward (retained graph) recomputes it."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, mean, impl):
        n_valid = int((labels != ignore_index).sum())
        scale = 1.0 / max(n_valid, 1) if mean else 1.0
        logp, lse, grad = impl.forward_with_grad(logits, labels, ignore_index, -scale)
        ctx.save_for_backward(logits, labels, lse)
        ctx.grad, ctx.scale, ctx.ignore_index, ctx.impl = grad, scale, ignore_index, impl
        return -logp.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            logits, labels, lse = ctx.saved_tensors
            upstream = torch.full(labels.shape, -ctx.scale, dtype=torch.float32, device=logits.device) * grad_out.float()
            grad = ctx.impl.backward(logits, labels, lse, upstream, 1.0, ctx.ignore_index, ctx.impl.new_grad(logits))
        elif float(grad_out) != 1.0:
            grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None


class PPOClipFn(torch.autograd.Function):
    """The PPO clipped loss with its logits gradient written during the forward sweep, for backends
    with ``ppo_forward_with_grad``: a token's derivative ``d loss / d logp`` depends only on its own
    log-prob (through the ratio), which is known as soon as its row's log-sum-exp is. Returns
    ``(loss, logp)``; ``old_logprobs`` and ``advantages`` are constants. A second backward (retained
    graph) recomputes the gradient from the saved per-token derivatives."""

    @staticmethod
    def forward(ctx, logits, labels, old_logprobs, advantages, clip_eps, ignore_index, impl):
        valid = labels != ignore_index
        scale = 1.0 / max(int(valid.sum()), 1)
        logp, lse, grad, coef = impl.ppo_forward_with_grad(logits, labels, ignore_index, old_logprobs, advantages,
                                                           clip_eps, scale)
        loss, _ = ppo_clip_terms(logp, old_logprobs, advantages, valid, clip_eps)
        ctx.save_for_backward(logits, labels, lse, coef)
        ctx.grad, ctx.ignore_index, ctx.impl = grad, ignore_index, impl
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            logits, labels, lse, coef = ctx.saved_tensors
            grad = ctx.impl.backward(logits, labels, lse, coef * grad_loss.float(), 1.0, ctx.ignore_index,
                                     ctx.impl.new_grad(logits))
        elif float(grad_loss) != 1.0:
            grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None, None, None, None


def _chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, LINEAR_CHUNK_BYTES // (4 * max(vocab, 1))))


class LinearTokenLogprobsFn(torch.autograd.Function):
    """``token_logprobs(hidden @ weight.T)`` computed chunk by chunk; logits never exist whole."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, impl):
        n, vocab = hidden.shape[0], weight.shape[0]
        step = _chunk_rows(n, vocab)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        chunk = hidden.new_empty((step, vocab))  # one logits chunk, reused: extra memory is O(step * V)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            logits = torch.mm(hidden[rows], weight.t(), out=chunk[: hidden[rows].shape[0]])
            logp[rows], lse[rows] = impl.forward(logits, labels[rows], temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.ignore_index, ctx.impl, ctx.step = temperature, ignore_index, impl, step
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad = grad.float().contiguous()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        chunk = hidden.new_empty((ctx.step, weight.shape[0]))
        for start in range(0, hidden.shape[0], ctx.step):
            rows = slice(start, start + ctx.step)
            logits = torch.mm(hidden[rows], weight.t(), out=chunk[: hidden[rows].shape[0]])
            # The chunk's logits are dead after this, so the gradient overwrites them in place.
            g = ctx.impl.backward(logits, labels[rows], lse[rows], grad[rows], ctx.temperature, ctx.ignore_index, logits)
            if grad_hidden is not None:
                torch.mm(g, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(g.t().float(), hidden[rows].float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None
