import math

import pytest
import torch

from sslab.modules.dino_loss import dino_loss, update_center


def softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def cross_entropy(p, q):
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))


def test_dino_loss_matches_hand_computation_and_skips_same_view():
    # two global crops (teacher + student) and one local crop (student only), batch 1, K = 3
    t = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    s = [[0.2, 0.1, 0.0], [0.0, 0.3, 0.1], [1.0, -1.0, 0.5]]
    center = [0.1, 0.0, -0.1]
    tt, st = 0.05, 0.1
    p_t = [softmax([a - c for a, c in zip(row, center, strict=True)], tt) for row in t]
    p_s = [softmax(row, st) for row in s]
    # pairs (teacher view i, student view v) with v != i: (0,1), (0,2), (1,0), (1,2)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(cross_entropy(p_t[i], p_s[v]) for i, v in pairs) / len(pairs)
    loss = dino_loss(
        [torch.tensor([r]) for r in s], [torch.tensor([r]) for r in t], torch.tensor([center]), st, tt
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_averages_over_batch():
    torch.manual_seed(0)
    s = [torch.randn(4, 5) for _ in range(3)]
    t = [torch.randn(4, 5) for _ in range(2)]
    c = torch.zeros(1, 5)
    full = dino_loss(s, t, c, 0.1, 0.04)
    per_sample = [
        dino_loss([x[i : i + 1] for x in s], [x[i : i + 1] for x in t], c, 0.1, 0.04) for i in range(4)
    ]
    assert full.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-5)


def test_single_global_crop_without_other_views_is_rejected():
    with pytest.raises(ValueError):
        dino_loss([torch.zeros(1, 3)], [torch.zeros(1, 3)], torch.zeros(1, 3), 0.1, 0.04)


def test_center_update_is_ema_of_batch_mean():
    center = torch.tensor([[1.0, 2.0]])
    teacher = torch.tensor([[0.0, 4.0], [2.0, 0.0]])  # mean [1, 2] -> unchanged
    assert torch.allclose(update_center(center, teacher, 0.9), center)
    teacher = torch.tensor([[3.0, 0.0], [5.0, 0.0]])  # mean [4, 0]
    assert torch.allclose(
        update_center(center, teacher, 0.9), torch.tensor([[0.9 * 1 + 0.1 * 4, 0.9 * 2 + 0.1 * 0]])
    )
