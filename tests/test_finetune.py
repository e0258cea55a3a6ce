"""End-to-end fine-tuning (MAE recipe): layer-wise lr decay groups, the applied lr, and learning on real data."""

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir

from sslab.backbones import build
from sslab.build import build_datamodule, build_method
from sslab.evaluation.finetune import Classifier, finetune, finetune_param_groups
from sslab.runs.evaluate import evaluate
from sslab.runs.training import train
from tests.conftest import CONF, make_cfg


def group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_param_groups_get_layer_decayed_scales():
    torch.manual_seed(0)
    model = Classifier(build("vit_t", img_size=28, patch_size=7, depth=2), num_classes=10)
    groups = finetune_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    params = list(model.parameters())
    assert sum(len(g["params"]) for g in groups) == len(params)  # every parameter exactly once
    vit = model.encoder.vit
    # 2 blocks, decay 0.5 (BEiT/MAE): embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm and head 1
    expected = [
        (vit.patch_embed.proj.weight, 0.125, 0.05),
        (vit.cls_token, 0.125, 0.0),
        (vit.pos_embed, 0.125, 0.0),
        (vit.blocks[0].attn.qkv.weight, 0.25, 0.05),
        (vit.blocks[0].norm1.weight, 0.25, 0.0),
        (vit.blocks[1].mlp.fc1.weight, 0.5, 0.05),
        (vit.blocks[1].mlp.fc1.bias, 0.5, 0.0),
        (vit.norm.weight, 1.0, 0.0),
        (model.head.weight, 1.0, 0.05),
        (model.head.bias, 1.0, 0.0),
    ]
    for param, scale, wd in expected:
        g = group_of(groups, param)
        assert g["lr_scale"] == pytest.approx(scale) and g["weight_decay"] == wd
    assert {g["lr_scale"] for g in finetune_param_groups(model, 0.05, None)} == {1.0}


def test_one_step_moves_each_layer_by_its_decayed_lr(tmp_path):
    """Adam's first step moves a weight by lr x scale x |g| / (|g| + eps) <= lr x scale (no weight decay here)."""
    torch.manual_seed(0)
    cfg = make_cfg(tmp_path, "data.eval_bank_size=32", "data.eval_test_size=16")
    dm = build_datamodule(cfg)
    dm.setup()
    encoder = build("vit_t", img_size=28, patch_size=7, depth=2)
    before = copy.deepcopy(encoder)
    _, test_loader = dm.eval_dataloaders()
    base_lr, batch = 1e-3, 32
    out = finetune(
        encoder,
        dm.bank_set,
        test_loader,
        num_classes=10,
        image_size=28,
        mean=dm.mean,
        std=dm.std,
        epochs=1,
        batch_size=batch,
        base_lr=base_lr,
        warmup_epochs=0,
        weight_decay=0.0,
        layer_decay=0.5,
    )
    lr = base_lr * batch / 256
    vit, old = out["model"].encoder.vit, before.vit
    for new_w, old_w, scale in [
        (vit.patch_embed.proj.weight, old.patch_embed.proj.weight, 0.125),
        (vit.blocks[0].attn.qkv.weight, old.blocks[0].attn.qkv.weight, 0.25),
        (vit.blocks[1].mlp.fc2.weight, old.blocks[1].mlp.fc2.weight, 0.5),
    ]:
        step = (new_w - old_w).abs().max().item()
        # |g| / (|g| + eps) is a little below 1: the MAE head init (std 2e-5) keeps encoder gradients near
        # 1e-7; a wrong scale would be off by a factor 2 or more
        assert 0.8 * lr * scale < step <= lr * scale * (1 + 1e-4)
    assert torch.equal(encoder.vit.pos_embed, before.vit.pos_embed)  # the caller's encoder is untouched


@pytest.mark.slow
def test_finetune_beats_chance_on_real_data(tmp_path):
    torch.manual_seed(0)
    cfg = make_cfg(tmp_path, "data.eval_bank_size=1000", "data.eval_test_size=200")
    dm = build_datamodule(cfg)
    dm.setup()
    _, test_loader = dm.eval_dataloaders()
    encoder = build("vit_t", img_size=28, patch_size=7, depth=2)
    out = finetune(
        encoder,
        dm.bank_set,
        test_loader,
        num_classes=10,
        image_size=28,
        mean=dm.mean,
        std=dm.std,
        epochs=6,
        batch_size=32,
    )
    assert out["epoch_loss"][-1] < out["epoch_loss"][0] - 0.3
    # chance is 10% on the 10 balanced classes (sd 2.1 points on 200 test images); from random init a
    # 2-block ViT reaches ~36% in these 186 steps
    assert out["top1"] > 25.0


@pytest.mark.slow
def test_eval_finetune_through_eval_py_uses_the_teacher(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_steps=2", "callbacks=[]")
    metrics = train(cfg)
    model = build_method(cfg, build_datamodule(cfg))
    assert model.eval_backbone() is model.teacher_backbone  # DINO evaluates (and fine-tunes) its teacher
    ckpt = f"{metrics['run_dir']}/checkpoints/last.ckpt"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose(
            "eval",
            overrides=[f"ckpt={ckpt}", "eval=[knn,finetune]", "finetune.epochs=1", "finetune.batch_size=32"],
        )
    result = evaluate(ecfg)
    assert 0 <= result["eval/finetune_top1"] <= 100 and "eval/knn_top1" in result
    assert "eval/linear_top1" not in result
