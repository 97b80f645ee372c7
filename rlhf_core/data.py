"""Datasets: reading records, validating fields, tokenising with prompt masking, collation.

Sources: a ``.jsonl`` file (one JSON object per line), ``.json`` (a list), ``.csv``, ``.parquet``, a
directory written by 🤗 ``Dataset.save_to_disk``, or ``hf:NAME`` (a hub dataset, when online). Columns
named otherwise are mapped with ``data.fields`` (``{prompt: question}``). Record formats:

- ``sft``: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
  whose last message is the assistant's response (the tokenizer's chat template renders the rest
  when it has one; otherwise ``"<role>: <content>\\n"`` lines followed by ``"assistant: "``).
- ``reward``: ``{"prompt": str, "response": str, "score": finite number}``.
- ``pairwise``: ``{"prompt": str, "chosen": str, "rejected": str}``. A pair whose ``chosen`` equals
  its ``rejected`` carries no preference: it is dropped, counted and reported with its file:line.
- ``prompts``: ``{"prompt": str}`` or ``{"messages": [...]}`` (the conversation so far).

Chat roles other than ``system``, ``user``, ``assistant``, ``tool``, ``developer`` are kept (a chat
template may know them) but counted and reported with the file:line of the first few.

Sequences are ``[bos] prompt response eos``; labels are ``-100`` on the prompt (loss on response
tokens only). Bad input raises :class:`DataError` naming file, line and field.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UserError

#: The supported plugin API of this module (see README "Plugin API").
__all__ = ["DataError", "Record", "TokenStats", "IGNORE_INDEX", "load_split", "load_records", "data_inputs",
           "dataset_components", "render_prompt", "encode_prompt", "encode_response", "tokenize_sft",
           "tokenize_scored", "collate_sft", "collate_scored", "shift_labels", "pad"]

IGNORE_INDEX = -100
KINDS = ("sft", "reward", "pairwise", "prompts")
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer")
_FIELDS = {
    "sft": ("prompt", "response"),
    "reward": ("prompt", "response", "score"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "prompts": ("prompt",),
}


class DataError(UserError, ValueError):
    """Malformed input data; the message names the file, line and field."""


@dataclass
class Record:
    """One validated example and where it came from (``source`` is ``file:line``)."""

    source: str
    fields: dict[str, Any]


# ----------------------------------------------------------------------------- reading

def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json dataset must be a list of objects, got {type(data).__name__}")
    for i, item in enumerate(data):
        yield f"{path}: record {i}", item


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                record = dict(row)
                if "score" in record and record["score"] not in (None, ""):
                    try:
                        record["score"] = float(record["score"])
                    except ValueError:
                        pass  # left as a string: the field check reports it with its line
                yield f"{path}:{reader.line_num}", record
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {i}", row


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


_SAVED_DATASET = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_saved_dataset(path: str | Path) -> bool:
    """True for a directory written by 🤗 ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return Path(path).is_dir() and any((Path(path) / m).is_file() for m in _SAVED_DATASET)


def _read_saved_dataset(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a ``save_to_disk`` directory, one at a time from the memory-mapped Arrow table."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(f"{path}: reading a saved 🤗 dataset needs the datasets package (pip install -e \".[datasets]\")") from None
    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(data)} (set data.split)")
        data = data[split]
    for i, row in enumerate(data):
        yield f"{path}: row {i}", row


def _read_hub_dataset(name: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a 🤗 hub dataset (``hf:NAME``), streamed; a machine without network gets one line."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"hf:{name}: reading hub datasets needs the datasets package (pip install -e \".[datasets]\")") from None
    if any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise DataError(f"hf:{name}: hub datasets cannot be read while HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; save "
                        "it first with Dataset.save_to_disk(DIR) and set data.train: DIR")
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(name, timeout=10)  # one quick request, instead of the loader's retries
        data = load_dataset(name, split=split, streaming=True)
        rows = iter(data)
        first = next(rows, None)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"hf:{name}: could not load the hub dataset (split {split!r}): {reason}; offline, save it "
                        "first with Dataset.save_to_disk(DIR) and set data.train: DIR") from None
    if first is not None:
        yield f"hf:{name} row 0", first
    for i, row in enumerate(rows, start=1):
        yield f"hf:{name} row {i}", row


