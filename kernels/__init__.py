"""Fused log-prob, cross-entropy and PPO-loss kernels with backend dispatch.

Public ops (all take logits ``[..., V]`` in fp32/bf16/fp16 and integer labels ``[...]``; positions
whose label is ``ignore_index`` contribute nothing; outputs are fp32; differentiable w.r.t. logits):

- :func:`token_logprobs`, :func:`cross_entropy`, :func:`ppo_clip_loss`
- :func:`linear_token_logprobs`, :func:`linear_cross_entropy`, :func:`linear_ppo_clip_loss`
  (``hidden [N, H]``, ``weight [V, H]``; the ``[N, V]`` logits are never materialised; the two
  losses compute their gradients inside the forward chunk loop on the fast backends)
- :func:`token_entropy`, :func:`linear_token_entropy`: entropy of the next-token distribution
  (one sweep per row on the fast backends; row chunks of PyTorch on the reference)

``backend``: ``"reference"`` | ``"triton"`` | ``"cpp"`` | ``None``. ``None`` reads the environment
variable ``RLHF_KERNEL_BACKEND`` and otherwise picks automatically: ``triton`` for CUDA tensors,
``cpp`` for CPU tensors when the C++ extension is built, else ``reference``.
"""
from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

from . import reference
from .fused import (
    CrossEntropyFn, LinearLossFn, LinearScoresFn, LinearTokenEntropyFn, LinearTokenLogprobsFn, PPOClipFn, TokenEntropyFn,
    TokenLogprobsFn, scores_pass,
)
from .reference import ppo_clip_terms, reduce_tokens

BACKENDS = ("reference", "triton", "cpp")
#: Logit dtypes the fast backends read; others (e.g. float64) go to the reference.
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV_BACKEND = "RLHF_KERNEL_BACKEND"

__all__ = [
    "BACKENDS", "available_backends", "resolve_backend", "token_logprobs", "cross_entropy",
    "ppo_clip_loss", "linear_token_logprobs", "linear_cross_entropy", "linear_ppo_clip_loss",
    "token_entropy", "linear_token_entropy",
    "ppo_clip_terms", "reduce_tokens", "reference",
]


@functools.lru_cache(maxsize=None)
def _load_impl(name: str) -> tuple[ModuleType | None, str]:
    """Import a fast backend once; returns (module, "") or (None, why it is unavailable)."""
    try:
        if name == "triton":
            from .triton import ops as impl
        else:
            from . import cpp as impl
    except Exception as exc:  # an ImportError, or a broken triton install
        return None, f"{type(exc).__name__}: {exc}"
    why = impl.unavailable_reason()
    return (None, why) if why else (impl, "")


def available_backends(device: str | torch.device = "cpu") -> dict[str, str]:
    """Map each backend name to ``""`` when usable on ``device``, else to the reason it is not."""
    device = torch.device(device)
    status = {"reference": ""}
    for name in ("triton", "cpp"):
        impl, why = _load_impl(name)
        if impl is not None and not impl.supports(device):
            why = f"{name} does not run on {device.type} tensors"
        status[name] = why
    return status


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str | None, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> tuple[str, ModuleType | None]:
    """Pick the backend for ``dtype`` tensors on ``device``; an unavailable explicit choice is an
    error. ``auto`` falling back to the reference says why, once per process (dtypes the fast
    backends do not read, such as float64, go to the reference silently)."""
    choice = backend if backend is not None else os.environ.get(ENV_BACKEND) or "auto"
    if choice != "reference" and dtype not in FAST_DTYPES:
        if choice == "auto":
            return "reference", None
        raise TypeError(f"kernel backend {choice!r} reads float32, bfloat16 and float16 logits, got {dtype}; "
                        "use backend 'reference' or 'auto'")
    if choice == "auto":
        wanted = ("triton", "cpp") if device.type == "cuda" else ("cpp",)
        reasons = []
        for name in wanted:
            impl, why = _load_impl(name)
            if impl is not None and impl.supports(device):
                return name, impl
            reasons.append(f"{name}: {why or 'does not run on ' + device.type}")
        _warn_once(device.type, f"rlhf_kernels: no fast backend for {device.type} tensors ({'; '.join(reasons)}); "
                                "using the PyTorch reference")
        return "reference", None
    if choice == "reference":
        return "reference", None
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; accepted: auto, {', '.join(BACKENDS)}")
    impl, why = _load_impl(choice)
    if impl is None:
        raise RuntimeError(f"kernel backend {choice!r} is unavailable: {why}")
    if not impl.supports(device):
        raise RuntimeError(f"kernel backend {choice!r} does not run on {device.type} tensors; use 'auto' or 'reference'")
    return choice, impl


