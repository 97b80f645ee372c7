"""Tracker plugins: the rlhf_register_trackers hook, TensorBoard read back with its own reader."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import yaml
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
    stage = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "sft"), size_guidance={"scalars": 0})
    stage.Reload()  # a stage's scalars live in its own TensorBoard run, tensorboard/<stage>/
    logged = [(e.step, e.value) for e in stage.Scalars("sft/loss")]
    expected = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    assert [e.step for e in stage.Scalars("sft/eval_loss")] == [2, 4]
    assert all(tag.startswith("sft/") for tag in stage.Tags()["scalars"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert not any(tag.startswith("sft/") for tag in events.Tags()["scalars"])
    assert {"config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "stage: sft" in config_text
    hparams = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    hparams.Reload()
    assert "_hparams_/session_start_info" in hparams.summary_metadata  # the hyper-parameter table


def test_tracker_options_and_missing_package_are_config_errors(registry, monkeypatch):
    with pytest.raises(ConfigError, match=r"tracking\[0\].flsh: unknown option for tracker 'tensorboard'"):
        resolve(load_raw(None, ["tracking=[{name: tensorboard, flsh: 1}]"]), registry)
    with pytest.raises(ConfigError, match=r"tracking\[0\]: unknown tracker 'wandbb'; available: mlflow, tensorboard, trackio, wandb"):
        resolve(load_raw(None, ["tracking=[wandbb]"]), registry)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"tensorboard tracker needs the tensorboard package: pip install"):
        resolve(load_raw(None, ["tracking=[tensorboard]"]), registry)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"wandb tracker needs the wandb package: pip install -e \"\.\[wandb\]\""):
        resolve(load_raw(None, ["tracking=[wandb]"]), registry)
    with pytest.raises(ConfigError, match=r"tracking\[0\]: wandb: mode must be online, offline"):
        monkeypatch.delitem(sys.modules, "wandb")
        resolve(load_raw(None, ["tracking=[{name: wandb, mode: offlne}]"]), registry)
    if importlib.util.find_spec("mlflow"):
        import mlflow  # noqa: F401  (imported first: it registers its stores when sqlalchemy imports)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ConfigError, match=r"mlflow \(local SQLite store\) tracker needs the sqlalchemy package"):
        resolve(load_raw(None, ["tracking=[mlflow]"]), registry)


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


class Flaky:
    """A third-party tracker whose tool goes away: raises in ``fail_in`` (``start``, ``log`` from
    step ``at_step`` on, or ``finish``); records every call it gets."""

    calls: list = []

    def __init__(self, run_dir, config, *, fail_in: str = "log", at_step: int = 3):
        self.fail_in, self.at_step = fail_in, at_step
        Flaky.calls.append(("start",))
        if fail_in == "start":
            raise ConnectionError("collector unreachable")

    def log(self, stage, step, metrics):
        Flaky.calls.append(("log", step))
        if self.fail_in == "log" and step >= self.at_step:
            raise ConnectionError("collector unreachable\n(a second line of detail)")

    def finish(self, summary):
        Flaky.calls.append(("finish",))
        if self.fail_in == "finish":
            raise ConnectionError("collector unreachable")


@hookimpl
def rlhf_register_flaky(register):
    register("flaky", Flaky)


def _tracker_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning: tracker" in line]


@pytest.mark.parametrize("fail_in, where", [("log", "stage sft step 3"), ("start", "start"), ("finish", "finish")])
def test_a_failing_tracker_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, fail_in, where):
    module = types.ModuleType("flaky_plugin")
    module.rlhf_register_trackers = rlhf_register_flaky
    monkeypatch.setitem(sys.modules, "flaky_plugin", module)
    monkeypatch.setitem(sys.modules, "recorder_plugin",
                        types.SimpleNamespace(rlhf_register_trackers=rlhf_register_trackers))
    Flaky.calls, Recorder.calls = [], []
    result = run(tmp_path, "--set", "plugins=[flaky_plugin, recorder_plugin]",
                 "--set", f"tracking=[{{name: flaky, fail_in: {fail_in}}}, recorder]")
    assert result.exit_code == 0, result.output
    (warning,) = _tracker_warnings(result.stderr)  # one line, not one per step
    assert [line for line in result.stderr.splitlines() if "flaky" in line] == [warning]
    assert warning.startswith("rlhf: warning: tracker 'flaky' stopped") and "metrics.jsonl" in warning
    reason = f"{where}: ConnectionError: collector unreachable"
    assert warning.endswith(reason)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["trackers_failed"] == {"flaky": reason}
    sent = [c[1] for c in Flaky.calls if c[0] == "log"]
    # nothing after the failure (step 2 and 4 twice: the training row and the eval row)
    assert sent == {"start": [], "log": [1, 2, 2, 3], "finish": [1, 2, 2, 3, 4, 4]}[fail_in]
    assert (("finish",) in Flaky.calls) == (fail_in == "finish")
    assert len([c for c in Recorder.calls if c[0] == "log"]) == len(rows)  # the healthy tracker got everything
    assert Recorder.calls[-1] == ("finish", "finished")


def test_tensorboard_on_a_full_disk_stops_alone_and_summary_says_where(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    add_scalar = SummaryWriter.add_scalar

    def full_from_step_3(self, tag, value, global_step=None, *args, **kwargs):
        if global_step is not None and global_step >= 3:
            raise OSError(28, "No space left on device")
        return add_scalar(self, tag, value, global_step, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_from_step_3)
    result = run(tmp_path, "--set", "tracking=[{name: tensorboard, flush_secs: 1}]")
    assert result.exit_code == 0, result.output
    reason = "stage sft step 3: OSError: [Errno 28] No space left on device"
    assert _tracker_warnings(result.stderr) == [f"rlhf: warning: tracker 'tensorboard' stopped, the run goes on without "
                                                f"it (metrics.jsonl keeps every row): {reason}"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["trackers_failed"] == {"tensorboard": reason}
    assert "trackers_failed" in result.stdout  # in the end-of-run table too
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "sft"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("sft/loss")] == [1, 2]  # what it wrote before the disk filled


def _wandb_records(path):
    """Every record of a W&B transaction log (``run-*.wandb``), parsed with W&B's own protobuf
    schema. The file is W&B's header (":W&B", magic, version: 7 bytes) followed by LevelDB-log
    blocks of 32 KiB whose records are ``crc32c(4) length(2) type(1) payload`` (type 1 whole,
    2/3/4 first/middle/last piece)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        else:
            pending = (pending if kind == 3 else b"") + chunk


