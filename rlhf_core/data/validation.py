"""Record formats and their validation: the fields each kind needs, chat ``messages``, column
mapping (``data.fields``), the prompt/response split of every accepted form (:func:`record_turns`),
and the notes kept on what was dropped or unusual.

Every kind takes the standard form (strings) and the conversational form (lists of ``{role,
content}`` messages), the formats TRL and the Hugging Face hub use:

- ``prompts``: ``{"prompt": str | [messages]}`` or ``{"messages": [...]}`` (a final assistant
  message, if any, is left out: it is the response of an sft record used as a prompt).
- ``sft``: ``{"prompt", "response" | "completion"}`` (``response`` is read when a record has both)
  or ``{"messages": [...]}`` (read when a record also has ``prompt``); ``reward``: the
  same plus ``"score"``; ``unpaired``: the same plus ``"label"`` (true: desirable).
- ``pairwise``: ``{"prompt", "chosen", "rejected"}`` or, with the prompt inside each side
  (implicit prompt), ``{"chosen", "rejected"}``.

A conversational record is one conversation per response: the response is its final message,
which must be the assistant's, and the prompt is every message before it (earlier assistant turns
included, never trained on). ``{"prompt": [user], "completion": [assistant]}`` is the conversation
``[user, assistant]``, exactly as ``{"messages": [user, assistant]}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError

IGNORE_INDEX = -100
KINDS = ("sft", "reward", "pairwise", "unpaired", "prompts")
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer")
#: The response keys of each kind's :class:`Turns` (``completion`` and ``messages`` records fill ``response``).
RESPONSE_KEYS = {"sft": ("response",), "reward": ("response",), "unpaired": ("response",),
                 "pairwise": ("chosen", "rejected"), "prompts": ()}
#: The fields a record of each kind keeps (beside the fields a component reads).
_KEPT = {"sft": ("prompt", "response", "completion", "messages"),
         "reward": ("prompt", "response", "completion", "messages", "score"),
         "unpaired": ("prompt", "response", "completion", "messages", "label"),
         "pairwise": ("prompt", "chosen", "rejected"),
         "prompts": ("prompt", "messages")}
#: What a record of each kind needs, for the error messages.
NEEDS = {
    "sft": "prompt and response (or completion), or messages",
    "reward": "prompt, response (or completion) and score, or messages and score",
    "unpaired": "prompt, completion (or response) and label, or messages and label",
    "pairwise": "prompt, chosen and rejected, or chosen and rejected that hold the prompt",
    "prompts": "prompt (text or messages), or messages",
}


@dataclass
class Record:
    """One validated example and where it came from (``source`` is ``file:line``)."""

    source: str
    fields: dict[str, Any]


@dataclass
class Turns:
    """A record split into its prompt and responses, in one of two forms: standard (``prompt`` a
    string, each response a string) or conversational (``prompt`` the messages before the response,
    each response one assistant message ``{"role": "assistant", "content": ...}``).

    ``responses`` maps the kind's response keys (:data:`RESPONSE_KEYS`) to the responses;
    ``names`` maps them to the record's field that held each one (``completion``, ``messages``,
    ...), for error messages."""

    prompt: str | list[dict]
    responses: dict[str, str | dict] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        """True for lists of messages, False for strings."""
        return isinstance(self.prompt, list)


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
    "response": ("answer", "output", "target", "solution"),
    "score": ("rating", "reward", "label"),
    "label": ("desirable", "kto_label"),
    "chosen": ("preferred", "winner", "positive"),
    "rejected": ("dispreferred", "loser", "negative"),
    "messages": ("conversations", "conversation", "chat", "dialog"),
}


def _mapping_hint(name: str, obj: dict, kind: str = "") -> str:
    """``; the record has a 'answer' field: map it with data.fields: {response: answer}`` when
    the record has a column other datasets use for ``name``, else ``""``; a record that looks like
    another kind's preference data says so instead."""
    other = _looks_like(obj, kind)
    if other:
        return f"; {other}"
    found = next((alias for alias in FIELD_ALIASES.get(name, ()) if alias in obj), None)
    if found is None:
        return ""
    return f"; the record has a {found!r} field: map it with data.fields: {{{name}: {found}}}"


