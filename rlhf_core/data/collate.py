"""Padding and collation of tokenised items into batches, and the label shift for next-token losses."""
from __future__ import annotations

import torch

from .records import IGNORE_INDEX


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad integer sequences to one ``[B, T]`` tensor (right padding unless ``left``)."""
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: the column of each row's last 1 in a left-aligned ``[B, T]`` mask (a response's last
    token; 0 for an empty row)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def append_column(t: torch.Tensor, value: float | int) -> torch.Tensor:
    """``[B, T]`` -> ``[B, T + 1]`` with a last column of ``value``."""
    return torch.cat([t, t.new_full((t.shape[0], 1), value)], dim=1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with unshifted logits: position t holds token t + 1 (the last is ignored).

    Shifting the labels instead of slicing the logits keeps ``[B, T, V]`` contiguous, so the kernels
    read the model's logits in place and write one gradient for them (no copy of the slice).
    """
    return append_column(labels[:, 1:], IGNORE_INDEX)


def collate_sft(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` ``[B, T]``, right padded, labels -100 on padding."""
    ids = pad([it["input_ids"] for it in items], pad_id)
    mask = pad([[1] * len(it["input_ids"]) for it in items], 0)
    labels = pad([it["labels"] for it in items], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_scored(items: list[dict], pad_id: int, keys: tuple[str, ...] = ("response",)) -> dict[str, torch.Tensor]:
    """Per key: ``<key>_ids``/``<key>_mask``/``<key>_labels`` ``[B, T]`` right padded (labels -100 on
    prompt and padding); ``score [B]`` when present."""
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        seqs = [it[f"{key}_ids"] for it in items]
        out[f"{key}_ids"] = pad(seqs, pad_id)
        out[f"{key}_mask"] = pad([[1] * len(s) for s in seqs], 0)
        out[f"{key}_labels"] = pad([it[f"{key}_labels"] for it in items], IGNORE_INDEX)
    if "score" in items[0]:
        out["score"] = torch.tensor([it["score"] for it in items], dtype=torch.float32)
    return out
