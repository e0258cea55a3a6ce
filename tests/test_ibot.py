"""iBOT: the patch loss and patch center against hand computations, the method's wiring, and real runs."""

import csv
import math

import pytest
import torch

from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.methods import IBOT
from sslab.modules.dino_loss import (
    centered_targets,
    cls_distillation_loss,
    dino_loss,
    masked_patch_loss,
    update_patch_center,
)
from sslab.runs.training import train


def softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def cross_entropy(p, logits, t):
    q = softmax(logits, t)
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))


# two images x three tokens, K = 2; image 0 has tokens 0 and 2 masked, image 1 token 1, image 2 none
S = [[[0.3, -0.2], [9.0, -9.0], [0.1, 0.4]], [[5.0, 5.0], [-0.5, 0.2], [7.0, 1.0]], [[1.0, 2.0]] * 3]
T = [[[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]], [[0.9, 0.1], [0.4, 0.6], [0.1, 0.9]], [[0.5, 0.5]] * 3]
M = [[True, False, True], [False, True, False], [False, False, False]]


def test_patch_loss_matches_hand_computation():
    st = 0.1
    image0 = (cross_entropy(T[0][0], S[0][0], st) + cross_entropy(T[0][2], S[0][2], st)) / 2
    image1 = cross_entropy(T[1][1], S[1][1], st)
    expected = (image0 + image1 + 0.0) / 3  # averaged over masked tokens per image, then over all 3 images
    loss = masked_patch_loss(torch.tensor(S), torch.tensor(T), torch.tensor(M), st)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the same from masked tokens only, in masks.nonzero() order
    masks = torch.tensor(M)
    masked_only = masked_patch_loss(torch.tensor(S)[masks], torch.tensor(T)[masks], masks, st)
    assert masked_only.item() == pytest.approx(expected, rel=1e-6)


def test_unmasked_tokens_do_not_count():
    masks = torch.tensor(M)
    s, t = torch.tensor(S, requires_grad=True), torch.tensor(T)
    loss = masked_patch_loss(s, t, masks, 0.1)
    s2, t2 = torch.tensor(S), t.clone()
    s2[~masks] = torch.randn_like(s2[~masks]) * 10
    t2[~masks] = torch.softmax(torch.randn_like(t2[~masks]), -1)
    assert masked_patch_loss(s2, t2, masks, 0.1).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert torch.all(s.grad[~masks] == 0) and torch.all(s.grad[masks].abs().sum(-1) > 0)


def test_no_masked_token_gives_zero_patch_loss():
    masks = torch.zeros(2, 4, dtype=torch.bool)
    assert masked_patch_loss(torch.randn(2, 4, 3), torch.rand(2, 4, 3), masks, 0.1).item() == 0.0


def test_patch_center_update_by_hand():
    center = torch.tensor([[1.0, -1.0]])
    logits = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [2.0, -2.0]]])  # (B=2, N=2, K=2)
    # per-image token means: [2, 3] and [1, -1]; mean over images: [1.5, 1.0]
    new = update_patch_center(center, logits, 0.9)
    assert new[0].tolist() == pytest.approx([0.9 * 1.0 + 0.1 * 1.5, 0.9 * -1.0 + 0.1 * 1.0])


def test_cls_loss_with_centered_targets_is_dino_loss():
    torch.manual_seed(0)
    s = [torch.randn(4, 6) for _ in range(4)]
    t = [torch.randn(4, 6) for _ in range(2)]
    c = torch.randn(1, 6) * 0.1
    ours = cls_distillation_loss(s, [centered_targets(x, c, 0.04) for x in t], 0.1)
    assert ours.item() == pytest.approx(dino_loss(s, t, c, 0.1, 0.04).item(), rel=1e-6)


def _model(tiny_cfg, *overrides):
    cfg = tiny_cfg("method=ibot", *overrides)
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm)
    model.setup_schedules(total_steps=100, steps_per_epoch=1)  # teacher temperatures 0.04 / 0.07 from step 0
    images = torch.stack([dm.train_set[i]["image"] for i in range(8)])
    return model, images


def _batch(model, images, masks):
    torch.manual_seed(0)
    return {"image": images, "views": model.views(images), "masks": masks}


