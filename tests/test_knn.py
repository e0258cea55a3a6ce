import math

import pytest
import torch

from sslab.evaluation.knn import knn_accuracy, knn_predict


def test_weighted_vote_matches_hand_computation():
    # bank on the unit circle; the query at angle 0
    angles = [0.1, 0.2, 1.0, 3.0]
    bank = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    votes = knn_predict(bank, labels, query, k=3, temperature=0.5, num_classes=2)
    w = [math.exp(math.cos(a) / 0.5) for a in angles[:3]]
    assert votes[0, 0].item() == pytest.approx(w[0], rel=1e-5)
    assert votes[0, 1].item() == pytest.approx(w[1] + w[2], rel=1e-5)


def test_knn_is_scale_invariant_and_agrees_with_brute_force():
    torch.manual_seed(0)
    means = torch.randn(5, 16) * 3
    bank_y = torch.arange(500) % 5
    bank = means[bank_y] + torch.randn(500, 16)
    q_y = torch.arange(100) % 5
    q = means[q_y] + torch.randn(100, 16)
    acc = knn_accuracy(bank, bank_y, q, q_y, k=20, temperature=0.07)
    assert acc == knn_accuracy(bank * 7.0, bank_y, q * 0.1, q_y, k=20, temperature=0.07)
    # brute force in torch
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top, idx = sims.topk(20, dim=1)
    votes = torch.zeros(100, 5).scatter_add_(1, bank_y[idx], (top / 0.07).exp())
    assert acc == pytest.approx(100.0 * (votes.argmax(1) == q_y).float().mean().item())
    assert acc > 90