def _a(kind: str) -> str:
    """``a sft``, ``an unpaired``: the kind with its article."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _looks_like(obj: dict, kind: str) -> str:
    """``the record looks like ...`` for preference data of another kind than ``kind``, or ``""``."""
    if kind != "unpaired" and isinstance(obj.get("label"), bool) and "chosen" not in obj:
        return ("the record looks like unpaired preference data (a completion with a true/false label), which an "
                f"unpaired consumer (the kto stage) reads, not {_a(kind)} one")
    if kind != "pairwise" and "chosen" in obj and "rejected" in obj:
        return ("the record looks like pairwise preference data (chosen, rejected), which a pairwise consumer (the "
                f"reward stage's pairwise loss, the dpo stage) reads, not {_a(kind)} one")
    return ""


def validate_record(obj: Any, where: str, kind: str, notes: DataNotes | None = None,
                    extra: dict[str, str] | None = None) -> Record | None:
    """Check the fields that ``kind`` needs (in any of its forms, see :func:`record_turns`), and the
    ``extra`` fields a component reads (``{field: who reads it}``, e.g. ``{"answer": "reward
    'math'"}``: kept as they are, any JSON value but null); returns a :class:`Record`, None for a
    record that is dropped (a pair whose sides are equal, counted in ``notes``), or raises
    :class:`DataError`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kept = {}
    for name, reader in (extra or {}).items():
        if obj.get(name) is None:
            raise DataError(f"{where}: missing field {name!r}, which {reader} reads; the record has "
                            f"{', '.join(map(str, obj)) or 'no fields'} (map another column with data.fields: "
                            f"{{{name}: COLUMN}})")
        kept[name] = obj[name]
    turns = record_turns(obj, kind, where)
    if kind == "reward":
        _check_score(obj, where)
    if kind == "unpaired":
        _check_label(obj, where)
    if kind == "pairwise" and turns.responses["chosen"] == turns.responses["rejected"]:
        if notes is not None:
            notes.dropped_pairs.append(where)
        return None
    if notes is not None and turns.conversational:
        messages = [*turns.prompt, *turns.responses.values()]
        if any(m["role"] not in KNOWN_ROLES for m in messages):
            notes.unknown_roles.append(where)
    return Record(where, {**kept, **{name: obj[name] for name in _KEPT[kind] if obj.get(name) is not None}})


def _check_score(obj: dict, where: str) -> None:
    if obj.get("score") is None:
        raise DataError(f"{where}: missing field 'score'; a reward record needs {NEEDS['reward']}"
                        f"{_mapping_hint('score', obj, 'reward')}")
    value = obj["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field 'score' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise DataError(f"{where}: field 'score' must be finite, got {value!r}")


def _check_label(obj: dict, where: str) -> None:
    if obj.get("label") is None:
        raise DataError(f"{where}: missing field 'label' (true: a desirable completion, false: an undesirable one); "
                        f"an unpaired record needs {NEEDS['unpaired']}{_mapping_hint('label', obj, 'unpaired')}")
    if not isinstance(obj["label"], bool):
        raise DataError(f"{where}: field 'label' must be true (a desirable completion) or false (an undesirable "
                        f"one), got {obj['label']!r}")


def record_turns(fields: dict[str, Any], kind: str, where: str = "record") -> Turns:
    """The prompt and responses of a record of ``kind`` (see the module docstring for the forms);
    raises :class:`DataError` naming ``where`` and the field for a record that fits no form.

    Pairwise records: with ``prompt``, each side is the prompt's continuation; without it, each side
    holds the prompt. Conversational sides must share every message but their final assistant one
    (the prompt is those shared messages; TRL takes their longest common prefix instead, which
    would train on differing earlier turns). Plain strings without a prompt are split by
    :func:`split_common_prefix`."""
    if kind == "prompts":
        return Turns(_prompt_only(fields, where))
    if kind == "pairwise":
        return _pair(fields, where)
    if kind not in RESPONSE_KEYS:
        raise DataError(f"{where}: unknown data kind {kind!r}; accepted: {', '.join(KINDS)}")
    return _single(fields, kind, where)


def _prompt_only(obj: dict, where: str) -> str | list[dict]:
    if obj.get("messages") is not None:  # as in sft records, ``messages`` wins over ``prompt``
        messages = obj["messages"]
        _check_messages(messages, "messages", where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where}: field 'messages': no message before the final assistant one to prompt with")
        return messages
    if obj.get("prompt") is None:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages'); a prompts record needs {NEEDS['prompts']}"
                        f"{_mapping_hint('prompt', obj, 'prompts')}")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        _check_messages(prompt, "prompt", where)
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__} (or a list of "
                        "{role, content} messages)")
    return prompt


def _single(obj: dict, kind: str, where: str) -> Turns:
    """sft, reward and unpaired records: one response."""
    if obj.get("messages") is not None:
        messages = obj["messages"]
        _check_messages(messages, "messages", where)
        return _conversation(messages, "messages", where, kind)
    if obj.get("prompt") is None:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages'); {_a(kind)} record needs {NEEDS[kind]}"
                        f"{_mapping_hint('prompt', obj, kind)}")
    name = "response" if obj.get("response") is not None else "completion"
    if obj.get(name) is None:
        wanted = "'completion' (or 'response', or 'messages')" if kind == "unpaired" else "'response' (or 'messages')"
        raise DataError(f"{where}: missing field {wanted}; {_a(kind)} record needs {NEEDS[kind]}"
                        f"{_mapping_hint('response', obj, kind)}")
    prompt, response = obj["prompt"], obj[name]
    if isinstance(prompt, str) and isinstance(response, str):
        if kind == "unpaired" and not response:
            raise DataError(f"{where}: field {name!r} is empty; an unpaired record needs a completion to judge")
        return Turns(prompt, {"response": response}, {"response": name})
    _same_form(prompt, response, name, where)
    _check_messages(prompt, "prompt", where)
    _check_messages(response, name, where)
    return _conversation(prompt + response, name, where, kind)