def test_student_sees_mask_token_teacher_sees_intact_views(tiny_cfg):
    model, images = _model(tiny_cfg)
    masks = torch.zeros(16, 4, 4, dtype=torch.bool)
    masks[:8, 1:3, 1:3] = True  # first global crop of every image: 4 of 16 patches masked
    out = model.step(_batch(model, images, masks))
    out["loss"].backward()
    assert model.backbone.mask_token.grad is not None and model.backbone.mask_token.grad.abs().sum() > 0
    assert model.teacher_backbone.mask_token.grad is None
    assert out["logs"]["mask_ratio"].item() == pytest.approx(0.125)
    assert out["logs"]["loss_patch"].item() > 0
    assert torch.count_nonzero(model.patch_center) > 0  # the patch center moved
    # with no masked token the patch loss is 0 and the mask token gets no gradient
    model.zero_grad()
    out = model.step(_batch(model, images, torch.zeros_like(masks)))
    out["loss"].backward()
    assert out["logs"]["loss_patch"].item() == 0.0
    assert model.backbone.mask_token.grad is None or model.backbone.mask_token.grad.abs().sum() == 0


def test_separate_patch_head_is_trained_ema_updated_and_frozen_first(tiny_cfg):
    model, images = _model(tiny_cfg, "method.separate_patch_head=true", "method.patch_out_dim=128")
    assert model.patch_head.last_layer.weight.shape[0] == 128 and model.patch_center.shape == (1, 128)
    assert any(t is model.teacher_patch_head for t, _ in model.ema_pairs())
    assert any(layer is model.patch_head.last_layer for layer in model.frozen_last_layers())
    trained = {id(p) for g in model.param_groups() for p in g["params"]}
    assert all(id(p) in trained for p in model.patch_head.parameters() if p.requires_grad)
    masks = torch.zeros(16, 4, 4, dtype=torch.bool)
    masks[::2, 0, :2] = True
    out = model.step(_batch(model, images, masks))
    out["loss"].backward()
    assert model.patch_head.mlp[0].weight.grad.abs().sum() > 0


def test_patch_out_dim_without_separate_head_is_refused(tiny_cfg):
    cfg = tiny_cfg("method=ibot", "method.patch_out_dim=128")
    with pytest.raises(SSLabError, match="separate_patch_head=true"):
        build_method(cfg, build_datamodule(cfg))


def test_cnn_backbone_is_refused_in_one_line(tiny_cfg):
    cfg = tiny_cfg("method=ibot", "backbone=resnet18", "~backbone.depth")
    with pytest.raises(SSLabError) as e:
        build_method(cfg, build_datamodule(cfg))
    assert "method=ibot" in str(e.value) and "ViT" in str(e.value) and "\n" not in str(e.value)
    assert IBOT.requires_masking


def _losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [
            (float(r["train/loss"]), float(r["train/loss_patch"]))
            for r in csv.DictReader(f)
            if r.get("train/loss")
        ]


@pytest.mark.slow
def test_ibot_trains_with_falling_loss(tiny_cfg, tmp_path):
    metrics = train(
        tiny_cfg("method=ibot", "trainer.max_steps=40", "trainer.max_epochs=-1", "callbacks=[knn]")
    )
    losses = _losses(tmp_path)
    assert len(losses) == 40 and metrics["global_step"] == 40
    first, last = losses[:10], losses[-10:]
    assert sum(x for x, _ in last) < sum(x for x, _ in first) - 0.5  # total loss falls
    assert sum(p for _, p in last) < sum(p for _, p in first)  # and so does the masked-patch part
    assert 0 <= metrics["eval/knn_top1"] <= 100


@pytest.mark.slow
def test_ibot_resume_is_exact(tiny_cfg, tmp_path):
    common = [
        "method=ibot",
        "trainer.max_steps=6",
        "trainer.max_epochs=-1",
        "checkpoint.every_n_steps=3",
        "checkpoint.save_top_k=-1",
        "callbacks=[]",
    ]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train(tiny_cfg(*common, f"paths.output_dir={full_dir}"))
    train(
        tiny_cfg(
            *common,
            f"paths.output_dir={resumed_dir}",
            f"resume={full_dir / 'checkpoints' / 'step000003.ckpt'}",
        )
    )
    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert torch.count_nonzero(a["state_dict"]["patch_center"]) > 0
    la, lb = _losses(full_dir), _losses(resumed_dir)
    assert lb == la[3:]  # the same masks and views: identical losses of steps 4..6
