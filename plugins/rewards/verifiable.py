"""Built-in verifiable rewards: ``math`` (answer equivalence), ``exact_match`` (normalised text) and
``format`` (a regular expression over the response).

``math`` and ``exact_match`` declare ``fields = ("answer",)``: the host passes each prompt record's
``answer`` (a str, int or float from the data file), aligned with the responses. ``math`` checks
equivalence with the optional ``math-verify`` package (``pip install -e ".[math]"``); without it, an
exact numeric comparison whose grammar :func:`parse_number` documents.
"""
from __future__ import annotations

import functools
import re
import sys
import threading
from fractions import Fraction
from typing import Any, Callable

import torch

from rlhf_core import hookimpl

EXTRACT_MODES = ("auto", "boxed", "tag", "last_number")
FORMAT_MODES = ("fullmatch", "search")

# A plain number in running text: an integer (with optional 1,000-style separators), a decimal or
# a simple fraction a/b, with an optional minus sign. Not preceded by a letter, digit or dot, so the
# "2" of "x2" or the "5" of "0.5" is never a number of its own.
_TEXT_NUMBER = re.compile(r"(?<![\w.])-?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")

# The fallback's number grammar (see parse_number).
_SIGN = r"[-+\u2212]?"
_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_FALLBACK_NUMBER = re.compile(
    rf"(?P<sign>{_SIGN})\s*(?:"
    rf"\\[dt]?frac\{{\s*(?P<tex_num>{_SIGN}\d+)\s*\}}\{{\s*(?P<tex_den>\d+)\s*\}}"
    rf"|(?P<num>\d+)\s*/\s*(?P<den>\d+)"
    rf"|(?P<dec>{_DECIMAL}))"
    r"(?:\s+[A-Za-z]+)*"
)

# exact_match's normalisation: leading whitespace/quotes, trailing whitespace/quotes/sentence marks.
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_SURROUNDING = re.compile(rf"^[\s{_QUOTES}]+|[\s{_QUOTES}.,;:!?]+$")

INSTALL_HINT = 'pip install -e ".[math]" (or: pip install math-verify)'


def find_boxed(text: str) -> str | None:
    """The content of the last-opened ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text`` whose braces
    balance (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``), stripped; ``None`` if there is none.
    One pass over the text, so a response full of unclosed boxes costs no more than its length."""
    box_openings = {match.end() - 1 for match in _BOXED.finditer(text)}  # indices of their "{"
    open_braces: list[int] = []
    found, found_at = None, -1
    for i, char in enumerate(text):
        if char == "{":
            open_braces.append(i)
        elif char == "}" and open_braces:
            opened = open_braces.pop()
            if opened in box_openings and opened > found_at:
                found, found_at = text[opened + 1:i].strip(), opened
    return found


def find_tag(text: str, tag: str) -> str | None:
    """The content of the last ``<tag>...</tag>`` in ``text`` (across lines), stripped; ``None`` if
    there is none. Found with two reverse searches, so its cost is linear in the text's length."""
    close = text.rfind(f"</{tag}>")
    start = text.rfind(f"<{tag}>", 0, close) if close >= 0 else -1
    return text[start + len(tag) + 2:close].strip() if start >= 0 else None


def find_last_number(text: str) -> str | None:
    """The last plain number in ``text`` as written: ``-3``, ``19.5``, ``1,000``, ``3/4`` (LaTeX such
    as ``\\frac{1}{2}`` is not a plain number: its last number is ``2``); ``None`` if there is none."""
    matches = _TEXT_NUMBER.findall(text)
    return matches[-1] if matches else None


def extract_answer(text: str, mode: str, tag: str = "answer") -> str | None:
    """The final answer in a response, by ``mode``: ``boxed`` (:func:`find_boxed`), ``tag``
    (:func:`find_tag`), ``last_number`` (:func:`find_last_number`) or ``auto`` (the first of the
    three that finds one, in that order). ``None`` when there is no answer to extract."""
    finders: dict[str, Callable[[str], str | None]] = {
        "boxed": find_boxed,
        "tag": lambda t: find_tag(t, tag),
        "last_number": find_last_number,
    }
    for name in (("boxed", "tag", "last_number") if mode == "auto" else (mode,)):
        answer = finders[name](text)
        if answer is not None:
            return answer
    return None


def parse_number(text: str) -> Fraction | None:
    """The exact value of ``text`` under the fallback grammar, or ``None`` if it is not one.

    Accepted, after stripping whitespace and any ``$`` / ``\\$`` at either end and one final ``.``:
    an optional sign (``-``, ``+``, ``\u2212``), then an integer (``1000`` or ``1,000``: commas
    only between groups of three digits), a decimal (``0.5``, ``.5``, ``5.``), a fraction of
    integers ``a/b`` or ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``; ``b`` > 0), then optional
    unit words of ASCII letters, each after a space (``19 apples``, ``5 cm``). Not accepted:
    percentages, scientific notation, units glued to the number (``5cm``), ``x = 5``, any other
    LaTeX, and expressions.
    """
    core = text.strip().replace("\\$", "$").strip("$ \t\n")
    core = core[:-1] if core.endswith(".") else core
    match = _FALLBACK_NUMBER.fullmatch(core.strip())
    if match is None:
        return None
    sign = -1 if match["sign"] in ("-", "\u2212") else 1
    if match["dec"] is not None:
        return sign * Fraction(match["dec"].replace(",", "").rstrip("."))
    num, den = (match["tex_num"], match["tex_den"]) if match["tex_num"] is not None else (match["num"], match["den"])
    return sign * Fraction(int(num.replace("\u2212", "-")), int(den)) if int(den) else None