def check_data_path(path: str | Path) -> str | None:
    """None when ``path`` is a readable data file of a known format or a saved 🤗 dataset
    directory, else a one-line reason."""
    path = Path(path)
    if is_saved_dataset(path):
        return None
    if path.is_dir():
        return (f"{path}: is a directory; expected a data file ({', '.join(_READERS)}) or a directory written by "
                "Dataset.save_to_disk")
    if not path.exists():
        return f"{path}: no such file"
    if path.suffix.lower() not in _READERS:
        return f"{path}: unknown data format {path.suffix!r}; accepted: {', '.join(_READERS)}"
    if not os.access(path, os.R_OK):
        return f"{path}: permission denied"
    return None


@dataclass
class DataNotes:
    """Legal but suspicious records: counted, with the first few sources, for one warning each."""

    dropped_pairs: list[str] = field(default_factory=list)
    unknown_roles: list[str] = field(default_factory=list)

    def lines(self, where: str) -> list[str]:
        """Warning lines (empty when nothing was suspicious)."""
        out = []
        if self.dropped_pairs:
            out.append(f"{where}: dropped {len(self.dropped_pairs)} pairwise record(s) whose chosen equals rejected "
                       f"(no preference to learn); first: {', '.join(self.dropped_pairs[:3])}")
        if self.unknown_roles:
            out.append(f"{where}: {len(self.unknown_roles)} chat message(s) with a role other than "
                       f"{', '.join(KNOWN_ROLES)}; kept as written; first: {', '.join(self.unknown_roles[:3])}")
        return out


def read_records(path: str | Path, kind: str, notes: DataNotes | None = None, *, fields: dict[str, str] | None = None,
                 split: str = "train") -> list[Record]:
    """Read and validate every record of ``path`` (a data file, a saved 🤗 dataset directory, or
    ``hf:NAME``) for data ``kind``; errors name file, line, field. ``fields`` maps our field names to
    the source's columns (``{prompt: question}``). Suspicious records are counted in ``notes``
    (pairs with chosen == rejected are dropped)."""
    notes = notes if notes is not None else DataNotes()
    if str(path).startswith("hf:"):
        rows = _read_hub_dataset(str(path)[3:], split)
    else:
        problem = check_data_path(path)
        if problem:
            raise DataError(problem)
        path = Path(path)
        rows = _read_saved_dataset(path, split) if is_saved_dataset(path) else _READERS[path.suffix.lower()](path)
    records = [r for where, obj in rows if (r := validate_record(map_fields(obj, fields, where), where, kind, notes))]
    if not records:
        raise DataError(f"{path}: no records (the file is empty)" if not notes.dropped_pairs
                        else f"{path}: no usable records (every pair has chosen == rejected)")
    return records


def map_fields(obj: Any, fields: dict[str, str] | None, where: str) -> Any:
    """A record with the source's columns renamed to our field names (``data.fields``)."""
    if not fields or not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for ours, theirs in fields.items():
        if theirs not in obj:
            raise DataError(f"{where}: no column {theirs!r} (data.fields maps {ours!r} to it); columns: "
                            f"{', '.join(map(str, obj))}")
        out[ours] = obj[theirs]
    return out


