"""Tracker plugins: the rlhf_register_trackers hook, TensorBoard read back with its own reader."""
from __future__ import annotations

import json
import sys
import types

import pytest
from click.testing import CliRunner

from rlhf_core import hookimpl
from rlhf_core.cli import cli
from rlhf_core.config import ConfigError, load_raw, resolve

TINY = ("stages=[{stage: sft, data: {train: 'builtin:letters', builtin_size: 64, max_length: 16}, "
        "train: {steps: 4, batch_size: 8, log_every: 1, eval_every: 2}}]")


def run(tmp_path, *args):
    return CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "run"), "--set", TINY, *args], obj={})


def test_tensorboard_scalars_config_and_hparams_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(tmp_path, "--set", "tracking=[{name: tensorboard, flush_secs: 1}]")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("sft/loss")]
    expected = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("sft/eval_loss")] == [2, 4]
    assert {"config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "stage: sft" in config_text
    hparams = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    hparams.Reload()
    assert "_hparams_/session_start_info" in hparams.summary_metadata  # the hyper-parameter table


def test_tracker_options_and_missing_package_are_config_errors(registry, monkeypatch):
    with pytest.raises(ConfigError, match=r"tracking\[0\].flsh: unknown option for tracker 'tensorboard'"):
        resolve(load_raw(None, ["tracking=[{name: tensorboard, flsh: 1}]"]), registry)
    with pytest.raises(ConfigError, match=r"tracking\[0\]: unknown tracker 'wandbb'; available: tensorboard"):
        resolve(load_raw(None, ["tracking=[wandbb]"]), registry)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"tensorboard tracker needs the tensorboard package: pip install"):
        resolve(load_raw(None, ["tracking=[tensorboard]"]), registry)


class Recorder:
    """A third-party tracker: records what the host hands it."""

    calls: list = []

    def __init__(self, run_dir, config, *, tag: str = "x"):
        Recorder.calls.append(("start", config["seed"], tag))

    def log(self, stage, step, metrics):
        Recorder.calls.append(("log", stage, step, sorted(metrics)))

    def finish(self, summary):
        Recorder.calls.append(("finish", summary["status"]))


@hookimpl
def rlhf_register_trackers(register):
    register("recorder", Recorder)


def test_a_tracker_plugin_sees_every_row_and_the_final_status(tmp_path, monkeypatch):
    module = types.ModuleType("recorder_plugin")
    module.rlhf_register_trackers = rlhf_register_trackers
    monkeypatch.setitem(sys.modules, "recorder_plugin", module)
    Recorder.calls = []
    result = run(tmp_path, "--set", "plugins=[recorder_plugin]", "--set", "tracking=[{name: recorder, tag: y}]")
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert Recorder.calls[0] == ("start", 0, "y") and Recorder.calls[-1] == ("finish", "finished")
    logs = [c for c in Recorder.calls if c[0] == "log"]
    assert len(logs) == len(rows) and all(c[1] == "sft" for c in logs) and "loss" in logs[0][3]
    Recorder.calls = []
    result = run(tmp_path, "--overwrite", "--set", "plugins=[recorder_plugin]", "--set", "tracking=[recorder]",
                 "--set", "stages.sft.train.lr=1e30", "--set", "stages.sft.train.max_grad_norm=0")
    assert result.exit_code == 1
    assert Recorder.calls[-1][0] == "finish" and Recorder.calls[-1][1].startswith("failed: stage 'sft'")
