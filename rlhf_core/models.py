"""Load and save policy, reference, reward and value models.

``builtin:tiny`` is a 2-layer Llama (d=64) over a byte-level tokenizer (``ByT5Tokenizer``, no files
needed): everything runs offline. Anything else goes through ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained`` (local directory or hub id), with ``trust_remote_code``
off unless the config turns it on. Weights are saved as safetensors.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir, state_bytes
from .distributed import barrier, full_state_dict, unwrap
from .errors import UserError
from .tracking import is_main_process

#: The supported plugin API of this module (see docs/reference/api.md).
__all__ = ["ModelLoadError", "ScalarHeadModel", "load_causal_lm", "load_tokenizer", "save_causal_lm",
           "is_reward_model_dir", "apply_lora", "is_lora", "is_adapter_dir", "merge_lora_state", "linear_head",
           "use_fused_linear", "fused_linear_problems", "plain_model", "lora_scope", "SharedBackbone", "root_call",
           "AdapterScalarModel", "score_at_last_token", "loading"]

BUILTIN_TINY = "builtin:tiny"
REWARD_MARKER = "rlhf_reward_model.json"
HEAD_FILE = "reward_head.safetensors"
REWARD_ADAPTER = "adapter"  # a LoRA reward model's adapter, beside the merged weights
POLICY_ADAPTER = "default"  # peft's name for the first adapter: the policy's
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's
ADAPTER_BASE = "rlhf_adapter.json"  # ours: the source the adapter's base weights load from
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer could not be loaded; the message names the path."""


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


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise ``torch.device(spec)`` (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ModelLoadError(f"model.device: {exc}; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device is {spec!r} but CUDA is not available; use 'auto' or 'cpu'")
    return device


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


def linear_head(model: nn.Module) -> tuple[nn.Module | None, str]:
    """``(head, "")`` when a causal LM's logits are exactly ``last_hidden_state @ head.weight.T``
    (a plain bias-free ``nn.Linear``, no logit scaling or soft-capping): what the fused-linear
    kernels need (run them through :func:`root_call`). Otherwise ``(None, why)``. Looks through DDP
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
    why = _cannot_skip_logits(inner)
    return (None, why) if why else (head, "")


def _cannot_skip_logits(inner: nn.Module) -> str:
    """Why :func:`root_call` cannot run ``inner``'s forward without logits ("" when it can)."""
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return f"{type(inner).__name__}.forward has no logits_to_keep argument (needed to skip the LM head)"
    return ""


def root_call(model: nn.Module, then: Callable[[torch.Tensor, torch.Tensor], Any], input_ids: torch.Tensor,
              attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> Any:
    """``then(hidden [B, T, H], head_weight [V, H])`` computed *inside* the causal LM's own forward
    (called through ``model``: a DDP or peft wrapper, an FSDP root), where ``hidden`` is the
    decoder's last hidden state and no logits are computed (``logits_to_keep`` selects no position).
    Inside the root forward the root's parameters (embeddings, LM head, a :class:`SharedBackbone`'s
    heads) are gathered when sharded, and whatever ``then`` returns is the forward's output, so
    FSDP gathers them again for the backward and reduces their gradients like any weight's — the
    fused-linear kernels and scalar heads run the same with 1 or N processes. Returns ``then``'s
    result (tensors and anything else, e.g. a dict of floats)."""
    inner = plain_model(model)
    probe = _probe(inner)
    probe["then"] = then
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device))
    finally:
        probe["then"], probe["hidden"] = None, None
    return out["rlhf"]


