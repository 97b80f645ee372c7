"""Rewards that see the row (data fields), weighted sums of rewards, the refusal of an untrained
reward model, tied-reward warnings, and the builtin arith task learning with verifiable rewards."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from rlhf_core.cli import cli
from rlhf_core.config import ConfigError, WeightedComponent, load_raw, resolve, to_plain
from rlhf_core.runtime.pipeline import prepare, preflight
from rlhf_core import CheckedReward, ComponentError, RewardSum, reward_fields
from rlhf_plugins.arith import make_records, tagged

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"

# A third-party reward that reads the row's ``answer`` and records every call.
RECORDING_REWARD = textwrap.dedent('''
    import json, os
    import torch
    from rlhf_core import hookimpl

    class AnswerLength:
        """len(answer) as the reward; every call appended to $CALLS as JSON."""
        fields = ("answer",)

        def __init__(self, ctx, *, scale: float = 1.0):
            self.scale = scale

        def __call__(self, prompts, responses, answer):
            with open(os.environ["CALLS"], "a") as fh:
                fh.write(json.dumps({"prompts": prompts, "answer": answer}) + "\\n")
            return torch.tensor([self.scale * len(a) for a in answer], dtype=torch.float32)

    class Constant:
        """The same reward for every response."""

        def __init__(self, ctx):
            pass

        def __call__(self, prompts, responses):
            return torch.full((len(responses),), 0.5)

    @hookimpl
    def rlhf_register_rewards(register):
        register("answer_length", AnswerLength)
        register("constant", Constant)
''')


def ppo_stage(**extra) -> dict:
    stage = {"stage": "ppo", "init": "base", "data": {"train": "builtin:arith", "builtin_size": 40, "max_length": 40},
             "iterations": 2, "prompts_per_batch": 4, "samples_per_prompt": 2, "minibatch_size": 8,
             "advantage": "group_mean", "generation": {"max_new_tokens": 6}, "eval_every": 0, "eval_prompts": 4}
    stage.update(extra)
    return stage


def write_config(tmp_path: Path, stages: list[dict], plugin: bool = True) -> Path:
    config = {"seed": 0, "model": {"name_or_path": "builtin:tiny"}, "stages": stages}
    if plugin:
        (tmp_path / "my_rewards.py").write_text(RECORDING_REWARD)
        config["plugins"] = [str(tmp_path / "my_rewards.py")]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------- the contract, in-process

class _Entry:
    kind, name, plugin = "reward", "probe", "tests"

    def __init__(self, obj):
        self.obj = obj


def test_checked_reward_passes_declared_fields_aligned_with_the_responses():
    seen = {}

    class Probe:
        fields = ("answer", "tests")

        def __init__(self, ctx):
            pass

        def __call__(self, prompts, responses, answer, tests):
            seen.update(prompts=prompts, answer=answer, tests=tests)
            return torch.tensor([float(a) for a in answer])

    reward = CheckedReward(_Entry(Probe), None, {})
    rows = [{"answer": "3", "tests": ["t1"], "other": 1}, {"answer": "5", "tests": "t2"}]
    assert reward(["p1", "p2"], ["r1", "r2"], rows).tolist() == [3.0, 5.0]
    assert seen == {"prompts": ["p1", "p2"], "answer": ["3", "5"], "tests": [["t1"], "t2"]}
    with pytest.raises(ComponentError, match="reads the data fields answer, tests, and this caller gives no data records"):
        reward(["p1"], ["r1"])


def test_fields_can_be_a_function_of_the_options_and_are_checked():
    class ByOption:
        fields = staticmethod(lambda *, use="answer", **_: (use,))

    class Bad:
        fields = "answer"  # a string, not a tuple of names

    assert reward_fields(_Entry(ByOption), {}) == ("answer",)
    assert reward_fields(_Entry(ByOption), {"use": "solution"}) == ("solution",)
    assert reward_fields(_Entry(object), {}) == ()
    with pytest.raises(ComponentError, match=r"declares fields 'answer'; expected a tuple of field names"):
        reward_fields(_Entry(Bad), {})


def test_a_reward_sum_weighs_each_term_and_reports_it_unweighted():
    a = lambda p, r, rows: torch.tensor([1.0, 0.0, 1.0])  # noqa: E731
    b = lambda p, r, rows: torch.tensor([0.5, 1.0, 0.0])  # noqa: E731
    total, parts = RewardSum([("math", 1.0, a), ("format", 0.2, b)]).score(["p"] * 3, ["r"] * 3, [{}] * 3)
    # 1.0 * a + 0.2 * b, by hand: (1.1, 0.2, 1.0)
    assert torch.allclose(total, torch.tensor([1.1, 0.2, 1.0]))
    assert {k: v.tolist() for k, v in parts.items()} == {"math": [1.0, 0.0, 1.0], "format": [0.5, 1.0, 0.0]}
    one, none = RewardSum([("math", 1.0, a)]).score(["p"] * 3, ["r"] * 3)
    assert one.tolist() == [1.0, 0.0, 1.0] and none == {}  # a single term is that reward, unchanged


def test_a_weighted_reward_list_parses_round_trips_and_rejects_bad_weights(registry):
    raw = load_raw(str(CONFIGS / "grpo_arith.yaml"))
    config = resolve(raw, registry)
    reward = config.stages[1].config.reward
    assert [type(r) for r in reward] == [WeightedComponent, WeightedComponent]
    assert [(r.name, r.weight) for r in reward] == [("math", 1.0), ("format", 0.2)]
    assert reward[1].options == {"pattern": r"<answer>-?\d+</answer>"}  # weight is not passed to the reward
    assert to_plain(reward) == raw["stages"][1]["reward"]
    raw["stages"][1]["reward"] = [{"name": "math", "weight": "heavy"}]
    with pytest.raises(ConfigError, match=r"stages\[1\]\.reward\[0\]\.weight: expected a number, got 'heavy'"):
        resolve(raw, registry)
    raw["stages"][1]["reward"] = [{"name": "math"}, {"name": "format"}, {"name": "math", "wieght": 1}]
    with pytest.raises(ConfigError) as err:
        resolve(raw, registry)
    text = str(err.value)
    assert "stages[1].reward[1]: format reward: pattern is required" in text
    assert "stages[1].reward[2].wieght: unknown option for reward 'math'" in text
    # A weight that parses but is not finite is the stage's own check (it runs once every item parsed).
    raw["stages"][1]["reward"] = [{"name": "math", "weight": float("nan")}]
    with pytest.raises(ConfigError, match=r"stages\[1\]\.reward\[0\]\.weight: must be a finite number, got nan"):
        resolve(raw, registry)


# ---------------------------------------------------------------------- preflight

def test_a_missing_field_is_a_file_line_error_before_anything_trains(tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", [{"question": "What is 1+1?", "solution": "2"},
                                                     {"question": "What is 2+2?"}])
    path = write_config(tmp_path, [{"stage": "sft", "data": {"train": "builtin:arith", "builtin_size": 20},
                                    "train": {"steps": 1, "batch_size": 4}},
                                   ppo_stage(data={"train": str(data), "fields": {"prompt": "question", "answer": "solution"}},
                                             reward="math")], plugin=False)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run")], obj={})
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert (f"stages[1].data.train: {data}:2: no column 'solution' (data.fields maps 'answer' to it)") in result.output
    assert not (tmp_path / "run" / "sft").exists()  # nothing trained
    # Without the mapping the field itself is missing, named with who reads it.
    path = write_config(tmp_path, [ppo_stage(data={"train": str(data), "fields": {"prompt": "question"}},
                                             reward=[{"name": "format", "pattern": "x"}, {"name": "math"}])], plugin=False)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run2")], obj={})
    assert result.exit_code != 0
    assert (f"{data}:1: missing field 'answer', which reward[1] 'math' (plugin 'rewards-verifiable') reads") in result.output


def test_an_untrained_reward_model_is_refused_before_training(tmp_path, registry):
    path = write_config(tmp_path, [{"stage": "sft", "data": {"train": "builtin:letters", "builtin_size": 20},
                                    "train": {"steps": 1, "batch_size": 4}},
                                   {"stage": "ppo", "data": {"train": "builtin:letters", "builtin_size": 20}}], plugin=False)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run")], obj={})
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert ("stages[1].reward.path: 'auto' means the latest earlier stage that trains a reward model, and there is "
            "none (earlier stages: sft); an untrained reward head would score noise") in result.output
    assert not (tmp_path / "run" / "sft").exists()
    # @STAGE must name a stage that trains a reward model; a gold reward_model is checked the same way.
    raw = yaml.safe_load(path.read_text())
    raw["stages"][1]["reward"] = {"name": "reward_model", "path": "@sft"}
    raw["stages"][1]["gold"] = "reward_model"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        preflight(prepare(str(path)))
    assert "stages[1].reward.path: '@sft' names stage 'sft', which trains a policy, not a reward model" in str(err.value)
    assert "stages[1].gold.path: 'auto' means the latest earlier stage" in str(err.value)
    # With a reward stage before it, auto is fine.
    raw["stages"].insert(1, {"stage": "reward", "data": {"train": "builtin:letters", "builtin_size": 20},
                             "train": {"steps": 1, "batch_size": 4}})
    raw["stages"][2]["reward"] = "reward_model"
    path.write_text(yaml.safe_dump(raw))
    preflight(prepare(str(path)))


# ---------------------------------------------------------------------- in a run

def test_fields_reach_the_reward_and_components_are_logged(tmp_path, monkeypatch):
    """A third-party reward reading ``answer`` from a JSONL whose column is ``solution`` (mapped
    with data.fields) gets each prompt's own answer, repeated for its samples; with a weighted
    second reward, each component's mean is logged beside the total."""
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(calls))
    rows = [{"question": f"What is {a}+{a}?", "solution": str(2 * a)} for a in range(1, 13)]
    data = write_jsonl(tmp_path / "problems.jsonl", rows)
    path = write_config(tmp_path, [ppo_stage(data={"train": str(data), "fields": {"prompt": "question", "answer": "solution"}},
                                             reward=[{"name": "answer_length", "weight": 2.0},
                                                     {"name": "format", "pattern": "x.*", "weight": 0.5}])])
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run")], obj={})
    assert result.exit_code == 0, result.output
    answer_of = {r["question"]: r["solution"] for r in rows}
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert seen and all(c["answer"] == [answer_of[p] for p in c["prompts"]] for c in seen)
    train = [c for c in seen if len(c["prompts"]) == 8]  # 4 prompts x 2 samples per iteration
    assert len(train) == 2 and all(c["prompts"][0::2] == c["prompts"][1::2] for c in train)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppo = [m for m in metrics if "reward_mean" in m]
    for m in ppo:
        assert set(m) >= {"reward_answer_length", "reward_format", "reward_tied", "tied_groups_frac"}
        assert m["reward_mean"] == pytest.approx(2.0 * m["reward_answer_length"] + 0.5 * m["reward_format"])


