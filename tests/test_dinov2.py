"""DINOv2: KoLeo and Sinkhorn-Knopp against hand computations, layer-wise lr decay groups, real runs."""

import csv
import math

import pytest
import torch

from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.modules.dino_loss import koleo_loss, sinkhorn_knopp
from sslab.runs.training import train


def test_koleo_matches_hand_computation():
    # unit vectors a=(1,0), b=(0,1), c=(0.6,0.8): nearest neighbours a->c (sqrt .8), b->c (sqrt .4), c->b (sqrt .4)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    expected = -(math.log(math.sqrt(0.8)) + 2 * math.log(math.sqrt(0.4))) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)
    # inputs are L2-normalised first: scaling a row changes nothing
    assert koleo_loss(x * torch.tensor([[5.0], [0.1], [3.0]])).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_eps_is_the_official_one():
    # duplicates: the official code computes ||x - y + eps|| (torch PairwiseDistance) then log(d + eps), eps = 1e-8
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    expected = -math.log(math.sqrt(2) * 1e-8 + 1e-8)
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_is_computed_in_fp32_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = koleo_loss(x)
    assert inside.dtype == torch.float32
    assert inside.item() == koleo_loss(x).item()


def test_koleo_refuses_a_batch_of_one():
    with pytest.raises(SSLabError, match="at least 2 images") as e:
        koleo_loss(torch.randn(1, 4))
    assert "\n" not in str(e.value)


def test_sinkhorn_one_iteration_by_hand():
    logits = [[0.0, math.log(2.0)], [math.log(3.0), 0.0]]  # exp: [[1, 2], [3, 1]], B = 2 samples, K = 2
    q = [[1.0, 3.0], [2.0, 1.0]]  # Q = exp(logits)^T, prototypes x samples
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    q = [[v / sum(row) / 2 for v in row] for row in q]  # each prototype row -> 1/K
    cols = [q[0][j] + q[1][j] for j in range(2)]
    q = [[q[i][j] / cols[j] / 2 for j in range(2)] for i in range(2)]  # each sample column -> 1/B
    expected = [[q[i][j] * 2 for i in range(2)] for j in range(2)]  # x B, transposed back to samples x K
    out = sinkhorn_knopp(torch.tensor(logits), temperature=1.0, n_iter=1)
    assert out.tolist()[0] == pytest.approx(expected[0], rel=1e-6)
    assert out.tolist()[1] == pytest.approx(expected[1], rel=1e-6)


def test_sinkhorn_is_doubly_stochastic_up_to_b_over_k():
    torch.manual_seed(0)
    b, k = 24, 8
    logits = torch.randn(b, k) * 0.5 + torch.linspace(0, 1, k)  # prototypes of unequal popularity
    out = sinkhorn_knopp(logits, temperature=0.1, n_iter=200)
    assert torch.allclose(out.sum(1), torch.ones(b), atol=1e-5)  # each sample: a distribution
    assert torch.allclose(out.sum(0), torch.full((k,), b / k), atol=1e-3)  # each prototype: B / K
    # with the paper's 3 iterations rows are exact and prototypes closer to equipartition than softmax's,
    # and each further iteration brings them closer still
    three = sinkhorn_knopp(logits, temperature=0.1, n_iter=3)
    assert torch.allclose(three.sum(1), torch.ones(b), atol=1e-5)
    gaps = [
        (x.sum(0) - b / k).abs().max().item()
        for x in (torch.softmax(logits / 0.1, dim=1), three, sinkhorn_knopp(logits, 0.1, 10), out)
    ]
    assert gaps[1] < 0.5 * gaps[0] and gaps[2] < gaps[1] and gaps[3] < gaps[2]
    # logits far above exp's fp32 range (125 / T) give the same targets as shifted ones: no overflow
    shifted = sinkhorn_knopp(logits + 12.0, 0.1, 3)
    assert torch.isfinite(shifted).all() and torch.allclose(shifted, three, rtol=1e-3, atol=1e-6)


def _dinov2(tiny_cfg, *overrides):
    cfg = tiny_cfg("method=dinov2", *overrides)
    dm = build_datamodule(cfg)
    return build_method(cfg, dm), dm


