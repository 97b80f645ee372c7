"""Record formats and their validation: the fields each kind needs, chat ``messages``, column
mapping (``data.fields``), and the notes kept on what was dropped or unusual."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

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


#: Column names other datasets use for our fields, for the hint that maps them with ``data.fields``.
FIELD_ALIASES = {
    "prompt": ("question", "instruction", "query", "input", "problem"),
    "response": ("completion", "answer", "output", "target", "solution"),
    "score": ("rating", "reward", "label"),
    "chosen": ("preferred", "winner", "positive"),
    "rejected": ("dispreferred", "loser", "negative"),
    "messages": ("conversations", "conversation", "chat", "dialog"),
}


def _mapping_hint(name: str, obj: dict) -> str:
    """``; the record has a 'completion' field: map it with data.fields: {response: completion}`` when
    the record has a column other datasets use for ``name``, else ``""``."""
    found = next((alias for alias in FIELD_ALIASES.get(name, ()) if alias in obj), None)
    if found is None:
        return ""
    return f"; the record has a {found!r} field: map it with data.fields: {{{name}: {found}}}"


def validate_record(obj: Any, where: str, kind: str, notes: DataNotes | None = None,
                    extra: dict[str, str] | None = None) -> Record | None:
    """Check the fields that ``kind`` needs, and the ``extra`` fields a component reads (``{field:
    who reads it}``, e.g. ``{"answer": "reward 'math'"}``: kept as they are, any JSON value but
    null); returns a :class:`Record`, None for a record that is dropped (counted in ``notes``), or
    raises :class:`DataError`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kept = {}
    for name, reader in (extra or {}).items():
        if obj.get(name) is None:
            raise DataError(f"{where}: missing field {name!r}, which {reader} reads; the record has "
                            f"{', '.join(map(str, obj)) or 'no fields'} (map another column with data.fields: "
                            f"{{{name}: COLUMN}})")
        kept[name] = obj[name]
    if kind in ("sft", "prompts") and "messages" in obj:
        _check_messages(obj["messages"], where, need_assistant_last=kind == "sft")
        if notes is not None and any(m["role"] not in KNOWN_ROLES for m in obj["messages"]):
            notes.unknown_roles.append(where)
        return Record(where, {**kept, "messages": obj["messages"]})
    for name in _FIELDS[kind]:
        if name not in obj or obj[name] is None:
            alt = " (or 'messages')" if kind in ("sft", "prompts") else ""
            raise DataError(f"{where}: missing field {name!r}{alt}; a {kind} record needs {', '.join(_FIELDS[kind])}"
                            f"{_mapping_hint(name, obj)}")
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
    return Record(where, {**kept, **{name: obj[name] for name in _FIELDS[kind]}})


def _check_messages(messages: Any, where: str, need_assistant_last: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object with string 'role' and 'content'")
    if need_assistant_last and (messages[-1]["role"] != "assistant" or len(messages) < 2):
        raise DataError(f"{where}: field 'messages': the last message must have role 'assistant' (the response) "
                        "and follow at least one other message")
