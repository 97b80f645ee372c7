"""LoRA adapters (``peft``): applying them, switching them (:func:`lora_scope`), saving and
merging them. With LoRA the reference model is the policy with its adapters off, and reward
models and critics can be adapters on the same frozen base (:mod:`.shared_backbone`)."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file
from torch import nn

from ..distributed import full_state_dict, unwrap
from ..errors import ModelLoadError

POLICY_ADAPTER = "default"  # peft's name for the first adapter: the policy's
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's
ADAPTER_BASE = "rlhf_adapter.json"  # ours: the source the adapter's base weights load from
SHARED_HEADS = "rlhf_heads"  # where a SharedBackbone's scalar heads live inside the policy's model


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Wrapping a model in peft: peft reads transformers' deprecated ``is_gradient_checkpointing``,
    whose FutureWarning a user can do nothing about, and which every LoRA command printed again."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model: nn.Module, lora_cfg: Any, base_source: str, *, causal_lm: bool = True) -> nn.Module:
    """``model`` with LoRA adapters (``peft.get_peft_model``) as ``lora_cfg`` (a
    :class:`rlhf_core.config.LoraConfig`) says: only the adapters train; the base weights are frozen.
    ``base_source`` is where those base weights load from (recorded when the adapter is saved)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                              target_modules=lora_cfg.target_modules, bias="none",
                              task_type="CAUSAL_LM" if causal_lm else None)
    try:
        with peft_wrapping():
            model = get_peft_model(model, peft_cfg)
    except ValueError as exc:  # e.g. target_modules that match nothing
        raise ModelLoadError(f"model.lora: {exc}") from None
    base = Path(base_source)
    model.rlhf_lora = {"base": str(base.resolve()) if base.exists() else base_source, "merge": bool(lora_cfg.merge),
                       "scaling": lora_cfg.alpha / lora_cfg.r}
    return model


def is_lora(model: nn.Module) -> bool:
    """True for a model :func:`apply_lora` made (its adapters can be switched off: the reference)."""
    return hasattr(model, "rlhf_lora")


def plain_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP and peft wrappers (with LoRA: the model its adapters are
    injected into)."""
    inner = unwrap(model)
    return inner.get_base_model() if is_lora(inner) else inner


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` holds a PEFT adapter (what a LoRA stage saves)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The source an adapter directory's base weights load from: ours, else PEFT's record."""
    path = Path(path)
    if (path / ADAPTER_BASE).is_file():
        return json.loads((path / ADAPTER_BASE).read_text())["base"]
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{path}: the adapter does not say which base model it belongs to "
                             f"(no {ADAPTER_BASE}, no base_model_name_or_path)")
    return base


def merge_lora_state(state: dict[str, torch.Tensor], model: nn.Module,
                     adapter: str = POLICY_ADAPTER) -> dict[str, torch.Tensor]:
    """A LoRA model's full state dict with ``adapter`` folded into its base weights,
    ``W + alpha / r * B @ A`` (in fp32, stored in W's dtype), under the plain model's names: what
    the model without peft would hold (other adapters and a :class:`SharedBackbone`'s heads are
    left out). Works on a gathered state dict, so on sharded models too."""
    scaling = model.rlhf_lora["scaling"]
    plain = lambda key: key.replace("base_model.model.", "", 1).replace(".base_layer.", ".")  # noqa: E731
    out = {plain(k): v for k, v in state.items() if ".lora_" not in k and f"{SHARED_HEADS}." not in k}
    for key, a in state.items():
        if f".lora_A.{adapter}." not in key:
            continue
        module, rest = key.split(".lora_A.")
        b = state[f"{module}.lora_B.{rest}"]
        name = plain(module) + ".weight"
        out[name] = (out[name].float() + scaling * (b.float() @ a.float())).to(out[name].dtype)
    return out


@contextlib.contextmanager
def lora_scope(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Inside the block, every LoRA layer of ``model`` applies only ``adapter`` (``None``: no
    adapter at all, the frozen base model). Unlike peft's ``set_adapter`` / ``disable_adapter``
    this never touches ``requires_grad``, so adapters that train side by side (a policy and a
    critic on one base) stay trainable, also under FSDP, which keeps its own copy of that flag.
    Run a backward inside the same scope as its forward when activations are checkpointed (the
    recomputation reads the active adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unwrap(model).modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if adapter is None:
            m._disable_adapters = True
        else:
            m._active_adapter, m._disable_adapters = [adapter], False
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a saved PEFT adapter (safetensors, else a weights-only torch file)."""
    safetensors = adapter_dir / "adapter_model.safetensors"
    if safetensors.is_file():
        return load_file(str(safetensors))
    return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of ``model`` as the plain Hugging Face model holds them, on every rank:
    gathered when sharded (a collective: every rank calls it), with LoRA's policy adapter merged in
    (:func:`merge_lora_state`). What an engine with its own copy of the policy loads."""
    inner = unwrap(model)
    state = full_state_dict(model, everywhere=True)
    return merge_lora_state(state, inner) if is_lora(inner) else state