def test_layerwise_lr_decay_groups(tiny_cfg):
    """dinov2/utils/param_groups.py: layer-wise decay, and the patch embedding's lr x patch_embed_lr_mult."""
    model, _ = _dinov2(tiny_cfg)  # TINY: 2 blocks; dinov2.yaml: layer_decay 0.9, patch_embed_lr_mult 0.2
    scale_of = {id(p): g["lr_scale"] for g in model.param_groups() for p in g["params"]}
    named = dict(model.backbone.named_parameters())
    expected = {
        "vit.cls_token": 0.9**3,
        "vit.pos_embed": 0.9**3,
        "mask_token": 0.9**3,
        "vit.patch_embed.proj.weight": 0.9**3 * 0.2,  # DINOv2 optim.patch_embed_lr_mult
        "vit.patch_embed.proj.bias": 0.9**3 * 0.2,
        "vit.blocks.0.attn.qkv.weight": 0.9**2,
        "vit.blocks.0.norm1.bias": 0.9**2,
        "vit.blocks.1.mlp.fc1.weight": 0.9,
        "vit.norm.weight": 1.0,
    }
    for name, scale in expected.items():
        assert scale_of[id(named[name])] == pytest.approx(scale), name
    assert all(scale_of[id(p)] == 1.0 for p in model.head.parameters() if p.requires_grad)
    assert not any(id(p) in scale_of for p in model.teacher_backbone.parameters())


def test_sinkhorn_centering_step_runs_and_leaves_centers_alone(tiny_cfg):
    model, dm = _dinov2(tiny_cfg, "method.centering=sinkhorn_knopp")
    model.setup_schedules(total_steps=100, steps_per_epoch=1)  # teacher temperatures 0.04 / 0.04 from step 0
    images = torch.stack([dm.train_set[i]["image"] for i in range(8)])
    torch.manual_seed(0)
    masks = torch.zeros(16, 4, 4, dtype=torch.bool)
    masks[:8:2, :2, :2] = True
    out = model.step({"image": images, "views": model.views(images), "masks": masks})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["logs"]["koleo"].item() != 0
    assert torch.count_nonzero(model.center) == 0 and torch.count_nonzero(model.patch_center) == 0
    # KoLeo: 0.1 x sum over the two global crops of the student's CLS features
    assert model.backbone.vit.cls_token.grad is not None


def test_unknown_centering_is_refused(tiny_cfg):
    with pytest.raises(SSLabError, match="center, sinkhorn_knopp"):
        _dinov2(tiny_cfg, "method.centering=median")


@pytest.mark.slow
def test_batch_of_one_is_refused_before_training(tiny_cfg):
    with pytest.raises(SSLabError, match=r"KoLeo loss needs at least 2 images .*data.batch_size=1"):
        train(tiny_cfg("method=dinov2", "data.batch_size=1", "trainer.max_steps=2", "callbacks=[]"))


@pytest.mark.slow
def test_dinov2_trains_with_falling_loss(tiny_cfg, tmp_path):
    metrics = train(
        tiny_cfg("method=dinov2", "trainer.max_steps=40", "trainer.max_epochs=-1", "callbacks=[knn]")
    )
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 40 and metrics["global_step"] == 40
    assert sum(losses[-10:]) < sum(losses[:10]) - 0.5
    assert all(float(r["train/koleo"]) > 0 for r in rows)
    assert 0 <= metrics["eval/knn_top1"] <= 100


RANK_SCRIPT = """
from sslab.modules.dino_loss import sinkhorn_knopp
part = torch.load(path).split((7, 4))[rank]
torch.save(sinkhorn_knopp(part, 0.1, 3), f"{path}.{rank}")
"""


@pytest.mark.slow
def test_sinkhorn_over_two_ranks_equals_one_process_on_the_global_batch(tmp_path):
    # ranks hold unequal shares (as masked patch tokens do): the all-reduced sums and sample count make the
    # result identical to Sinkhorn-Knopp over the concatenated batch in one process
    from tests.gloo import run_two_ranks

    torch.manual_seed(0)
    logits = torch.randn(11, 6)
    path = tmp_path / "logits.pt"
    torch.save(logits, path)
    together = torch.cat(run_two_ranks(RANK_SCRIPT, path))
    assert torch.allclose(together, sinkhorn_knopp(logits, 0.1, 3), atol=1e-6)
