"""Built-in ``judge`` reward: a generative judge from a local causal LM.

The judge reads a prompt template filled with the prompt, the response and any fields of the
prompt's record, and the reward is the probability it gives to a verdict token next:

    r = p(positive) / (p(positive) + p(negative))   when ``negative`` is set (default),
    r = p(positive)                                  when ``negative`` is null,

where ``p`` is the softmax over the whole vocabulary of the judge's logits at the last position
of the rendered template. Only that position is scored: the last hidden state meets the LM head's
rows of the two verdict tokens (or the full vocabulary row when ``negative`` is null), never
``[B, T, V]``. (The verdict options are ``positive`` / ``negative``, not ``yes`` / ``no``: YAML
reads unquoted ``yes`` and ``no`` as booleans.)
"""
from __future__ import annotations

import inspect
import string
from pathlib import Path
from typing import Any

import torch

from rlhf_core import distributed as dist_utils
from rlhf_core import hookimpl
from rlhf_core.data import encode_prompt, pad
from rlhf_core import StageError
from rlhf_core.models import check_model_source, linear_head, plain_model, with_last_hidden
from rlhf_core import is_main_process

DEFAULT_TEMPLATE = ("Question: {prompt}\nAnswer: {response}\n\n"
                    "Is the answer above correct and helpful? Reply Yes or No.\nVerdict:")
DEFAULT_MODEL = "base"
DEFAULT_POSITIVE = " Yes"
DEFAULT_NEGATIVE = " No"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 1024
#: Placeholders every template may use besides the record's own fields.
BUILTIN_PLACEHOLDERS = ("prompt", "response")


