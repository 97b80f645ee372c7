"""Built-in environments for multi-turn episodes (``ppo.environment``) and the ``guess`` dataset.

``answer``
    The row's prompt is the opening (a string as one user message, messages as written); the first
    reply that calls no tool ends the episode, and the rewards (``ppo.reward``) score it. With
    ``environment.tools`` this is tool use on any prompt data: the calculator on ``arith_tools``.
``guess``
    Guess a number from ``low`` to ``high``: the policy says a number, the environment answers
    ``higher`` or ``lower``; solving it on turn ``t`` earns ``1 - turn_penalty * (t - 1)`` (0 when
    unsolved within ``max_turns``). Logs ``env_solved`` and ``env_invalid`` (replies without a
    number). The target is the row's ``target`` field (the ``guess`` dataset's records carry one),
    else drawn from the episode's seed.

Environments follow :class:`rlhf_core.Environment`: ``reset(row, seed)`` and ``step(state, reply)``
return :class:`rlhf_core.Observation`; the episode is a function of the row, the seed and the
replies.
"""
from __future__ import annotations

import random
import re
from typing import Any

from rlhf_core import Observation, hookimpl
from rlhf_core.data import record_turns


class Answer:
    """``answer``: the row's question, answered once (tool calls first, when tools are configured).
    ``system``: a system message put before the row's messages ("" = none)."""

    def __init__(self, ctx: Any = None, *, system: str = ""):
        self.system = system

    def reset(self, row: dict[str, Any], seed: int) -> Observation:
        prompt = record_turns(row, "prompts", "prompt row").prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        return Observation(messages)

    def step(self, state: Any, reply: str) -> Observation:
        return Observation(done=True)


def guess_prompt(low: int, high: int) -> str:
    """The opening question of the guessing game."""
    return f"Guess my number from {low} to {high}."


class GuessNumber:
    """``guess``: a number from ``low`` to ``high`` found through ``higher`` / ``lower`` feedback
    (see the module docstring)."""

    def __init__(self, ctx: Any = None, *, low: int = 1, high: int = 16, turn_penalty: float = 0.1):
        self.check_options(low=low, high=high, turn_penalty=turn_penalty)
        self.low, self.high, self.turn_penalty = low, high, turn_penalty

    @staticmethod
    def check_options(*, low: int, high: int, turn_penalty: float) -> None:
        """``low < high``; ``turn_penalty`` in [0, 1)."""
        if not low < high:
            raise ValueError(f"guess: low must be below high, got low={low}, high={high}")
        if not 0 <= turn_penalty < 1:
            raise ValueError(f"guess: turn_penalty must be in [0, 1), got {turn_penalty}")

    def reset(self, row: dict[str, Any], seed: int) -> Observation:
        target = int(row["target"]) if "target" in row else random.Random(seed).randint(self.low, self.high)
        if not self.low <= target <= self.high:
            raise ValueError(f"the row's target {target} is outside [{self.low}, {self.high}]")
        text = row.get("prompt") if isinstance(row.get("prompt"), str) else guess_prompt(self.low, self.high)
        return Observation([{"role": "user", "content": text}], state={"target": target, "turns": 0})

    def step(self, state: dict[str, int], reply: str) -> Observation:
        state = {**state, "turns": state["turns"] + 1}
        found = re.search(r"-?\d+", reply)
        if found is None:
            return Observation([{"role": "user", "content": f"Say a number from {self.low} to {self.high}."}],
                               state=state, info={"invalid": 1.0, "solved": 0.0})
        guess = int(found.group())
        if guess == state["target"]:
            reward = max(0.0, 1.0 - self.turn_penalty * (state["turns"] - 1))
            return Observation(reward=reward, done=True, state=state, info={"solved": 1.0})
        hint = "higher" if guess < state["target"] else "lower"
        return Observation([{"role": "user", "content": hint}], state=state, info={"solved": 0.0})


def guess_records(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` records of the guessing game (``low`` 1, ``high`` 16), deterministic in ``seed``:
    ``prompts``: the question and its ``target``; ``sft``: one record per assistant turn of
    demonstrated games (the conversation so far, then the guess) whose guesses are consistent with
    the feedback but drawn at random from the numbers still possible, half of the games scanning
    upwards from the lowest instead; RL then learns to halve the range (fewer turns)."""
    if kind not in ("sft", "prompts"):
        raise ValueError(f"guess dataset: no {kind!r} data; accepted: sft, prompts")
    rng = random.Random(f"guess-{kind}-{seed}")
    low, high = 1, 16
    out: list[dict] = []
    while len(out) < n:
        target = rng.randint(low, high)
        if kind == "prompts":
            out.append({"prompt": guess_prompt(low, high), "target": str(target)})
            continue
        messages = [{"role": "user", "content": guess_prompt(low, high)}]
        lo, hi, scan = low, high, rng.random() < 0.5
        while len(out) < n:
            guess = lo if scan else rng.randint(lo, hi)
            out.append({"messages": messages + [{"role": "assistant", "content": str(guess)}]})
            if guess == target:
                break
            lo, hi = (guess + 1, hi) if guess < target else (lo, guess - 1)
            messages = messages + [{"role": "assistant", "content": str(guess)},
                                   {"role": "user", "content": "higher" if guess < target else "lower"}]
    return out


@hookimpl
def rlhf_register_environments(register):
    register("answer", Answer)
    register("guess", GuessNumber)


@hookimpl
def rlhf_register_datasets(register):
    register("guess", guess_records)