def test_wandb_offline_run_holds_config_history_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run(tmp_path, "--set", "tracking=[{name: wandb, project: demo, tags: [t1]}]")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = list(_wandb_records(files[0]))
    kinds = [r.WhichOneof("record_type") for r in records]
    started = records[kinds.index("run")].run
    assert started.project == "demo" and started.display_name == "run" and list(started.tags) == ["sft", "t1"]
    config = {u.key: json.loads(u.value_json) for u in started.config.update}
    assert config["seed"] == 0 and config["stages"][0]["stage"] == "sft"
    history = [{i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = [(h["sft/step"], h["sft/loss"]) for h in history if "sft/loss" in h]
    expected = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert logged == [(s, pytest.approx(v, rel=1e-12)) for s, v in expected]
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "sft/*" and m.step_metric == "sft/step" for m in metrics)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or u.nested_key[0]: json.loads(u.value_json) for u in r.summary.update})
    assert summary["status"] == "finished" and "exit" in kinds


def test_mlflow_run_read_back_with_mlflow_client(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    result = run(tmp_path, "--set", "tracking=[{name: mlflow, experiment: demo, tags: {team: rl}}]")
    assert result.exit_code == 0, result.output
    run_dir = (tmp_path / "run").resolve()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.tags["team"] == "rl" and found.data.tags["rlhf.stages"] == "sft"
    assert found.data.tags["rlhf.status"] == "finished"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert found.data.params["stages.0.train.lr"] == json.dumps(config["stages"][0]["train"]["lr"])
    assert found.data.params["stages.0.stage"] == "sft" and found.data.params["tracking.0.name"] == "mlflow"
    history = client.get_metric_history(found.info.run_id, "sft/loss")
    expected = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v, rel=1e-12)) for s, v in expected]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "sft/eval_loss")] == [2, 4]
    artifacts = [a.path for a in client.list_artifacts(found.info.run_id)]
    assert artifacts == ["summary.json"] and (run_dir / "mlflow-artifacts").is_dir()


def test_mlflow_resumed_run_continues_the_same_mlflow_run(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    from rlhf_plugins.trackers import MlflowTracker

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    config = {"seed": 0, "stages": [{"name": "sft", "stage": "sft"}]}
    first = MlflowTracker(run_dir, config)
    first.log("sft", 1, {"loss": 2.0})
    first.finish({"status": "interrupted"})
    second = MlflowTracker(run_dir, config)
    second.log("sft", 2, {"loss": 1.0})
    second.finish({"status": "finished", "gold_score": 0.5})
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    assert second.run_id == first.run_id
    got = client.get_run(first.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["run/gold_score"] == 0.5
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "sft/loss")] == [(1, 2.0), (2, 1.0)]



TRACKIO_SCRIPT = """
import sys
from pathlib import Path
from rlhf_plugins.trackers import TrackioTracker

tracker = TrackioTracker(Path(sys.argv[1]), {"stages": [{"stage": "sft"}]}, project="docs-test")
for step in (1, 2, 3):
    tracker.log("sft", step, {"loss": 1.0 / step})
tracker.log("ppo", 1, {"reward_mean": 0.25})
tracker.finish({"status": "finished", "gold_score_ppo": 0.9})
"""


def test_trackio_rows_read_back_from_its_database(tmp_path):
    """The trackio tracker in a fresh process whose TRACKIO_DIR is a temp directory (trackio reads it
    at import): each logged row is in trackio's SQLite store with its stage's step, the run is named
    after the run directory, the end is recorded, and trackio's banner stays off the run's log."""
    import os
    import sqlite3
    import subprocess

    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path / "my-run")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env={**os.environ, "TRACKIO_DIR": str(store)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Trackio" not in done.stdout
    (db,) = store.glob("docs-test*.db")
    logged = [(name, json.loads(m)) for name, m in
              sqlite3.connect(db).execute("SELECT run_name, metrics FROM metrics ORDER BY id")]
    assert {name for name, _ in logged} == {logged[0][0]} and logged[0][0].startswith("my-run-")
    assert [(m["sft/step"], m["sft/loss"]) for _, m in logged if "sft/loss" in m] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [(m["ppo/step"], m["ppo/reward_mean"]) for _, m in logged if "ppo/step" in m] == [(1, 0.25)]
    assert logged[-1][1] == {"run/finished": 1.0, "run/gold_score_ppo": 0.9}
