"""DINO, iBOT and DINOv2 built from their yamls train like the official code (issue 12's audit).

Each test names the official file the property comes from: facebookresearch/dino ``main_dino.py`` and
``utils.py``; bytedance/ibot ``main_ibot.py`` and ``loader.py``; facebookresearch/dinov2
``dinov2/train/ssl_meta_arch.py``, ``dinov2/train/train.py``, ``dinov2/utils/param_groups.py``,
``dinov2/layers/dino_head.py`` and ``dinov2/data/masking.py``.
"""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from timm.layers import DropPath

from sslab.build import build_datamodule, build_method
from sslab.methods.base import SSLMethod
from sslab.modules.dino_loss import cls_distillation_loss
from sslab.modules.schedules import CosineSchedule

from .conftest import CONF, make_cfg


def _build(tmp_path, method: str, *overrides: str) -> SSLMethod:
    cfg = make_cfg(tmp_path, f"method={method}", *overrides)
    return build_method(cfg, build_datamodule(cfg))


def _decayed(model: SSLMethod) -> dict[str, bool]:
    """Parameter name -> whether its optimizer group gets weight decay."""
    flags = {id(p): g["apply_wd"] for g in model.param_groups() for p in g["params"]}
    return {n: flags[id(p)] for n, p in model.named_parameters() if id(p) in flags}


@pytest.mark.parametrize("method", ["dino", "ibot", "dinov2"])
def test_teacher_is_deterministic_with_drop_path_on(tmp_path, method):
    """main_dino.py / main_ibot.py build the teacher with drop_path_rate 0; DINOv2 keeps it in eval mode.
    Either way two teacher passes over the same images agree while the student's differ."""
    model = _build(tmp_path, method, "++backbone.drop_path_rate=0.5")
    model.train()
    assert any(m.drop_prob > 0 for m in model.backbone.modules() if isinstance(m, DropPath))
    assert all(m.drop_prob == 0 for m in model.teacher_backbone.modules() if isinstance(m, DropPath))
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.teacher_backbone(x), model.teacher_backbone(x))
        assert not torch.equal(model.backbone(x), model.backbone(x))
    # same parameters, so the EMA pairs them one to one
    assert [n for n, _ in model.backbone.named_parameters()] == [
        n for n, _ in model.teacher_backbone.named_parameters()
    ]


def test_teacher_mode_follows_each_reference(tmp_path):
    """DINO's teacher is never put in eval mode (BN in its head normalises with batch statistics);
    DINOv2's ``SSLMetaArch.train`` puts the teacher in eval mode."""
    dino = _build(tmp_path, "dino", "method.use_bn_in_head=true").train()
    assert dino.teacher_head.training and dino.teacher_backbone.training
    dinov2 = _build(tmp_path, "dinov2").train()
    assert dinov2.head.training and dinov2.backbone.training
    assert not dinov2.teacher_head.training and not dinov2.teacher_backbone.training


def test_dino_and_ibot_decay_everything_but_biases_and_1d(tmp_path):
    """dino utils.get_params_groups (iBOT's is the same): no decay on ``.bias`` and 1-D parameters only,
    so the cls token, position embedding and mask token are decayed."""
    for method in ("dino", "ibot"):
        wd = _decayed(_build(tmp_path, method))
        assert wd["backbone.vit.cls_token"] and wd["backbone.vit.pos_embed"]
        assert wd["backbone.vit.patch_embed.proj.weight"] and wd["head.mlp.0.weight"]
        assert not wd["backbone.vit.blocks.0.norm1.weight"] and not wd["backbone.vit.blocks.0.attn.qkv.bias"]
        assert not wd["head.mlp.0.bias"]
    assert _decayed(_build(tmp_path, "ibot"))["backbone.mask_token"]


