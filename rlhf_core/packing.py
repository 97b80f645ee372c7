"""Padding-free forwards (``data.packing``): the sequences of a padded ``[B, T]`` batch share rows.

Inside ``with padding_free(model, ...)``, every forward of the models' transformer decoders (the
base model under the LM head, the reward model's or critic's backbone, a LoRA-wrapped one) is
rewritten on the way in and out, so that nothing around the decoder changes:

- **in**: the real tokens (``attention_mask == 1``) of each sequence are laid out in rows by
  best-fit decreasing (:func:`plan_rows`; rows as long as the batch's longest sequence, so no
  sequence is ever split and a row never costs more attention than a padded row), with position
  ids restarting at 0 for every sequence (what ``cumsum(mask) - 1`` gives a padded row, left or
  right padded) and no 2-D attention mask. Transformers then builds attention that never crosses
  a sequence boundary from the position ids: a block-diagonal causal mask for PyTorch attention
  (``sdpa``, ``eager``, flex), variable-length kernels for flash-attention.
- **out**: the last hidden states go back to the padded ``[B, T, H]`` layout (zeros on padding),
  so LM heads, ``logits_to_keep``, the fused-linear kernels, scalar heads and every loss see the
  tensors they would see without packing, and read each sequence's last token where it was.

The rows cost about the batch's real tokens instead of ``B x T``; the result per token is the
padded one up to floating-point summation order. The plan is a pure function of the mask, so it
is deterministic, and each process packs only its own share of a global batch.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import UserError

#: The supported plugin API of this module (see docs/reference/api.md).
__all__ = ["PackPlan", "PackingStats", "plan_rows", "padding_free", "attention_path", "packing_line", "packing_problems"]


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: sequence indices per row, each row's lengths summing to at most
    ``capacity``. Longest first (ties by index), each into the fullest row it fits; deterministic."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        best = -1
        for r, room in enumerate(free):
            if lengths[i] <= room and (best < 0 or room < free[best]):
                best = r
        if best < 0:
            rows.append([])
            free.append(capacity)
            best = len(rows) - 1
        rows[best].append(i)
        free[best] -= lengths[i]
    return rows


@dataclass
class PackPlan:
    """Where each real token of a padded ``[B, T]`` batch sits in ``[rows, width]`` packed rows.

    ``source``: the flat ``B * T`` positions of the real tokens; ``target``: their flat
    ``rows * width`` positions (same order); ``position_ids [rows, width]``: each sequence's
    positions from 0, the tail of a row (after its last sequence) numbered from 0 as a segment of
    its own, which attends only to itself and is never read back."""

    batch: int
    length: int
    rows: int
    width: int
    source: torch.Tensor
    target: torch.Tensor
    position_ids: torch.Tensor

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "PackPlan":
        """The plan of a 0/1 ``[B, T]`` mask (real tokens may sit anywhere in their row, e.g. after
        left padding; their order is kept)."""
        mask = attention_mask.detach().to("cpu", torch.bool)
        batch, length = mask.shape
        lengths = mask.sum(1).tolist()
        width = max(max(lengths), 1)
        rows = plan_rows(lengths, width)
        width = max(sum(lengths[i] for i in row) for row in rows) if rows else 1
        columns = [mask[b].nonzero().flatten() for b in range(batch)]
        source, target, positions = [], [], torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            offset = 0
            for b in row:
                n = lengths[b]
                source.append(b * length + columns[b])
                target.append(torch.arange(r * width + offset, r * width + offset + n))
                positions[r, offset:offset + n] = torch.arange(n)
                offset += n
            positions[r, offset:] = torch.arange(width - offset)
        device = attention_mask.device
        empty = torch.zeros(0, dtype=torch.long)
        return cls(batch, length, len(rows), width, torch.cat(source or [empty]).to(device),
                   torch.cat(target or [empty]).to(device), positions.to(device))

    @property
    def real(self) -> int:
        """Real tokens in the batch."""
        return int(self.source.numel())

    def pack(self, padded: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[rows, width, ...]`` (``fill`` where no token sits)."""
        tail = padded.shape[2:]
        out = padded.new_full((self.rows * self.width, *tail), fill)
        out[self.target] = padded.reshape(self.batch * self.length, *tail)[self.source]
        return out.view(self.rows, self.width, *tail)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[rows, width, ...]`` -> ``[B, T, ...]``, zeros on padding (differentiable)."""
        tail = packed.shape[2:]
        values = packed.reshape(self.rows * self.width, *tail).index_select(0, self.target)
        out = packed.new_zeros(self.batch * self.length, *tail).index_copy(0, self.source, values)
        return out.view(self.batch, self.length, *tail)


@dataclass
class PackingStats:
    """What the packed forwards of a ``padding_free`` block cost: ``real`` tokens, the packed rows'
    ``slots`` (rows x width) and the ``padded`` slots (B x T) the same batches would have taken."""

    real: int = 0
    slots: int = 0
    padded: int = 0

    @property
    def efficiency(self) -> float:
        """Packing efficiency: real tokens over row capacity (1.0 before any forward)."""
        return self.real / self.slots if self.slots else 1.0

    def add(self, plan: PackPlan) -> None:
        """Count one packed forward."""
        self.real += plan.real
        self.slots += plan.rows * plan.width
        self.padded += plan.batch * plan.length


def packing_problems() -> list[str]:
    """Why packing cannot run with the installed transformers ("" list when it can): it needs the
    packed-sequence masks built from position ids (``masking_utils.find_packed_sequence_indices``)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        import transformers

        return [f"data.packing needs transformers' packed-sequence attention masks (transformers >= 4.56); "
                f"this is transformers {transformers.__version__}: upgrade it or set data.packing: false"]
    return []


