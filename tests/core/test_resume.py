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
"""


def rlhf(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "rlhf_core.cli", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_identical(a: Path, b: Path) -> None:
    for stage in ("sft", "reward", "ppo"):
        for file in sorted((a / stage).glob("*.safetensors")):
            x, y = load_file(file), load_file(b / stage / file.name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (stage, file.name)
    assert rows(a) == rows(b)


def kill_at(config: Path, out: Path, stage: str, step: int, *extra: str) -> None:
    """Start a run and SIGKILL it once ``stage`` has logged ``step``."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_core.cli", "run", str(config), "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            lines = (out / "metrics.jsonl").read_text().splitlines()
            if any(json.loads(x)["stage"] == stage and json.loads(x)["step"] >= step for x in lines[:-1]):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # killed, not finished


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per advantage estimator."""
    out = {}
    root = tmp_path_factory.mktemp("reference")
    for advantage in ("batch_mean", "gae", "gae+lora"):
        config = root / f"{advantage}.yaml"
        text = PIPELINE.format(advantage=advantage.split("+")[0])
        if advantage.endswith("+lora"):  # the critic and the reward model: adapters + heads on the policy's base
            text += "model: {lora: {r: 4, alpha: 8}}\n"
        config.write_text(text)
        result = rlhf("run", str(config), "--out", str(root / advantage))
        assert result.returncode == 0, result.stderr[-2000:]
        out[advantage] = (config, root / advantage)
    return out


@pytest.mark.parametrize("stage, advantage", [("sft", "batch_mean"), ("reward", "batch_mean"), ("ppo", "batch_mean"),
                                              ("ppo", "gae"), ("ppo", "gae+lora")])
def test_kill_and_resume_is_bit_identical(reference, tmp_path, stage, advantage):
    config, uninterrupted = reference[advantage]
    out = tmp_path / "run"
    limit = 12 if stage == "ppo" else 30
    kill_at(config, out, stage, random.Random(f"{stage}{advantage}").randint(2, limit - 4))
    result = rlhf("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["stages_completed"] == ["sft", "reward", "ppo"]
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
    (torn / "extra-rank0.pt").write_bytes(b"half")
    shutil.copytree(newest, newest.with_name("step-00000100.tmp"))
    result = rlhf("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from step {int(newest.name.split('-')[1])}" in result.stdout
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
