"""``data.packing`` and ``train.max_tokens_per_batch`` through ``rlhf run``: packed trains what
padded trains, on 1 and 2 processes, through a kill -9 and a resume; lengths that vary a lot
(1 to ~70 byte tokens) so that packing has pads to remove."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file
from test_distributed import max_diff, rlhf  # tests/core is on the path (pytest's rootdir-relative imports)
from test_resume import kill_at, rows

STAGES = ("sft", "reward", "pairs", "dpo", "kto", "ppo")

PIPELINE = """
seed: 0
checkpoint: {{every: 2}}
stages:
  - stage: sft
    data: {{train: "{data}/sft.jsonl", max_length: 48, packing: {packing}}}
    train: {{steps: 6, batch_size: 8, lr: 1.0e-3, log_every: 1, eval_every: 3, max_tokens_per_batch: {budget}}}
  - stage: reward
    data: {{train: "{data}/scored.jsonl", max_length: 48, packing: {packing}}}
    train: {{steps: 4, batch_size: 7, lr: 1.0e-4, log_every: 1}}
  - stage: reward
    name: pairs
    init: base
    loss: bradley_terry
    data: {{train: "{data}/pairs.jsonl", max_length: 48, packing: {packing}}}
    train: {{steps: 3, batch_size: 6, lr: 1.0e-4, log_every: 1}}
  - stage: dpo
    init: "@sft"
    data: {{train: "{data}/pairs.jsonl", max_length: 48, packing: {packing}}}
    train: {{steps: 4, batch_size: 6, lr: 1.0e-4, log_every: 1, eval_every: 2}}
  - stage: kto
    init: "@sft"
    data: {{train: "{data}/unpaired.jsonl", max_length: 48, packing: {packing}}}
    train: {{steps: 3, batch_size: 6, lr: 1.0e-4, log_every: 1}}
  - stage: ppo
    data: {{train: "{data}/prompts.jsonl", packing: {packing}}}
    advantage: gae
    iterations: 3
    prompts_per_batch: 8
    minibatch_size: 4
    optim: {{lr: 1.0e-5}}
    critic_optim: {{lr: 1.0e-5}}
    generation: {{max_new_tokens: 8}}
    eval_prompts: 0
"""


def text(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Records of very different lengths; one SFT example longer than max_length (truncated, counted)."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    files = {
        "sft": [{"prompt": text(rng, 1, 15), "response": text(rng, 1, 30)} for _ in range(80)]
        + [{"prompt": text(rng, 5, 5), "response": text(rng, 90, 90)}],
        "scored": [{"prompt": text(rng, 1, 20), "response": text(rng, 1, 40), "score": rng.uniform(-1, 1)}
                   for _ in range(60)],
        "pairs": [{"prompt": text(rng, 1, 20), "chosen": text(rng, 1, 30), "rejected": text(rng, 1, 30)}
                  for _ in range(60)],
        "unpaired": [{"prompt": text(rng, 1, 20), "completion": text(rng, 1, 30), "label": rng.random() < 0.5}
                     for _ in range(60)],
        "prompts": [{"prompt": text(rng, 1, 30)} for _ in range(40)],
    }
    for name, recs in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def write(tmp: Path, data: Path, packing: bool, budget: int | None = 160) -> Path:
    config = tmp / f"packing-{packing}.yaml"
    config.write_text(PIPELINE.format(data=data, packing=str(packing).lower(),
                                      budget="null" if budget is None else budget))
    return config


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("packed")
    config = write(root, data, True)
    result = rlhf("run", str(config), "--out", str(root / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return config, root / "run", result.stdout


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_packed_trains_what_padded_trains(packed_run, data, tmp_path):
    """Same examples per step (token budget on both sides), same weights (fp32, <= 1e-5 after Adam
    steps, as between 1 and 2 processes), same losses per step; the packed run says how it attends
    and reports its packing efficiency, below 1 where the lengths vary and above what the padded
    batches would use."""
    _, packed, stdout = packed_run
    result = rlhf("run", str(write(tmp_path, data, False)), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES:
        assert max_diff(tmp_path / "run" / stage, packed / stage) <= 1e-5, stage
    padded_rows, packed_rows = metrics(tmp_path / "run"), metrics(packed)
    assert [(r["stage"], r["step"]) for r in padded_rows] == [(r["stage"], r["step"]) for r in packed_rows]
    for a, b in zip(padded_rows, packed_rows):
        for key in ("loss", "eval_loss", "eval_mse", "eval_accuracy", "reward_mean", "kl", "value_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["stage"], a["step"], key)
        assert "packing_efficiency" not in a
    for stage in ("sft", "reward", "pairs", "dpo", "kto"):
        assert f"{stage}: data.packing: each micro-batch's sequences share rows" in stdout
    assert "attention: PyTorch attention (sdpa) with a block-diagonal causal mask" in stdout
    summary = json.loads((packed / "summary.json").read_text())["stages"]
    for stage in ("sft", "reward", "pairs", "dpo", "kto"):
        assert 0.5 < summary[stage]["train_packing_efficiency"] < 1.0, stage
    assert 0.3 < summary["ppo"]["packing_efficiency"] <= 1.0
    ppo = [r for r in packed_rows if r["stage"] == "ppo" and "packing_efficiency" in r]
    assert len(ppo) == 3 and all(0.3 < r["packing_efficiency"] <= 1.0 for r in ppo)
    # The example over max_length was cut by the usual rule and counted, and trained whole in one row.
    assert summary["sft"]["truncated"] == 1.0


@pytest.mark.slow
def test_two_processes_packed_train_what_one_does(packed_run, tmp_path):
    """Each rank packs its share of the global token budget; the normaliser stays global. (PPO is
    left out: each rank samples its own responses, so 2 processes see other samples than 1.)"""
    config, one, _ = packed_run
    result = rlhf("run", str(config), "--out", str(tmp_path / "run"), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in STAGES[:-1]:
        assert max_diff(one / stage, tmp_path / "run" / stage) <= 1e-5, stage
    for a, b in zip(metrics(one), metrics(tmp_path / "run")):
        for key in ("loss", "eval_loss", "margin", "kl"):  # packing_efficiency is per rank's rows: it may differ
            if key in a and a["stage"] != "ppo":
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["stage"], key)


@pytest.mark.parametrize("stage, step", [("sft", 3), pytest.param("dpo", 2, marks=pytest.mark.slow)])
def test_kill_and_resume_packed_is_bit_identical(packed_run, tmp_path, stage, step):
    """The position in the token-budget stream is the checkpointed step: a resumed packed run ends
    bit for bit where the uninterrupted one did."""
    config, uninterrupted, _ = packed_run
    out = tmp_path / "run"
    kill_at(config, out, stage, step)
    result = rlhf("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in STAGES:
        for file in sorted((uninterrupted / name).glob("*.safetensors")):
            x, y = load_file(file), load_file(out / name / file.name)
            assert all(torch.equal(x[k], y[k]) for k in x), (name, file.name)
    assert rows(uninterrupted) == rows(out)


def test_a_budget_below_an_example_is_refused_before_anything_loads(data, tmp_path):
    config = write(tmp_path, data, True, budget=40)
    result = rlhf("run", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert ("stages[0].train.max_tokens_per_batch: must be at least data.max_length (48), the most tokens one "
            "example can have, so that every example fits a batch; got 40") in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
