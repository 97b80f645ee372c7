"""The rlhf CLI through click's CliRunner, and the CI-sized end-to-end pipeline."""
from __future__ import annotations

import json

import matplotlib.image
import numpy
import pytest
import yaml
from click.testing import CliRunner

from rlhf_core import __version__
from rlhf_core.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args), obj={}, catch_exceptions=False)


def test_version_and_help():
    assert invoke("--version").output.strip() == f"rlhf, version {__version__}"
    out = invoke("run", "--help").output
    for flag in ("--set", "--out", "--print-config", "--overwrite"):
        assert flag in out


def test_plugins_json_lists_builtins_and_what_they_registered():
    rows = {r["name"]: r for r in json.loads(invoke("plugins", "--json").output)}
    assert rows["sft"]["source"] == "builtin"
    assert rows["ppo-advantages"]["registered"]["advantage"] == ["batch_mean", "ema", "gae", "group_mean", "reinforce_pp", "rloo"]
    assert rows["reward"]["registered"]["loss"] == ["bradley_terry", "huber", "mse"]
    text = invoke("plugins").output
    assert "ppo-rewards" in text and "reward: length, reward_model" in text
    assert "ppo" not in {r["name"] for r in json.loads(invoke("--disable", "ppo", "plugins", "--json").output)}


def test_print_config_applies_overrides():
    out = invoke("run", "--print-config", "--set", "stages.ppo.advantage=rloo", "--set", "stages.ppo.samples_per_prompt=4").output
    data = yaml.safe_load(out)
    ppo = data["stages"][2]
    assert ppo["advantage"] == "rloo" and ppo["samples_per_prompt"] == 4 and data["kernels"]["backend"] == "auto"


def test_bad_config_is_one_clear_message_not_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - stage: sft\n    loss: nope\n    train: {lr: fast}\n")
    result = CliRunner().invoke(cli, ["run", str(path)], obj={})
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"{path} has 2 problem(s)" in result.output
    assert "stages[0].loss: unknown loss 'nope'; available: cross_entropy" in result.output


def test_bad_data_file_is_reported_with_line(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"stages:\n  - stage: sft\n    data: {{train: {data}}}\n    train: {{steps: 1}}\n")
    result = CliRunner().invoke(cli, ["run", str(cfg), "--out", str(tmp_path / "run")], obj={})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{data}:2: missing field 'response'" in result.output


def test_existing_run_dir_needs_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep")
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "run")], obj={})
    assert result.exit_code == 1 and "--overwrite" in result.output