def decoders(model: nn.Module) -> list[nn.Module]:
    """The outermost transformer decoders inside ``model`` (Hugging Face base models: a
    ``PreTrainedModel`` that is its own ``base_model``), whatever wraps them."""
    from transformers import PreTrainedModel

    found, names = [], []
    for name, module in model.named_modules():
        if any(name.startswith(n + ".") for n in names):
            continue
        if isinstance(module, PreTrainedModel) and module.base_model is module:
            found.append(module)
            names.append(name)
    return found


def attention_path(model: nn.Module) -> str:
    """How a packed forward of ``model`` keeps sequences apart (for the stage's first lines)."""
    impls = sorted({str(getattr(d.config, "_attn_implementation", None) or "eager") for d in decoders(model)})
    if any(i.startswith("flash") for i in impls):
        return f"variable-length flash-attention ({', '.join(impls)})"
    return f"PyTorch attention ({', '.join(impls)}) with a block-diagonal causal mask"


def packing_line(model: nn.Module) -> str:
    """Prepare ``model`` for packed forwards and say how they attend (the stage's first line): on
    CUDA with the ``flash-attn`` package installed and half-precision weights, decoders still on
    PyTorch's ``sdpa`` switch to ``flash_attention_2`` (variable-length kernels); elsewhere the
    block-diagonal mask of the model's own attention."""
    import importlib.util

    for decoder in decoders(model):
        weight = next(decoder.parameters(), None)
        if (weight is not None and weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)
                and getattr(decoder.config, "_attn_implementation", None) == "sdpa"
                and importlib.util.find_spec("flash_attn") is not None):
            decoder.set_attn_implementation("flash_attention_2")
    return ("data.packing: each micro-batch's sequences share rows (best-fit decreasing, rows as long as its longest "
            f"sequence); attention: {attention_path(model)}")


class _Packer:
    """The hooks on one decoder: active while a ``padding_free`` block holds ``stats``."""

    def __init__(self, decoder: nn.Module):
        self.stats: PackingStats | None = None
        self.plans: list[PackPlan] = []
        decoder.register_forward_pre_hook(self.before, with_kwargs=True)
        # First of the forward hooks, even of those installed earlier (with_last_hidden's, which keeps the
        # decoder's output): whatever reads the output reads it in the padded layout.
        decoder.register_forward_hook(self.after, with_kwargs=True, prepend=True)

    def before(self, module, args, kwargs):
        if self.stats is not None and args:  # some models pass input_ids (and more) by position (GPT-2)
            kwargs = {**inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments}
            kwargs.update(kwargs.pop("kwargs", {}))
            args = ()
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        # Decoding with a cache is never packed (transformers hands the cache over as past_key_values or,
        # in newer releases, as cache).
        if (self.stats is None or ids is None or mask is None or mask.dim() != 2
                or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None):
            self.plans.append(None)
            return None
        plan = PackPlan.from_mask(mask)
        self.stats.add(plan)
        self.plans.append(plan)
        kwargs.update(input_ids=plan.pack(ids), attention_mask=None, position_ids=plan.position_ids, use_cache=False)
        return args, kwargs

    def after(self, module, args, kwargs, output):
        plan = self.plans.pop()
        if plan is None:
            return None
        if isinstance(output, tuple):
            return (plan.unpack(output[0]), *output[1:])
        output.last_hidden_state = plan.unpack(output.last_hidden_state)
        return output


def _packer(decoder: nn.Module) -> _Packer:
    packer = decoder.__dict__.get("_rlhf_packer")
    if packer is None:
        packer = _Packer(decoder)
        decoder.__dict__["_rlhf_packer"] = packer  # not a submodule, not in the state dict
    return packer


@contextlib.contextmanager
def padding_free(*models: nn.Module | None, stats: PackingStats | None = None) -> Iterator[PackingStats]:
    """Within the block, every forward of the decoders of ``models`` (None entries skipped) runs on
    packed rows (see the module docstring); yields the :class:`PackingStats` it adds to."""
    problems = packing_problems()
    if problems:
        raise UserError(problems[0])
    stats = stats if stats is not None else PackingStats()
    packers = {}
    for model in models:
        if model is None:
            continue
        found = decoders(model)
        if not found:
            raise UserError(f"data.packing: {type(model).__name__} holds no Hugging Face transformer decoder (a "
                            "PreTrainedModel base model) whose forward can be packed; set data.packing: false")
        packers.update({id(d): _packer(d) for d in found})
    before = {key: p.stats for key, p in packers.items()}
    for packer in packers.values():
        packer.stats = stats
    try:
        yield stats
    finally:
        for key, packer in packers.items():
            packer.stats = before[key]
