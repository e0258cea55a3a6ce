"""VICReg terms against hand-worked values (Bardes et al., 2022, official-code form) and the expander."""

import pytest
import torch
from torch import nn

from sslab.methods.vicreg import expander
from sslab.modules.vicreg_loss import covariance_term, off_diagonal, variance_term, vicreg_loss, vicreg_terms


def test_off_diagonal_lists_the_six_off_diagonal_entries_of_a_3x3():
    m = torch.arange(9.0).view(3, 3)
    assert off_diagonal(m).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]


def test_terms_and_weighted_loss_match_hand_computation():
    # z1 = [[1, 2], [3, 6]], z2 = [[1, 2], [1, 2]] (batch 2, dim 2)
    z1 = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    z2 = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    t = vicreg_terms(z1, z2)
    # invariance: mean of squared differences = (0 + 0 + 2^2 + 4^2) / 4 = 5
    assert t["invariance"].item() == pytest.approx(5.0)
    # variance: z1 columns have unbiased variances 2 and 8 (std > 1: no hinge); z2 is constant, so each column's
    # std is sqrt(1e-4) = 0.01 and its hinge 0.99; the two views are averaged: (0 + 0.99) / 2
    assert t["variance"].item() == pytest.approx(0.495, abs=1e-6)
    # covariance: centred z1 = [[-1, -2], [1, 2]] -> C = Z^T Z / (2 - 1) = [[2, 4], [4, 8]];
    # off-diagonal squares 16 + 16 = 32, divided by D = 2 -> 16; z2 contributes 0
    assert t["covariance"].item() == pytest.approx(16.0)
    loss, _ = vicreg_loss(z1, z2)  # 25 * 5 + 25 * 0.495 + 1 * 16
    assert loss.item() == pytest.approx(153.375, rel=1e-6)
    loss, _ = vicreg_loss(z1, z2, sim_coeff=1.0, std_coeff=2.0, cov_coeff=0.5)  # 5 + 0.99 + 8
    assert loss.item() == pytest.approx(13.99, rel=1e-6)


def test_decorrelated_unit_variance_embeddings_pay_no_variance_or_covariance():
    # +-sqrt(2) patterns over 4 samples: zero-mean, unbiased variance 8/3 > 1, columns orthogonal
    s = 2**0.5
    z = torch.tensor([[s, s], [s, -s], [-s, s], [-s, -s]])
    assert variance_term(z).item() == 0.0
    assert covariance_term(z).item() == pytest.approx(0.0, abs=1e-12)


def test_variance_hinge_uses_gamma_and_eps():
    z = torch.zeros(4, 3)
    assert variance_term(z, gamma=1.0, eps=1e-4).item() == pytest.approx(0.99)
    assert variance_term(z, gamma=2.0, eps=0.25).item() == pytest.approx(1.5)


def test_batch_of_one_is_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.zeros(1, 4), torch.zeros(1, 4))


def test_expander_layout():
    head = expander(8, [16, 16, 4])
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[-1].bias is None and head[-1].out_features == 4 and head[0].in_features == 8
    assert head(torch.randn(5, 8)).shape == (5, 4)


VICREG_RANK_SCRIPT = """
from sslab.modules.vicreg_loss import vicreg_loss
z1, z2 = (t.split(4)[rank].clone().requires_grad_() for t in torch.load(path))
loss, _ = vicreg_loss(z1, z2)
loss.backward()
torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}, f"{path}.{rank}")
"""


@pytest.mark.slow
def test_vicreg_over_two_ranks_equals_one_process_on_the_global_batch(tmp_path):
    # variance and covariance see both ranks' rows (all_gather with gradients): the mean of the rank losses is
    # the one-process loss on the global batch, and each rank's gradient / world size (DDP's average) is that
    # loss's gradient for its rows
    from tests.gloo import run_two_ranks

    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    path = tmp_path / "z.pt"
    torch.save((z1, z2), path)
    ranks = run_two_ranks(VICREG_RANK_SCRIPT, path)

    f1, f2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, _ = vicreg_loss(f1, f2)
    loss.backward()
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=1e-6)
    assert torch.allclose(torch.cat([r["g1"] for r in ranks]) / 2, f1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["g2"] for r in ranks]) / 2, f2.grad, atol=1e-6)
    # negative control: without the gather each rank's variance/covariance would see only 4 rows
    local, _ = vicreg_loss(z1[:4], z2[:4])
    assert not torch.allclose(local, ranks[0]["loss"], rtol=1e-3)
