"""rlhf_core.training directly: the one optimizer step (AdamW, warm-up and schedule, clipping, the
non-finite checks and their messages, its state across a checkpoint), the schedule's values by
hand, and the one held-out loop with stand-in rows."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_core import OptimConfig, OptimizerStep, TrainingError
from rlhf_core.training import evaluate_batches, lr_lambda

CPU = torch.device("cpu")


def test_the_schedules_by_hand():
    # 2 warm-up steps of 10: (step + 1) / 2, then cosine from 1 to 0.1 over the 8 that follow.
    cosine = lr_lambda("cosine", 2, 10)
    assert [cosine(0), cosine(1)] == [0.5, 1.0]
    assert cosine(2) == pytest.approx(1.0) and cosine(10) == pytest.approx(0.1)
    assert cosine(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    linear = lr_lambda("linear", 0, 4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda("constant", 3, 100)(50) == 1.0 and lr_lambda("constant", 3, 100)(0) == pytest.approx(1 / 3)


def one_parameter(value: float = 1.0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([value]))


def test_an_optimizer_step_follows_its_schedule_and_clips():
    p = one_parameter()
    step = OptimizerStep([p], OptimConfig(lr=0.1, schedule="linear", warmup_steps=1, max_grad_norm=0.5), CPU, 3,
                         who="stage 'x'")
    lrs = []
    for _ in range(3):
        lrs.append(step.lr)
        step.zero_grad()
        step.backward((p * 4.0).sum())  # gradient 4: clipped to norm 0.5
        norm = step.step()
        assert float(norm) == pytest.approx(4.0)  # the norm before clipping is what it returns
        assert float(p.grad) == pytest.approx(0.5)  # the gradient stays readable after the step
    # warm-up 1 step (1/1), then linear over the 2 steps after it: 1.0, 1.0, 0.5
    assert lrs == pytest.approx([0.1, 0.1, 0.05])


def test_a_frozen_parameter_is_not_optimised():
    frozen, trained = one_parameter(), one_parameter()
    frozen.requires_grad_(False)
    step = OptimizerStep([frozen, trained], OptimConfig(lr=0.1), CPU, 1, who="stage 'x'")
    assert step.params == [trained]


def test_non_finite_losses_and_gradients_stop_training_with_advice():
    p = one_parameter()
    step = OptimizerStep([p], OptimConfig(lr=0.1), CPU, 1, who="stage 'ppo'", prefix="optim.", model="policy",
                         hint="check the reward's scale")
    with pytest.raises(TrainingError, match=r"^stage 'ppo': the policy loss became nan at step 3; lower optim.lr, set "
                                            r"optim.mixed_precision: no, or check the reward's scale$"):
        step.check_loss(torch.tensor(float("nan")), " at step 3")
    step.check_loss(torch.tensor(1.0))  # finite: nothing to say
    step.zero_grad()
    step.backward((p * float("inf")).sum())
    with pytest.raises(TrainingError, match=r"^stage 'ppo': the policy gradient norm became (inf|nan); lower optim.lr, "
                                            r"set optim.max_grad_norm > 0, or check the reward's scale$"):
        step.step()
    assert float(p.detach()) == 1.0  # the poisoned step never reached the weights


def test_an_optimizer_steps_state_continues_the_schedule_exactly():
    """What a checkpoint carries beside the optimizer: a restored step takes the same learning
    rates as one that never stopped."""
    def run(stop_at: int | None) -> list[float]:
        p = one_parameter()
        cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=2)
        step = OptimizerStep([p], cfg, CPU, 6, who="stage 'x'")
        lrs = []
        for i in range(6):
            if i == stop_at:
                state, weights, optimizer = step.state_dict(), p.detach().clone(), step.optimizer.state_dict()
                p = torch.nn.Parameter(weights)
                step = OptimizerStep([p], cfg, CPU, 6, who="stage 'x'")
                step.optimizer.load_state_dict(optimizer)
                step.load_state_dict(state)
            lrs.append(step.lr)
            step.zero_grad()
            step.backward((p ** 2).sum())
            step.step()
        return lrs + [float(p.detach())]

    assert run(3) == run(None)


def test_evaluate_batches_drops_the_results_of_stand_in_rows(monkeypatch):
    """Every batch is scored (a sharded model needs every rank's forwards), and only batches with
    rows of this rank come back: with two ranks and 3 items in batches of 2, rank 0's share of the
    last batch (one item) is empty and scores a stand-in."""
    from rlhf_core import distributed

    items = [{"x": [i]} for i in range(3)]
    collate = lambda batch: {"x": torch.tensor([b["x"] for b in batch])}  # noqa: E731
    seen = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    out = evaluate_batches(items, 2, collate, CPU, lambda batch: seen.append(batch["x"].tolist()) or batch["x"].sum())
    assert seen == [[[1]], [[2]]]  # rank 1: item 1 of batch 0, item 2 (the last batch's only one)
    assert [int(v) for v in out] == [1, 2]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    seen.clear()
    out = evaluate_batches(items, 2, collate, CPU, lambda batch: seen.append(batch["x"].tolist()) or batch["x"].sum())
    assert seen == [[[0]], [[2]]]  # rank 0: item 0, then a stand-in row for its empty share of the last batch
    assert [int(v) for v in out] == [0]