def test_dinov2_decays_by_name(tmp_path):
    """dinov2/utils/param_groups.py: no decay where the name ends in ``.bias`` or contains ``norm`` or
    ``gamma``; tokens, registers and the trainable weight-norm gain are decayed."""
    wd = _decayed(_build(tmp_path, "dinov2", "backbone.num_registers=2"))
    for name in ("backbone.vit.cls_token", "backbone.vit.pos_embed", "backbone.vit.reg_token"):
        assert wd[name], name
    assert wd["backbone.mask_token"] and wd["head.last_layer.parametrizations.weight.original0"]
    assert not wd["backbone.vit.norm.weight"] and not wd["backbone.vit.blocks.1.norm2.weight"]
    assert not wd["backbone.vit.blocks.0.mlp.fc1.bias"]


def test_head_gain_is_trainable_where_the_reference_trains_it(tmp_path):
    """dinov2/layers/dino_head.py never freezes ``weight_g``; DINO's vanilla recipe (norm_last_layer true)
    does."""
    gain = "head.last_layer.parametrizations.weight.original0"
    assert dict(_build(tmp_path, "dinov2").named_parameters())[gain].requires_grad
    assert not dict(_build(tmp_path, "dino").named_parameters())[gain].requires_grad


def test_lr_warmup_peaks_at_the_last_warmup_step_as_np_linspace():
    """dino utils.cosine_scheduler: np.linspace(0, base, warmup) then the half cosine."""
    warmup, total, base, final = 10, 50, 1e-3, 1e-6
    ref = np.concatenate(
        [
            np.linspace(0, base, warmup),
            final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total - warmup) / (total - warmup))),
        ]
    )
    ours = CosineSchedule(base, final, total, warmup, linspace=True)
    assert [ours(i) for i in range(total)] == pytest.approx(ref.tolist(), rel=1e-12, abs=1e-15)
    assert ours(warmup - 1) == base


def test_dino_methods_schedule_lr_and_teacher_temperature_like_their_references(tmp_path):
    """DINO / iBOT: ``teacher_temp_schedule[epoch]`` = np.linspace(warm, temp, warmup_epochs) per epoch;
    DINOv2: the same linspace per iteration (train.py's CosineScheduler with base = final)."""
    spe = 7
    dino = _build(
        tmp_path,
        "dino",
        "method.teacher_temp=0.07",
        "method.teacher_temp_warmup_epochs=3",
        "method.warmup_epochs=2",
    )
    temp = dino.extra_schedules(total_steps=100, steps_per_epoch=spe)["teacher_temp"]
    ref = np.linspace(0.04, 0.07, 3)
    for step in range(40):
        epoch = step // spe
        assert temp(step) == pytest.approx(ref[epoch] if epoch < 3 else 0.07, abs=1e-12), step
    v2 = _build(tmp_path, "dinov2", "method.teacher_temp=0.07", "method.teacher_temp_warmup_epochs=3")
    temp = v2.extra_schedules(total_steps=100, steps_per_epoch=spe)["teacher_temp"]
    ref = np.linspace(0.04, 0.07, 3 * spe)
    assert [temp(s) for s in range(3 * spe)] == pytest.approx(ref.tolist(), abs=1e-12)
    assert temp(3 * spe) == 0.07
    assert dino.lr_warmup_linspace and v2.lr_warmup_linspace


def test_dinov2_patch_center_and_head_use_masked_tokens_only(tmp_path):
    """ssl_meta_arch.py: the teacher's patch head sees the masked tokens only (index_select by
    mask_indices_list) and ``iBOTPatchLoss.update_center`` takes their mean."""
    model = _build(tmp_path, "dinov2")
    tokens = torch.randn(4, 16, model.backbone.embed_dim)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[1, :5] = True
    masks[3, 7:9] = True
    index = masks.flatten().nonzero().squeeze(1)
    calls = []
    head = model.teacher_patch_head_module()
    handle = head.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        logits = head(tokens[masks])
        calls.clear()
        model.patch_targets(tokens, index, 0.04)
    handle.remove()
    assert calls == [7]  # one head call on the 7 masked tokens
    m = model.center_momentum_patch
    torch.testing.assert_close(model.patch_center, (1 - m) * logits.mean(0, keepdim=True))


