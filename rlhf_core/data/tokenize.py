"""Tokenising: prompt rendering (chat templates, ``data.chat_template``), prompt/response encoding,
length rules with truncation statistics, and the SFT / scored / unpaired tokenisers (labels
``-100`` on the prompt).

A record's prompt and responses (:func:`~rlhf_core.data.validation.record_turns`) become text in one
of three ways, chosen by :class:`Rendering`:

- plain strings: the prompt as written, the response as written followed by EOS;
- through the tokenizer's chat template: prompt = ``template(messages before the response,
  add_generation_prompt=True)``; response = ``template(the whole conversation)`` minus that prompt
  text, i.e. the assistant's content and whatever the template closes its turn with (ChatML's
  ``<|im_end|>\\n``), followed by EOS when the template put no EOS token there. A template that
  renders the earlier turns differently once the response is added (the prompt text is not a
  prefix of the whole conversation's text) is an error naming the record;
- the fallback for conversational records without a template (or with ``never``): ``"<role>:
  <content>\\n"`` per message then ``"assistant: "``; the response is the assistant's content and EOS.

The prompt and the response text are encoded separately and concatenated, so the prompt's tokens
are exactly those a sampler is given for the same prompt (:func:`render_prompt`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ..errors import DataError
from .validation import IGNORE_INDEX, RESPONSE_KEYS, Record, Turns, record_turns

#: The values of ``data.chat_template`` and ``--chat-template``.
CHAT_TEMPLATE_MODES = ("auto", "always", "never")


@dataclass
class Rendering:
    """How records become text for a tokenizer (``data.chat_template`` and where it applies).

    ``chat_template``: ``auto`` renders conversational records with the tokenizer's chat template
    (the ``role: content`` fallback when it has none) and plain strings as written; ``always`` also
    wraps plain strings, the prompt as one user message and each response as the assistant's, and
    renders them with the template (a tokenizer without one is an error naming ``model``);
    ``never`` uses no template (conversational records get the fallback). Under ``auto``, plain
    strings meeting a tokenizer that has a template print one notice, once per :class:`Rendering`,
    through ``echo`` (None: silent), starting with ``where`` and naming the setting ``option``."""

    chat_template: Literal["auto", "always", "never"] = "auto"
    where: str = "data"
    model: str = "the model"
    option: str = "data.chat_template"
    echo: Callable[[str], None] | None = print
    noticed: bool = field(default=False, repr=False)

    def resolve(self, tokenizer: Any, turns: Turns) -> tuple[Turns, bool]:
        """``(turns, use_template)``: plain strings wrapped as messages under ``always``, and whether
        the chat template renders them."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise DataError(f"{self.option}: unknown value {self.chat_template!r}; accepted: {', '.join(CHAT_TEMPLATE_MODES)}")
        if self.chat_template == "always" and not has_template:
            raise DataError(f"{self.option}: always needs a chat template, and the tokenizer of {self.model} has none; "
                            "use auto or never (plain text as written, messages as 'role: content' lines)")
        if turns.conversational:
            return turns, has_template and self.chat_template != "never"
        if self.chat_template == "always":
            return as_conversation(turns), True
        if has_template and self.chat_template == "auto" and not self.noticed and self.echo is not None:
            self.noticed = True
            self.echo(f"{self.where}: plain-text prompts go to {self.model} as written, without its chat template; "
                      f"set {self.option} to always to wrap each one as a user message and apply the template "
                      "(never: no template and no notice)")
        return turns, False


def as_conversation(turns: Turns) -> Turns:
    """Plain strings as a conversation: the prompt one user message, each response the assistant's."""
    return Turns([{"role": "user", "content": turns.prompt}],
                 {key: {"role": "assistant", "content": text} for key, text in turns.responses.items()}, turns.names)


