"""Built-in losses against hand-computed numbers."""
from __future__ import annotations

import math

import torch

from rlhf_plugins.reward import bradley_terry_loss, huber_loss, mse_loss, pearson
from rlhf_core.data import shift_labels
from rlhf_plugins.sft import cross_entropy_loss


def test_cross_entropy_hand_computed():
    # Two tokens, V=2. Row 0 logits (0, 0): p(label 0) = 1/2 -> nll ln 2. Row 1 logits (ln 3, 0):
    # p(label 0) = 3/4 -> nll ln(4/3). The third position is ignored.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 0, -100]])
    loss, metrics = cross_entropy_loss(logits, labels, backend="reference")
    assert math.isclose(loss.item(), (math.log(2) + math.log(4 / 3)) / 2, rel_tol=1e-6)
    assert metrics["tokens_per_batch"] == 2.0


def test_sequence_mean_aggregation_differs_from_token_mean():
    # Sequence A has one token with nll ln 2, sequence B two tokens with nll ln(4/3) each.
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[math.log(3.0), 0.0], [math.log(3.0), 0.0]]])
    labels = torch.tensor([[0, -100], [0, 0]])
    token, _ = cross_entropy_loss(logits, labels, backend="reference")
    seq, _ = cross_entropy_loss(logits, labels, backend="reference", aggregation="sequence_mean")
    assert math.isclose(token.item(), (math.log(2) + 2 * math.log(4 / 3)) / 3, rel_tol=1e-6)
    assert math.isclose(seq.item(), (math.log(2) + math.log(4 / 3)) / 2, rel_tol=1e-6)


def test_shift_labels_aligns_prediction_with_next_token():
    assert shift_labels(torch.tensor([[7, 8, 9]])).tolist() == [[8, 9, -100]]


def test_regression_losses_hand_computed():
    pred, target = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([1.0, 0.0, 1.0])
    # errors 0, 2, 4 -> mse (0 + 4 + 16) / 3
    assert math.isclose(mse_loss(pred, target)[0].item(), 20 / 3, rel_tol=1e-6)
    # huber delta=1: 0, 1*(2-0.5)=1.5, 1*(4-0.5)=3.5 -> mean 5/3
    assert math.isclose(huber_loss(pred, target, delta=1.0)[0].item(), 5 / 3, rel_tol=1e-6)
    # huber delta=3: 0, 0.5*4=2, 3*(4-1.5)=7.5 -> 9.5/3
    assert math.isclose(huber_loss(pred, target, delta=3.0)[0].item(), 9.5 / 3, rel_tol=1e-6)


def test_bradley_terry_hand_computed():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(0) = log 2
    assert math.isclose(loss.item(), (math.log(1 + math.exp(-1)) + math.log(2)) / 2, rel_tol=1e-6)
    assert metrics["accuracy"] == 0.5
    # with margin 1: -log sigmoid(0) = log 2 and -log sigmoid(-1) = log(1 + e)
    assert math.isclose(bradley_terry_loss(chosen, rejected, margin=1.0)[0].item(), (math.log(2) + math.log(1 + math.e)) / 2, rel_tol=1e-6)


def test_pearson():
    assert math.isclose(pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])), 1.0, rel_tol=1e-9)
    assert pearson(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])) == 0.0