def _conversation(messages: list[dict], name: str, where: str, kind: str) -> Turns:
    """Prompt = every message before the last, response = the last (the assistant's)."""
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(f"{where}: field {name!r}: the last message must have role 'assistant' (the response) "
                        f"and follow at least one other message; {_a(kind)} record needs {NEEDS[kind]}")
    if kind == "unpaired" and not messages[-1]["content"]:
        raise DataError(f"{where}: field {name!r}: the assistant message is empty; an unpaired record needs a "
                        "completion to judge")
    return Turns(messages[:-1], {"response": messages[-1]}, {"response": name})


def _pair(obj: dict, where: str) -> Turns:
    for side in ("chosen", "rejected"):
        if obj.get(side) is None:
            raise DataError(f"{where}: missing field {side!r}; a pairwise record needs {NEEDS['pairwise']}"
                            f"{_mapping_hint(side, obj, 'pairwise')}")
        if obj[side] in ("", []):
            raise DataError(f"{where}: field {side!r} is empty; a pairwise record needs a non-empty chosen and "
                            "rejected response")
    chosen, rejected = obj["chosen"], obj["rejected"]
    names = {"chosen": "chosen", "rejected": "rejected"}
    prompt = obj.get("prompt")
    if prompt is not None:
        if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
            return Turns(prompt, {"chosen": chosen, "rejected": rejected}, names)
        for side, value in (("chosen", chosen), ("rejected", rejected)):
            _same_form(prompt, value, side, where)
        _check_messages(prompt, "prompt", where)
        _check_messages(chosen, "chosen", where)
        _check_messages(rejected, "rejected", where)
        return _shared_prompt(prompt + chosen, prompt + rejected, where)
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, sides = split_common_prefix(chosen, rejected)
        return Turns(prompt, dict(zip(("chosen", "rejected"), sides)), names)
    _same_form(chosen, rejected, "rejected", where, like="chosen")
    _check_messages(chosen, "chosen", where)
    _check_messages(rejected, "rejected", where)
    return _shared_prompt(chosen, rejected, where)


def _shared_prompt(chosen: list[dict], rejected: list[dict], where: str) -> Turns:
    """Two conversations that differ only in their final assistant message."""
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field {side!r}: the last message must have role 'assistant' (the response); "
                            f"a pairwise record needs {NEEDS['pairwise']}")
        if not messages[-1]["content"]:
            raise DataError(f"{where}: field {side!r}: the assistant message is empty; a pairwise record needs a "
                            "non-empty chosen and rejected response")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their final assistant message; both "
                        "sides of a pair share every earlier message (the prompt) and differ only in the response")
    if not chosen[:-1]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected': no message before the final assistant one (the "
                        "prompt); give a 'prompt' field or start each side with the prompt's messages")
    return Turns(chosen[:-1], {"chosen": chosen[-1], "rejected": rejected[-1]}, {"chosen": "chosen", "rejected": "rejected"})


def split_common_prefix(chosen: str, rejected: str) -> tuple[str, tuple[str, str]]:
    """``(prompt, (chosen response, rejected response))`` of two texts that hold their prompt
    (``{"chosen": str, "rejected": str}``): the prompt is their longest common prefix, cut back to
    just before its last whitespace character, so that it never ends inside a word and each
    response starts with the whitespace before its first word (``"Q: hi A: yes"`` / ``"Q: hi A:
    no"`` -> ``"Q: hi A:"``, ``" yes"`` / ``" no"``); with no whitespace in the common prefix the
    prompt is empty. TRL cuts at the first differing character instead (``"...A: y"`` would keep a
    shared first letter in the prompt, and a token would be split there)."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = next((i for i in range(common - 1, -1, -1) if chosen[i].isspace()), 0)
    return chosen[:cut], (chosen[cut:], rejected[cut:])


def _same_form(prompt: Any, response: Any, name: str, where: str, like: str = "prompt") -> None:
    """Both strings or both lists of messages, else a DataError naming the field."""
    if isinstance(prompt, list) and isinstance(response, list):
        return
    if isinstance(prompt, list):
        raise DataError(f"{where}: field {name!r} must be a list of {{role, content}} messages like {like!r} (a "
                        f"conversational record), got {type(response).__name__}")
    if isinstance(prompt, str) and isinstance(response, list):
        raise DataError(f"{where}: field {like!r} must be a list of {{role, content}} messages like {name!r} (a "
                        f"conversational record), got a string; give both as strings or both as messages")
    bad, value = (like, prompt) if not isinstance(prompt, str) else (name, response)
    raise DataError(f"{where}: field {bad!r} must be a string, got {type(value).__name__} (or, in a conversational "
                    "record, a list of {role, content} messages)")


def _check_messages(messages: Any, name: str, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{name}[{i}]' must be an object with string 'role' and 'content'")