def answer_text(value: Any) -> str:
    """A data row's answer as text: a str as is, a number as Python writes it (``0.1``, ``42``)."""
    return value if isinstance(value, str) else repr(value)


def numbers_equal(answer: str, gold: str) -> bool:
    """The fallback check: both sides parse under :func:`parse_number` and are exactly equal, or
    neither does and the texts are equal after stripping whitespace and ``$``."""
    a, g = parse_number(answer), parse_number(gold)
    if a is not None or g is not None:
        return a == g
    return answer.strip().strip("$ ") == gold.strip().strip("$ ")


@functools.cache
def print_missing_math_verify_notice() -> None:
    """Say once per process that ``math`` is falling back to exact numeric comparison."""
    print(f"rlhf: notice: math reward: math-verify is not installed, so answers are compared as plain "
          f"numbers only (1/2 = 0.5, but not \\sqrt{{2}}/2 = \\frac{{1}}{{\\sqrt{{2}}}}); install it with: "
          f"{INSTALL_HINT}", file=sys.stderr)


def load_math_verify() -> tuple[Callable, Callable, type[BaseException]] | None:
    """``(parse, verify, TimeoutException)`` from math-verify, or ``None`` when it is not installed."""
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError:
        return None
    return parse, verify, TimeoutException


def check_extract(reward: str, extract: str, accepted: tuple[str, ...], tag: str) -> None:
    """``extract`` is one of ``accepted`` and ``tag`` is a non-empty name."""
    if extract not in accepted:
        raise ValueError(f"{reward} reward: unknown extract mode {extract!r}; accepted: {', '.join(accepted)}")
    if not re.fullmatch(r"[A-Za-z_][\w.-]*", tag):
        raise ValueError(f"{reward} reward: tag {tag!r} is not a tag name; accepted: letters, digits, _ . - "
                         f"(such as answer, for <answer>...</answer>)")


