"""The verifiable rewards: math (with math-verify and with its exact-number fallback), exact_match, format."""
from __future__ import annotations

import importlib.util
import sys
import threading
from fractions import Fraction

import pytest
import torch

from rlhf_core.plugin_system.registry import Entry
from rlhf_plugins.rewards import verifiable
from rlhf_plugins.rewards.verifiable import ExactMatchReward, FormatReward, MathReward

requires_math_verify = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                          reason="math-verify is not installed (pip install math-verify)")

# (response, row answer, correct?) — both paths give the same verdict.
AGREE = [
    (r"so \boxed{\frac{1}{2}}", "0.5", True),            # LaTeX fraction vs decimal
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"\boxed{\frac{2}{4}}", "1/2", True),               # unreduced fraction
    ("<answer>1/2</answer>", 0.5, True),                 # float answer from JSON
    ("The answer is 0.5", "1/2", True),                  # last number
    (r"\boxed{-3}", -3, True),                           # negative, int answer
    ("so x = -3", "-3", True),
    ("-0.5", "-1/2", True),
    ("<answer>\u22123</answer>", -3, True),              # unicode minus sign
    ("1/2", "-1/2", False),
    ("I have 19 apples", 19, True),
    ("<answer>19 apples</answer>", "19", True),          # unit word stripped
    ("<answer>5 cm</answer>", 5, True),
    ("Total: 1,000", 1000, True),                        # thousands separator
    ("<answer>1,000</answer>", "1000", True),
    (r"<answer>\$5.00</answer>", 5, True),               # currency sign, trailing zeros
    ("<answer>3.0</answer>", 3, True),
    (r"\boxed{0.1}", 0.1, True),
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}", True),            # not a number: same text on the fallback
    (r"\boxed{19.5}", 19, False),                        # close but wrong
    ("19", "19.5", False),
    (r"\boxed{1/2}", "1/3", False),
    ("12", 21, False),
    ("10", 1, False),                                    # '1' is in '10' but is not its value
    ("1", 10, False),
    (r"first 7, then \boxed{8}", 8, True),              # auto: a box beats the last number
    (r"first 7, then \boxed{8}", 7, False),
    ("<answer>4</answer> and later 5", 4, True),         # auto: a tag beats the last number
    ("no answer here", 1, False),                        # nothing to extract scores wrong
    ("<answer>1e3</answer>", 1000, False),               # scientific notation: neither path
]

# Equivalent answers only math-verify accepts: the fallback compares plain numbers (documented).
VERIFY_ONLY = [
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}"),
    (r"<answer>50\%</answer>", "0.5"),
    (r"\boxed{x=3}", 3),
    ("<answer>5cm</answer>", 5),                         # unit glued to the number
]


@pytest.fixture
def fallback_math(monkeypatch):
    """A ``math`` reward built as if math-verify were not installed (the import raises ImportError)."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    verifiable.print_missing_math_verify_notice.cache_clear()
    reward = MathReward()
    assert reward.math_verify is None
    return reward


def score(reward, rows) -> list[float]:
    """The reward's scores for (response, answer, ...) rows, as a list."""
    out = reward(["q"] * len(rows), [r[0] for r in rows], [r[1] for r in rows])
    assert out.dtype == torch.float32 and out.shape == (len(rows),)
    return out.tolist()


@requires_math_verify
def test_math_with_math_verify_on_the_agreement_table():
    reward = MathReward()
    assert reward.math_verify is not None
    assert score(reward, AGREE) == [1.0 if ok else 0.0 for _, _, ok in AGREE]


def test_math_fallback_on_the_agreement_table(fallback_math):
    assert score(fallback_math, AGREE) == [1.0 if ok else 0.0 for _, _, ok in AGREE]


@requires_math_verify
def test_fallback_is_stricter_where_documented(monkeypatch):
    with_verify = MathReward()
    monkeypatch.setitem(sys.modules, "math_verify", None)
    fallback = MathReward()
    assert score(with_verify, VERIFY_ONLY) == [1.0] * len(VERIFY_ONLY)
    assert score(fallback, VERIFY_ONLY) == [0.0] * len(VERIFY_ONLY)


