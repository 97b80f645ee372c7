"""The builtin ``letters`` task: a job a tiny byte-level model learns from scratch in minutes.

Prompt: ``"<c>="`` for a letter ``c`` in ``abcdefgh``. The ideal response is ``c`` written 8
times. The programmatic human rater (:func:`gold_score`) scores a response by the share of its
first 8 characters that equal ``c``, divided by ``max(8, len(response))`` so that rambling does not
pay: ``gold_score("a=", "aaaaaaaa") == 1.0``, ``gold_score("a=", "aabbaaaa") == 0.75``.

The SFT demonstrations are noisy, as human demonstrations are: each character is ``c`` with
probability 1/2 and a random letter otherwise, so imitation alone reaches a gold score near
0.56. The reward data pairs responses of every quality (share of ``c`` uniform in [0, 1], lengths
1-16) with their gold scores, so the reward model can learn what the rater wants and PPO can
push the policy past its demonstrations.
"""
from __future__ import annotations

import random

import torch

from rlhf_core import hookimpl

ALPHABET = "abcdefgh"
TARGET_LEN = 8


def make_prompt(letter: str) -> str:
    """The prompt for ``letter``."""
    return f"{letter}="


def prompt_letter(prompt: str) -> str:
    """The letter a prompt asks for (its first character)."""
    return prompt[:1]


def gold_score(prompt: str, response: str) -> float:
    """The rater: matches of the prompt letter in the first 8 characters / max(8, len(response))."""
    letter = prompt_letter(prompt)
    matches = sum(ch == letter for ch in response[:TARGET_LEN])
    return matches / max(TARGET_LEN, len(response))


def _noisy_response(rng: random.Random, letter: str, p_correct: float, length: int) -> str:
    return "".join(letter if rng.random() < p_correct else rng.choice(ALPHABET) for _ in range(length))


def make_records(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` records of data ``kind`` (sft | reward | pairwise | unpaired | prompts), deterministic in ``seed``;
    an unpaired completion is desirable when its gold score is at least 0.5."""
    rng = random.Random(f"letters-{kind}-{seed}")
    out = []
    for _ in range(n):
        letter = rng.choice(ALPHABET)
        prompt = make_prompt(letter)
        if kind == "prompts":
            out.append({"prompt": prompt})
        elif kind == "sft":
            out.append({"prompt": prompt, "response": _noisy_response(rng, letter, 0.5, TARGET_LEN)})
        elif kind == "reward":
            # Every length a policy can plausibly emit (1-16), so the reward model learns that
            # short answers are penalised too; with lengths 6-10 only, PPO found 5-character
            # answers that the reward model overrated (a real reward hack, caught by the gold judge).
            response = _noisy_response(rng, letter, rng.random(), rng.randint(1, 2 * TARGET_LEN))
            out.append({"prompt": prompt, "response": response, "score": gold_score(prompt, response)})
        elif kind == "pairwise":
            a, b = (_noisy_response(rng, letter, rng.random(), TARGET_LEN) for _ in range(2))
            if gold_score(prompt, a) == gold_score(prompt, b):
                continue
            chosen, rejected = (a, b) if gold_score(prompt, a) > gold_score(prompt, b) else (b, a)
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif kind == "unpaired":
            completion = _noisy_response(rng, letter, rng.random(), TARGET_LEN)
            out.append({"prompt": prompt, "completion": completion, "label": gold_score(prompt, completion) >= 0.5})
        else:
            raise ValueError(f"letters dataset: unknown kind {kind!r}; accepted: sft, reward, pairwise, unpaired, prompts")
    return out


class LettersGoldReward:
    """Rule-based reward: the task's rater itself (the gold judge). ``scale`` multiplies it."""

    def __init__(self, ctx=None, *, scale: float = 1.0):
        self.scale = scale

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """``[B]`` gold scores."""
        return torch.tensor([self.scale * gold_score(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)


@hookimpl
def rlhf_register_datasets(register):
    register("letters", make_records)


@hookimpl
def rlhf_register_rewards(register):
    register("letters_gold", LettersGoldReward)