def _check(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, op: str) -> None:
    """Reject input that a kernel would otherwise read out of bounds with."""
    if not torch.is_floating_point(logits):
        raise TypeError(f"{op}: logits must be floating point, got {logits.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"{op}: labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if logits.numel() == 0:
        raise ValueError(f"{op}: empty input (logits shape {tuple(logits.shape)})")
    vocab = logits.shape[-1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise IndexError(f"{op}: label {value} out of range for vocab size {vocab} (ignore_index={ignore_index})")


def _check_same_rows(name: str, t: torch.Tensor, labels: torch.Tensor, op: str) -> None:
    if t.shape != labels.shape:
        raise ValueError(f"{op}: {name} shape {tuple(t.shape)} must equal labels shape {tuple(labels.shape)}")


def _prepare(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, backend: str | None,
             op: str) -> ModuleType | None:
    """Validate once per public call and pick the backend (None = reference)."""
    _check(logits, labels, ignore_index, op)
    return resolve_backend(backend, logits.device, logits.dtype)[1]


def _token_logprobs(logits, labels, temperature: float, ignore_index: int, impl: ModuleType | None) -> torch.Tensor:
    """``token_logprobs`` on input already checked by :func:`_prepare`."""
    if impl is None:
        return reference.token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    flat, owned = _rows(logits)
    out = TokenLogprobsFn.apply(flat, labels.reshape(-1).contiguous(), float(temperature), ignore_index, impl, owned)
    return out.view(labels.shape)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token ``log softmax(logits / temperature)[label]``, fp32, 0 at ignored positions. Shape ``labels.shape``."""
    impl = _prepare(logits, labels, ignore_index, backend, "token_logprobs")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    return _token_logprobs(logits, labels, temperature, ignore_index, impl)


def _rows(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A ``[N, V]`` view with unit column stride, and whether it is a private copy (when the input
    cannot be viewed that way, e.g. ``logits[:, :-1]`` of a ``[B, T, V]`` tensor)."""
    flat = logits.reshape(-1, logits.shape[-1])
    is_view = flat.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    if is_view and flat.stride(-1) == 1:
        return flat, False
    return flat.contiguous(), True


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Token cross-entropy; ``mean`` over non-ignored tokens (0 if there are none), ``sum`` or ``none``."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: unknown reduction {reduction!r}; accepted: mean, sum, none")
    impl = _prepare(logits, labels, ignore_index, backend, "cross_entropy")
    if (reduction != "none" and logits.requires_grad and torch.is_grad_enabled()
            and hasattr(impl, "forward_with_grad")):
        flat, _ = _rows(logits)
        return CrossEntropyFn.apply(flat, labels.reshape(-1).contiguous(), ignore_index, reduction == "mean", impl)
    nll = -_token_logprobs(logits, labels, 1.0, ignore_index, impl)
    return reduce_tokens(nll, (labels != ignore_index).float(), reduction)


def ppo_clip_loss(
    logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
    clip_eps: float = 0.2, ignore_index: int = -100, return_stats: bool = False, backend: str | None = None,
):
    """Mean over valid tokens of ``max(-A*r, -A*clip(r, 1-eps, 1+eps))``, ``r = exp(logp - old_logp)``.

    ``old_logprobs`` and ``advantages`` have the shape of ``labels``. With ``return_stats=True``
    returns ``(loss, stats)`` where stats holds ``clip_frac``, ``ratio_mean``, ``ratio_max`` and
    ``approx_kl``, computed from the same per-token log-probs (no second pass over the logits).
    """
    _check_same_rows("old_logprobs", old_logprobs, labels, "ppo_clip_loss")
    _check_same_rows("advantages", advantages, labels, "ppo_clip_loss")
    impl = _prepare(logits, labels, ignore_index, backend, "ppo_clip_loss")
    if logits.requires_grad and torch.is_grad_enabled() and hasattr(impl, "ppo_forward_with_grad"):
        flat, _ = _rows(logits)
        loss, logp = PPOClipFn.apply(
            flat, labels.reshape(-1).contiguous(), old_logprobs.reshape(-1), advantages.reshape(-1),
            float(clip_eps), ignore_index, impl,
        )
        if not return_stats:
            return loss
        return loss, ppo_clip_terms(logp.view(labels.shape), old_logprobs, advantages, labels != ignore_index, clip_eps)[1]
    logp = _token_logprobs(logits, labels, 1.0, ignore_index, impl)
    loss, stats = ppo_clip_terms(logp, old_logprobs, advantages, labels != ignore_index, clip_eps)
    return (loss, stats) if return_stats else loss


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
    ignore_index: int = -100, backend: str | None = None, with_entropy: bool = False, entropy_grad: bool = True,
):
    """``token_logprobs(hidden @ weight.T, labels)`` without materialising the ``[N, V]`` logits.
    With ``with_entropy``, ``(logprobs, entropy)``: outside autograd both come from one pass over
    each logits chunk (one matrix product instead of two); with gradients they are two ops, or,
    with ``entropy_grad=False`` (the entropy only logged), one pass whose entropy is detached."""
    op = "linear_token_logprobs"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    # Validate labels against [N, V] without building it: an expanded view costs nothing.
    impl = _prepare(weight[:, 0].unsqueeze(0).expand(hidden.shape[0], -1), labels, ignore_index, backend, op)
    if with_entropy:
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            if not entropy_grad and impl is not None:
                return LinearScoresFn.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(),
                                            float(temperature), ignore_index, impl, _entropy_impl(impl))
            return (linear_token_logprobs(hidden, weight, labels, temperature=temperature, ignore_index=ignore_index,
                                          backend=backend),
                    linear_token_entropy(hidden, weight, temperature=temperature, backend=backend))
        return _linear_scores(hidden, weight, labels, float(temperature), ignore_index, impl)
    if impl is None:
        return reference.linear_token_logprobs(hidden, weight, labels, temperature=temperature, ignore_index=ignore_index)
    return LinearTokenLogprobsFn.apply(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(), float(temperature), ignore_index, impl
    )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
    reduction: str = "mean", backend: str | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, labels)`` without materialising the logits."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: unknown reduction {reduction!r}; accepted: mean, sum, none")
    impl = _linear_prepare(hidden, weight, labels, ignore_index, backend, "linear_cross_entropy")
    if reduction != "none" and _grad_in_forward(impl, hidden, weight):
        loss, _ = LinearLossFn.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(), ignore_index, impl,
                                     False, None, None, 0.0, reduction == "mean")
        return loss
    nll = -linear_token_logprobs(hidden, weight, labels, ignore_index=ignore_index, backend=backend)
    return reduce_tokens(nll, (labels != ignore_index).float(), reduction)