def test_end_to_end_sft_reward_ppo_learns(tiny_pipeline_yaml, tmp_path):
    """The CI-sized default: losses go down, the reward model tracks the rater, PPO beats SFT on gold."""
    out = tmp_path / "run"
    result = invoke("run", tiny_pipeline_yaml(), "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sft = [r["loss"] for r in rows if r["stage"] == "sft" and "loss" in r]
    reward = [r["loss"] for r in rows if r["stage"] == "reward" and "loss" in r]
    assert sft[-1] < 0.5 * sft[0] and reward[-1] < 0.5 * reward[0]
    assert all(r["tokens_per_s"] > 0 for r in rows if r["stage"] in ("sft", "reward") and "tokens_per_s" in r)
    # Noisy demonstrations put the optimal SFT loss near 1.37 nats/token (see plugins/letters.py).
    assert summary["stages"]["sft"]["eval_loss"] < 1.6
    assert summary["stages"]["reward"]["eval_corr"] > 0.8
    assert summary["gold_score_ppo"] > summary["gold_score_sft"] + 0.15
    # Reward-hacking guard: the KL to the reference stays bounded on the demo configuration.
    assert max(r["kl"] for r in rows if r["stage"] == "ppo" and "kl" in r) < 8.0
    for stage in ("sft", "reward", "ppo"):  # a drawn figure: axes, curves, labels in many colours, not a blank
        image = matplotlib.image.imread(out / "plots" / f"{stage}.png")
        assert image.ndim == 3 and min(image.shape[:2]) >= 200, image.shape
        assert len(numpy.unique(image.reshape(-1, image.shape[2]), axis=0)) > 50
    assert (out / "ppo" / "model.safetensors").is_file() and (out / "reward" / "reward_head.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"][2]["stage"] == "ppo"
    assert "gold_score_ppo" in result.output

    # `rlhf eval` reports the number PPO's final evaluation reported (same prompts, same seed).
    from rlhf_core.config import DataConfig
    from rlhf_core.data import load_split
    from rlhf_core.plugin_system.manager import build_registry, get_plugin_manager

    registry = build_registry(get_plugin_manager(entry_points=False))
    _, held = load_split(DataConfig(train="builtin:letters", builtin_size=300), "prompts", registry, seed=0)
    prompts = tmp_path / "eval_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r.fields) + "\n" for r in held[:48]))
    result = invoke("eval", str(out / "ppo"), "--prompts", str(prompts), "--reward", "{name: reward_model, path: "
                    f"{out / 'reward'}}}", "--gold", "letters_gold", "--max-new-tokens", "12", "--json")
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    assert numbers["prompts"] == len(held[:48])
    assert numbers["gold"] == pytest.approx(summary["stages"]["ppo"]["eval_gold_end"], abs=1e-9)
    assert numbers["reward"] == pytest.approx(summary["stages"]["ppo"]["eval_reward_end"], abs=1e-6)
    # `rlhf generate` samples from the same directory.
    samples = [json.loads(x) for x in invoke("generate", str(out / "ppo"), "--prompt", "a=", "--prompt", "b=",
                                             "--n", "3", "--max-new-tokens", "8", "--json").output.splitlines()]
    assert [s["prompt"] for s in samples] == ["a=", "b="] and all(len(s["samples"]) == 3 for s in samples)


@pytest.mark.parametrize("advantage", ["rloo", "gae", "group_mean", "ema"])
def test_every_estimator_runs_and_improves_reward(tiny_pipeline_yaml, tmp_path, advantage):
    extra = f"    advantage: {advantage}\n" + ("    samples_per_prompt: 4\n    prompts_per_batch: 8\n" if advantage in ("rloo", "group_mean") else "")
    cfg = tiny_pipeline_yaml(extra, iterations=20)
    result = invoke("run", cfg, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["gold_score_ppo"] > summary["gold_score_sft"] + 0.05


def test_group_estimator_needs_groups(tiny_pipeline_yaml, tmp_path):
    result = CliRunner().invoke(cli, ["run", tiny_pipeline_yaml("    advantage: rloo\n"), "--out", str(tmp_path / "r")], obj={})
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "== stage" not in result.output  # reported before anything ran
    assert "stages[2].samples_per_prompt: advantage estimator 'rloo' compares samples of the same prompt and needs samples_per_prompt >= 2" in result.output


def test_diverging_training_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "r"), "--set", "stages.sft.train.lr=1e6",
                                      "--set", "stages.sft.train.steps=30", "--set", "stages.sft.train.max_grad_norm=0"], obj={})
    assert result.exit_code == 1 and "Traceback" not in result.output
    # Seed 0: step 2's update makes the weights huge, and step 3's gradient overflows before any
    # loss does; the step is refused before it reaches the weights (tests/core/test_training.py
    # checks each message on its own).
    assert ("Error: stage 'sft': the gradient norm became nan at step 3; lower train.lr, set train.max_grad_norm > 0, "
            "or check the data") in result.output


def test_bench_is_a_builtin_plugin_command(tmp_path):
    """``rlhf bench`` comes from the ``bench`` plugin through rlhf_register_commands: it runs,
    writes its JSON, and ``--disable bench`` removes it."""
    import subprocess
    import sys

    out = tmp_path / "b"
    done = subprocess.run([sys.executable, "-m", "rlhf_core.cli", "bench", "kernels", "--shape", "32x300",
                           "--dtype", "float32", "--op", "cross_entropy", "--no-compile", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "kernels.json").read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"eager", "torch_ce"} and (out / "kernels.png").is_file()
    gone = subprocess.run([sys.executable, "-m", "rlhf_core.cli", "--disable", "bench", "bench", "kernels"],
                          capture_output=True, text=True, timeout=300)
    assert gone.returncode == 2 and "No such command 'bench'" in gone.stderr


@pytest.mark.slow  # every memory set-up at a toy shape, ~25 s
def test_bench_memory_runs_every_kind_of_set_up_at_a_toy_shape(tmp_path):
    """``rlhf bench memory`` at a toy shape: a PPO iteration, a PPO iteration with a reward model
    and a critic on the policy's shared base, an SFT step; the table's rows, JSON and PNG."""
    import subprocess
    import sys

    pytest.importorskip("peft")
    out = tmp_path / "m"
    done = subprocess.run([sys.executable, "-m", "rlhf_core.cli", "bench", "memory", "--hidden", "64", "--layers", "1",
                           "--vocab", "500", "--prompt", "4", "--response", "4", "--batch", "2", "--setup", "plain",
                           "--critic-setup", "fused+lora+shared", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "memory.json").read_text())["rows"]
    assert [(r["stage"], r["setup"]) for r in rows] == [("ppo", "plain"), ("ppo+rm+critic", "fused+lora+shared"),
                                                       ("sft", "plain")]
    assert all(r["peak_rss_mb"] > 0 and r["seconds"] > 0 for r in rows) and (out / "memory.png").is_file()
    assert rows[1]["trainable_params"] < rows[0]["trainable_params"]  # the policy trains its adapters only


