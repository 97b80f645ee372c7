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

from .reference import ppo_clip_terms, token_logprobs

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


#: Fewest rows per chunk of the gradient-in-forward losses: each chunk adds ``g.T @ hidden`` into the
#: ``[V, H]`` weight gradient, a pass over that whole buffer, so chunks must be tall enough for the
#: matrix product to dominate (measured on CPU at V=128256, H=1024: 130-row chunks 1.05x slower than
#: the unfused op, 512-row chunks 1.02-1.07x faster).
LINEAR_GRAD_MIN_ROWS = 512


def _chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, LINEAR_CHUNK_BYTES // (4 * max(vocab, 1))))


def _grad_chunk_rows(n_rows: int, vocab: int) -> int:
    return min(n_rows, max(_chunk_rows(n_rows, vocab), LINEAR_GRAD_MIN_ROWS))


class LinearTokenLogprobsFn(torch.autograd.Function):
    """``token_logprobs(hidden @ weight.T)`` computed chunk by chunk; logits never exist whole."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, impl):
        n, vocab = hidden.shape[0], weight.shape[0]
        step = _chunk_rows(n, vocab)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for rows, logits in logit_chunks(hidden, weight, step):
            logp[rows], lse[rows] = impl.forward(logits, labels[rows], temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.ignore_index, ctx.impl, ctx.step = temperature, ignore_index, impl, step
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad = grad.float().contiguous()
        # The chunk's logits are dead after this, so the gradient overwrites them in place.
        grad_hidden, grad_weight = linear_backward(
            hidden, weight, ctx.step, ctx.needs_input_grad[:2],
            lambda logits, rows: ctx.impl.backward(logits, labels[rows], lse[rows], grad[rows], ctx.temperature,
                                                   ctx.ignore_index, logits))
        return grad_hidden, grad_weight, None, None, None, None


def scores_pass(hidden, weight, labels, temperature: float, ignore_index: int, impl, ent_impl):
    """``(logp, lse, entropy)`` ``[N]`` of ``hidden @ weight.T`` from one pass over each logits chunk:
    the log-prob of each row's label and its log-sum-exp (``impl.forward``; with ``impl`` None the
    reference log-probs and no ``lse``), and the entropy (``ent_impl.entropy_forward``, else
    :func:`entropy_rows`). No autograd."""
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device) if impl is not None else None
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for rows, logits in logit_chunks(hidden, weight, _chunk_rows(n, weight.shape[0])):
        if impl is None:
            logp[rows] = token_logprobs(logits, labels[rows], temperature=temperature, ignore_index=ignore_index)
        else:
            logp[rows], lse[rows] = impl.forward(logits, labels[rows], temperature, ignore_index)
        entropy[rows] = ent_impl.entropy_forward(logits, temperature)[0] if ent_impl else entropy_rows(logits, temperature)
    return logp, lse, entropy


class LinearScoresFn(torch.autograd.Function):
    """:class:`LinearTokenLogprobsFn` whose forward also returns each row's entropy, from the same
    pass over the logits chunks (one matrix product for both). The entropy is not differentiable:
    it is what an on-policy PPO update logs while its log-probs carry the gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, impl, ent_impl):
        logp, lse, entropy = scores_pass(hidden, weight, labels, temperature, ignore_index, impl, ent_impl)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.ignore_index, ctx.impl = temperature, ignore_index, impl
        ctx.step = _chunk_rows(hidden.shape[0], weight.shape[0])
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad, grad_entropy):
        return *LinearTokenLogprobsFn.backward(ctx, grad), None


def logit_chunks(hidden, weight, step: int):
    """``(rows, logits)`` for each chunk of ``step`` rows of ``hidden @ weight.T``, computed into
    one reused buffer: the extra memory is O(step * V), never the whole ``[N, V]``."""
    chunk = hidden.new_empty((step, weight.shape[0]))
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        yield rows, torch.mm(hidden[rows], weight.t(), out=chunk[: hidden[rows].shape[0]])


def linear_grads(hidden, weight, needs: tuple[bool, ...], chunk_grads) -> tuple:
    """``(grad_hidden, grad_weight)`` of a chunked ``f(hidden @ weight.T)`` from the
    ``(rows, d loss / d logits)`` pairs of ``chunk_grads`` (all consumed, needed or not):
    ``grad_hidden`` rows, and ``grad_weight`` summed in fp32 and cast to the weight's dtype."""
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
    for rows, g in chunk_grads:
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(g.t().float(), hidden[rows].float())
    return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None


def linear_backward(hidden, weight, step: int, needs: tuple[bool, ...], chunk_grad) -> tuple:
    """The backward of a chunked ``f(hidden @ weight.T)``: each chunk's logits are recomputed and
    turned into ``d loss / d logits`` by ``chunk_grad(logits, rows)`` (which may overwrite them)."""
    return linear_grads(hidden, weight, needs,
                        ((rows, chunk_grad(logits, rows)) for rows, logits in logit_chunks(hidden, weight, step)))