def template_placeholders(template: str) -> tuple[str, ...]:
    """The names of ``template``'s ``str.format`` placeholders, in first-use order, without
    repeats. Raises ``ValueError`` for a malformed template, a positional placeholder (``{}``,
    ``{0}``), attribute or index access (``{answer.x}``, ``{answer[0]}``), or no ``{response}``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"judge: template is not a valid str.format template ({exc}); write a literal brace as "
                         "{{ or }}") from None
    names: list[str] = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if spec and any(inner for _, inner, _, _ in string.Formatter().parse(spec) if inner is not None):
            raise ValueError(f"judge: template placeholder {{{name}:{spec}}} nests another placeholder; not supported")
        if not name.isidentifier():
            raise ValueError(f"judge: template placeholder {{{name}}} is not a field name; use {{prompt}}, "
                             "{response} or {FIELD} (a field of the prompt record), and {{ }} for literal braces")
        if name not in names:
            names.append(name)
    if "response" not in names:
        raise ValueError("judge: template has no {response} placeholder; the judge would never see the response")
    return tuple(names)


class JudgeReward:
    """A generative judge: the probability a local causal LM gives to a verdict token.

    Options: ``model`` (an init source: ``base``, ``@STAGE`` or a directory / hub id; the judge
    is loaded frozen on the run's device and sharded like any frozen model), ``template`` (a
    ``str.format`` template with ``{response}``, optionally ``{prompt}`` and any ``{FIELD}`` of the
    prompt record: those fields are this reward's :attr:`fields`), ``positive`` / ``negative`` (the
    verdict texts; ``negative: null`` scores ``p(positive)`` alone), ``batch_size`` (sequences per forward) and
    ``max_length`` (template tokens kept; longer ones lose their beginning, BOS kept, so the verdict
    position stays at the end).

    Each verdict must be exactly ONE token of the judge's tokenizer (tokenised alone, no special
    tokens): a multi-token verdict is refused when the reward is built, with its tokenization in
    the message, rather than scored by a prefix that could mean something else (e.g. a byte-level
    tokenizer splits ``" Yes"`` into ``" "``, ``"Y"``, ...; use ``"Y"`` / ``"N"`` there).

    The template is rendered as plain text (BOS, if the tokenizer has one, then the text): for a
    chat judge write its chat format into the template. Sequences are left-padded, with position ids
    counted from each row's first real token, so the last column is every row's last real token and
    padding does not change a score.
    """

    def __init__(self, ctx, *, model: str = DEFAULT_MODEL, template: str = DEFAULT_TEMPLATE,
                 positive: str = DEFAULT_POSITIVE, negative: str | None = DEFAULT_NEGATIVE, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: int = DEFAULT_MAX_LENGTH):
        self.check_options(model=model, template=template, positive=positive, negative=negative, batch_size=batch_size,
                           max_length=max_length)
        source = ctx.init_source(model, "policy")
        self.stage, self.tokenizer = ctx.name, ctx.tokenizer_for(source)
        # fail on the verdicts before the weights load
        self.verdict_ids = [self._verdict_id(positive, "positive")] + (
            [self._verdict_id(negative, "negative")] if negative is not None else [])
        if len(self.verdict_ids) == 2 and self.verdict_ids[0] == self.verdict_ids[1]:
            raise StageError(f"stage {ctx.name!r}: judge: positive {positive!r} and negative {negative!r} are the same "
                             f"token of the judge's tokenizer ({source})")
        if is_main_process():
            verdict = (f"p({positive!r}) / (p({positive!r}) + p({negative!r}))" if negative is not None
                       else f"p({positive!r})")
            print(f"{ctx.name}: reward = judge {source}, scoring {verdict}")
        self.model = ctx.load_model(model, trainable=False)
        self.head = linear_head(self.model)[0]  # None: the head is not a plain linear layer, logits are computed
        self.keep_last = "logits_to_keep" in inspect.signature(plain_model(self.model).forward).parameters
        self.template, self.device = template, ctx.device
        self.batch_size, self.max_length = batch_size, max_length
        self.placeholders = template_placeholders(template)

    @staticmethod
    def fields(*, template: str = DEFAULT_TEMPLATE, **_options: Any) -> tuple[str, ...]:
        """The prompt-record fields the reward needs: the template's placeholders other than
        ``{prompt}`` and ``{response}`` (called with the reward's options)."""
        return tuple(n for n in template_placeholders(template) if n not in BUILTIN_PLACEHOLDERS)

    @staticmethod
    def check_options(*, model: str, template: str, positive: str,
                      negative: str | None, batch_size: int,
                      max_length: int) -> None:
        """Called before anything trains: the template's placeholders, non-empty distinct verdicts,
        positive sizes, and a local ``model`` directory that exists (hub ids are checked when the
        judge loads)."""
        if not isinstance(template, str):
            raise ValueError(f"judge: template must be a string, got {type(template).__name__}")
        template_placeholders(template)
        if not isinstance(model, str) or not model:
            raise ValueError("judge: model must be base, @STAGE, a model directory or a hub id")
        if model == "auto":
            raise ValueError("judge: model 'auto' would pick the latest policy; name the judge: base, @STAGE, a "
                             "model directory or a hub id")
        if not model.startswith("@") and model != "base" and (Path(model).expanduser().exists()
                                                              or model.startswith(("/", ".", "~"))):
            problem = check_model_source(model)
            if problem:
                raise ValueError(f"judge: model {problem}")
        for name, text in (("positive", positive), ("negative", negative)):
            if text is None and name == "negative":
                continue
            if not isinstance(text, str) or not text:
                raise ValueError(f"judge: {name} must be a non-empty verdict text, got {text!r}")
        if negative is not None and positive == negative:
            raise ValueError(f"judge: positive and negative are the same text {positive!r}")
        if batch_size < 1:
            raise ValueError(f"judge: batch_size must be at least 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"judge: max_length must be at least 1, got {max_length}")

    def _verdict_id(self, text: str, name: str) -> int:
        """The one token id of a verdict text; a :class:`StageError` naming the tokenization otherwise."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise StageError(f"stage {self.stage!r}: judge: {name} {text!r} is {len(ids)} tokens of the judge's tokenizer {pieces}, not "
                             "one; choose a verdict text that is a single token (with or without its leading space, "
                             "as the tokenizer has it)")
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        if unknown is not None and ids[0] == unknown:
            raise StageError(f"stage {self.stage!r}: judge: {name} {text!r} is the judge tokenizer's unknown token; choose a text it knows")
        return ids[0]

    def render(self, prompt: str, response: str, row: dict[str, Any]) -> list[int]:
        """Token ids of one filled template: BOS (if any) and the text, cut to ``max_length`` from
        the beginning (BOS kept) so that the end, where the verdict goes, stays."""
        values = {"prompt": prompt, "response": response, **row}
        ids = encode_prompt(self.tokenizer, self.template.format(**{n: values[n] for n in self.placeholders}))
        if len(ids) <= self.max_length:
            return ids
        bos = getattr(self.tokenizer, "bos_token_id", None)
        head = ids[:1] if bos is not None and ids[0] == bos and self.max_length > 1 else []
        return head + ids[len(ids) - (self.max_length - len(head)):]

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], **fields: list[Any]) -> torch.Tensor:
        """``[B]`` float32 rewards in [0, 1]; ``fields`` holds one list per template field, aligned
        with ``responses``."""
        missing = [n for n in self.placeholders if n not in BUILTIN_PLACEHOLDERS and n not in fields]
        if missing:
            raise ValueError(f"judge: the template needs field(s) {', '.join(missing)}, which were not passed")
        seqs = [self.render(p, r, {k: v[i] for k, v in fields.items()})
                for i, (p, r) in enumerate(zip(prompts, responses))]
        out = [torch.zeros(0)]
        for rows, real in dist_utils.lockstep_chunks(seqs, self.batch_size, self.device, [self.tokenizer.eos_token_id]):
            scores = self.score(rows).cpu()
            if real:
                out.append(scores)
        return torch.cat(out)

    def score(self, rows: list[list[int]]) -> torch.Tensor:
        """``[B]`` float32 verdict probabilities for token sequences (one forward)."""
        ids = pad(rows, self.tokenizer.pad_token_id, left=True).to(self.device)
        mask = pad([[1] * len(s) for s in rows], 0, left=True).to(self.device)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        if self.head is not None:
            return with_last_hidden(self.model, self.verdict_probs, ids, mask, position_ids)
        # a head that is not a plain linear layer (soft-capped, scaled logits): the last position's logits
        keep = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **keep)
        return self.probs_from_logits(out.logits[:, -1].float())

    def verdict_probs(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """From the decoder's last hidden states ``[B, T, H]`` and the LM head's weight ``[V, H]``:
        ``[B]`` verdict probabilities at the last position (left padding puts every row's last
        token there). With ``negative``: ``sigmoid(l_yes - l_no)`` from the two head rows alone, in
        float32; without: ``exp(l_yes - logsumexp(l))`` over the full ``[B, V]`` row."""
        last = hidden[:, -1]
        if len(self.verdict_ids) == 2:
            two = last.float() @ weight[self.verdict_ids].float().T  # [B, 2]
            return torch.sigmoid(two[:, 0] - two[:, 1])
        return self.probs_from_logits((last @ weight.T).float())

    def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` float32 last-position logits -> ``[B]`` verdict probabilities."""
        if len(self.verdict_ids) == 2:
            two = logits[:, self.verdict_ids]
            return torch.sigmoid(two[:, 0] - two[:, 1])
        return torch.exp(logits[:, self.verdict_ids[0]] - torch.logsumexp(logits, dim=-1))


@hookimpl
def rlhf_register_rewards(register):
    register("judge", JudgeReward)
