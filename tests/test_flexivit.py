"""FlexiViT (Beyer et al., CVPR 2023): PI-resize, position-embedding resize, per-step patch size, evaluation."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sslab.backbones import build
from sslab.backbones.flexi import (
    bilinear_resize_matrix,
    draw_patch_size,
    pi_resize_kernel,
    resize_pos_embed,
    set_eval_patch_size,
)
from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.runs.evaluate import eval_patch_sizes, evaluate
from sslab.runs.training import train
from tests.conftest import CONF, make_cfg


def flexi_vit(**kw):
    return build("vit_t", img_size=28, patch_size=7, depth=2, flexi=True, flexi_patch_sizes=[4, 7, 14], **kw)


def test_bilinear_resize_matrix_by_hand():
    # 2 -> 4 px, half-pixel centres: output pixel centres sit at input coordinates -0.25, 0.25, 0.75, 1.25,
    # so the 1-D weights are (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1); the 2-D operator is their outer product.
    w1 = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    expected = torch.kron(w1, w1)  # rows: output pixels (row-major), columns: input pixels
    assert torch.allclose(bilinear_resize_matrix(2, 4), expected)


@pytest.mark.parametrize(("old", "new"), [(7, 14), (4, 7), (7, 28), (3, 5)])
def test_pi_resize_keeps_the_token_of_the_resized_patch(old, new):
    """The paper's property: <x, w> = <Bx, w'> for every patch x when the patch grows (B injective)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, old, old, generator=g, dtype=torch.float64)
    w = torch.randn(16, 3, old, old, generator=g, dtype=torch.float64)
    bias = torch.randn(16, generator=g, dtype=torch.float64)
    tokens = F.conv2d(x, w, bias, stride=old)
    x_resized = F.interpolate(x, size=(new, new), mode="bilinear", align_corners=False)
    w_resized = pi_resize_kernel(w, new)
    assert w_resized.shape == (16, 3, new, new)
    assert torch.allclose(F.conv2d(x_resized, w_resized, bias, stride=new), tokens, atol=1e-10)
    # a naive bilinear resize of the kernel does not keep the token
    w_naive = F.interpolate(w, size=(new, new), mode="bilinear", align_corners=False)
    assert not torch.allclose(F.conv2d(x_resized, w_naive, bias, stride=new), tokens, atol=1e-2)


def test_pi_resize_is_least_squares_when_shrinking():
    """Shrinking cannot keep every token; w' = pinv(B^T) w minimises E_x(<x,w> - <Bx,w'>)^2 = ||w - B^T w'||^2
    over Gaussian patches, whose normal equations say the residual is orthogonal to B's columns: B (w - B^T w') = 0.
    """
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 1, 7, 7, generator=g, dtype=torch.float64)
    w_small = pi_resize_kernel(w, 4)
    b = bilinear_resize_matrix(7, 4)  # (16, 49)
    residual = w.reshape(5, 49) - w_small.reshape(5, 16) @ b
    assert torch.allclose(residual @ b.T, torch.zeros(5, 16, dtype=torch.float64), atol=1e-10)
    # and it beats the naive kernel resize on that objective
    naive = F.interpolate(w, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    assert residual.norm() < (w.reshape(5, 49) - naive.reshape(5, 16) @ b).norm()


def test_pos_embed_resize():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 16, 8, generator=g)
    assert resize_pos_embed(pos, (4, 4), (7, 7)).shape == (1, 49, 8)
    assert resize_pos_embed(pos, (4, 4), (2, 2)).shape == (1, 4, 8)
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos
    const = torch.full((1, 16, 8), 0.5)
    assert torch.allclose(resize_pos_embed(const, (4, 4), (7, 7)), torch.full((1, 49, 8), 0.5))
    # 2x2 -> 4x4 bilinear, half-pixel centres: each output is the hand-worked weighted mean of its neighbours
    ramp = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 4, 1)
    up = resize_pos_embed(ramp, (2, 2), (4, 4)).view(4, 4)
    w1 = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    assert torch.allclose(up, w1 @ torch.tensor([[0.0, 1.0], [2.0, 3.0]]) @ w1.T)


