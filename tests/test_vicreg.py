"""VICReg terms against hand-worked values (Bardes et al., 2022, official-code form), the expander, and the
per-view BatchNorm statistics of the method (facebookresearch/vicreg ``main_vicreg.py``)."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import nn

from sslab.build import build_backbone
from sslab.errors import SSLabError
from sslab.methods.base import DataSpec
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


def method_from_yaml(name: str, *overrides: str):
    """The method built from its shipped yaml (conf/method/<name>.yaml) around a 1-block ViT, no data needed."""
    from tests.conftest import CONF

    tiny = ["backbone=vit_t", "++backbone.depth=1", "++backbone.embed_dim=32", "++backbone.num_heads=2"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"method={name}", *tiny, "method.projector_dims=[64,64,32]", *overrides]
        )
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    cls = get_class(method_cfg.pop("_target_"))
    method_cfg.pop("name")
    spec = DataSpec(cfg.data.image_size, cfg.data.local_crop_size, tuple(cfg.data.mean), tuple(cfg.data.std))
    return cls(backbone=build_backbone(cfg), data=spec, **method_cfg)


def official_vicreg_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """facebookresearch/vicreg ``main_vicreg.py`` VICReg.forward after the expander, written out: 25 MSE +
    25 (mean relu(1 - std_x) + mean relu(1 - std_y)) / 2 + sum of squared off-diagonal covariances / D."""
    n, d = x.shape
    x, y = x.double(), y.double()
    invariance = ((x - y) ** 2).mean()
    x, y = x - x.mean(0), y - y.mean(0)
    std = [torch.sqrt(v.var(0) + 1e-4) for v in (x, y)]
    variance = sum(torch.clamp(1 - s, min=0).mean() / 2 for s in std)
    off = ~torch.eye(d, dtype=torch.bool)
    covariance = sum(((v.T @ v / (n - 1))[off] ** 2).sum() / d for v in (x, y))
    return 25 * invariance + 25 * variance + covariance


def test_vicreg_expands_each_view_on_its_own_batchnorm_statistics():
    """The recipe from conf/method/vicreg.yaml defaults to bn_stats=per_view and its loss is the official
    forward's: expander(backbone(x)) and expander(backbone(y)) in two calls. The joint form (both views in one
    BatchNorm batch) gives a different loss on views with different statistics (negative control)."""
    method = method_from_yaml("vicreg")
    assert method.bn_stats == "per_view"
    method.train()
    method.backbone.eval()  # only the expander has BatchNorm; keeps the ViT deterministic
    g = torch.Generator().manual_seed(0)
    v1 = torch.randn(8, 3, 28, 28, generator=g)
    v2 = 0.5 * torch.randn(8, 3, 28, 28, generator=g) + 1.0  # another distribution: other BN statistics
    out = method.step({"views": (v1, v2)})
    with torch.no_grad():
        h1, h2 = method.backbone(v1), method.backbone(v2)
        expected = official_vicreg_loss(method.projector(h1), method.projector(h2))
        z1, z2 = method.projector(torch.cat([h1, h2])).chunk(2)
        joint = official_vicreg_loss(z1, z2)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(joint.item() - expected.item()) > 1e-3 * abs(expected.item())
    joint_method = method_from_yaml("vicreg", "method.bn_stats=joint")
    joint_method.load_state_dict(method.state_dict())
    joint_method.train()
    joint_method.backbone.eval()
    assert joint_method.step({"views": (v1, v2)})["loss"].item() == pytest.approx(joint.item(), rel=1e-5)


def test_backbones_with_batchnorm_see_one_view_per_call():
    """A BatchNorm backbone (ResNet) is called once per view as in the official code; joint batches them."""
    method = method_from_yaml("vicreg")
    bn_backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 16), nn.BatchNorm1d(16)).train()
    method.backbone = bn_backbone
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(6, 3, 28, 28, generator=g), 3 + torch.randn(6, 3, 28, 28, generator=g)
    h1, h2 = method.encode(v1, v2)
    assert torch.allclose(h1, bn_backbone(v1), atol=1e-5) and torch.allclose(h2, bn_backbone(v2), atol=1e-5)
    method.bn_stats = "joint"
    j1, j2 = method.encode(v1, v2)
    b1, b2 = bn_backbone(torch.cat([v1, v2])).chunk(2)
    assert torch.allclose(j1, b1, atol=1e-5) and torch.allclose(j2, b2, atol=1e-5)
    assert not torch.allclose(j1, h1, atol=1e-2)


def test_unknown_bn_stats_is_refused():
    with pytest.raises(SSLabError, match="bn_stats"):
        method_from_yaml("vicreg", "method.bn_stats=pooled")


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
