"""Results that do not depend on the number of processes: 2 gloo processes on CPU against 1.

Every test here launches real processes through torch's launcher (``rlhf run --nproc 2`` or
torchrun), so they are kept small: a few optimizer steps of the builtin tiny model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rlhf_core

HERE = Path(__file__).parent
ROOT = Path(rlhf_core.__file__).resolve().parent.parent

SFT_REWARD = """
seed: 0
distributed: {{strategy: {strategy}}}
stages:
  - stage: sft
    data: {{train: "builtin:letters", builtin_size: 200, max_length: 16}}
    train: {{steps: 4, batch_size: 8, grad_accum: 2, lr: 1.0e-3, log_every: 1, eval_every: 2}}
  - stage: reward
    data: {{train: "builtin:letters", builtin_size: 200, max_length: 16}}
    train: {{steps: 3, batch_size: 7, lr: 1.0e-3, log_every: 1}}
  - stage: reward
    name: pairs
    init: base
    loss: bradley_terry
    data: {{train: "builtin:letters", builtin_size: 100, max_length: 16}}
    train: {{steps: 2, batch_size: 6, lr: 1.0e-4, log_every: 1}}
  - stage: dpo
    init: "@sft"
    data: {{train: "builtin:letters", builtin_size: 100, max_length: 16}}
    train: {{steps: 3, batch_size: 7, lr: 1.0e-4, log_every: 1}}
  - stage: kto
    init: "@sft"
    data: {{train: "builtin:letters", builtin_size: 100, max_length: 16}}
    train: {{steps: 3, batch_size: 7, lr: 1.0e-4, log_every: 1}}
