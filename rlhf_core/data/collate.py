"""Padding and collation of tokenised items into batches, and the label shift for next-token losses."""
from __future__ import annotations

import torch

from .validation import IGNORE_INDEX


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


def prompt_length(labels: list[int]) -> int:
    """How many leading tokens of a tokenised item are its prompt (labels ``-100``)."""
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def collate_unpaired(items: list[dict], pad_id: int, mismatched: bool = False) -> dict[str, torch.Tensor]:
    """Unpaired items (:func:`~rlhf_core.data.tokenize.tokenize_unpaired`) as :func:`collate_sft`
    batches them: ``input_ids``/``attention_mask``/``labels`` ``[B, T]`` right padded (labels -100
    on prompt and padding), plus ``desirable [B]`` bool.

    With ``mismatched``, also ``kl_input_ids``/``kl_attention_mask``/``kl_labels`` ``[B, T']``: row
    ``i`` is item ``i``'s prompt followed by item ``(i + 1) mod B``'s completion (labels on the
    completion), KTO's mismatched pairs for its reference point z0, formed within the batch as TRL
    forms them (a batch of one pairs an item with itself); the completion is cut so that a row is no
    longer than the longer of the two items."""
    out = collate_sft([{"input_ids": it["ids"], "labels": it["labels"]} for it in items], pad_id)
    out["desirable"] = torch.tensor([bool(it["desirable"]) for it in items], dtype=torch.bool)
    if mismatched:
        pairs = [mismatched_pair(item, items[(i + 1) % len(items)]) for i, item in enumerate(items)]
        out.update({f"kl_{key}": value for key, value in collate_sft(pairs, pad_id).items()})
    return out


def mismatched_pair(item: dict, other: dict) -> dict[str, list[int]]:
    """KTO's mismatched pair of two unpaired items: ``item``'s prompt followed by ``other``'s
    completion, cut so that it is no longer than the longer of the two (``input_ids``, ``labels``
    with -100 on the prompt)."""
    start, other_start = prompt_length(item["labels"]), prompt_length(other["labels"])
    room = max(len(item["ids"]), len(other["ids"])) - start
    completion = other["ids"][other_start:][:room]
    return {"input_ids": item["ids"][:start] + completion, "labels": [IGNORE_INDEX] * start + completion}