def test_missing_math_verify_notice_is_printed_once(capsys, fallback_math):
    MathReward()  # the fixture's reward printed the notice; this second one prints nothing
    err = capsys.readouterr().err
    assert err.count("math-verify is not installed") == 1
    assert 'pip install -e ".[math]"' in err and "pip install math-verify" in err


@requires_math_verify
def test_no_notice_with_math_verify_installed(capsys):
    verifiable.print_missing_math_verify_notice.cache_clear()
    MathReward()
    assert "math-verify" not in capsys.readouterr().err


def test_parse_number_grammar():
    accepted = {"1,000": 1000, "-1/2": Fraction(-1, 2), r"\frac{-3}{4}": Fraction(-3, 4), "$5$": 5,
                ".5": Fraction(1, 2), "5.": 5, "+2": 2, "3 square meters": 3, "1,234.5": Fraction(2469, 2)}
    assert {text: verifiable.parse_number(text) for text in accepted} == accepted
    for text in ["1,00", "5cm", "50%", "1e3", "x = 5", "1/0", r"\sqrt{4}", "two", ""]:
        assert verifiable.parse_number(text) is None, text


@pytest.mark.parametrize("text, mode, expected", [
    (r"a \boxed{\frac{1}{2}} b \boxed{3}", "boxed", "3"),          # the last box
    (r"\boxed{ {a}{b} }", "boxed", "{a}{b}"),                     # nested braces balanced
    (r"\boxed{1", "boxed", None),                                 # never closed
    ("<answer>1</answer> <answer>\n 2 \n</answer>", "tag", "2"),  # the last tag, stripped
    ("<answer>1", "tag", None),
    (r"\boxed{5} then 6", "last_number", "6"),
    ("x2 and 0.5.", "last_number", "0.5"),                        # 'x2' is no number; final '.' is not part of it
    ("3/4 cup", "last_number", "3/4"),
    (r"<answer>4</answer> \boxed{5}", "auto", "5"),
    ("nothing", "auto", None),
])
def test_extract_answer(text, mode, expected):
    assert verifiable.extract_answer(text, mode) == expected


@requires_math_verify
def test_extract_modes_tag_name_and_reward_values():
    rows = [("<final>7</final> 8", 7), (r"\boxed{7} 8", 7)]
    assert score(MathReward(extract="tag", tag="final", correct=2.0, wrong=-1.0), rows) == [2.0, -1.0]
    assert score(MathReward(extract="last_number"), rows) == [0.0, 0.0]
    assert score(MathReward(extract="boxed"), rows) == [0.0, 1.0]


def test_linear_time_on_unclosed_boxes_and_tags():
    # A quadratic scan would take minutes on these; the single-pass finders return at once.
    assert verifiable.find_boxed("\\boxed{" * 50_000) is None
    assert verifiable.find_tag("<answer>" * 50_000, "answer") is None


@requires_math_verify
def test_a_failing_or_timed_out_check_scores_wrong_not_raises():
    from math_verify.errors import TimeoutException
    reward = MathReward()
    _, verify, timeout_error = reward.math_verify

    def crash(text, **_):
        raise RuntimeError("boom")

    def time_out(text, **_):
        raise TimeoutException("Operation timed out!")

    for parse in (crash, time_out):
        reward.math_verify = (parse, verify, timeout_error)
        assert score(reward, [("1", 1), ("2", 2)]) == [0.0, 0.0]


@requires_math_verify
def test_timeouts_only_in_the_main_thread():
    reward = MathReward(timeout=3)
    parse, verify, timeout_error = reward.math_verify
    seen = []

    def recording_parse(text, *, parsing_timeout):
        seen.append(parsing_timeout)
        return parse(text, parsing_timeout=parsing_timeout)

    reward.math_verify = (recording_parse, verify, timeout_error)
    assert score(reward, [("1", 1)]) == [1.0]
    results = []
    worker = threading.Thread(target=lambda: results.append(score(reward, [("1", 1)])))
    worker.start()
    worker.join()
    # signal.alarm raises off the main thread, so there the check runs without math-verify's timeout.
    assert results == [[1.0]] and seen == [3, 3, None, None]