"""


def rlhf(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "rlhf_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return out


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    cfg = root / "c.yaml"
    cfg.write_text(SFT_REWARD.format(strategy="auto"))
    result = rlhf("run", str(cfg), "--out", str(root / "run"))
    assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_train_the_same_weights_as_one(one_process, tmp_path, strategy):
    """Global batch 8 (grad_accum 2), 7 (uneven shares), pairwise 6, DPO pairs 7 and KTO examples 7
    (their reference precomputed by a sharded frozen copy on every rank; KTO's reference point a
    mean over both ranks' mismatched pairs): the same final weights (SFT, DPO and KTO through the
    fused-linear kernels on the sharded or replicated LM head on both sides).

    Floating-point noise (another summation order, other padded widths per share) is ~1e-7 in the
    gradients; Adam's first steps turn the noise on near-zero gradient entries into up to lr-sized
    differences, so the pairwise stage starts from the base model with a small lr."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SFT_REWARD.format(strategy=strategy))
    result = rlhf("run", str(cfg), "--out", str(tmp_path / "run"), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused_linear off" not in result.stdout  # SFT's loss from the sharded LM head, inside the forward
    for stage in ("sft", "reward", "pairs", "dpo", "kto"):
        assert max_diff(one_process / stage, tmp_path / "run" / stage) <= 1e-5, stage
    one = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Logged numbers are global too (one line per step, written by rank 0 only).
    assert [(r["stage"], r["step"]) for r in one] == [(r["stage"], r["step"]) for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "eval_loss", "eval_mse", "eval_accuracy", "margin", "eval_margin", "kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["stage"], key)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["stages_completed"] == ["sft", "reward", "pairs", "dpo", "kto"]


def test_checkpoints_load_across_world_sizes(one_process, tmp_path):
    """A 1-process checkpoint continues on 2 processes and the 2-process result on 1."""
    two = tmp_path / "two"
    result = rlhf("run", "--out", str(two), "--nproc", "2", "--set", f"model.name_or_path={one_process / 'sft'}",
                  "--set", "stages=[{stage: sft, data: {train: 'builtin:letters', builtin_size: 64, max_length: 16}, "
                           "train: {steps: 1, batch_size: 8}}]")
    assert result.returncode == 0, result.stderr[-3000:]
    back = tmp_path / "back"
    result = rlhf("run", "--out", str(back), "--set", f"model.name_or_path={two / 'sft'}",
                  "--set", "stages=[{stage: reward, data: {train: 'builtin:letters', builtin_size: 64, max_length: 16}, "
                           "train: {steps: 1, batch_size: 8}}]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (back / "reward" / "reward_head.safetensors").is_file()


def test_ppo_batch_statistics_are_global(tmp_path):
    """Baselines, whitening, logged statistics and the KL controller on 2 ranks (each holding half
    of the rollouts) equal the single-process computation on the same rollouts."""
    sys.path.insert(0, str(HERE))
    try:
        import _ppo_stats_worker as worker
    finally:
        sys.path.remove(str(HERE))
    single = worker.statistics(*worker.fixed_batch(), list(range(8)))
    out = tmp_path / "stats.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(HERE / "_ppo_stats_worker.py"), str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = json.loads(out.read_text())
    merged = {key: [] for key in ("batch_mean", "ema_second", "whitened")}
    for rows, stats in parts:
        for key in merged:
            merged[key] += stats[key]
        assert stats["ema_baseline"] == pytest.approx(single["ema_baseline"], abs=1e-6)
        assert stats["kl_coef"] == pytest.approx(single["kl_coef"], abs=1e-9)
        for key, value in single["stats"].items():
            assert stats["stats"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for key, value in merged.items():
        assert torch.allclose(torch.tensor(value), torch.tensor(single[key]), atol=1e-6), key


@pytest.mark.slow  # a learning check (tens of seconds): .ci/run runs it with the slow tests
def test_two_process_pipeline_learns(tiny_pipeline_yaml, tmp_path):
    """The CI-sized SFT -> reward -> PPO pipeline on 2 processes: PPO beats SFT on the gold judge."""
    result = rlhf("run", tiny_pipeline_yaml(iterations=30), "--out", str(tmp_path / "run"), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["gold_score_ppo"] > summary["gold_score_sft"] + 0.1
    assert (tmp_path / "run" / "ppo" / "model.safetensors").is_file()
    assert result.stdout.count("== stage ppo") == 1  # progress from rank 0 only


BOMB = '''
import os, torch
from rlhf_core import hookimpl

class Bomb:
    def __init__(self, ctx=None, *, on_rank: int = 1):
        self.on_rank = on_rank

    def __call__(self, prompts, responses):
        if int(os.environ.get("RANK", "0")) == self.on_rank:
            raise RuntimeError("judge crashed on this rank")
        return torch.zeros(len(responses))

@hookimpl
def rlhf_register_rewards(register):
    register("bomb", Bomb)
'''


def test_a_failing_rank_ends_the_job_promptly_with_its_error(tmp_path):
    (tmp_path / "rank_bomb.py").write_text(BOMB)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
plugins: [rank_bomb]
stages:
  - stage: ppo
    data: {train: "builtin:letters", builtin_size: 40}
    reward: bomb
    iterations: 3
    prompts_per_batch: 4
    minibatch_size: 4
    generation: {max_new_tokens: 4}
    eval_prompts: 0
""")
    started = time.monotonic()
    result = rlhf("run", str(cfg), "--out", str(tmp_path / "run"), "--nproc", "2",
                  env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and elapsed < 60  # seconds, not a collective's 30-minute timeout
    message = "[rank 1] reward 'bomb' (plugin 'rank_bomb') raised RuntimeError: judge crashed on this rank"
    assert f"Error: {message}" in result.stderr
    assert f"[rank 0] stopped because {message}" in result.stderr
    assert "Error: rank 1 failed (exit code 1)" in result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == f"failed: {message}" and summary["stages_completed"] == []


LORA = """
seed: 0
model: {lora: {r: 4, alpha: 8}}
distributed: {strategy: fsdp}
stages:
  - stage: sft
    data: {train: "builtin:letters", builtin_size: 200, max_length: 16}
    train: {steps: 3, batch_size: 8, lr: 1.0e-3, log_every: 1}
  - stage: reward
    data: {train: "builtin:letters", builtin_size: 200, max_length: 16}
    train: {steps: 2, batch_size: 8, lr: 1.0e-3, log_every: 1}
  - stage: ppo
    data: {train: "builtin:letters", builtin_size: 40}
    iterations: 2
    prompts_per_batch: 4
    minibatch_size: 4
    generation: {max_new_tokens: 4}
    eval_every: 0
    eval_prompts: 4
"""


def test_fsdp_shards_the_frozen_base_and_trains_lora_adapters_like_one_process(tmp_path):
    """FSDP2 over a peft model: 2 processes train the same adapters (and the same merged reward
    model) as one, and PPO runs with the reference = adapters disabled on the sharded policy."""
    pytest.importorskip("peft")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LORA)
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        result = rlhf("run", str(cfg), "--out", str(out), "--nproc", str(n))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[n] = out
    assert (runs[2] / "sft" / "adapter_model.safetensors").is_file()
    assert max_diff(runs[1] / "sft", runs[2] / "sft") <= 1e-5
    assert max_diff(runs[1] / "reward", runs[2] / "reward") <= 1e-5
    rows = [json.loads(x) for x in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if r["stage"] == "ppo" and "kl" in r]
    assert [r["step"] for r in ppo] == [1, 2] and ppo[0]["kl"] == 0.0  # policy == reference at the start
    assert (runs[2] / "ppo" / "adapter_config.json").is_file()


def test_a_critic_and_reward_model_on_the_policys_sharded_base_train_like_one_process(tmp_path):
    """Reward model and critic as adapters + heads on the FSDP-sharded LoRA policy (the heads are
    applied inside the root's forward, so FSDP gathers them and reduces their gradients): 2
    processes give the rewards, values and trained adapters and heads of 1 process."""
    pytest.importorskip("peft")
    sys.path.insert(0, str(HERE))
    try:
        from test_lora import lora_reward_dir
    finally:
        sys.path.remove(str(HERE))
    _, source = lora_reward_dir(tmp_path)
    out = {}
    for n in (1, 2):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                                 str(HERE / "_shared_backbone_worker.py"), str(source), str(tmp_path / f"{n}.pt")],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        out[n] = torch.load(tmp_path / f"{n}.pt")
    one, two = out[1], out[2]
    assert torch.allclose(one["reward"], two["reward"], atol=1e-5)
    assert torch.allclose(one["values"], two["values"], atol=1e-5)
    assert one["trained"].keys() == two["trained"].keys()
    for key in one["trained"]:
        assert torch.allclose(one["trained"][key], two["trained"][key], atol=1e-5), key
    trained = one["trained"]
    # the critic started as a copy of the reward model and trained; the reward model stayed frozen
    critic_b = [k for k in trained if ".lora_B.critic." in k]
    assert critic_b and any(not torch.equal(trained[k], trained[k.replace(".critic.", ".reward.")]) for k in critic_b)
    assert not torch.equal(trained["base_model.model.rlhf_heads.critic.weight"],
                           trained["base_model.model.rlhf_heads.reward.weight"])
    reloaded, _ = lora_reward_dir(tmp_path / "again")
    assert torch.equal(trained["base_model.model.rlhf_heads.reward.weight"], reloaded.head.weight.detach())


def test_policy_loss_aggregation_gives_one_gradient_on_one_or_two_processes(tmp_path):
    """For every loss_agg mode (and a ratio, a sequence-ratio and a detached-weight loss), the policy
    gradient of one update on 2 ranks x micro-batches of 1 row equals one process with micro-batches
    of 2 rows; REINFORCE++'s global normalisation and the group std are the same too."""
    from safetensors.torch import load_file as load

    sys.path.insert(0, str(HERE))
    try:
        import _policy_loss_worker as worker
    finally:
        sys.path.remove(str(HERE))
    single = worker.gradients(list(range(8)))
    out = tmp_path / "grads.safetensors"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(HERE / "_policy_loss_worker.py"), str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = load(str(out))
    assert set(two) == set(single) and len(single) == 2 + 3 * 4
    for key, want in single.items():
        got = two[key].reshape(want.shape)
        assert want.abs().sum() > 0, key
        assert float((got - want).norm() / want.norm()) <= 1e-6, key
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-6, key


def test_dynamic_sampling_on_two_processes_runs_the_same_rounds(tmp_path):
    """DAPO's dynamic sampling on 2 ranks: every rank runs the same number of sampling rounds (the
    sharded forwards meet), and the logged counts are over both ranks. A reward of 0 for everything
    ties every group: 3 rounds, 3 x 4 groups sampled, 4 of them fill the batch."""
    stage = ("stages=[{stage: ppo, init: base, data: {train: 'builtin:letters', builtin_size: 40}, iterations: 2, "
             "prompts_per_batch: 4, samples_per_prompt: 2, minibatch_size: 8, generation: {max_new_tokens: 6}, "
             "eval_every: 0, eval_prompts: 0, reward: {name: letters_gold, scale: 0.0}, advantage: group_mean, "
             "dynamic_sampling: {max_rounds: 3}}]")
    result = rlhf("run", "--nproc", "2", "--out", str(tmp_path / "run"), "--set", stage)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if "ds_rounds" in r]
    assert len(ppo) == 2
    for r in ppo:
        assert (r["ds_rounds"], r["ds_dropped_groups"], r["ds_filled_groups"]) == (3, 8, 4)
