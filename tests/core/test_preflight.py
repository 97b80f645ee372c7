"""Everything a run needs is checked before the first stage trains: option values, overrides,
data files and records of every stage, model sources. Each problem names its config path (and
file:line for data); the CLI shows no traceback and nothing has trained."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rlhf_core.cli import cli
from rlhf_core.config import ConfigError, load_raw, resolve


def problems(registry, *overrides):
    with pytest.raises(ConfigError) as info:
        resolve(load_raw(None, list(overrides)), registry)
    return info.value.problems


def run(tmp_path, *args):
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "run"), *args], obj={})
    assert "Traceback" not in result.output
    assert "== stage" not in result.output  # reported before anything trained
    return result


@pytest.mark.parametrize("override, message", [
    ("stages.sft.train.lr=-1", "stages[0].train.lr: must be a finite number > 0, got -1.0"),
    ("stages.sft.train.lr=.nan", "stages[0].train.lr: must be a finite number > 0, got nan"),
    ("stages.sft.train.batch_size=0", "stages[0].train.batch_size: must be at least 1, got 0"),
    ("stages.sft.train.steps=0", "stages[0].train.steps: must be at least 1, got 0"),
    ("stages.sft.train.betas=[0.9, 1.5]", "stages[0].train.betas: must be two numbers in [0, 1), got [0.9, 1.5]"),
    ("stages.reward.data.max_length=0", "stages[1].data.max_length: must be at least 2, got 0"),
    ("stages.sft.data.max_prompt_length=32", "stages[0].data.max_prompt_length: must be at least 1 and below max_length (32)"),
    ("stages.sft.data.eval_fraction=1.0", "stages[0].data.eval_fraction: must be in [0, 1), got 1.0"),
    ("stages.ppo.reward={name: length, target: 0}", "stages[2].reward: length reward: target must be > 0, got 0"),
    ("stages.ppo.advantage={name: ema, decay: 1.5}", "stages[2].advantage: ema: decay must be in [0, 1), got 1.5"),
    ("stages.ppo.advantage={name: gae, lam: 2}", "stages[2].advantage: gae: lam must be in [0, 1], got 2.0"),
    ("stages.ppo.loss.clip_eps=0", "stages[2].loss: ppo_clip: clip_eps must be in (0, 1), got 0.0"),
    ("stages.sft.loss.aggregation=sum", "stages[0].loss.aggregation: expected one of 'token_mean', 'sequence_mean', got 'sum'"),
    ("stages.ppo.generation.top_p=0", "stages[2].generation.top_p: must be in (0, 1], got 0.0"),
    ("stages.ppo.data.max_length=8", "stages[2].data.max_length: must exceed generation.max_new_tokens (12)"),
    ("stages.ppo.reward.path=/no/such/rm", "stages[2].reward: reward_model: path '/no/such/rm': no such directory"),
])
def test_bad_values_are_reported_with_their_path(registry, override, message):
    assert any(message in p for p in problems(registry, override)), problems(registry, override)


def test_value_problems_are_collected_together_and_validate_never_sees_half_parsed_fields(registry):
    found = problems(registry, "stages.sft.train.lr=-1", "stages.ppo.advantage.foo=1", "stages.ppo.iterations=0")
    assert "stages[0].train.lr: must be a finite number > 0, got -1.0" in found
    # a bare component name plus an option keeps the name (was: AttributeError in PPOStage.validate)
    assert "stages[2].advantage.foo: unknown option for advantage 'batch_mean'; accepted: (no options)" in found
    assert "stages[2].iterations: must be at least 1, got 0" in found


def test_set_option_on_a_bare_component_name_keeps_the_name(registry):
    raw = load_raw(None, ["stages.reward.loss=bradley_terry", "stages.reward.loss.margin=0.5"])
    assert raw["stages"][1]["loss"] == {"name": "bradley_terry", "margin": 0.5}
    with pytest.raises(ConfigError, match=r"--set stages.seed.x: no list entry|--set seed.x: seed is 0, not a mapping"):
        load_raw(None, ["seed.x=1"])


def test_set_with_invalid_yaml_names_the_key():
    with pytest.raises(ConfigError, match=r"--set stages.sft.train.betas: the value '\[0.9,' is not valid YAML"):
        load_raw(None, ["stages.sft.train.betas=[0.9,"])


def test_a_validator_that_crashes_is_one_line_naming_the_plugin(registry):
    entry = registry.get("reward", "length")
    original = entry.obj.__dict__["check_options"]  # the staticmethod itself, to restore it as it was
    try:
        entry.obj.check_options = staticmethod(lambda **kw: 1 / 0)
        found = problems(registry, "stages.ppo.reward=length")
    finally:
        entry.obj.check_options = original
    assert found == ["stages[2].reward: reward 'length' of plugin 'ppo-rewards' failed to check its options: "
                     "ZeroDivisionError: division by zero"]


def test_data_of_a_later_stage_is_checked_before_the_first_trains(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a="}\n' * 3 + '{"prompt": 7}\n')
    (tmp_path / "adir.jsonl").mkdir()
    result = run(tmp_path, "--set", f"stages.ppo.data.train={bad}", "--set", f"stages.reward.data.train={tmp_path}/adir.jsonl",
                 "--set", f"stages.sft.data.eval={tmp_path}/missing.jsonl")
    assert result.exit_code == 1
    assert "has 3 problem(s)" in result.output
    assert f"stages[2].data.train: {bad}:4: field 'prompt' must be a string, got int" in result.output
    assert f"stages[1].data.train: {tmp_path}/adir.jsonl: is a directory; expected a data file" in result.output
    assert f"stages[0].data.eval: {tmp_path}/missing.jsonl: no such file" in result.output
    assert not (tmp_path / "run").exists()  # not even a run directory


def test_model_sources_are_checked_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run(tmp_path, "--set", "model.name_or_path=./no/such/model", "--set", "stages.ppo.init=@nope",
                 "--set", "stages.reward.init=someorg/some-model")
    assert result.exit_code == 1
    assert "model.name_or_path: ./no/such/model: no such directory" in result.output
    assert "stages[2].init: '@nope' names no earlier stage; earlier stages: sft, reward" in result.output
    assert ("stages[1].init: someorg/some-model: not a local directory, and not in the hub cache while HF_HUB_OFFLINE "
            "is set") in result.output


def test_suspicious_data_is_reported_with_file_and_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a=", "chosen": "aaaa", "rejected": "abab"}\n'
                     '{"prompt": "b=", "chosen": "bb", "rejected": "bb"}\n' * 2)
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "usr", "content": "a="}, {"role": "assistant", "content": "aaaa"}]}\n'
                    '{"prompt": "b=", "response": "bbbb"}\n')
    result = CliRunner().invoke(cli, [
        "run", "--out", str(tmp_path / "run"), "--set", f"stages.sft.data.train={chat}", "--set", "stages.sft.train.steps=1",
        "--set", f"stages.reward.data.train={pairs}", "--set", "stages.reward.loss=bradley_terry",
        "--set", "stages.reward.train.steps=1", "--set", "stages.ppo.iterations=1", "--set", "stages.ppo.eval_prompts=2",
        "--set", "stages.ppo.data.max_prompt_length=2"], obj={})
    assert result.exit_code == 0, result.output
    assert (f"stage 'reward' data.train: dropped 2 pairwise record(s) whose chosen equals rejected (no preference to "
            f"learn); first: {pairs}:2, {pairs}:4") in result.output
    assert f"stage 'sft' data.train: 1 chat message(s) with a role other than system, user, assistant, tool, developer; " \
           f"kept as written; first: {chat}:1" in result.output
    # PPO applies the same length rules as the other stages: "<letter>=" is 2 tokens, cut to the last 2 (of 2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"]["ppo"]["prompts"] > 0 and summary["stages"]["ppo"]["prompts_truncated"] == 0


def test_distributed_options_that_cannot_work_are_refused_up_front(tmp_path, registry, monkeypatch):
    result = run(tmp_path, "--set", "distributed.cpu_offload=true")
    assert result.exit_code == 1
    assert "distributed.cpu_offload: moves sharded parameters from GPU to CPU memory; this run is on the CPU" in result.output
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun with 2 processes
    assert problems(registry, "distributed.strategy=none") == [
        "distributed.strategy: 'none' would train 2 unsynchronised copies; use auto, fsdp or ddp"]
    monkeypatch.delenv("WORLD_SIZE")
    result = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path), "--out", str(tmp_path / "x")], obj={})
    assert result.exit_code == 2 and "--resume continues RUN_DIR in place; do not combine it with --out" in result.output


def test_each_model_source_and_option_problem_has_its_own_message(tmp_path, registry, monkeypatch):
    from rlhf_core.models import check_model_source

    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_model_source(str(tmp_path / "file")) == f"{tmp_path / 'file'}: is a file; expected a model directory (what save_pretrained writes)"
    assert check_model_source(str(tmp_path / "empty")) == f"{tmp_path / 'empty'}: the directory has no config.json (nor adapter_config.json), so it is not a saved model"
    assert check_model_source("a b") == "a b: no such directory, and not a hub id of the form org/name"
    assert check_model_source("builtin:tiny") is None
    assert problems(registry, "stages.sft.data.fields={prompt: ''}") == [
        "stages[0].data.fields.prompt: maps a field (prompt, response, completion, score, label, chosen, rejected, "
        "messages, or one a reward reads) to a column name, got prompt: ''"]
    assert problems(registry, "tracking=[{name: tensorboard, log_dir: /abs}]") == [
        "tracking[0]: tensorboard: log_dir must be a path inside the run directory, got '/abs'"]
    assert problems(registry, "checkpoint.keep=0") == ["checkpoint.keep: must be at least 1, got 0"]