def test_dinov2_divides_the_dino_term_like_ssl_meta_arch(tmp_path):
    """ssl_meta_arch.py: the summed CLS cross-entropies are divided by
    n_global * (n_global - 1) + max(n_local * n_global, 1); iBOT averages over the pairs."""
    ibot, v2 = _build(tmp_path, "ibot"), _build(tmp_path, "dinov2")
    assert ibot.cls_loss_pairs(2, 0) == 2 and v2.cls_loss_pairs(2, 0) == 3
    assert ibot.cls_loss_pairs(2, 8) == v2.cls_loss_pairs(2, 8) == 18
    # with no local crops, DINOv2's step reports 2/3 of the mean over pairs
    v2 = _build(tmp_path, "dinov2", "method.views.num_local=0", "method.koleo_weight=0")
    v2.train()
    v2.setup_schedules(100, 10)
    images = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
    views = v2.views(images)
    masks = torch.zeros(8, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    with torch.no_grad():
        out = v2.step({"views": views, "masks": masks})
        teacher = v2.teacher_head(v2.teacher_backbone(torch.cat(views)))
        # the step already updated the center once, so recompute the targets with the old center (zero)
        probs = torch.softmax(teacher / v2.schedules["teacher_temp"](0), dim=-1)
        student = v2.backbone.forward_tokens(torch.cat(views), mask=masks)["cls"]
        mean_over_pairs = cls_distillation_loss(
            list(v2.head(student).chunk(2)), list(probs.chunk(2)), v2.student_temp
        )
    torch.testing.assert_close(out["logs"]["loss_cls"], mean_over_pairs * 2 / 3, rtol=1e-5, atol=1e-6)


def test_dinov2_masking_recipe(tmp_path):
    """dinov2/data/masking.py: min_num_patches 4, max half the patches per block; collate.py floors the
    budget; ibot loader.py keeps it a float."""
    v2 = _build(tmp_path, "dinov2")
    assert v2.masking.min_block_patches == 4 and v2.masking.max_block_fraction == 0.5
    assert v2.masking.integer_budget and v2.masking.stratified
    ibot = _build(tmp_path, "ibot")
    assert not ibot.masking.integer_budget and not ibot.masking.stratified


def test_dinov2_lr_scaling_and_patch_embed_multiplier(tmp_path):
    """dinov2 ssl_default_config: lr x sqrt(batch / 1024) (scaling_rule sqrt_wrt_1024) and
    patch_embed_lr_mult 0.2."""
    v2 = _build(tmp_path, "dinov2")
    assert v2.lr_scaling == "sqrt_wrt_1024" and v2.patch_embed_lr_mult == 0.2
    scale = {id(p): g["lr_scale"] for g in v2.param_groups() for p in g["params"]}
    blocks = len(v2.backbone.vit.blocks)
    patch = v2.backbone.vit.patch_embed.proj.weight
    assert scale[id(patch)] == pytest.approx(0.2 * 0.9 ** (blocks + 1))


def _experiment(name: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", "data.path=/nonexistent"])


def test_vanilla_and_boost_experiments_are_the_official_commands():
    """dino README: vanilla = main_dino.py's defaults on 8 GPUs; boost = --epochs 300 --teacher_temp 0.07
    --warmup_teacher_temp_epochs 30 --norm_last_layer false on 16 GPUs."""
    vanilla = _experiment("dino_vits16_imagenet")
    m, t = vanilla.method, vanilla.trainer
    assert (vanilla.data.batch_size, t.devices, t.get("num_nodes", 1), t.max_epochs) == (64, 8, 1, 100)
    assert (m.teacher_temp, m.teacher_temp_warmup_epochs, m.views.num_local) == (0.04, 0, 8)
    assert vanilla.backbone.drop_path_rate == 0.1 and m.norm_last_layer and not m.use_bn_in_head
    assert (m.base_lr, m.warmup_epochs, m.momentum_teacher, m.out_dim) == (5e-4, 10, 0.996, 65536)
    boost = _experiment("dino_vits16_imagenet_boost")
    b = boost.method
    assert (b.teacher_temp, b.teacher_temp_warmup_epochs, b.norm_last_layer) == (0.07, 30, False)
    assert (boost.trainer.max_epochs, boost.trainer.num_nodes, boost.trainer.devices) == (300, 2, 8)
    assert b.views.num_local == 8 and boost.backbone.drop_path_rate == 0.1