def role_lines(messages: list[dict], eos: str = "") -> str:
    """The fallback rendering of a conversation without a chat template: ``"<role>: <content>\\n"``
    per message, then ``"assistant: "``. With ``eos`` (the tokenizer's EOS text) an earlier assistant
    message ends with it instead of the newline, as the model produced it (a response is its content
    then EOS), so a multi-turn episode's context and a multi-turn record's prompt read alike (and no
    whitespace follows the EOS for a tokenizer to strip)."""
    return "".join(f"{m['role']}: {m['content']}" + (eos if m["role"] == "assistant" and eos else "\n")
                   for m in messages) + "assistant: "


def apply_template(tokenizer: Any, messages: list[dict], source: str, add_generation_prompt: bool,
                   tools: list[dict] | None = None) -> str:
    """The tokenizer's chat template over ``messages`` (and the tools' JSON schemas) as text; what
    the template raises becomes a :class:`DataError` naming ``source``."""
    try:
        if tools:
            return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # a template raises what it likes (jinja2 errors, raise_exception(...))
        raise DataError(f"{source}: the tokenizer's chat template refused the conversation: {exc}") from None


def _prompt_text(tokenizer: Any, turns: Turns, use_template: bool, source: str) -> str:
    if not turns.conversational:
        return turns.prompt
    if use_template:
        return apply_template(tokenizer, turns.prompt, source, add_generation_prompt=True)
    return role_lines(turns.prompt, getattr(tokenizer, "eos_token", None) or "")


def render_prompt(tokenizer: Any, fields: dict[str, Any], rendering: Rendering | None = None,
                  source: str = "record") -> str:
    """The prompt text of a record of any kind (``prompt`` text or messages, ``messages`` without a
    final assistant message, or the prompt a pair's sides share), rendered as ``rendering`` says
    (default: ``auto`` without the notice); ``source`` names the record in errors."""
    kind = "pairwise" if "chosen" in fields and "rejected" in fields and "messages" not in fields else "prompts"
    rendering = rendering if rendering is not None else Rendering(echo=None)
    turns, use_template = rendering.resolve(tokenizer, record_turns(fields, kind, source))
    return _prompt_text(tokenizer, turns, use_template, source)


def encode_turns(tokenizer: Any, turns: Turns, rendering: Rendering | None = None,
                 source: str = "record") -> tuple[list[int], dict[str, list[int]]]:
    """``(prompt ids, {response key: response ids})`` of a record's :class:`Turns` (see the module
    docstring for the three renderings); ``source`` names the record in errors."""
    rendering = rendering if rendering is not None else Rendering(echo=None)
    turns, use_template = rendering.resolve(tokenizer, turns)
    prompt = _prompt_text(tokenizer, turns, use_template, source)
    responses = {}
    for key, response in turns.responses.items():
        if not turns.conversational:
            responses[key] = encode_response(tokenizer, response)
        elif not use_template:
            responses[key] = encode_response(tokenizer, response["content"])
        else:
            whole = apply_template(tokenizer, [*turns.prompt, response], source, add_generation_prompt=False)
            if not whole.startswith(prompt):
                raise DataError(
                    f"{source}: field {turns.names.get(key, key)!r}: the chat template renders the messages before the "
                    "final assistant message differently once that message is added (the prompt rendered with "
                    "add_generation_prompt=True is not the start of the whole conversation), so the response's tokens "
                    f"cannot be told from the prompt's; use a template that leaves earlier turns as they are, or "
                    f"{rendering.option} never")
            ids = list(tokenizer(whole[len(prompt):], add_special_tokens=False)["input_ids"])
            eos = tokenizer.eos_token_id
            responses[key] = ids if eos is None or eos in ids else ids + [eos]
    return encode_prompt(tokenizer, prompt), responses


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt ids: the tokenizer's BOS (if it has one and the text, e.g. a chat template's, does not
    start with it already) then the text, no EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    bos_text = getattr(tokenizer, "bos_token", None)
    if bos is None or (bos_text and text.startswith(bos_text)):
        return list(ids)
    return [bos] + list(ids)


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


