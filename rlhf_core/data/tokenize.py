"""Tokenising: prompt rendering (chat templates), prompt/response encoding, length rules with
truncation statistics, and the SFT / scored-record tokenisers (labels ``-100`` on the prompt)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .records import IGNORE_INDEX, Record


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