def _linear_prepare(hidden, weight, labels, ignore_index: int, backend: str | None, op: str) -> ModuleType | None:
    """Check ``hidden [N, H]``, ``weight [V, H]`` and the labels against ``[N, V]`` without building it."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    return _prepare(weight[:, 0].unsqueeze(0).expand(hidden.shape[0], -1), labels, ignore_index, backend, op)


def _grad_in_forward(impl, hidden, weight) -> bool:
    """Whether a fused-linear loss can compute its input gradients in the forward chunk loop."""
    return (impl is not None and hasattr(impl, "forward_with_grad") and torch.is_grad_enabled()
            and (hidden.requires_grad or weight.requires_grad))


def linear_ppo_clip_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
    advantages: torch.Tensor, *, clip_eps: float = 0.2, ignore_index: int = -100, return_stats: bool = False,
    backend: str | None = None,
):
    """``ppo_clip_loss(hidden @ weight.T, ...)`` without materialising the logits."""
    _check_same_rows("old_logprobs", old_logprobs, labels, "linear_ppo_clip_loss")
    _check_same_rows("advantages", advantages, labels, "linear_ppo_clip_loss")
    impl = _linear_prepare(hidden, weight, labels, ignore_index, backend, "linear_ppo_clip_loss")
    if _grad_in_forward(impl, hidden, weight):
        old, adv = old_logprobs.float().contiguous(), advantages.float().contiguous()
        loss, logp = LinearLossFn.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(), ignore_index, impl,
                                        True, old, adv, float(clip_eps), True)
        if not return_stats:
            return loss
        return loss, ppo_clip_terms(logp, old, adv, labels != ignore_index, clip_eps)[1]
    logp = linear_token_logprobs(hidden, weight, labels, ignore_index=ignore_index, backend=backend)
    loss, stats = ppo_clip_terms(logp, old_logprobs, advantages, labels != ignore_index, clip_eps)
    return (loss, stats) if return_stats else loss


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position, fp32, shape ``logits.shape[:-1]``;
    differentiable. Fast backends compute it in one sweep per row; the reference path works in row
    chunks (fp32 temporaries of one chunk, not of the whole logits)."""
    if not torch.is_floating_point(logits) or logits.dim() < 1 or logits.numel() == 0:
        raise ValueError(f"token_entropy: need non-empty floating-point logits [..., V], got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"token_entropy: temperature must be > 0, got {temperature}")
    impl = resolve_backend(backend, logits.device, logits.dtype)[1]
    flat, _ = _rows(logits)
    return TokenEntropyFn.apply(flat, float(temperature), _entropy_impl(impl)).view(logits.shape[:-1])


def linear_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0,
                         backend: str | None = None) -> torch.Tensor:
    """``token_entropy(hidden @ weight.T)`` ``[N]`` without materialising the ``[N, V]`` logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_token_entropy: need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if temperature <= 0:
        raise ValueError(f"linear_token_entropy: temperature must be > 0, got {temperature}")
    impl = resolve_backend(backend, hidden.device, hidden.dtype)[1]
    return LinearTokenEntropyFn.apply(hidden.contiguous(), weight.contiguous(), float(temperature), _entropy_impl(impl))


@torch.no_grad()
def _linear_scores(hidden, weight, labels, temperature: float, ignore_index: int, impl) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy ``[N]`` of ``hidden @ weight.T`` from one pass over each logits chunk."""
    logp, _, entropy = scores_pass(hidden, weight, labels, temperature, ignore_index, impl, _entropy_impl(impl))
    return logp, entropy


def _entropy_impl(impl: ModuleType | None) -> ModuleType | None:
    return impl if impl is not None and hasattr(impl, "entropy_forward") else None