def _probe(inner: nn.Module) -> dict:
    """The hooks :func:`root_call` works through, installed once per model: the decoder's forward
    keeps its last hidden state; the root's forward (hook prepended, so it runs before FSDP's own
    post-forward hook whenever it was installed) replaces its output with ``then``'s."""
    probe = getattr(inner, "_rlhf_probe", None)
    if probe is not None:
        return probe
    probe = {"then": None, "hidden": None}

    def keep_hidden(module, args, output):
        if probe["then"] is not None:
            probe["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def apply(module, args, output):
        if probe["then"] is None:
            return output
        hidden, probe["hidden"] = probe["hidden"], None
        return {"rlhf": probe["then"](hidden, module.get_output_embeddings().weight)}

    inner.base_model.register_forward_hook(keep_hidden)
    inner.register_forward_hook(apply, prepend=True)
    inner._rlhf_probe = probe
    return probe


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
    run inside the model's forward (:func:`root_call`)."""
    from .interfaces import StageError

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


# ----------------------------------------------------------------------------- LoRA (peft)

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


class ScalarHeadModel(nn.Module):
    """A transformer backbone with a linear head giving one scalar per token.

    Used as the reward model R_phi(x, y) (the score reads the last non-pad token) and as the PPO
    critic (values per token). Saves and loads as a unit: backbone via ``save_pretrained``, head as
    ``reward_head.safetensors``, plus a marker file.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = scalar_head(hidden_size)

    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module) -> "ScalarHeadModel":
        """Reuse a causal LM's base model (no LM head) as the backbone."""
        model = cls(causal_lm.base_model, causal_lm.config.hidden_size)
        return model.to(next(causal_lm.parameters()).dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, *, score: bool = False) -> torch.Tensor:
        """Per-token scalars ``[B, T]`` in fp32 (pass ``position_ids`` for left-padded rows); with
        ``score``, ``R_phi(x, y)`` ``[B]``: the scalar at the last non-pad token of each
        right-padded row. (One forward for both, so DDP/FSDP wrappers see every call.)"""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # [B, T, H]
        values = self.head(hidden).squeeze(-1).float()
        return score_at_last_token(values, attention_mask) if score else values

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``R_phi(x, y)`` ``[B]`` (see :meth:`forward`)."""
        return self(input_ids, attention_mask, score=True)

    def save_pretrained(self, directory: Path, tokenizer: Any = None) -> Path:
        """Backbone (safetensors) + head + marker (+ tokenizer) into ``directory``: gathered on rank
        0, which writes. Call it on every rank (on the unwrapped module under DDP)."""
        directory = Path(directory)
        state = full_state_dict(self)  # every rank takes part; rank 0 gets the whole model
        if is_main_process():
            backbone_model, lora = self.backbone, is_lora(self.backbone)
            if lora:  # a reward model is always saved whole (adapters merged in), and its adapter beside it
                adapter = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
                state = merge_lora_state(state, self.backbone)  # backbone.base_model.model.X -> backbone.X
                backbone_model = self.backbone.get_base_model()
            backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            head = {k[len("head."):]: v.contiguous() for k, v in state.items() if k.startswith("head.")}
            with atomic_dir(directory, needed_bytes=state_bytes(state)) as tmp:
                if lora:  # what SharedBackbone loads onto a policy with the same base
                    self.backbone.save_pretrained(tmp / REWARD_ADAPTER, state_dict=adapter,
                                                  selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
                    (tmp / REWARD_ADAPTER / ADAPTER_BASE).write_text(json.dumps({"base": self.backbone.rlhf_lora["base"]}) + "\n")
                backbone_model.save_pretrained(tmp, state_dict=backbone, safe_serialization=True)
                save_file(head, str(tmp / HEAD_FILE))
                (tmp / REWARD_MARKER).write_text(json.dumps({"format": 1, "head": HEAD_FILE}) + "\n")
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        barrier()
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: Any = None, trust_remote_code: bool = False,
                        attn_implementation: str | None = None) -> "ScalarHeadModel":
        """Load what :meth:`save_pretrained` wrote (attention kernels ``attn_implementation``, None:
        as saved); a directory without the marker is an error."""
        from transformers import AutoModel

        directory = Path(directory)
        if not (directory / REWARD_MARKER).is_file():
            raise ModelLoadError(f"{directory} is not a saved reward model (no {REWARD_MARKER}); "
                                 "train one with the 'reward' stage or point to its output directory")
        with loading("a reward model", directory):
            backbone = AutoModel.from_pretrained(directory, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
            model = cls(set_attention(backbone, attn_implementation), backbone.config.hidden_size)
            model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        return model.to(next(backbone.parameters()).dtype)


def is_reward_model_dir(path: str | Path) -> bool:
    """True when ``path`` holds a saved :class:`ScalarHeadModel`."""
    return (Path(path) / REWARD_MARKER).is_file()


def scalar_head(hidden_size: int) -> nn.Linear:
    """A fresh scalar head ``[H] -> [1]``: weights ~ N(0, 1 / (H + 1)), bias 0."""
    head = nn.Linear(hidden_size, 1)
    nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
    nn.init.zeros_(head.bias)
    return head


def score_at_last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: each right-padded row's value ``[B, T]`` at its last non-pad token (R_phi(x, y))."""
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # [B]
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


# ----------------------------------------------------------------------------- one frozen base, several adapters

SHARED_HEADS = "rlhf_heads"  # where a SharedBackbone's scalar heads live inside the policy's model


class SharedBackbone:
    """Reward models and critics as LoRA adapters with their own linear heads on a LoRA policy's
    frozen base weights: one copy of the base in memory instead of one per model.

    ``policy`` is a model from :func:`apply_lora` (its adapter is peft's ``default``), not yet
    sharded; ``required``: a model that cannot share is an error (``shared_backbone: true``).
    :meth:`add` puts a named adapter and head on it and returns an
    :class:`AdapterScalarModel` that scores like a :class:`ScalarHeadModel`; :meth:`seal` (before
    :func:`rlhf_core.distributed.wrap`) attaches the heads to the policy's model, so that they are
    sharded, checkpointed and (for a trainable critic) optimised like its other weights, and are
    left out of every policy export (:func:`save_causal_lm`, :func:`merge_lora_state`).

    A scalar forward is the policy's own forward with the adapter switched (:func:`lora_scope`) and
    the head applied to the decoder's last hidden state inside it, without logits (:func:`root_call`).
    """

    def __init__(self, policy: nn.Module, lora_cfg: Any, *, required: bool = False):
        self.policy, self.lora_cfg, self.required = policy, lora_cfg, required
        self.model = policy.get_base_model()  # the Hugging Face causal LM the adapters are injected into
        self.heads = nn.ModuleDict()
        self.trainable: dict[str, bool] = {}
        self.sealed = False
        self.problem = _cannot_skip_logits(self.model)

    def why_not(self, source: str) -> str:
        """Why the scalar model saved in ``source`` cannot be an adapter on this base ("" when it can):
        it must be a LoRA reward model (with its ``adapter/``) trained on exactly the policy's start
        weights, or (a fresh critic) the policy's own source."""
        if self.problem or self.sealed:
            return self.problem or "the policy is already prepared for training"
        mine = _same_source(self.policy.rlhf_lora["base"])
        if not is_reward_model_dir(source):
            return "" if _same_source(source) == mine else f"{source} is not the policy's start weights ({mine})"
        adapter_dir = Path(source) / REWARD_ADAPTER
        if not is_adapter_dir(adapter_dir):
            return f"{source} was not trained with LoRA (no {REWARD_ADAPTER}/), so its whole backbone differs"
        base = _same_source(adapter_base(adapter_dir))
        return "" if base == mine else f"its adapter was trained on {base}, the policy starts from {mine}"

    def add(self, name: str, source: str, *, trainable: bool) -> "AdapterScalarModel":
        """Adapter ``name`` and its head from ``source`` (a LoRA reward model: its adapter and head;
        the policy's own source: a fresh adapter as ``model.lora`` says and a fresh head), frozen
        unless ``trainable``; a name already taken gets a suffix (a second reward-model judge, e.g.
        gold, is ``reward_2``). Check :meth:`why_not` first."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import set_peft_model_state_dict

        why = self.why_not(source)
        if why:
            raise ModelLoadError(f"{name}: cannot share the policy's base weights: {why}")
        base_name, n = name, 1
        while name in self.trainable or name == POLICY_ADAPTER:
            n += 1
            name = f"{base_name}_{n}"
        head = scalar_head(self.model.config.get_text_config().hidden_size)
        if is_reward_model_dir(source):
            adapter_dir = Path(source) / REWARD_ADAPTER
            with loading(f"the {base_name}'s LoRA adapter", adapter_dir):
                self.policy.add_adapter(name, PeftLoraConfig.from_pretrained(str(adapter_dir)))
                # saved from the decoder alone (a ScalarHeadModel's backbone): re-root the names under the causal LM
                prefix = f"base_model.model.{self.model.base_model_prefix}."
                weights = {prefix + k[len("base_model.model."):]: v for k, v in _adapter_weights(adapter_dir).items()}
                result = set_peft_model_state_dict(self.policy, weights, adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k]
            if result.unexpected_keys or missing:
                raise ModelLoadError(f"{adapter_dir}: the adapter does not fit the policy's model "
                                     f"({len(missing)} weights missing, {len(result.unexpected_keys)} unexpected)")
            with loading(f"the {base_name}'s head", Path(source) / HEAD_FILE):
                head.load_state_dict(load_file(str(Path(source) / HEAD_FILE)))
        else:
            cfg = self.lora_cfg
            self.policy.add_adapter(name, PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                         target_modules=cfg.target_modules, bias="none"))
        self.trainable[name] = trainable
        self.heads[name] = head.to(device=self.model.device, dtype=self.model.dtype)
        self._set_requires_grad()
        return AdapterScalarModel(self, name)

    def seal(self) -> None:
        """Attach the heads to the policy's model (call before sharding); nothing is added after."""
        if self.trainable and not self.sealed:
            self.model.add_module(SHARED_HEADS, self.heads)  # their requires_grad was set by add
        self.sealed = True

    def _set_requires_grad(self) -> None:
        # peft's add_adapter leaves only the active adapter trainable: say once what trains, before sharding.
        for pname, p in self.policy.named_parameters():
            owner = self.owner(pname)
            if owner == POLICY_ADAPTER:
                p.requires_grad_(".lora_" in pname)
            elif owner is not None:
                p.requires_grad_(self.trainable[owner])
        for name, head in self.heads.items():
            head.requires_grad_(self.trainable[name])

    def owner(self, param_name: str) -> str | None:
        """Which model a policy parameter belongs to: an added adapter's or head's name,
        ``default`` for the policy's own adapter and base weights, None for nothing else."""
        if f"{SHARED_HEADS}." in param_name:
            return param_name.split(f"{SHARED_HEADS}.", 1)[1].split(".", 1)[0]
        for name in self.trainable:
            if f".lora_A.{name}." in param_name or f".lora_B.{name}." in param_name:
                return name
        return POLICY_ADAPTER

    def parameters_of(self, name: str, model: nn.Module | None = None) -> list[nn.Parameter]:
        """The trainable parameters of ``name`` (``default``: the policy) as the (possibly sharded)
        ``model`` holds them now: what an optimizer takes and gradient clipping reads."""
        model = self.policy if model is None else model
        return [p for n, p in model.named_parameters() if p.requires_grad and self.owner(n) == name]


class AdapterScalarModel:
    """A reward model or critic that is an adapter and a head on a :class:`SharedBackbone`: called
    like :class:`ScalarHeadModel` (per-token values ``[B, T]`` in fp32, or with ``score`` the value
    at each row's last non-pad token). Frozen ones always score in eval mode."""

    def __init__(self, shared: SharedBackbone, name: str):
        self.shared, self.name = shared, name

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, *, score: bool = False) -> torch.Tensor:
        shared, model = self.shared, self.shared.policy
        training = model.training
        if not shared.trainable[self.name]:
            model.eval()
        head = shared.heads[self.name]
        try:
            with self.scope():
                # [B, T, 1] -> [B, T] by a sum over the size-1 axis: a new tensor (FSDP warns about returning views)
                values = root_call(model, lambda hidden, _: head(hidden).float().sum(-1), input_ids, attention_mask,
                                   position_ids)
        finally:
            model.train(training)
        return score_at_last_token(values, attention_mask) if score else values

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``R_phi(x, y)`` ``[B]``."""
        return self(input_ids, attention_mask, score=True)

    def scope(self):
        """Run this model's backward inside it when activations are checkpointed (see :func:`lora_scope`)."""
        return lora_scope(self.shared.policy, self.name)

    def parameters(self) -> list[nn.Parameter]:
        """The adapter's and head's trainable parameters (none when frozen)."""
        return self.shared.parameters_of(self.name)


def _same_source(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    safetensors = adapter_dir / "adapter_model.safetensors"
    if safetensors.is_file():
        return load_file(str(safetensors))
    return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