def test_doctor_says_what_is_usable_and_what_a_missing_piece_costs(monkeypatch):
    """One row per piece; a missing optional package says how to install it and what is lost."""
    import importlib.util

    import torch

    rows = {r["name"]: r for r in json.loads(invoke("doctor", "--json").output)}
    assert rows["torch"] == {"name": "torch", "ok": True, "detail": torch.__version__, "without": ""}
    assert {"CUDA", "Triton kernels", "C++ kernels", "peft", "vllm", "datasets", "tensorboard", "wandb", "mlflow",
            "trackio"} <= set(rows)
    assert rows["CUDA"]["ok"] == torch.cuda.is_available()
    if rows["C++ kernels"]["ok"]:
        assert rows["C++ kernels"]["detail"].split()[2] in ("avx512", "avx2", "scalar")  # the ISA the kernels use
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    text = invoke("doctor").output
    assert '-- peft' in text and 'not installed: pip install -e ".[lora]"' in text
    assert "without it: no LoRA (model.lora)" in text


def test_dry_run_validates_everything_and_prints_the_plan_without_training(tmp_path, monkeypatch):
    """The plan has the stages, the model, each data input's record count, steps and token estimates;
    nothing is trained and no run directory appears. A bad data file is the same error as a real run's."""
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "--dry-run", "--set", "stages.sft.train.steps=7", "--set", "stages.ppo.samples_per_prompt=2",
                    "--set", "stages.ppo.advantage=rloo")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "model: builtin:tiny, dtype float32, device cpu" in lines
    assert "stage 0 'sft' (sft, plugin sft)" in lines and "  data.train: builtin:letters (2000 records)" in lines
    assert "  training examples: 1,800" in lines and "  optimizer steps: 7" in lines
    assert "  tokens (at most): 7,168" in lines  # 7 steps x 32 examples x max_length 32
    ppo = lines[lines.index("stage 2 'ppo' (ppo, plugin ppo)"):]
    assert "  samples: 3,840" in ppo and "  generated tokens (at most): 46,080" in ppo  # 60 x 32 x 2, x 12 tokens
    assert not (tmp_path / "runs").exists()
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "output": "b"}\n')
    bad = CliRunner().invoke(cli, ["run", "--dry-run", "--set", f"stages.sft.data.train={data}"], obj={})
    assert bad.exit_code == 1 and "map it with data.fields: {response: output}" in bad.output


def test_the_rollout_benchmark_measures_each_engine_beside_its_floor(tmp_path):
    """``rlhf bench rollout``'s measurement at a toy shape: every engine asked for gets a row with
    tokens/s, ms per step, a floor (step FLOPs over a measured matrix-product rate, below the
    measured step time) and one PPO iteration's split; an engine that cannot run says why."""
    from rlhf_bench import rollout_speed

    rows = rollout_speed.measure("small", ("hf", "hf-forward", "hf-loop", "vllm"), prompts=2, samples=2,
                                 new_tokens=4, prompt_len=4, repeats=2)
    assert [r["engine"] for r in rows] == ["hf", "hf-forward", "hf-loop", "vllm"]
    for row in rows[:3]:
        assert row["rows"] == 4 and row["tokens"] > 0 and row["tokens_per_s"] > 0
        assert 0 < row["floor_ms_step"] < row["ms_per_step"] and 0 < row["of_floor_step"] < 1
        assert row["iteration_s"] >= row["generate_s"] + row["train_s"] > 0
    assert "unavailable" in rows[3] or rows[3]["tokens"] > 0
    # 2 rows x 256 hidden x (q, k, v, o + 3 MLP products of 688) x 4 layers + the head, plus attention
    from rlhf_bench.vs_trl import _model

    config = _model()[0].config
    per_row = 2 * (4 * (4 * 256 * 256 + 3 * 256 * 688) + 256 * 384) + 4 * (2 * 2 * 4 * 64 * 10)
    assert rollout_speed.step_flops(config, 2, 10) == 2 * per_row