@pytest.mark.parametrize("response, answer, normalize, extract, expected", [
    ('  "Paris".  ', "paris", True, "none", 1.0),       # quotes, final mark, case
    ("The  Big\nApple!", "the big apple", True, "none", 1.0),  # whitespace runs collapsed
    ("\u201cYes,\u201d", "yes", True, "none", 1.0),     # curly quotes and a trailing comma
    ("-3", "3", True, "none", 0.0),                     # a sign is not surrounding punctuation
    ("Paris, France", "paris", True, "none", 0.0),
    ("42", 42, True, "none", 1.0),                      # int answer from JSON
    ("3.0", 3, True, "none", 0.0),                      # text, not numbers
    ("Paris", "paris", False, "none", 0.0),             # normalize: false is character for character
    ("Paris", "Paris", False, "none", 1.0),
    ("I think <answer> PARIS </answer>", "paris", True, "tag", 1.0),
    ("I think Paris", "paris", True, "tag", 0.0),       # nothing extracted scores wrong
])
def test_exact_match(response, answer, normalize, extract, expected):
    reward = ExactMatchReward(normalize=normalize, extract=extract)
    assert score(reward, [(response, answer)]) == [expected]


THINK_ANSWER = r"<think>.*</think>\s*<answer>.*</answer>"


@pytest.mark.parametrize("response, mode, expected", [
    ("<think>a\nb</think>\n<answer>3</answer>", "fullmatch", 1.0),  # '.' crosses newlines
    ("<think>a</think><answer>3</answer> extra", "fullmatch", 0.0),
    ("<think>a</think><answer>3</answer> extra", "search", 1.0),
    ("<answer>3</answer>", "search", 0.0),
    ("", "fullmatch", 0.0),
])
def test_format(response, mode, expected):
    assert FormatReward(pattern=THINK_ANSWER, mode=mode)(["q"], [response]).tolist() == [expected]


def test_format_reward_values():
    reward = FormatReward(pattern="ok", correct=0.5, wrong=-0.5)
    assert reward(["q", "q"], ["ok", "no"]).tolist() == [0.5, -0.5]


@pytest.mark.parametrize("cls, options, message", [
    (FormatReward, {"pattern": "(<answer>"}, "pattern '(<answer>' is not a valid regular expression: missing ), "),
    (FormatReward, {}, "format reward: pattern is required"),
    (FormatReward, {"pattern": "x", "mode": "match"}, "unknown mode 'match'; accepted: fullmatch, search"),
    (MathReward, {"extract": "first"}, "unknown extract mode 'first'; accepted: auto, boxed, tag, last_number"),
    (ExactMatchReward, {"extract": "all"}, "accepted: none, auto, boxed, tag, last_number"),
    (MathReward, {"tag": "<answer>"}, "tag '<answer>' is not a tag name"),
    (MathReward, {"timeout": 0}, "timeout must be a whole number of seconds >= 1"),
    (MathReward, {"timeout": 1.5}, "got 1.5"),
    (MathReward, {"correct": float("nan")}, "math reward: correct must be a finite number"),
    (ExactMatchReward, {"wrong": "low"}, "exact_match reward: wrong must be a finite number, got 'low'"),
])
def test_option_errors(cls, options, message):
    with pytest.raises(ValueError) as raised:  # as the host calls it: every option, unset ones at their defaults
        cls.check_options(**Entry("reward", "under-test", cls, "test").with_defaults(options))
    assert message in str(raised.value)
    with pytest.raises(ValueError):
        cls(**options)


def test_registration_and_config_options():
    registered = {}
    verifiable.rlhf_register_rewards(lambda name, cls: registered.setdefault(name, cls))
    assert registered == {"math": MathReward, "exact_match": ExactMatchReward, "format": FormatReward}
    assert MathReward.fields == ExactMatchReward.fields == ("answer",) and not hasattr(FormatReward, "fields")
    # What a config may set is what the host reads off each constructor.
    assert set(Entry("reward", "math", MathReward, "builtin").options()) == {"extract", "tag", "correct", "wrong",
                                                                            "timeout"}
    assert set(Entry("reward", "format", FormatReward, "builtin").options()) == {"pattern", "mode", "correct", "wrong"}