def validate_record(obj: Any, where: str, kind: str, notes: DataNotes | None = None) -> Record | None:
    """Check the fields that ``kind`` needs; returns a :class:`Record`, None for a record that is
    dropped (counted in ``notes``), or raises :class:`DataError`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if kind in ("sft", "prompts") and "messages" in obj:
        _check_messages(obj["messages"], where, need_assistant_last=kind == "sft")
        if notes is not None and any(m["role"] not in KNOWN_ROLES for m in obj["messages"]):
            notes.unknown_roles.append(where)
        return Record(where, {"messages": obj["messages"]})
    for name in _FIELDS[kind]:
        if name not in obj or obj[name] is None:
            alt = " (or 'messages')" if kind in ("sft", "prompts") else ""
            raise DataError(f"{where}: missing field {name!r}{alt}; a {kind} record needs {', '.join(_FIELDS[kind])}")
        value = obj[name]
        if name == "score":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"{where}: field 'score' must be a number, got {value!r}")
            if not math.isfinite(value):
                raise DataError(f"{where}: field 'score' must be finite, got {value!r}")
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if kind == "pairwise" and obj["chosen"] == obj["rejected"]:
        if notes is not None:
            notes.dropped_pairs.append(where)
        return None
    return Record(where, {name: obj[name] for name in _FIELDS[kind]})


def _check_messages(messages: Any, where: str, need_assistant_last: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object with string 'role' and 'content'")
    if need_assistant_last and (messages[-1]["role"] != "assistant" or len(messages) < 2):
        raise DataError(f"{where}: field 'messages': the last message must have role 'assistant' (the response) "
                        "and follow at least one other message")


def load_records(spec: str, kind: str, registry: Any, *, seed: int, builtin_size: int,
                 notes: DataNotes | None = None, fields: dict[str, str] | None = None,
                 split: str = "train") -> list[Record]:
    """Records from a file, a saved 🤗 dataset, ``hf:NAME`` or ``builtin:NAME`` (a registered dataset)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        factory = registry.get("dataset", name).obj
        raw = factory(kind, builtin_size, seed)
        records = [validate_record(obj, f"builtin:{name} record {i}", kind, notes) for i, obj in enumerate(raw)]
        return [r for r in records if r is not None]
    return read_records(spec, kind, notes, fields=fields, split=split)


