"""The builtin ``arith`` task: verifiable rewards on a job a tiny byte-level model learns in minutes.

Prompt: ``What is A+B?`` for integers ``0 <= A, B < 30``; each record carries its ``answer`` (the
sum, as a string), which the ``math`` and ``exact_match`` rewards compare against. The ideal
response is ``<answer>SUM</answer>``.

An SFT warm-up on the demonstrations teaches the format and some arithmetic: after 600 steps the
tiny model, sampling at temperature 1, is right about 40% of the time. A share of the demonstrations
(:data:`UNTAGGED_DEMOS`) gives the sum without the ``<answer>`` tag, so the ``format`` reward has
something to teach too. RL with the ``math`` reward then raises held-out accuracy (the gold score:
``math`` on fresh samples of held-out prompts) well past what imitation reached: see
``examples/configs/grpo_arith.yaml`` and ``rlhf bench algorithms``.
"""
from __future__ import annotations

import random

from rlhf_core import hookimpl

MAX_OPERAND = 30
UNTAGGED_DEMOS = 0.2


def make_prompt(a: int, b: int) -> str:
    """The question for ``a + b``."""
    return f"What is {a}+{b}?"


def tagged(answer: int | str) -> str:
    """The ideal response for ``answer``."""
    return f"<answer>{answer}</answer>"


def _demonstration(rng: random.Random, total: int) -> str:
    """A demonstration: the sum, without the tag with probability :data:`UNTAGGED_DEMOS`."""
    return str(total) if rng.random() < UNTAGGED_DEMOS else tagged(total)


def make_records(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` records of data ``kind`` (``sft``: prompt, demonstration and answer; ``prompts``:
    prompt and answer), deterministic in ``seed``."""
    if kind not in ("sft", "prompts"):
        raise ValueError(f"arith dataset: no {kind!r} data (it trains with verifiable rewards, not a reward model); "
                         "accepted: sft, prompts")
    rng = random.Random(f"arith-{kind}-{seed}")
    out = []
    for _ in range(n):
        a, b = rng.randrange(MAX_OPERAND), rng.randrange(MAX_OPERAND)
        record = {"prompt": make_prompt(a, b), "answer": str(a + b)}
        if kind == "sft":
            record["response"] = _demonstration(rng, a + b)
        out.append(record)
    return out


#: The share of ``arith_tools`` demonstrations that call the calculator (the rest answer directly).
TOOL_DEMOS = 0.5
#: ``arith_tools``' operands are below this: sums the tiny model rarely gets right by itself.
TOOL_OPERAND = 100


def tool_call(expression: str, tags: tuple[str, str] = ("<tool_call>", "</tool_call>")) -> str:
    """A reply calling the ``calculator`` tool on ``expression`` (the JSON-in-tags form)."""
    return f'{tags[0]}{{"name":"calculator","arguments":{{"expression":"{expression}"}}}}{tags[1]}'


def make_tool_records(kind: str, n: int, seed: int) -> list[dict]:
    """``arith_tools``: the arithmetic task with operands below :data:`TOOL_OPERAND`, for multi-turn
    episodes with the ``calculator`` tool (``ppo.environment: {name: answer, tools: [calculator]}``).
    ``prompts``: the question and its ``answer``.
    ``sft``: conversations; a share :data:`TOOL_DEMOS` of the questions are demonstrated calling the
    calculator (one record for the call, one for the answer after the tool's result), the others
    answered directly like ``arith``'s. The tiny model imitates both; RL learns that calling the
    tool is what gets the sum right."""
    if kind not in ("sft", "prompts"):
        raise ValueError(f"arith_tools dataset: no {kind!r} data; accepted: sft, prompts")
    rng = random.Random(f"arith-tools-{kind}-{seed}")
    out: list[dict] = []
    while len(out) < n:
        a, b = rng.randrange(TOOL_OPERAND), rng.randrange(TOOL_OPERAND)
        if kind == "prompts":
            out.append({"prompt": make_prompt(a, b), "answer": str(a + b)})
            continue
        question = [{"role": "user", "content": make_prompt(a, b)}]
        if rng.random() >= TOOL_DEMOS:
            out.append({"messages": question + [{"role": "assistant", "content": _demonstration(rng, a + b)}],
                        "answer": str(a + b)})
            continue
        call = {"role": "assistant", "content": tool_call(f"{a}+{b}")}
        out.append({"messages": question + [call], "answer": str(a + b)})
        out.append({"messages": question + [call, {"role": "tool", "name": "calculator", "content": str(a + b)},
                                            {"role": "assistant", "content": tagged(a + b)}], "answer": str(a + b)})
    return out[:n]


@hookimpl
def rlhf_register_datasets(register):
    register("arith", make_records)
    register("arith_tools", make_tool_records)
