"""Built-in ``code`` reward: the fraction of a row's tests that the response's code passes.

Declares ``fields = ("tests",)``: each prompt record carries ``tests``, a list of Python statements
(``assert add(1, 2) == 3``) or one such string. The code is the response's last fenced
```` ```python ```` block (else its last bare ```` ``` ```` block, else the whole response); it runs
in :mod:`rlhf_core.sandbox`, once per test in a fresh process, never in the trainer's process.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from rlhf_core import hookimpl
from rlhf_core.sandbox import SandboxLimits, run_tests_batch

# A fenced block: its info string (language) and its body up to the closing fence.
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")


def extract_code(response: str) -> str:
    """The code of ``response``: its last ```` ```python ```` (or ``py``) fenced block, else its last
    fenced block without a language, else the whole response. An unclosed fence is not a block."""
    blocks = [(info.strip().lower(), body) for info, body in _FENCE.findall(response)]
    for wanted in (lambda info: info in _PYTHON_TAGS, lambda info: info == ""):
        bodies = [body for info, body in blocks if wanted(info)]
        if bodies:
            return bodies[-1]
    return response


def row_tests(value: Any, row: int) -> list[str]:
    """A row's ``tests`` as a list of statements: a string is one test; anything but a non-empty
    list of strings is a ``ValueError`` naming the row (0-based, in the batch)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"code reward: row {row}: 'tests' must be a string or a list of strings, "
                         f"got {type(value).__name__}: {value!r:.80}")
    if not value:
        raise ValueError(f"code reward: row {row}: 'tests' is empty; give at least one test statement")
    return list(value)


class CodeReward:
    """Reward = tests passed / tests, each test run after the code in its own sandboxed process (so
    a failing, crashing or hanging test does not hide the others; an error counts as a failure).

    Options: ``timeout`` (wall-clock seconds for one response, all its tests), ``cpu_seconds``,
    ``memory_mb`` and ``file_size_mb`` (per process), ``max_processes`` (processes the code may
    have at once), ``max_workers`` (responses scored in parallel). The network is always off.
    """

    fields = ("tests",)

    def __init__(self, ctx=None, *, timeout: float = 10.0, cpu_seconds: int = 5, memory_mb: int = 512,
                 max_processes: int = 16, file_size_mb: int = 16, max_workers: int = 4):
        self.check_options(timeout=timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                           max_processes=max_processes, file_size_mb=file_size_mb, max_workers=max_workers)
        self.limits = SandboxLimits(timeout=timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                                    max_processes=max_processes, file_size_mb=file_size_mb)
        self.max_workers = max_workers

    @staticmethod
    def check_options(*, timeout: float, cpu_seconds: int, memory_mb: int,
                      max_processes: int, file_size_mb: int, max_workers: int) -> None:
        """Every limit as :class:`rlhf_core.sandbox.SandboxLimits` accepts it; ``max_workers`` an
        integer >= 1."""
        try:
            SandboxLimits(timeout=timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                          max_processes=max_processes, file_size_mb=file_size_mb)
        except ValueError as exc:
            raise ValueError(f"code reward: {exc}") from None
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"code reward: max_workers must be an integer >= 1, got {max_workers!r}")

    def __call__(self, prompts: list[str], responses: list[str], tests: list[Any]) -> torch.Tensor:
        """``[B]`` float32 fractions of each row's tests passed by its response's code."""
        if len(tests) != len(responses):
            raise ValueError(f"code reward: {len(responses)} responses but {len(tests)} 'tests' values")
        jobs = [(extract_code(response), row_tests(value, row))
                for row, (response, value) in enumerate(zip(responses, tests))]
        results = run_tests_batch(jobs, self.limits, max_workers=self.max_workers)
        return torch.tensor([r.fraction for r in results], dtype=torch.float32)


@hookimpl
def rlhf_register_rewards(register):
    register("code", CodeReward)
