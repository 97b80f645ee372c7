"""kill -9 at any moment, resume, and get bit-identical final weights and metrics (CPU, fp32, same
world size). Every kill here is a real SIGKILL of an ``rlhf run`` subprocess at a random step."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TIMING = {"time", "tokens_per_s", "time_generate", "time_score", "time_train"}

PIPELINE = """
seed: 0
checkpoint: {{every: 3}}
stages:
  - stage: sft
    data: {{train: "builtin:letters", builtin_size: 300, max_length: 16}}
    train: {{steps: 30, batch_size: 16, lr: 1.0e-3, log_every: 1, eval_every: 7}}
  - stage: reward
    data: {{train: "builtin:letters", builtin_size: 300, max_length: 16}}
    train: {{steps: 30, batch_size: 16, lr: 1.0e-3, log_every: 2, grad_accum: 2}}
  - stage: ppo
    data: {{train: "builtin:letters", builtin_size: 60}}
    advantage: {advantage}
    gold: letters_gold
    iterations: 12
    prompts_per_batch: 8
    minibatch_size: 4
    generation: {{max_new_tokens: 6}}
    kl: {{adaptive: true, target: 0.5, horizon: 50}}
    eval_every: 4
    eval_prompts: 8
  - stage: dpo
    init: "@sft"
    data: {{train: "builtin:letters", builtin_size: 200, max_length: 16}}
    train: {{steps: 12, batch_size: 8, lr: 1.0e-3, log_every: 1, eval_every: 5}}
"""


def rlhf(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "rlhf_core.cli", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_identical(a: Path, b: Path) -> None:
    for stage in ("sft", "reward", "ppo", "dpo"):
        for file in sorted((a / stage).glob("*.safetensors")):
            x, y = load_file(file), load_file(b / stage / file.name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (stage, file.name)
    assert rows(a) == rows(b)


def kill_at(config: Path, out: Path, stage: str, step: int, *extra: str, until=None) -> None:
    """Start a run and SIGKILL it once ``stage`` has logged ``step`` (and ``until(out)`` is true, when given)."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_core.cli", "run", str(config), "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            lines = (out / "metrics.jsonl").read_text().splitlines()
            if (any(json.loads(x)["stage"] == stage and json.loads(x)["step"] >= step for x in lines[:-1])
                    and (until is None or until(out))):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # killed, not finished


class References(dict):
    """Uninterrupted runs, one per advantage estimator, each run the first time a test asks for it."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, advantage: str) -> tuple[Path, Path]:
        config = self.root / f"{advantage}.yaml"
        text = PIPELINE.format(advantage=advantage.split("+")[0])
        if advantage.endswith("+lora"):  # the critic and the reward model: adapters + heads on the policy's base
            text += "model: {lora: {r: 4, alpha: 8}}\n"
        config.write_text(text)
        result = rlhf("run", str(config), "--out", str(self.root / advantage))
        assert result.returncode == 0, result.stderr[-2000:]
        self[advantage] = (config, self.root / advantage)
        return self[advantage]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per advantage estimator (``batch_mean``, ``gae``, ``gae+lora``)."""
    return References(tmp_path_factory.mktemp("reference"))


# The default suite kills PPO (with a critic, LoRA and a shared base) and DPO after it here, and SFT
# with packing (tests/core/test_packing_runs.py); the slow tests add the plainer variants.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("stage, advantage", [pytest.param("sft", "batch_mean", marks=SLOW),
                                              pytest.param("reward", "batch_mean", marks=SLOW),
                                              pytest.param("ppo", "batch_mean", marks=SLOW),
                                              pytest.param("ppo", "gae", marks=SLOW), ("ppo", "gae+lora"),
                                              pytest.param("dpo", "batch_mean", marks=SLOW), ("dpo", "gae+lora")])
