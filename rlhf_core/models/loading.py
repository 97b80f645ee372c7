"""Loading and saving causal LMs and tokenizers, and checking where they come from before anything
loads.

``builtin:tiny`` is a 2-layer Llama (d=64) over a byte-level tokenizer (``ByT5Tokenizer``, no files
needed): everything runs offline. Anything else goes through ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained`` (local directory or hub id), with ``trust_remote_code``
off unless the config turns it on. Weights are saved as safetensors.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..atomic import atomic_dir, state_bytes
from ..distributed import barrier, full_state_dict, is_main_process, unwrap
from ..errors import ModelLoadError, UserError
from .lora import ADAPTER_BASE, POLICY_ADAPTER, adapter_base, is_adapter_dir, is_lora, merge_lora_state, peft_wrapping

BUILTIN_TINY = "builtin:tiny"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def loading(what: str, source: str | Path) -> Iterator[None]:
    """The one error of every model-loading path (policy, reference, reward model, critic, adapters,
    ``rlhf generate`` / ``eval``): whatever the loader raises becomes one :class:`ModelLoadError`
    naming ``what`` and ``source``. A weights file that is a pickle referring to code (refused by
    ``torch.load(weights_only=True)``, which transformers and rlhf use) is named as such: its payload
    never runs."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader's failure, reported once
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
            reason = ("a weights file is a pickle that refers to code, which rlhf never runs (torch.load with "
                      "weights_only=True refused it); use a model saved as safetensors")
        else:
            reason = f"{type(exc).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}".rstrip(": ")
        raise ModelLoadError(f"could not load {what} from {str(source)!r}: {reason}") from None


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_model_source(source: str, *, what: str = "model") -> str | None:
    """None when ``source`` can be loaded, else a one-line reason; never waits on network retries.

    A local-looking path (absolute, ``./``, ``../``, ``~``, or with more than one ``/``) must be an
    existing directory; a hub id must be in the local hub cache or, unless ``HF_HUB_OFFLINE`` is
    set, known to the hub (one request with a short timeout).
    """
    if source == BUILTIN_TINY:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        if what == "model" and is_adapter_dir(path):
            return check_model_source(adapter_base(path), what=what)
        if what == "model" and not (path / "config.json").is_file():
            return f"{source}: the directory has no config.json (nor adapter_config.json), so it is not a saved model"
        return None
    if path.exists():
        return f"{source}: is a file; expected a model directory (what save_pretrained writes)"
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep in source.replace("/", ""):
        return f"{source}: no such directory"
    if not _REPO_ID.match(source):
        return f"{source}: no such directory, and not a hub id of the form org/name"
    from huggingface_hub import try_to_load_from_cache

    filename = "config.json" if what == "model" else "tokenizer_config.json"
    if isinstance(try_to_load_from_cache(source, filename), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return f"{source}: not a local directory, and not in the hub cache while HF_HUB_OFFLINE is set"
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(source, timeout=10)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return (f"{source}: not a local directory, and the hub could not confirm it ({reason}); "
                "check the name, download it first, or point to a local directory")
    return None


def tiny_config(vocab_size: int):
    """The builtin tiny Llama configuration."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False,
    )


def load_tokenizer(model_cfg: Any, path: str | None = None):
    """The tokenizer for ``path`` (default: the config's tokenizer or model); pad falls back to EOS."""
    source = path or model_cfg.tokenizer or model_cfg.name_or_path
    if source == BUILTIN_TINY:
        from transformers import ByT5Tokenizer

        tok = ByT5Tokenizer()
    else:
        from transformers import AutoTokenizer

        with loading("a tokenizer", source):
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {source!r} has no EOS token; responses could never end")
    return tok


def torch_dtype(name: str):
    """``auto`` -> None (checkpoint dtype), otherwise the torch dtype."""
    return None if name == "auto" else _DTYPES[name]


def set_attention(model: nn.Module, name: str | None) -> nn.Module:
    """Switch ``model``'s attention kernels to ``name`` (``model.attn_implementation``; None: as loaded)."""
    if name is not None:
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as exc:
            raise UserError(f"model.attn_implementation: {name!r} cannot be used here: {exc}") from None
    return model


def load_causal_lm(model_cfg: Any, path: str | None = None, *, seed: int = 0):
    """A causal LM from ``path`` (default: the config's model), in the config's dtype and attention
    kernels (``model.attn_implementation``), on CPU."""
    return set_attention(_load_causal_lm(model_cfg, path, seed), getattr(model_cfg, "attn_implementation", None))


def _load_causal_lm(model_cfg: Any, path: str | None, seed: int):
    source = path or model_cfg.name_or_path
    if source == BUILTIN_TINY:
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(len(load_tokenizer(model_cfg, BUILTIN_TINY))))
        dtype = torch_dtype(model_cfg.dtype)
        return model.to(dtype) if dtype is not None else model
    if is_adapter_dir(source):  # a LoRA stage output: its base, with the adapter merged in
        from peft import PeftModel

        base = _load_causal_lm(model_cfg, adapter_base(source), seed)
        with loading("the LoRA adapter", source):
            with peft_wrapping():
                return PeftModel.from_pretrained(base, source).merge_and_unload()
    from transformers import AutoModelForCausalLM

    with loading("a causal LM", source):
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype(model_cfg.dtype) or "auto", trust_remote_code=model_cfg.trust_remote_code
        )


def save_causal_lm(model: nn.Module, tokenizer: Any, directory: Path) -> Path:
    """``save_pretrained`` (safetensors) of the model and its tokenizer into ``directory``: the full
    state dict is gathered on rank 0, which writes; every rank gets the path back. The result is an
    ordinary Hugging Face directory whatever the number of processes that trained it.

    A LoRA model (:func:`apply_lora`) saves its adapter in PEFT's format (``adapter_config.json``,
    ``adapter_model.safetensors``) plus ``rlhf_adapter.json`` naming the base it loads on (so
    ``load_causal_lm`` and ``init: auto`` take the directory as it is); with ``lora.merge`` also
    the merged model in ``directory/merged``, an ordinary Hugging Face directory."""
    state = full_state_dict(model)  # a collective for sharded models: every rank takes part
    inner = unwrap(model)
    if is_main_process():
        # A kill half-way leaves the previous directory, never a torn one; a full disk says what it needed.
        with atomic_dir(directory, needed_bytes=state_bytes(state)) as tmp:
            if is_lora(inner):
                inner.save_pretrained(tmp, state_dict=state, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
                (tmp / ADAPTER_BASE).write_text(json.dumps({"base": inner.rlhf_lora["base"]}) + "\n")
                if inner.rlhf_lora["merge"]:
                    inner.get_base_model().save_pretrained(tmp / "merged", state_dict=merge_lora_state(state, inner),
                                                           safe_serialization=True)
                    tokenizer.save_pretrained(tmp / "merged")
            else:
                inner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    barrier()  # no rank reads the checkpoint before it is complete
    return directory
