"""Run directories are never mixed, torn or lying: unique names, a lock, overwrite that leaves
nothing of the old run, a status in summary.json, atomic checkpoints, strict JSON, SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rlhf_core.atomic import atomic_dir, atomic_write_text, dumps_strict
from rlhf_core.cli import cli
from rlhf_core.runtime.run_dir import RunDir

TINY_SFT = ["--set", "stages=[{stage: sft, data: {train: 'builtin:letters', builtin_size: 64, max_length: 16}, "
                     "train: {steps: 2, batch_size: 8, log_every: 1}}]"]


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={})


def test_default_run_dirs_are_unique_within_one_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # the same second, always
    paths = set()
    for _ in range(20):
        with RunDir(None, False) as run_dir:
            paths.add(run_dir.path)
    assert len(paths) == 20 and all(p.parent == Path("runs") and p.name.startswith("20260101-000000-") for p in paths)


def test_a_locked_run_dir_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunDir(str(out), False):
        result = invoke("run", "--out", str(out), "--overwrite", *TINY_SFT)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"run directory {out} is in use by another rlhf run (pid {os.getpid()})" in result.output
        assert not (out / "config.yaml").exists()  # nothing written by the refused run
    result = invoke("run", "--out", str(out), "--overwrite", *TINY_SFT)  # released: usable again
    assert result.exit_code == 0, result.output


def _fake_finished_run(out: Path) -> None:
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "model.safetensors").write_text("old weights")
    (out / "plots").mkdir()
    (out / "plots" / "sft.png").write_text("old plot")
    (out / "summary.json").write_text(json.dumps({"status": "finished", "gold_score_ppo": 0.99}))
    (out / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    (out / "config.yaml").write_text("old: config\n")


def test_overwrite_leaves_nothing_of_the_old_run_even_when_the_new_one_fails(tmp_path):
    out = tmp_path / "run"
    _fake_finished_run(out)
    # A config error: validation fails first, so the old run is untouched.
    result = invoke("run", "--out", str(out), "--overwrite", "--set", "stages.sft.train.lr=-1")
    assert result.exit_code == 1 and "stages[0].train.lr: must be a finite number > 0, got -1" in result.output
    assert (out / "sft" / "model.safetensors").read_text() == "old weights"
    # A run that passes validation, then diverges: the old outputs are gone, the status says failed.
    result = invoke("run", "--out", str(out), "--overwrite", *TINY_SFT, "--set", "stages.sft.train.lr=1e30",
                    "--set", "stages.sft.train.max_grad_norm=0")
    assert result.exit_code == 1 and "Traceback" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("failed: stage 'sft':") and summary["stages_completed"] == []
    assert summary["stage_in_progress"] == "sft" and "gold_score_ppo" not in summary
    assert not (out / "sft").exists() and not (out / "plots" / "sft.png").exists()
    assert "old" not in (out / "config.yaml").read_text() and "old" not in (out / "metrics.jsonl").read_text()


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    result = invoke("run", "--out", str(tmp_path / "mine"), "--overwrite", *TINY_SFT)
    assert result.exit_code == 1 and "does not look like an rlhf run directory" in result.output
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_unwritable_or_file_out_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    result = invoke("run", "--out", str(tmp_path / "afile"), *TINY_SFT)
    assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output

    def denied(self, *args, **kwargs):  # as a non-root user under a read-only parent would see
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    result = invoke("run", "--out", str(tmp_path / "ro" / "run"), *TINY_SFT)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot create run directory {tmp_path / 'ro' / 'run'}: Permission denied" in result.output


def test_finished_run_status_and_strict_json(tmp_path):
    out = tmp_path / "run"
    result = invoke("run", "--out", str(out), *TINY_SFT)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["stages_completed"] == ["sft"] and "pid" not in summary
    assert dumps_strict({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_atomic_write_text_and_dir_keep_the_old_version_on_error(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    ckpt = tmp_path / "ckpt"
    with atomic_dir(ckpt) as tmp:
        (tmp / "a").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(ckpt) as tmp:
            (tmp / "a").write_text("v2-partial")
            raise RuntimeError("disk full")
    assert (ckpt / "a").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "summary.json"]
    with atomic_dir(ckpt) as tmp:
        (tmp / "b").write_text("v2")
    assert sorted(p.name for p in ckpt.iterdir()) == ["b"]


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import torch
    from transformers import ByT5Tokenizer, LlamaForCausalLM
    from rlhf_core.models import save_causal_lm, tiny_config

    out = Path(sys.argv[1])
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(tok)))
    if sys.argv[2] == "first":
        save_causal_lm(model, tok, out)
        sys.exit(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real = type(model).save_pretrained

    def torn(self, directory, **kw):
        real(self, directory, **kw)
        weights = Path(directory) / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])  # half the weights on disk ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... when the process is killed

    type(model).save_pretrained = torn
    save_causal_lm(model, tok, out)
''')


def test_a_kill_half_way_through_a_checkpoint_leaves_the_previous_one(tmp_path):
    from transformers import LlamaForCausalLM

    script = tmp_path / "save.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "run" / "sft"
    assert subprocess.run([sys.executable, str(script), str(out), "first"]).returncode == 0
    before = {k: v.clone() for k, v in LlamaForCausalLM.from_pretrained(out).state_dict().items()}
    killed = subprocess.run([sys.executable, str(script), str(out), "second"])
    assert killed.returncode == -signal.SIGKILL
    after = LlamaForCausalLM.from_pretrained(out).state_dict()  # the complete previous checkpoint
    assert all((after[k] == v).all() for k, v in before.items())
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == ["sft"]


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhf_core.cli", "run", "--out", str(out), "--set", "stages.sft.train.steps=100000",
           "--set", "stages.sft.train.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RLHF_DEBUG": ""})
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "interrupted by SIGTERM" in stderr
    assert stderr.rstrip().endswith(f"continue with: rlhf run --resume {out}")  # the exact command
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGTERM"
    assert summary["stages_completed"] == [] and summary["stage_in_progress"] == "sft"
    assert not (out / "sft").exists()  # no half-trained stage output that looks finished