class LinearLossFn(torch.autograd.Function):
    """Cross-entropy (``mean``/``sum``) or the PPO clipped loss of ``hidden @ weight.T`` with both
    input gradients computed inside the forward chunk loop: the loss's gradient with respect to each
    row's logits is known as soon as the row's log-sum-exp is (``-1/n`` or ``-1`` per valid token for
    cross-entropy; the clipped-surrogate derivative of the row's own log-prob for PPO), so each
    logits chunk is computed once and turned into ``grad_hidden`` rows and a ``grad_weight`` update
    while it is in cache. Three matrix products in all (the unfused op and the recompute-in-backward
    variant need three and four), and extra memory of one chunk. Returns ``(loss, logp)``; the
    backward only scales the stored gradients (a second backward is refused)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, impl, ppo, old, adv, clip_eps, mean):
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Tall chunks only pay off for the weight gradient (a frozen head, as with LoRA, has none).
        step = _grad_chunk_rows(n, vocab) if need_w else _chunk_rows(n, vocab)
        valid = labels != ignore_index
        scale = 1.0 / max(int(valid.sum()), 1) if (ppo or mean) else 1.0
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)

        def chunk_grads():  # each chunk's log-probs, and the loss's gradient with respect to its logits
            for rows, logits in logit_chunks(hidden, weight, step):
                if ppo:
                    logp[rows], _, g, _ = impl.ppo_forward_with_grad(logits, labels[rows], ignore_index, old[rows],
                                                                     adv[rows], clip_eps, scale)
                else:
                    logp[rows], _, g = impl.forward_with_grad(logits, labels[rows], ignore_index, -scale)
                yield rows, g

        ctx.grads = linear_grads(hidden, weight, (need_h, need_w), chunk_grads())
        if ppo:
            loss, _ = ppo_clip_terms(logp, old, adv, valid, clip_eps)
        else:
            loss = -logp.sum() * scale
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        if ctx.grads is None:
            raise RuntimeError("rlhf_kernels: a second backward through a fused-linear loss is not supported (its "
                               "gradients were computed in the forward); use backend='reference' to retain the graph")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if float(grad_loss) != 1.0:
            grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
            grad_w = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def entropy_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of ``softmax(logits / T)`` per row of a 2-D block, fp32 (shared by both entropy ops)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _entropy_grad_rows(logits: torch.Tensor, temperature: float, grad: torch.Tensor) -> torch.Tensor:
    """``d H / d logits`` times ``grad`` per row: ``-p (log p + H) / T``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1, keepdim=True)
    return (-p * (logp + entropy) * (grad.unsqueeze(-1) / temperature)).to(logits.dtype)


class TokenEntropyFn(torch.autograd.Function):
    """Entropy of each row's next-token distribution over a 2-D ``[N, V]`` view. With a fast
    backend (``impl.entropy_forward``: one sweep with an online max / sum / weighted sum) the
    backward writes ``-g p (z - lse + H) / T`` once; without one (``impl`` None), row chunks of
    PyTorch so the fp32 temporaries are one chunk, not a logits-sized copy."""

    @staticmethod
    def forward(ctx, logits, temperature, impl):
        ctx.temperature, ctx.impl = temperature, impl
        if impl is not None:
            out, lse = impl.entropy_forward(logits, temperature)
            ctx.save_for_backward(logits, lse, out)
            return out
        step = _chunk_rows(*logits.shape)
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], step):
            out[start:start + step] = entropy_rows(logits[start:start + step], temperature)
        ctx.save_for_backward(logits)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.impl is not None:
            logits, lse, h = ctx.saved_tensors
            return ctx.impl.entropy_backward(logits, lse, h, grad, ctx.temperature, ctx.impl.new_grad(logits)), None, None
        (logits,) = ctx.saved_tensors
        out = torch.empty_like(logits)
        step = _chunk_rows(*logits.shape)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            out[rows] = _entropy_grad_rows(logits[rows], ctx.temperature, grad[rows].float())
        return out, None, None


class LinearTokenEntropyFn(torch.autograd.Function):
    """Entropy of ``softmax(hidden @ weight.T / T)`` per row, chunk by chunk: the ``[N, V]`` logits
    never exist. The backward recomputes each chunk's logits; a fast backend (``impl``) computes
    the entropy and its gradient of each chunk in place, else PyTorch does."""

    @staticmethod
    def forward(ctx, hidden, weight, temperature, impl):
        n, vocab = hidden.shape[0], weight.shape[0]
        step = _chunk_rows(n, vocab)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for rows, logits in logit_chunks(hidden, weight, step):
            if impl is not None:
                out[rows], lse[rows] = impl.entropy_forward(logits, temperature)
            else:
                out[rows] = entropy_rows(logits, temperature)
        ctx.save_for_backward(hidden, weight, lse, out)
        ctx.temperature, ctx.step, ctx.impl = temperature, step, impl
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, lse, entropy = ctx.saved_tensors
        grad = grad.float().contiguous()

        def chunk_grad(logits, rows):
            if ctx.impl is not None:  # the chunk's logits are dead after this: the gradient overwrites them
                return ctx.impl.entropy_backward(logits, lse[rows], entropy[rows], grad[rows], ctx.temperature, logits)
            return _entropy_grad_rows(logits, ctx.temperature, grad[rows])

        grad_hidden, grad_weight = linear_backward(hidden, weight, ctx.step, ctx.needs_input_grad[:2], chunk_grad)
        return grad_hidden, grad_weight, None, None