def fit_prompt(tokenizer: Any, text: str, budget: int) -> tuple[list[int], bool]:
    """``(ids, truncated)``: :func:`encode_prompt` of ``text`` within ``budget`` tokens; a longer
    prompt keeps its BOS (when it starts with one) and its last tokens (:func:`fit_length`)."""
    ids = encode_prompt(tokenizer, text)
    if len(ids) <= budget:
        return ids, False
    bos_id = getattr(tokenizer, "bos_token_id", None)
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    kept, _, _ = fit_length(ids[len(head):], [], budget - len(head), budget - len(head))
    return head + kept, True


def _tokenized(records: list[Record], kind: str, tokenizer: Any, max_length: int, max_prompt_length: int | None,
               rendering: Rendering | None, stats: TokenStats):
    """Per record: ``(record, {key: (ids, labels)})`` cut to length, or None when a response lost every token."""
    rendering = rendering if rendering is not None else Rendering()
    for rec in records:
        stats.total += 1
        prompt, responses = encode_turns(tokenizer, record_turns(rec.fields, kind, rec.source), rendering, rec.source)
        sides = {}
        for key, response in responses.items():
            p, r, cut = fit_length(prompt, response, max_length, max_prompt_length)
            stats.truncated += cut
            if not r:
                sides = None
                break
            sides[key] = (p + r, [IGNORE_INDEX] * len(p) + r)
        if sides is None:
            stats.skip(rec.source)
            continue
        yield rec, sides


def tokenize_sft(records: list[Record], tokenizer: Any, max_length: int, max_prompt_length: int | None,
                 rendering: Rendering | None = None):
    """``[{"input_ids", "labels"}]`` with prompt labels masked, plus :class:`TokenStats`; any sft
    form (prompt/response, prompt/completion, messages), rendered as ``rendering`` says (default
    ``auto``)."""
    stats = TokenStats()
    out = [{"input_ids": ids, "labels": labels}
           for _, sides in _tokenized(records, "sft", tokenizer, max_length, max_prompt_length, rendering, stats)
           for ids, labels in sides.values()]
    return out, stats


def tokenize_scored(records: list[Record], tokenizer: Any, max_length: int, max_prompt_length: int | None,
                    response_keys: tuple[str, ...] = ("response",), rendering: Rendering | None = None):
    """Scored or pairwise data: ``[{"<key>_ids": ..., "<key>_labels": ..., "score"?: float}]`` for each
    response key (``("chosen", "rejected")`` for pairwise records, any of their forms), plus stats.
    Labels are ``-100`` on the prompt, so a stage can take response log-probs (DPO) as well as
    scores. A pair one of whose sides loses every response token to ``max_length`` is skipped."""
    kind = "pairwise" if tuple(response_keys) == RESPONSE_KEYS["pairwise"] else "reward"
    stats, out = TokenStats(), []
    for rec, sides in _tokenized(records, kind, tokenizer, max_length, max_prompt_length, rendering, stats):
        item: dict[str, Any] = {}
        for key in response_keys:
            item[f"{key}_ids"], item[f"{key}_labels"] = sides[key]
        if "score" in rec.fields:
            item["score"] = float(rec.fields["score"])
        out.append(item)
    return out, stats


def tokenize_unpaired(records: list[Record], tokenizer: Any, max_length: int, max_prompt_length: int | None,
                      rendering: Rendering | None = None):
    """Unpaired preference data (kind ``unpaired``, for KTO): ``[{"ids", "labels", "desirable"}]``,
    labels ``-100`` on the prompt, ``desirable`` the record's ``label`` (bool), plus stats."""
    stats = TokenStats()
    out = [{"ids": ids, "labels": labels, "desirable": bool(rec.fields["label"])}
           for rec, sides in _tokenized(records, "unpaired", tokenizer, max_length, max_prompt_length, rendering, stats)
           for ids, labels in sides.values()]
    return out, stats