def test_backbone_uses_resized_pos_embed_and_kernel():
    torch.manual_seed(0)
    m = flexi_vit().eval()
    m.eval_patch_size = 4
    x = torch.randn(2, 3, 28, 28)
    vit = m.vit
    tokens = m.embed_patches(x)
    assert tokens.shape == (2, 7, 7, 192)
    w4 = pi_resize_kernel(vit.patch_embed.proj.weight, 4)
    assert torch.allclose(tokens, F.conv2d(x, w4, vit.patch_embed.proj.bias, stride=4).permute(0, 2, 3, 1))
    seq = m.add_pos_embed(tokens)
    pos = resize_pos_embed(vit.pos_embed[:, 1:], (4, 4), (7, 7))
    assert torch.allclose(seq[:, 1:], tokens.reshape(2, 49, 192) + pos)
    assert torch.allclose(seq[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[0].expand(2, -1))


def test_flexi_at_the_stored_size_matches_timm_path():
    torch.manual_seed(0)
    plain = build("vit_t", img_size=28, patch_size=7, depth=2, num_registers=2).eval()
    flexi = flexi_vit(num_registers=2).eval()
    flexi.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(plain.forward_tokens(x)["patch"], flexi.forward_tokens(x)["patch"])


def test_train_size_in_train_mode_eval_size_in_eval_mode_and_masking_follows_it():
    torch.manual_seed(0)
    m = flexi_vit().train()
    m.set_patch_size(4)
    assert m.patch_size == 4
    x = torch.randn(2, 3, 28, 28)
    assert m.forward_tokens(x)["patch"].shape == (2, 49, 192)
    full = torch.ones(2, 49, dtype=torch.bool)  # the mask lives on the 7 x 7 grid of patch size 4
    a = m.forward_tokens(x, mask=full)["cls"]
    assert torch.allclose(a, m.forward_tokens(torch.randn(2, 3, 28, 28), mask=full)["cls"], atol=1e-5)
    keep = torch.tensor([[0, 17, 48], [1, 2, 40]])
    assert m.forward_tokens(x, keep=keep)["patch"].shape == (2, 3, 192)
    m.eval()
    assert m.patch_size == 7 and m.forward_tokens(x)["patch"].shape == (2, 16, 192)


@pytest.mark.parametrize(("p", "n_global", "n_local"), [(4, 49, 16), (7, 16, 4), (14, 4, 1)])
def test_eval_at_several_patch_sizes(p, n_global, n_local):
    torch.manual_seed(0)
    m = build("vit_t", img_size=28, patch_size=7, depth=2).eval()  # a plain ViT evaluates at any size too
    assert set_eval_patch_size(m, p) == 1 and m.patch_size == p
    out = m.forward_tokens(torch.randn(2, 3, 28, 28))
    assert out["patch"].shape == (2, n_global, 192) and torch.isfinite(out["cls"]).all()
    # a 14 px crop that p does not divide is resized to the nearest multiple (14 px at p=4 -> 16 px, 4 x 4)
    assert m.forward_tokens(torch.randn(2, 3, 14, 14))["patch"].shape == (2, n_local, 192)


def test_bad_flexi_configs_are_refused():
    with pytest.raises(SSLabError, match="divisors of the image size 28"):
        build("vit_t", img_size=28, patch_size=7, flexi=True, flexi_patch_sizes=[5, 7])
    with pytest.raises(SSLabError, match="divisors"):
        build("vit_t", img_size=28, patch_size=7, flexi=True, flexi_patch_sizes=[])
    with pytest.raises(SSLabError, match="CNN"):
        build("resnet18", img_size=28, flexi=True, flexi_patch_sizes=[4])


def test_draw_is_a_function_of_seed_and_step_and_uniform():
    sizes = (4, 7, 14)
    draws = [draw_patch_size(sizes, 0, s) for s in range(600)]
    assert draws == [draw_patch_size(sizes, 0, s) for s in range(600)]  # exact resume draws the same
    assert draws != [draw_patch_size(sizes, 1, s) for s in range(600)]
    counts = [draws.count(p) for p in sizes]
    assert sum(counts) == 600 and all(150 <= c <= 250 for c in counts)  # ~200 each (binomial sd 11.5)


def test_dino_step_at_two_patch_sizes_student_and_teacher_agree(tmp_path):
    torch.manual_seed(0)
    cfg = make_cfg(tmp_path, "backbone.flexi=true")
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm).train()
    model.setup_schedules(100, 10)
    images = torch.stack([dm.train_set[i]["image"] for i in range(8)])
    seen = set()
    for step in range(12):
        model.draw_patch_size(step)
        p = model.backbone.patch_size
        assert model.teacher_backbone.patch_size == p == draw_patch_size((4, 7, 14), cfg.seed, step)
        if p in seen:
            continue
        seen.add(p)
        views = model.views(images)
        out = model.step({"views": views, "image": images})
        model.zero_grad()
        out["loss"].backward()
        grad = model.backbone.vit.patch_embed.proj.weight.grad  # the stored 7 x 7 kernel learns at any size
        assert torch.isfinite(out["loss"]) and grad is not None and grad.abs().sum() > 0
    assert len(seen) >= 2
    model.eval()
    assert model.backbone.patch_size == model.teacher_backbone.patch_size == 7


@pytest.mark.slow
def test_flexi_training_run_logs_drawn_sizes_and_evaluates_per_size(tmp_path):
    cfg = make_cfg(tmp_path, "backbone.flexi=true", "trainer.max_steps=6", "callbacks=[]")
    metrics = train(cfg)
    run_dir = Path(metrics["run_dir"])
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): float(r["train/patch_size"]) for r in rows if r.get("train/patch_size")}
    # the Lightning flow logs the size of each step, as drawn from (seed, step)
    assert logged and all(v == draw_patch_size((4, 7, 14), cfg.seed, s) for s, v in logged.items())
    assert len(logged) >= 5 and len(set(logged.values())) >= 2
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose(
            "eval",
            overrides=[f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "eval=knn", "patch_sizes=[4,7,14]"],
        )
    result = evaluate(ecfg)
    for p in (4, 7, 14):
        assert 0 <= result[f"eval/knn_top1_p{p}"] <= 100
    json.dumps(result)


def test_eval_patch_size_options_are_checked():
    def opts(sizes, single):
        return OmegaConf.create({"patch_sizes": sizes, "backbone": {"patch_size": single}})

    vit = build("vit_t", img_size=28, patch_size=7, depth=1)
    assert eval_patch_sizes(opts([], None), vit, 28) == [None]
    assert eval_patch_sizes(opts([], 14), vit, 28) == [14]
    assert eval_patch_sizes(opts([4, 7, 14], None), vit, 28) == [4, 7, 14]
    with pytest.raises(SSLabError, match="either"):
        eval_patch_sizes(opts([4], 7), vit, 28)
    with pytest.raises(SSLabError, match="does not divide the 28 px"):
        eval_patch_sizes(opts([4, 5], None), vit, 28)
    with pytest.raises(SSLabError, match="apply to ViT backbones"):
        eval_patch_sizes(opts([4], None), build("resnet18", img_size=28), 28)
