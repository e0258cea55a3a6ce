"""lightly (1.6.0, a test-only dependency) as an independent oracle: our losses and heads against lightly's
on shared tensors, at 1e-5.

lightly is written independently of sslab and of the official repositories, so agreement here is evidence
that both follow the published formulas, not that one copies the other.
"""

import pytest
import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss, VICRegLoss
from lightly.models.modules.heads import DINOProjectionHead

from sslab.modules.dino_loss import (
    centered_targets,
    dino_loss,
    koleo_loss,
    masked_patch_loss,
    masked_token_index,
    update_center,
)
from sslab.modules.heads import DINOHead
from sslab.modules.vicreg_loss import vicreg_loss

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("n_local", [0, 4])
def test_dino_loss_and_center_match_lightly(n_local):
    batch, k = 6, 32
    teacher = [_logits(batch, k, seed=i) for i in range(2)]
    student = [_logits(batch, k, seed=10 + i) for i in range(2 + n_local)]
    center = _logits(1, k, seed=99) * 0.1
    oracle = DINOLoss(output_dim=k, teacher_temp=0.05, student_temp=0.1, center_momentum=0.9)
    oracle.center.copy_(center.view(1, 1, k))
    expected = oracle(teacher, student, teacher_temp=0.05)
    ours = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.05)
    torch.testing.assert_close(ours, expected, **TOL)
    # the center moves to 0.9 c + 0.1 * mean of both teacher views (lightly updated it in the call above)
    new = update_center(center, torch.cat(teacher), 0.9)
    torch.testing.assert_close(new, oracle.center.view(1, k), **TOL)


def test_ibot_patch_loss_matches_lightly():
    batch, grid, k = 5, 4, 24
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(batch, grid, grid, generator=g) < 0.4
    masks[0] = False  # an unmasked image counts in the batch mean and adds 0
    index = masked_token_index(masks.flatten(1))
    m = int(masks.sum())
    teacher, student = _logits(m, k, seed=4), _logits(m, k, seed=5)
    center = _logits(1, k, seed=6) * 0.1
    oracle = IBOTPatchLoss(output_dim=k, teacher_temp=0.07, student_temp=0.1)
    oracle.center.value.copy_(center)
    expected = oracle(teacher, student, masks, teacher_temp=0.07)
    probs = centered_targets(teacher, center, 0.07)
    ours = masked_patch_loss(student, probs, masks, student_temp=0.1, index=index)
    torch.testing.assert_close(ours, expected, **TOL)


def test_koleo_matches_lightly():
    x = _logits(16, 8, seed=7)
    torch.testing.assert_close(koleo_loss(x), KoLeoLoss()(x), **TOL)


def test_vicreg_loss_matches_lightly():
    z1, z2 = _logits(32, 16, seed=8), _logits(32, 16, seed=9)
    ours, _ = vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)
    expected = VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0)(z1, z2)
    torch.testing.assert_close(ours, expected, **TOL)


def load_lightly_dino_head(ours: DINOHead, oracle: DINOProjectionHead) -> None:
    """Copy lightly's head into ours: the MLP's linear layers in order, and the weight norm's
    ``weight_g`` / ``weight_v`` (the official DINO and lightly names) into our parametrization's
    ``original0`` / ``original1`` -- the key mapping a checkpoint loader needs."""
    theirs = [m for m in oracle.layers if isinstance(m, torch.nn.Linear)]
    mine = [m for m in ours.mlp if isinstance(m, torch.nn.Linear)]
    assert len(theirs) == len(mine) == 3
    with torch.no_grad():
        for a, b in zip(mine, theirs, strict=True):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        weight = ours.last_layer.parametrizations.weight
        weight.original0.copy_(oracle.last_layer.weight_g)
        weight.original1.copy_(oracle.last_layer.weight_v)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_without_bn_matches_lightly(norm_last_layer):
    torch.manual_seed(0)
    oracle = DINOProjectionHead(
        input_dim=24, hidden_dim=48, bottleneck_dim=16, output_dim=40, norm_last_layer=norm_last_layer
    )
    ours = DINOHead(24, 40, hidden_dim=48, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    load_lightly_dino_head(ours, oracle)
    x = _logits(7, 24, seed=11)
    torch.testing.assert_close(ours(x), oracle(x), **TOL)
    # the weight-norm gain is trainable exactly where lightly's (and the official head's) is
    gain = ours.last_layer.parametrizations.weight.original0
    assert gain.requires_grad == oracle.last_layer.weight_g.requires_grad == (not norm_last_layer)