def test_tied_rewards_are_counted_warned_about_and_summarised(tmp_path):
    path = write_config(tmp_path, [ppo_stage(reward="constant", iterations=3)])
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run")], obj={})
    assert result.exit_code == 0, result.output
    assert ("ppo: warning: iteration 1: every prompt's 2 samples got the same reward, so group-relative advantages "
            "are 0 and the reward teaches nothing in this batch") in result.output
    assert result.output.count("iteration 2: every prompt") == 0  # warned once
    assert "ppo: warning: in every one of the 3 iterations every prompt's 2 samples got the same reward" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["ppo"]["reward_tied_iterations"] == 3.0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["tied_groups_frac"] for m in metrics if "reward_mean" in m] == [1.0, 1.0, 1.0]
    # A reward with signal is not tied: the arith answers' lengths differ between prompts (k = 1).
    path = write_config(tmp_path, [ppo_stage(reward="answer_length", samples_per_prompt=1, advantage="batch_mean",
                                             prompts_per_batch=8)])
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run2")], obj={},
                                env={"CALLS": str(tmp_path / "calls.jsonl")})
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["stages"]["ppo"]["reward_tied_iterations"] == 0.0


def test_rlhf_eval_reads_the_fields_its_reward_needs(tmp_path):
    """``rlhf eval`` with the math reward on a prompts file of problems and answers (the untrained
    model answers none right); a file without the answers is a FILE:LINE error."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                              for r in make_records("prompts", 6, 0)])
    result = CliRunner().invoke(cli, ["eval", "builtin:tiny", "--prompts", str(data), "--reward", "math",
                                      "--max-new-tokens", "4", "--json"], obj={})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1]) == {"reward": 0.0, "prompts": 6}
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 1+1?"}])
    result = CliRunner().invoke(cli, ["eval", "builtin:tiny", "--prompts", str(bad), "--reward", "math"], obj={})
    assert result.exit_code != 0
    assert f"{bad}:1: missing field 'answer', which --reward 'math' reads" in result.output


# ---------------------------------------------------------------------- the arith task

def test_arith_records_are_deterministic_and_answer_their_prompts():
    sft = make_records("sft", 200, 3)
    assert sft == make_records("sft", 200, 3) and sft != make_records("sft", 200, 4)
    for r in sft:
        a, b = map(int, r["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
        assert r["answer"] == str(a + b) and r["response"] in (tagged(a + b), str(a + b))
    untagged = sum(not r["response"].startswith("<answer>") for r in sft) / len(sft)
    assert 0.1 < untagged < 0.3  # UNTAGGED_DEMOS = 0.2
    assert set(make_records("prompts", 5, 0)[0]) == {"prompt", "answer"}
    with pytest.raises(ValueError, match="arith dataset: no 'pairwise' data"):
        make_records("pairwise", 5, 0)


def run_arith_recipe(tmp_path: Path, seed: int, **grpo) -> tuple[float, float]:
    """examples/configs/grpo_arith.yaml with ``seed`` and the GRPO stage's ``grpo`` keys replaced:
    held-out accuracy after SFT and after GRPO."""
    config = yaml.safe_load((CONFIGS / "grpo_arith.yaml").read_text())
    config["seed"] = seed
    config["stages"][1].update(grpo)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "rlhf_core.cli", "run", str(path), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return summary["gold_score_sft"], summary["gold_score_ppo"]


@pytest.mark.slow  # a learning check (tens of seconds): .ci/run runs it with the slow tests
def test_grpo_with_verifiable_rewards_raises_held_out_accuracy_on_arith(tmp_path):
    """A small version of examples/configs/grpo_arith.yaml (seed 1, 60 GRPO iterations instead of
    200): the math and format rewards raise held-out accuracy by at least 10 points."""
    before, after = run_arith_recipe(tmp_path, 1, iterations=60, eval_every=0, eval_prompts=200)
    assert after >= before + 0.1, (before, after)


@pytest.mark.slow
def test_the_arith_recipe_raises_held_out_accuracy_by_20_points(tmp_path):
    """The recipe as shipped (seed 0, 200 iterations, about two minutes): at least 20 points over SFT."""
    before, after = run_arith_recipe(tmp_path, 0)
    assert after >= before + 0.2, (before, after)


def test_a_reward_service_that_stays_down_stops_the_run_unfinished(tmp_path):
    """PPO with the ``remote`` reward pointed at a port where nothing listens: the stage stops with
    the URL in one line (no traceback), nothing is trained on a missing reward, and summary.json
    does not say finished."""
    import socket

    with socket.socket() as s:  # a free port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/score"
    path = write_config(tmp_path, [ppo_stage(reward={"name": "remote", "url": url, "retries": 1, "backoff": 0.01,
                                                     "timeout": 1.0})], plugin=False)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run")], obj={})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"reward 'remote' (plugin 'rewards-remote') raised RemoteRewardError: remote reward: {url} did not answer " \
           "after 2 attempts" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] != "finished"
    assert not (tmp_path / "run" / "ppo" / "model.safetensors").exists()
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or "reward_mean" not in metrics.read_text()