def split_records(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded shuffle, then hold out ``eval_fraction`` (at least one record when there are two or more)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(len(records) * eval_fraction))) if eval_fraction > 0 else 0
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def load_split(data_cfg: Any, kind: str, registry: Any, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, eval) records for a stage's :class:`~rlhf_core.config.DataConfig`."""
    train = load_records(data_cfg.train, kind, registry, seed=seed, builtin_size=data_cfg.builtin_size,
                         fields=data_cfg.fields, split=data_cfg.split)
    if data_cfg.eval:
        held = load_records(data_cfg.eval, kind, registry, seed=seed + 1, builtin_size=max(1, data_cfg.builtin_size // 10),
                            fields=data_cfg.fields, split=data_cfg.eval_split)
    else:
        train, held = split_records(train, data_cfg.eval_fraction, seed)
    if data_cfg.limit is not None:
        train = train[: data_cfg.limit]
    return train, held


def data_inputs(data_cfg: Any, kind: str, path: str = "data") -> list[Any]:
    """The :class:`~rlhf_core.interfaces.StageInput` of a stage's ``train`` (and ``eval``) data."""
    from .interfaces import StageInput

    return [StageInput(f"{path}.{key}", "data", getattr(data_cfg, key), kind, data_cfg.builtin_size, data_cfg.fields,
                       data_cfg.split if key == "train" else data_cfg.eval_split)
            for key in ("train", "eval") if getattr(data_cfg, key)]


def dataset_components(data_cfg: Any, path: str) -> list[tuple[str, Any, str, None]]:
    """The ``builtin:`` datasets a :class:`DataConfig` names, for up-front validation."""
    from .config import ComponentSpec

    out = []
    for key in ("train", "eval"):
        value = getattr(data_cfg, key)
        if isinstance(value, str) and value.startswith("builtin:"):
            out.append(("dataset", ComponentSpec(value.split(":", 1)[1]), f"{path}.{key}", None))
    return out


# ----------------------------------------------------------------------------- tokenising

def render_prompt(tokenizer: Any, fields: dict[str, Any]) -> str:
    """The prompt text: ``prompt`` as is, or ``messages`` through the chat template."""
    if "messages" not in fields:
        return fields["prompt"]
    history = fields["messages"]
    if history and history[-1]["role"] == "assistant" and "response" not in fields:
        history = history[:-1]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "


def response_text(fields: dict[str, Any], key: str = "response") -> str:
    """The response text of an SFT/reward record (last assistant message for chat records)."""
    return fields["messages"][-1]["content"] if "messages" in fields else fields[key]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt ids: the tokenizer's BOS (if it has one) then the text, no EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + list(ids)


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Response ids: the text then EOS."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


@dataclass
class TokenStats:
    """How many examples were seen, cut to length, or skipped (no response token left)."""

    total: int = 0
    truncated: int = 0
    skipped: int = 0
    skipped_sources: list[str] = field(default_factory=list)

    def skip(self, source: str) -> None:
        """Count an example left with no response token, remembering where it came from."""
        self.skipped += 1
        self.skipped_sources.append(source)

    def summary(self) -> dict[str, float]:
        """The counts as stage-summary numbers."""
        return {"examples": float(self.total), "truncated": float(self.truncated), "skipped": float(self.skipped)}

    def describe(self) -> str:
        """One line for the log."""
        text = f"{self.total} examples, {self.truncated} truncated, {self.skipped} skipped (no response token within max_length)"
        if self.skipped_sources:
            text += "; first skipped: " + ", ".join(self.skipped_sources[:3])
        return text


def fit_length(prompt: list[int], response: list[int], max_length: int, max_prompt_length: int | None):
    """Cut to ``max_length``: the prompt keeps its last ``max_prompt_length`` tokens (default half),
    then the response is cut on the right. Returns (prompt, response, truncated)."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    keep = max_prompt_length if max_prompt_length is not None else max_length // 2
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep:]
    return prompt, response[: max(0, max_length - len(prompt))], True


def tokenize_sft(records: list[Record], tokenizer: Any, max_length: int, max_prompt_length: int | None):
    """``[{"input_ids", "labels"}]`` with prompt labels masked, plus :class:`TokenStats`."""
    stats, out = TokenStats(), []
    for rec in records:
        stats.total += 1
        prompt = encode_prompt(tokenizer, render_prompt(tokenizer, rec.fields))
        response = encode_response(tokenizer, response_text(rec.fields))
        prompt, response, cut = fit_length(prompt, response, max_length, max_prompt_length)
        stats.truncated += cut
        if not response:
            stats.skip(rec.source)
            continue
        out.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    return out, stats


def tokenize_scored(records: list[Record], tokenizer: Any, max_length: int, max_prompt_length: int | None,
                    response_keys: tuple[str, ...] = ("response",)):
    """Scored or pairwise data: ``[{"<key>_ids": ..., "<key>_labels": ..., "score"?: float}]`` for each
    response key (``("chosen", "rejected")`` for pairwise records), plus stats. Labels are ``-100``
    on the prompt, so a stage can take response log-probs (DPO) as well as scores."""
    stats, out = TokenStats(), []
    for rec in records:
        stats.total += 1
        prompt = encode_prompt(tokenizer, render_prompt(tokenizer, rec.fields))
        item: dict[str, Any] = {}
        for key in response_keys:
            p, r, cut = fit_length(prompt, encode_response(tokenizer, rec.fields[key]), max_length, max_prompt_length)
            stats.truncated += cut
            item[f"{key}_ids"] = p + r
            item[f"{key}_labels"] = [IGNORE_INDEX] * len(p) + r
            if not r:
                item = {}
                break
        if not item:
            stats.skip(rec.source)
            continue
        if "score" in rec.fields:
            item["score"] = float(rec.fields["score"])
        out.append(item)
    return out, stats


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad integer sequences to one ``[B, T]`` tensor (right padding unless ``left``)."""
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


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