def test_kill_and_resume_is_bit_identical(reference, tmp_path, stage, advantage):
    config, uninterrupted = reference[advantage]
    out = tmp_path / "run"
    limit = 12 if stage in ("ppo", "dpo") else 30
    kill_at(config, out, stage, random.Random(f"{stage}{advantage}").randint(2, limit - 4))
    result = rlhf("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["stages_completed"] == ["sft", "reward", "ppo", "dpo"]
    assert_identical(uninterrupted, out)
    assert not (out / "checkpoints" / stage).exists()  # spent once the stage finished


def test_a_kill_during_a_checkpoint_write_resumes_from_the_previous_one(reference, tmp_path):
    config, uninterrupted = reference["batch_mean"]
    out = tmp_path / "run"
    kill_at(config, out, "sft", 14)
    ckpts = sorted((out / "checkpoints" / "sft").glob("step-*"))
    newest = ckpts[-1]
    # What a kill half-way through the next save leaves: a temp dir and a step dir without meta.json.
    torn = newest.with_name("step-00000099")
    shutil.copytree(newest, torn)
    (torn / "meta.json").unlink()
    (torn / "extra-rank0.json").write_bytes(b"half")
    shutil.copytree(newest, newest.with_name("step-00000100.tmp"))
    # ... and a kill during the final model's save: atomic_dir's hidden temp directory, its writer gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = out / f".sft.tmp-{dead.stdout.strip()}"
    shutil.copytree(newest, leftover)
    result = rlhf("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from step {int(newest.name.split('-')[1])}" in result.stdout
    # (the kill itself may have left a step-N.tmp of its own: those are removed and named too)
    removed = next(line for line in result.stdout.splitlines() if "half-written file(s) left by a killed run:" in line)
    assert leftover.name in removed and "checkpoints/sft/step-00000100.tmp" in removed
    assert not leftover.exists()
    assert_identical(uninterrupted, out)


@pytest.mark.slow  # end to end; the fallback itself is in the default suite (tests/core/test_checkpoint.py)
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_identically(reference, tmp_path):
    config, uninterrupted = reference["batch_mean"]
    out = tmp_path / "run"
    kill_at(config, out, "sft", 11)
    # Complete checkpoints only: the kill may have interrupted a save (a step-N.tmp without meta.json).
    older, newest = [p for p in sorted((out / "checkpoints" / "sft").glob("step-*")) if (p / "meta.json").is_file()][-2:]
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    result = rlhf("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"checkpoint {newest} is damaged (__0_0.distcp does not match its recorded SHA-256)" in result.stderr
    assert f"resuming from step {int(older.name.split('-')[1])}" in result.stdout
    assert_identical(uninterrupted, out)


def test_sigterm_writes_a_checkpoint_at_the_next_step_and_resumes_identically(reference, tmp_path):
    config, uninterrupted = reference["batch_mean"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_core.cli", "run", str(config), "--out", str(out),
                             "--set", "checkpoint.every=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        try:
            if any(json.loads(x)["stage"] == "reward" for x in (out / "metrics.jsonl").read_text().splitlines()[:-1]):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stages_completed"] == ["sft"]
    assert list((out / "checkpoints" / "reward").glob("step-*"))  # written at the step boundary after the signal
    result = rlhf("run", "--resume", str(out), "--set", "checkpoint.every=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from step" in result.stdout
    assert_identical(uninterrupted, out)


def test_resume_refuses_a_changed_config_and_is_a_no_op_when_finished(reference, tmp_path):
    config, uninterrupted = reference["batch_mean"]
    out = tmp_path / "run"
    kill_at(config, out, "sft", 5)
    result = rlhf("run", "--resume", str(out), "--set", "stages.sft.train.lr=5e-4", "--set", "checkpoint.every=7",
                  "--set", "stages.sft.train.log_every=2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "stages[0].train.lr: 0.001 -> 0.0005" in result.stderr
    assert "checkpoint.every" not in result.stderr.split("only")[0] and "log_every" not in result.stderr.split("only")[0]
    result = rlhf("run", "--resume", str(uninterrupted))
    assert result.returncode == 0 and "already finished; nothing to resume" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = rlhf("run", "--resume", str(empty))
    assert result.returncode == 1 and "nothing to resume (no config.yaml" in result.stderr


@pytest.mark.slow  # three two-process runs; one-process kills and resumes are in the default suite
def test_two_process_kill_and_resume_matches_an_uninterrupted_two_process_run(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("""
seed: 0
checkpoint: {every: 2}
stages:
  - stage: sft
    data: {train: "builtin:letters", builtin_size: 200, max_length: 16}
    train: {steps: 16, batch_size: 8, lr: 1.0e-3, log_every: 1}
""")
    result = rlhf("run", str(config), "--out", str(tmp_path / "whole"), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    kill_at(config, tmp_path / "cut", "sft", 7, "--nproc", "2")
    subprocess.run(["pkill", "-9", "-f", str(tmp_path / "cut")], check=False)  # the launcher's workers too
    time.sleep(0.5)
    result = rlhf("run", "--resume", str(tmp_path / "cut"))  # another world size: refused up front
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "its checkpoints were written by 2 processes; resume with --nproc 2" in result.stderr
    result = rlhf("run", "--resume", str(tmp_path / "cut"), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = load_file(tmp_path / "whole" / "sft" / "model.safetensors"), load_file(tmp_path / "cut" / "sft" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "whole") == rows(tmp_path / "cut")


EPISODES_PIPELINE = """
seed: 0
checkpoint: {every: 3}
stages:
  - stage: sft
    data: {train: "builtin:guess", builtin_size: 300, max_length: 128}
    train: {steps: 12, batch_size: 16, lr: 3.0e-3, log_every: 4}
  - stage: ppo
    data: {train: "builtin:guess", builtin_size: 60, max_length: 128}
    environment: {name: guess, max_turns: 4}
    reward: null
    advantage: gae
    iterations: 6
    prompts_per_batch: 4
    samples_per_prompt: 2
    minibatch_size: 4
    generation: {max_new_tokens: 4}
    kl: {coef: 0.05}
    eval_every: 2
    eval_prompts: 4
"""


@pytest.mark.slow  # three runs of a two-stage pipeline
def test_multi_turn_ppo_kill_and_resume_is_bit_identical(tmp_path):
    """Episodes (seeds from the checkpointed prompt sampler), a critic over the policy's tokens of
    several turns, and evaluations of episodes: a SIGKILL mid-stage and --resume change nothing."""
    config = tmp_path / "episodes.yaml"
    config.write_text(EPISODES_PIPELINE)
    result = rlhf("run", str(config), "--out", str(tmp_path / "whole"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert any("episode_turns" in r for r in rows(tmp_path / "whole"))
    kill_at(config, tmp_path / "cut", "ppo", 3)
    result = rlhf("run", "--resume", str(tmp_path / "cut"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_identical(tmp_path / "whole", tmp_path / "cut")


TENSORBOARD_PIPELINE = """
seed: 0
checkpoint: {{every: {every}}}
tracking: [{{name: tensorboard, flush_secs: 1}}]
stages:
  - stage: sft
    data: {{train: "builtin:letters", builtin_size: 200, max_length: 16}}
    train: {{steps: 12, batch_size: 8, lr: 1.0e-3, log_every: 1, eval_every: 4}}
  - stage: reward
    data: {{train: "builtin:letters", builtin_size: 200, max_length: 16}}
    train: {{steps: 100, batch_size: 8, lr: 1.0e-3, log_every: 1, eval_every: 10}}
"""


def tensorboard_scalars(run: Path, stage: str) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` of a stage's TensorBoard run, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / stage), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow  # two kill-and-resume pipelines
@pytest.mark.parametrize("every, checkpoint", [(30, 30), (0, 0)])  # reward resumes at its checkpoint / starts over
def test_tensorboard_after_kill_and_resume_holds_each_step_once(tmp_path, every, checkpoint):
    from tensorboard.backend.event_processing import plugin_event_accumulator

    config = tmp_path / "c.yaml"
    config.write_text(TENSORBOARD_PIPELINE.format(every=every))
    out = tmp_path / "run"

    def tensorboard_past_checkpoint(run: Path) -> bool:
        """TensorBoard already holds reward steps after the newest checkpoint: the resume logs them again."""
        saved = [int(m.parent.name.split("-")[1]) for m in (run / "checkpoints" / "reward").glob("step-*/meta.json")]
        newest = max(saved, default=0)
        steps = [s for s, _ in tensorboard_scalars(run, "reward").get("reward/loss", [])]
        return newest >= checkpoint and bool(steps) and steps[-1] > newest + 2

    kill_at(config, out, "reward", 1, until=tensorboard_past_checkpoint)
    killed = [s for s, _ in tensorboard_scalars(out, "reward")["reward/loss"]]
    result = rlhf("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    restart = summary["resumed_from"].get("reward", 0)  # its newest checkpoint; 0: none, it starts over
    assert restart in ((30, 60, 90) if every else (0,))
    assert max(killed) > restart + 2  # the killed attempt's events include steps logged again after the resume
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for stage in ("sft", "reward"):  # sft finished before the kill: reward's purge must leave it whole
        expected: dict[str, list[tuple[int, float]]] = {}
        for row in (r for r in rows if r["stage"] == stage):
            for key, value in row.items():
                if key not in ("stage", "step") and isinstance(value, (int, float)):
                    expected.setdefault(f"{stage}/{key}", []).append((row["step"], value))
        logged = tensorboard_scalars(out, stage)
        assert logged.keys() == expected.keys()
        for tag, points in expected.items():
            assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag  # every step exactly once
            assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32
        served = plugin_event_accumulator.EventAccumulator(str(out / "tensorboard" / stage),
                                                           size_guidance={"tensors": 0})
        served.Reload()  # the reader TensorBoard's Python server uses (it ignores a directory's first restart)
        assert {tag: [e.step for e in served.Tensors(tag)] for tag in served.Tags()["tensors"]} == \
            {tag: [s for s, _ in points] for tag, points in expected.items()}
    top = plugin_event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    top.Reload()  # the killed attempt's config text is purged too (the classic reader never purges text)
    assert len(top.Tensors("config/text_summary")) == 1 and len(top.Tensors("summary/text_summary")) == 1
