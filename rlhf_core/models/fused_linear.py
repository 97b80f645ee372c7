"""Fused-linear forwards: a loss computed from the decoder's last hidden state and the LM head
inside the model's own forward, so that the ``[B, T, V]`` logits never exist
(:func:`with_last_hidden`), and the stage option ``fused_linear`` that chooses it."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from ..distributed import is_main_process
from ..errors import StageError
from .lora import plain_model


def linear_head(model: nn.Module) -> tuple[nn.Module | None, str]:
    """``(head, "")`` when a causal LM's logits are exactly ``last_hidden_state @ head.weight.T``
    (a plain bias-free ``nn.Linear``, no logit scaling or soft-capping): what the fused-linear
    kernels need (run them through :func:`with_last_hidden`). Otherwise ``(None, why)``. Looks through DDP
    and peft wrappers."""
    inner = plain_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
              if getattr(config, k, None) not in (None, 1.0)]
    if type(head) is not nn.Linear or head.bias is not None:
        return None, f"the LM head of {type(inner).__name__} is not a plain bias-free linear layer"
    if scaled:
        return None, f"{type(inner).__name__} scales or soft-caps its logits ({scaled[0]})"
    why = cannot_skip_logits(inner)
    return (None, why) if why else (head, "")


def cannot_skip_logits(inner: nn.Module) -> str:
    """Why :func:`with_last_hidden` cannot run ``inner``'s forward without logits ("" when it can)."""
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return f"{type(inner).__name__}.forward has no logits_to_keep argument (needed to skip the LM head)"
    return ""


def with_last_hidden(model: nn.Module, compute: Callable[[torch.Tensor, torch.Tensor], Any], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> Any:
    """``compute(hidden [B, T, H], head_weight [V, H])`` run *inside* the causal LM's own forward
    (called through ``model``: a DDP or peft wrapper, an FSDP root), where ``hidden`` is the
    decoder's last hidden state and no logits are computed (``logits_to_keep`` selects no position).
    Inside the root forward the root's parameters (embeddings, LM head, a :class:`SharedBackbone`'s
    heads) are gathered when sharded, and whatever ``compute`` returns is the forward's output, so
    FSDP gathers them again for the backward and reduces their gradients like any weight's — the
    fused-linear kernels and scalar heads run the same with 1 or N processes. Returns ``compute``'s
    result (tensors and anything else, e.g. a dict of floats)."""
    hooks = _forward_hooks(plain_model(model))
    hooks["compute"] = compute
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device))
    finally:
        hooks["compute"], hooks["hidden"] = None, None
    return out["rlhf"]


def _forward_hooks(inner: nn.Module) -> dict:
    """The state of the two hooks :func:`with_last_hidden` works through, installed once per model:
    the decoder's forward keeps its last hidden state; the root's forward (hook prepended, so it
    runs before FSDP's own post-forward hook whenever it was installed) replaces its output with
    ``compute``'s."""
    state = getattr(inner, "_rlhf_forward_hooks", None)
    if state is not None:
        return state
    state = {"compute": None, "hidden": None}

    def keep_hidden(module, args, output):
        if state["compute"] is not None:
            state["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def replace_output(module, args, output):
        if state["compute"] is None:
            return output
        hidden, state["hidden"] = state["hidden"], None
        return {"rlhf": state["compute"](hidden, module.get_output_embeddings().weight)}

    inner.base_model.register_forward_hook(keep_hidden)
    inner.register_forward_hook(replace_output, prepend=True)
    inner._rlhf_forward_hooks = state
    return state


def fused_linear_problems(setting: bool | str, blocker: str) -> list[str]:
    """A stage's ``validate`` check of ``fused_linear: true``: what :func:`use_fused_linear` would
    refuse at run time that is already known from the config (the stage's ``blocker``), reported
    before any model loads."""
    return [f"fused_linear: {blocker}; set it to auto or false"] if setting is True and blocker else []


def use_fused_linear(setting: bool | str, stage: str, models: list[nn.Module | None], blocker: str = "") -> bool:
    """A stage's ``fused_linear`` option: ``True`` (an error naming the reason when it cannot be),
    ``False``, or ``"auto"``: on when nothing blocks it, else off with a one-line notice saying why.
    Blocked by ``blocker`` (the stage's own reason, e.g. a loss that reads the logits) or by a model
    whose head is not a plain linear layer (see :func:`linear_head`). Works sharded: the kernels
    run inside the model's forward (:func:`with_last_hidden`)."""
    if setting is False:
        return False
    why = blocker
    for model in models:
        if model is not None and not why:
            why = linear_head(model)[1]
    if not why:
        return True
    if setting is True:
        raise StageError(f"{stage}.fused_linear: {why}; set it to auto or false")
    if is_main_process():
        print(f"{stage}: fused_linear off ({why}); the logits are computed")
    return False