def check_rewards(reward: str, correct: float, wrong: float) -> None:
    """``correct`` and ``wrong`` are finite numbers."""
    for name, value in (("correct", correct), ("wrong", wrong)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float("-inf") < value < float("inf"):
            raise ValueError(f"{reward} reward: {name} must be a finite number, got {value!r}")


class MathReward:
    """``correct`` when the response's final answer equals the row's ``answer`` mathematically, else
    ``wrong`` (also when no answer can be extracted, or checking it fails or times out).

    ``extract``: ``auto`` | ``boxed`` | ``tag`` | ``last_number`` (see :func:`extract_answer`);
    ``tag``: the tag name for ``<tag>...</tag>``. With math-verify installed, both sides are parsed
    as LaTeX math (wrapped in ``$...$``) and compared with ``verify`` (``1/2``, ``0.5`` and
    ``\\frac{1}{2}`` agree); ``timeout`` (whole seconds) bounds each parse and each comparison.
    math-verify's timeout is ``signal.alarm``, which works only in the main thread: called from
    another thread the check runs without a time limit. Without math-verify: :func:`numbers_equal`.
    """

    fields = ("answer",)

    def __init__(self, ctx: Any = None, *, extract: str = "auto", tag: str = "answer", correct: float = 1.0,
                 wrong: float = 0.0, timeout: int = 2):
        self.check_options(extract=extract, tag=tag, correct=correct, wrong=wrong, timeout=timeout)
        self.extract, self.tag, self.correct, self.wrong, self.timeout = extract, tag, correct, wrong, timeout
        self.math_verify = load_math_verify()
        if self.math_verify is None:
            print_missing_math_verify_notice()

    @staticmethod
    def check_options(*, extract: str, tag: str, correct: float, wrong: float,
                      timeout: int) -> None:
        """A known ``extract`` mode, a tag name, finite rewards, ``timeout`` a whole number of seconds >= 1."""
        check_extract("math", extract, EXTRACT_MODES, tag)
        check_rewards("math", correct, wrong)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
            raise ValueError(f"math reward: timeout must be a whole number of seconds >= 1 (math-verify uses "
                             f"signal.alarm), got {timeout!r}")

    def is_correct(self, response: str, gold: str) -> bool:
        """Whether ``response``'s extracted answer is equivalent to ``gold``; never raises."""
        answer = extract_answer(response, self.extract, self.tag)
        if answer is None:
            return False
        if self.math_verify is None:
            return numbers_equal(answer, gold)
        parse, verify, timeout_error = self.math_verify
        # signal.alarm exists only in the main thread; elsewhere math-verify would raise ValueError.
        limit = self.timeout if threading.current_thread() is threading.main_thread() else None
        try:
            target = parse(f"${answer}$", parsing_timeout=limit)
            expected = parse(f"${gold}$", parsing_timeout=limit)
            return bool(target and expected and verify(expected, target, timeout_seconds=limit))
        except (Exception, timeout_error):  # TimeoutException derives from BaseException
            return False

    def __call__(self, prompts: list[str], responses: list[str], answer: list[Any]) -> torch.Tensor:
        """``[B]`` float32: ``correct`` or ``wrong`` per response."""
        hits = [self.is_correct(r, answer_text(a)) for r, a in zip(responses, answer, strict=True)]
        return torch.tensor([self.correct if hit else self.wrong for hit in hits], dtype=torch.float32)


def normalize_text(text: str) -> str:
    """exact_match's normalisation: drop leading whitespace and quotes (``" ' ` \u201c \u201d \u2018
    \u2019 \u00ab \u00bb``), trailing whitespace, quotes and sentence marks (``. , ; : ! ?``), collapse
    inner whitespace runs to one space, case-fold. Signs, brackets and inner punctuation stay."""
    return " ".join(_SURROUNDING.sub("", text).split()).casefold()


class ExactMatchReward:
    """``correct`` when the response (or its extracted answer) equals the row's ``answer`` as text,
    else ``wrong`` (also when ``extract`` finds nothing).

    ``extract``: ``none`` (the whole response, the default) or a mode of :func:`extract_answer`;
    ``normalize``: compare after :func:`normalize_text` (default) or character for character.
    """

    fields = ("answer",)

    def __init__(self, ctx: Any = None, *, extract: str = "none", tag: str = "answer", normalize: bool = True,
                 correct: float = 1.0, wrong: float = 0.0):
        self.check_options(extract=extract, tag=tag, normalize=normalize, correct=correct, wrong=wrong)
        self.extract, self.tag, self.normalize, self.correct, self.wrong = extract, tag, normalize, correct, wrong

    @staticmethod
    def check_options(*, extract: str, tag: str, normalize: bool, correct: float,
                      wrong: float) -> None:
        """A known ``extract`` mode (or ``none``), a tag name, finite rewards."""
        check_extract("exact_match", extract, ("none",) + EXTRACT_MODES, tag)
        check_rewards("exact_match", correct, wrong)

    def is_correct(self, response: str, gold: str) -> bool:
        """Whether ``response`` (or its extracted answer) equals ``gold`` under the chosen normalisation."""
        answer = response if self.extract == "none" else extract_answer(response, self.extract, self.tag)
        if answer is None:
            return False
        if self.normalize:
            return normalize_text(answer) == normalize_text(gold)
        return answer == gold

    def __call__(self, prompts: list[str], responses: list[str], answer: list[Any]) -> torch.Tensor:
        """``[B]`` float32: ``correct`` or ``wrong`` per response."""
        hits = [self.is_correct(r, answer_text(a)) for r, a in zip(responses, answer, strict=True)]
        return torch.tensor([self.correct if hit else self.wrong for hit in hits], dtype=torch.float32)


class FormatReward:
    """``correct`` when the response matches ``pattern``, else ``wrong``. ``mode``: ``fullmatch``
    (the whole response, the default) or ``search`` (anywhere in it); ``.`` matches newlines (DOTALL)."""

    def __init__(self, ctx: Any = None, *, pattern: str = "", mode: str = "fullmatch", correct: float = 1.0,
                 wrong: float = 0.0):
        self.check_options(pattern=pattern, mode=mode, correct=correct, wrong=wrong)
        self.regex = re.compile(pattern, re.DOTALL)
        self.mode, self.correct, self.wrong = mode, correct, wrong

    @staticmethod
    def check_options(*, pattern: str, mode: str, correct: float, wrong: float) -> None:
        """A non-empty ``pattern`` that compiles, a known ``mode``, finite rewards."""
        if not pattern:
            raise ValueError(r"format reward: pattern is required, a regular expression such as "
                             r"'<think>.*</think>\s*<answer>.*</answer>'")
        try:
            re.compile(pattern, re.DOTALL)
        except re.error as exc:
            raise ValueError(f"format reward: pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        if mode not in FORMAT_MODES:
            raise ValueError(f"format reward: unknown mode {mode!r}; accepted: {', '.join(FORMAT_MODES)}")
        check_rewards("format", correct, wrong)

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """``[B]`` float32: ``correct`` or ``wrong`` per response."""
        match = self.regex.fullmatch if self.mode == "fullmatch" else self.regex.search
        return torch.tensor([self.correct if match(r) else self.wrong for r in responses], dtype=torch.float32)


@hookimpl
def rlhf_register_rewards(register):
    """Register ``math``, ``exact_match`` and ``format``."""
    register("math", MathReward)
    register("exact_match", ExactMatchReward)
    register("format", FormatReward)
