"""The ``code`` reward: code extraction, the tests field, option checks and scores from the sandbox.

The sandbox's own guarantees (hostile code, limits, isolation) are tested in tests/core/test_sandbox.py;
here hostile responses go through the reward once, as a batch, to check they score 0 beside good ones.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from rlhf_core.plugin_system.registry import Entry
from rlhf_plugins.rewards import code as code_reward
from rlhf_plugins.rewards.code import CodeReward, extract_code, row_tests

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
FAST = {"timeout": 3.0, "cpu_seconds": 2, "memory_mb": 256, "max_processes": 4, "file_size_mb": 2}


def check_options(component, **options):
    """The host's call: every option, the unset ones at the signature's defaults."""
    return component.check_options(**Entry("reward", "under-test", component, "test").with_defaults(options))


def fenced(body: str, info: str = "python") -> str:
    return f"```{info}\n{body}```"


def test_extract_code_prefers_the_last_python_block():
    other = "x = 1\n"
    assert extract_code(f"First try:\n{fenced(other)}\nBetter:\n{fenced(ADD)}\nDone.") == ADD
    assert extract_code(f"{fenced(ADD, 'py')} then {fenced('cat f', 'bash')}") == ADD
    assert extract_code(f"{fenced(other, '')} and {fenced(ADD, '')}") == ADD  # bare fences: the last
    assert extract_code(f"{fenced(ADD)} {fenced(other, '')}") == ADD  # a python block wins over a bare one
    assert extract_code(ADD) == ADD  # no fence: the whole response
    assert extract_code("```python\ndef f(): pass") == "```python\ndef f(): pass"  # unclosed: no block


def test_row_tests_accepts_a_string_or_a_list_and_names_the_bad_row():
    assert row_tests("assert True", 0) == ["assert True"]
    assert row_tests(("assert 1", "assert 2"), 0) == ["assert 1", "assert 2"]
    for bad in (None, 3, ["assert 1", 2], {"t": "assert 1"}):
        with pytest.raises(ValueError, match=r"row 5: 'tests' must be a string or a list of strings"):
            row_tests(bad, 5)
    with pytest.raises(ValueError, match="row 2: 'tests' is empty"):
        row_tests([], 2)


@pytest.mark.parametrize("options, key", [
    ({"timeout": 0}, "timeout"), ({"cpu_seconds": 0}, "cpu_seconds"), ({"memory_mb": "1G"}, "memory_mb"),
    ({"max_processes": 0}, "max_processes"), ({"file_size_mb": -1}, "file_size_mb"),
    ({"max_workers": 0}, "max_workers"), ({"max_workers": True}, "max_workers"),
])
def test_bad_options_are_rejected_by_name(options, key):
    with pytest.raises(ValueError, match=rf"^code reward: {key} must be"):
        check_options(CodeReward, **options)
    with pytest.raises(ValueError, match=key):
        CodeReward(None, **options)


def test_registered_as_code_with_its_field():
    registered = {}
    code_reward.rlhf_register_rewards(lambda name, cls: registered.setdefault(name, cls))
    assert registered == {"code": CodeReward}
    assert CodeReward.fields == ("tests",)


def test_scores_are_the_fraction_of_tests_passed():
    reward = CodeReward(None, **FAST)
    responses = [
        f"Here it is:\n{fenced(ADD)}",                                        # all 3 pass
        fenced("def add(a, b):\n    return a - b\n"),                        # wrong: 0 of 3
        fenced("def add(a, b):\n    return a + b if a >= 0 else 99\n"),       # 2 of 3
        fenced("def add(a, b):\n    raise ValueError('no')\n"),              # errors count as failures
        "def add(a, b): return a + b",                                        # no fence: whole response
    ]
    tests = [ADD_TESTS, ADD_TESTS, ADD_TESTS, ADD_TESTS, "assert add(1, 2) == 3"]  # last: one string
    scores = reward(["p"] * len(responses), responses, tests)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores.tolist() == pytest.approx([1.0, 0.0, 2 / 3, 0.0, 1.0])


def test_a_bad_tests_value_is_an_error_naming_the_row():
    reward = CodeReward(None, **FAST)
    with pytest.raises(ValueError, match="row 1: 'tests' must be"):
        reward(["p", "p"], [ADD, ADD], [ADD_TESTS, 42])
    with pytest.raises(ValueError, match="2 responses but 1 'tests' values"):
        reward(["p", "p"], [ADD, ADD], [ADD_TESTS])


def test_hostile_responses_score_zero_beside_a_good_one(tmp_path):
    """One batch: each hostile response gets 0 within the time limit, the good one 1, nothing outside
    changes, and this (the trainer's) process survives to check."""
    outside = tmp_path / "outside.txt"
    outside.write_text("original")
    hostile = [
        "import time\ntime.sleep(10**6)",
        "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        f"open({str(outside)!r}, 'w').write('pwned')",
        'print(\'{"tests": [{"passed": true, "timed_out": false, "error": ""}]}\')\nimport os\nos._exit(0)',
    ]
    responses = [fenced(ADD)] + [fenced(ADD + body + "\n") for body in hostile]
    reward = CodeReward(None, **{**FAST, "timeout": 1.5}, max_workers=len(responses))
    start = time.monotonic()
    scores = reward(["p"] * len(responses), responses, [ADD_TESTS] * len(responses))
    elapsed = time.monotonic() - start
    assert scores.tolist() == [1.0] + [0.0] * len(hostile)
    assert elapsed < 1.5 + 2.0  # in parallel, each within its 1.5 s limit plus start-up
    assert outside.read_text() == "original"


TWO_TRAINERS = '''
import json, sys
from rlhf_plugins.rewards.code import CodeReward
from rlhf_core.plugin_system.registry import Entry
tag = sys.argv[1]
code = "import time\\nwith open('marker', 'w') as f:\\n    f.write(%r)\\ntime.sleep(0.5)"
responses = ["```python\\n" + code % f"{tag}{i}" + "\\n```" for i in range(4)]
tests = [[f"assert open('marker').read() == {tag + str(i)!r}"] for i in range(4)]
print(json.dumps(CodeReward(None, max_workers=4, timeout=5.0)(["p"] * 4, responses, tests).tolist()))
'''


def test_two_trainer_processes_never_share_a_sandbox():
    """Two processes (as two ranks of a run) scoring at the same time: each response's marker file
    is still its own when its test reads it, so every response scores 1."""
    procs = [subprocess.Popen([sys.executable, "-c", TWO_TRAINERS, tag], stdout=subprocess.PIPE, text=True)
             for tag in ("rank0-", "rank1-")]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [json.loads(out.splitlines()[-1]) for out in outputs] == [[1.0] * 4, [1.0] * 4]
