"""Rollouts that overlap training (``ppo.async``): the synchronous loop at ``max_staleness: 0``, the
fixed version schedule and behaviour log-probs at 1, determinism and exact resume, a dead worker,
and the config's refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_plugins.ppo.asynchronous import needed_version

TIMING = {"time", "time_generate", "time_score", "time_train", "seconds", "peak_memory_mb", "async_wait"}

PIPELINE = """
seed: 0
checkpoint: {{every: 2}}
stages:
  - stage: sft
    data: {{train: "builtin:letters", builtin_size: 300, max_length: 24}}
    train: {{steps: 30, batch_size: 16, lr: 3.0e-3}}
  - stage: ppo
    data: {{train: "builtin:letters", builtin_size: 60}}
    reward: length
    iterations: {iterations}
    prompts_per_batch: 8
    minibatch_size: 8
    ppo_epochs: 1
    generation: {{max_new_tokens: 8}}
    optim: {{lr: 2.0e-3}}
    kl: {{coef: 0.05, placement: loss}}
    eval_prompts: 8
    eval_every: 0
{extra}
"""


def rlhf(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "rlhf_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def rows(run: Path, stage: str = "ppo") -> list[dict]:
    out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in out if r["stage"] == stage]


def write(tmp_path: Path, extra: str = "", iterations: int = 4, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(PIPELINE.format(extra=extra, iterations=iterations))
    return path


ASYNC = "    async: {max_staleness: 1}\n    rollout_correction: {type: tis, cap: 2.0}\n"


def test_the_version_schedule():
    """Batch i (1-based) is sampled after max(0, i - 1 - K) updates: K = 0 is synchronous PPO."""
    assert [needed_version(i, 0) for i in range(1, 6)] == [0, 1, 2, 3, 4]
    assert [needed_version(i, 1) for i in range(1, 6)] == [0, 0, 1, 2, 3]
    assert [needed_version(i, 2) for i in range(1, 6)] == [0, 0, 0, 1, 2]


@pytest.mark.slow  # whole runs with a worker process
def test_max_staleness_zero_is_the_synchronous_loop_bit_for_bit(tmp_path):
    for name, extra in (("sync", ""), ("zero", "    async: {max_staleness: 0}\n")):
        result = rlhf("run", str(write(tmp_path, extra, name=f"{name}.yaml")), "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
    assert rows(tmp_path / "sync") == rows(tmp_path / "zero")


@pytest.mark.slow  # whole runs with a worker process
def test_one_update_of_staleness_records_versions_and_behaviour_logprobs_and_resumes_exactly(tmp_path):
    config = write(tmp_path, ASYNC, iterations=6)
    result = rlhf("run", str(config), "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    trained = [r for r in rows(tmp_path / "a") if "policy_loss" in r]
    # batch 1 and 2 are sampled with the starting weights, batch i with those after i - 2 updates
    assert [r["staleness"] for r in trained] == [0.0] + [1.0] * 5
    # iteration 1: the worker's weights are the trainer's, so its behaviour log-probs are the trainer's
    assert trained[0]["engine_logprob_gap"] < 1e-4
    assert all(r["engine_logprob_gap"] > 1e-4 for r in trained[1:])  # one update behind: a real gap, corrected
    assert all("is_weight_mean" in r and "is_capped_frac" in r for r in trained)  # TIS applied, logged
    # the schedule does not depend on timing: a second run logs the same numbers
    result = rlhf("run", str(config), "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    # kill -9 after iteration 3 (a checkpoint at 2 holds batches 3: sampled with the weights after 1 update)
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_core.cli", "run", str(config), "--out", str(tmp_path / "c")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if any(json.loads(x)["stage"] == "ppo" and json.loads(x).get("step", 0) >= 3 and "policy_loss" in x
                   for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[:-1]):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its rollout worker
    proc.wait()
    result = rlhf("run", "--resume", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert rows(tmp_path / "a") == rows(tmp_path / "c")


@pytest.mark.slow  # whole runs: two FSDP processes, each with its rollout worker
def test_async_rollouts_on_two_fsdp_processes(tmp_path):
    """``--nproc 2``: each rank's worker samples that rank's share with the gathered weights; the
    version schedule holds (staleness 0, then 1), TIS is applied and logged, and a second run logs
    the same numbers (nothing depends on the timing of the two workers)."""
    config = write(tmp_path, ASYNC, iterations=4)
    for name in ("a", "b"):
        result = rlhf("run", str(config), "--out", str(tmp_path / name), "--nproc", "2")
        assert result.returncode == 0, result.stderr[-3000:]
    trained = [r for r in rows(tmp_path / "a") if "policy_loss" in r]
    assert [r["staleness"] for r in trained] == [0.0, 1.0, 1.0, 1.0]
    assert trained[0]["engine_logprob_gap"] < 1e-4 and all(r["engine_logprob_gap"] > 1e-4 for r in trained[1:])
    assert all("is_weight_mean" in r for r in trained)
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow  # whole runs with a worker process
def test_a_rollout_worker_killed_mid_run_ends_the_job_with_a_clear_message(tmp_path):
    config = write(tmp_path, ASYNC, iterations=200)
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_core.cli", "run", str(config), "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    worker = None
    while time.time() < deadline and worker is None:
        time.sleep(0.2)
        try:
            started = any('"policy_loss"' in x for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        except OSError:
            started = False
        if started:
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            for pid in children:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "multiprocessing.spawn" in cmd and "resource_tracker" not in cmd:
                    worker = int(pid)
    assert worker is not None, "no rollout worker process found"
    os.kill(worker, signal.SIGKILL)
    killed = time.time()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.time() - killed < 15
    assert "the rollout worker (pid" in err and "died with exit code -9" in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] != "finished"


def test_async_config_mistakes_are_named_before_anything_trains(tmp_path):
    config = write(tmp_path, "    async: {max_staleness: 1}\n    environment: guess\n"
                             "    dynamic_sampling: {max_rounds: 2}\n    samples_per_prompt: 2\n")
    result = rlhf("run", str(config), "--out", str(tmp_path / "run"))
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in text
    for expected in ("stages[1].async: not with this config: multi-turn episodes",
                     "stages[1].async: not with this config: dynamic_sampling",
                     "stages[1].async: samples from weights up to 1 update(s) old need a correction for the lag; "
                     "add rollout_correction: {type: tis}"):
        assert expected in text, expected
    assert not (tmp_path / "run" / "sft").exists()
    config = write(tmp_path, "    async: {max_staleness: -1, threads: 0}\n", name="values.yaml")
    text = rlhf("run", str(config), "--out", str(tmp_path / "run2")).stderr
    assert "stages[1].async.max_staleness: must be at least 0, got -1" in text
    assert "stages[1].async.threads: must be at least 1, got 0" in text


@pytest.mark.slow
def test_ppo_with_async_rollouts_beats_sft_on_the_gold_judge(tiny_pipeline_yaml, tmp_path):
    result = rlhf("run", tiny_pipeline_yaml(iterations=40), "--out", str(tmp_path / "run"),
                  "--set", "stages.ppo.async={max_staleness: 1}", "--set", "stages.ppo.rollout_correction={type: tis}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gold_score_ppo"] > summary["gold_score_sft"] + 0.1
