"""Scalar-head models: a transformer backbone with a linear head giving one scalar per token, the
reward model R_phi(x, y) (read at the last non-pad token) and the PPO critic (per token)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_dir, state_bytes
from ..distributed import barrier, full_state_dict, is_main_process
from ..errors import ModelLoadError
from .loading import load_causal_lm, loading, set_attention
from .lora import ADAPTER_BASE, POLICY_ADAPTER, is_lora, merge_lora_state

REWARD_MARKER = "rlhf_reward_model.json"
HEAD_FILE = "reward_head.safetensors"
REWARD_ADAPTER = "adapter"  # a LoRA reward model's adapter, beside the merged weights


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


def load_scalar_model(model_cfg: Any, source: str, *, seed: int = 0) -> ScalarHeadModel:
    """The one way a scalar-head model is loaded (reward stage, reward model, critic), on CPU: a
    saved reward model as it was saved, or a causal LM's decoder with a fresh head (``seed``
    draws the head and, for ``builtin:tiny``, the weights); ``model.attn_implementation`` applies."""
    if is_reward_model_dir(source):
        return ScalarHeadModel.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code,
                                               attn_implementation=model_cfg.attn_implementation)
    return ScalarHeadModel.from_causal_lm(load_causal_lm(model_cfg, source, seed=seed))
