"""Collapse statistics (sslab.modules.collapse) against hand computations, and their logging in a real step."""

import math

import pytest
import torch

from sslab.modules.collapse import effective_rank, feature_std


def test_rank_one_batch_has_rank_one_and_a_constant_batch_zero_std():
    direction = torch.randn(1, 32)
    rank_one = torch.randn(64, 1) * direction  # every row along one direction (signs differ)
    assert effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-4)
    constant = direction.expand(64, -1)
    assert feature_std(constant).item() == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(constant).item() == pytest.approx(1.0, abs=1e-4)


def test_isotropic_gaussian_batch_is_near_full_rank_and_one_over_sqrt_d():
    torch.manual_seed(0)
    d = 16
    x = torch.randn(20000, d)
    assert effective_rank(x).item() == pytest.approx(d, rel=0.01)
    assert feature_std(x).item() == pytest.approx(1 / math.sqrt(d), rel=0.02)


def test_hand_computed_values():
    # rows e1, e1, e2 (already unit): singular values sqrt(2), 1 -> p = (sqrt2, 1) / (sqrt2 + 1)
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    s = torch.tensor([math.sqrt(2), 1.0])
    p = s / s.sum()
    assert effective_rank(x).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    # normalised columns (1, 1, 0) and (0, 0, 1): each has unbiased std sqrt(1/3)
    assert feature_std(x).item() == pytest.approx(math.sqrt(1 / 3), rel=1e-6)


def test_k_equal_orthogonal_directions_give_rank_k():
    rows = torch.eye(8)[:4].repeat(5, 1) * torch.rand(20, 1).add(0.5)  # 4 directions, 5 rows each
    assert effective_rank(rows).item() == pytest.approx(4.0, rel=1e-4)


@pytest.mark.slow
def test_training_step_logs_grad_norm_and_collapse_statistics(tiny_cfg, tmp_path):
    import csv

    from sslab.runs.training import train

    train(tiny_cfg("trainer.max_steps=2", "callbacks=[]", "trainer.log_every_n_steps=2"))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 1 and rows[0]["step"] == "1"  # logged steps only (every 2nd)
    row = rows[0]
    assert float(row["train/grad_norm"]) > 0
    assert 0 < float(row["train/feature_std"]) <= 1
    assert 1 <= float(row["train/feature_rank"]) <= 16  # batch 16
