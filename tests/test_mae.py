"""MAE: random masking, patches, the normalised-pixel target, the masked-patch loss and sin-cos embeddings
against hand-worked values; a short real training run; CNN backbones refused."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from sslab.backbones.pos_embed import sincos_2d
from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.modules.masking import random_masking
from sslab.modules.patches import masked_mse, normalized_patches, patchify, unpatchify
from tests.conftest import CONF, TINY
from tests.wandb_file import finished, history

# TINY minus its DINO head sizes, which masked-image-modelling configs do not have
MIM_TINY = [o for o in TINY if not o.startswith("method.")]


def mim_cfg(tmp_path, method: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config", overrides=[*MIM_TINY, f"method={method}", f"paths.output_dir={tmp_path}", *overrides]
        )


def csv_losses(run_dir) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


# -- masking ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "ratio"), [(16, 0.75), (196, 0.75), (10, 0.75), (49, 0.6), (7, 0.5)])
def test_random_masking_keeps_floor_n_times_one_minus_ratio_per_sample(n, ratio):
    """facebookresearch/mae ``models_mae.py``: len_keep = int(L * (1 - mask_ratio))."""
    torch.manual_seed(0)
    keep, mask, restore = random_masking(6, n, ratio, "cpu")
    n_masked = n - int(n * (1 - ratio))
    assert keep.shape == (6, n - n_masked) and keep.dtype == torch.long
    assert mask.shape == (6, n) and mask.dtype == torch.bool
    assert restore.shape == (6, n) and restore.dtype == torch.long
    assert mask.sum(1).tolist() == [n_masked] * 6
    assert not mask.gather(1, keep).any()  # kept patches are exactly the unmasked ones
    assert (torch.sort(restore, 1).values == torch.arange(n)).all()  # a permutation per sample


def test_restore_idx_unshuffles_kept_then_masked_tokens():
    torch.manual_seed(1)
    keep, mask, restore = random_masking(4, 16, 0.75, "cpu")
    values = torch.arange(16).expand(4, -1)
    kept = values.gather(1, keep)
    placeholder = torch.full((4, 12), -1)
    unshuffled = torch.cat([kept, placeholder], 1).gather(1, restore)
    # every kept token lands back on its own patch index, mask tokens exactly on the masked patches
    assert (unshuffled[~mask] == values[~mask]).all()
    assert (unshuffled[mask] == -1).all()


def test_masks_differ_per_sample_and_each_patch_is_masked_at_the_ratio():
    torch.manual_seed(2)
    _, mask, _ = random_masking(4000, 16, 0.75, "cpu")
    assert len({tuple(m.tolist()) for m in mask[:50]}) > 45
    per_patch = mask.float().mean(0)
    assert torch.allclose(per_patch, torch.full((16,), 0.75), atol=0.03)


# -- patches ---------------------------------------------------------------------------------------------
def test_patchify_unpatchify_inverse_and_layout():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    # patch 1 is row 0, column 1, flattened as (p, p, C)
    assert torch.equal(p[:, 1], x[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(2, 48))
    # patch 4 is row 1, column 1
    assert torch.equal(p[:, 4], x[:, :, 4:8, 4:8].permute(0, 2, 3, 1).reshape(2, 48))
    assert torch.equal(unpatchify(p, 4, (2, 3), 3), x)


def test_normalized_target_against_hand_computed_patch():
    # one 2x2 single-channel patch [[1, 2], [3, 4]]: mean 2.5, unbiased var 5/3
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target, mean, std = normalized_patches(patchify(x, 2), eps=1e-6)
    expected_std = math.sqrt(5 / 3 + 1e-6)
    assert mean.item() == pytest.approx(2.5)
    assert std.item() == pytest.approx(expected_std, rel=1e-6)
    hand = [-1.5 / expected_std, -0.5 / expected_std, 0.5 / expected_std, 1.5 / expected_std]
    assert target.flatten().tolist() == pytest.approx(hand, rel=1e-5)
    # a flat patch: variance 0, so std = sqrt(eps) = 1e-3 and the target is all zeros
    flat = torch.full((1, 1, 2, 2), 5.0)
    target, mean, std = normalized_patches(patchify(flat, 2), eps=1e-6)
    assert std.item() == pytest.approx(1e-3, rel=1e-4) and mean.item() == 5.0
    assert torch.equal(target, torch.zeros_like(target))


def test_loss_counts_masked_patches_only():
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]], [[4.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    pred = torch.zeros_like(target)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    # per-patch MSE: sample 0 -> 1, 2, 4.5; sample 1 -> 8, 1, 0; masked ones: 1, 4.5, 1 -> mean 6.5 / 3
    assert masked_mse(pred, target, mask).item() == pytest.approx(6.5 / 3)
    changed = pred.clone()
    changed[0, 1] = 100.0  # an unmasked patch
    changed[1, 0] = -7.0
    assert masked_mse(changed, target, mask).item() == pytest.approx(6.5 / 3)
    changed[1, 1] = 1.0  # a masked patch: its error drops to 0
    assert masked_mse(changed, target, mask).item() == pytest.approx(5.5 / 3)


def test_sincos_2d_at_known_positions():
    pe = sincos_2d(8, (2, 3))  # 2 rows x 3 columns; first half encodes the column, second half the row
    assert pe.shape == (6, 8)
    # dim/2 = 4 per axis: frequencies 1 and 1/10000^(1/2) = 0.01; layout [sin w0, sin w1, cos w0, cos w1]
    assert pe[0].tolist() == pytest.approx([0, 0, 1, 1, 0, 0, 1, 1])
    s1, s2, c1, c2 = math.sin(1), math.sin(2), math.cos(1), math.cos(2)
    s01, s02, c01, c02 = math.sin(0.01), math.sin(0.02), math.cos(0.01), math.cos(0.02)
    assert pe[5].tolist() == pytest.approx([s2, s02, c2, c02, s1, s01, c1, c01], abs=1e-6)  # row 1, col 2
    assert pe[3].tolist() == pytest.approx([0, 0, 1, 1, s1, s01, c1, c01], abs=1e-6)  # row 1, col 0


# -- the method ------------------------------------------------------------------------------------------
def test_mae_gradient_reaches_encoder_only_through_visible_patches(tmp_path):
    """The encoder sees only the kept patches: pixels of masked patches get no gradient through it."""
    cfg = mim_cfg(tmp_path, "mae", "method.norm_pix_loss=false", "method.probe_features=visible")
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm)
    x = torch.randn(2, 3, 28, 28, requires_grad=True)
    torch.manual_seed(0)
    fwd = model.forward_masked(x)
    cls = fwd["encoder"]["cls"]
    (cls * torch.randn_like(cls)).sum().backward()  # not .sum(): a LayerNorm output sums to a constant
    grad = patchify(x.grad.abs(), 7).sum(-1)
    assert ((grad > 0) == ~fwd["mask"]).all()


def test_mae_settings_and_probe_batchnorm(tmp_path):
    cfg = mim_cfg(tmp_path, "mae")
    model = build_method(cfg, build_datamodule(cfg))
    assert model.requires_masking and model.probe_batchnorm
    assert model.betas == (0.9, 0.95) and model.weight_decay == 0.05 and model.mask_ratio == 0.75
    groups = {id(p): g["weight_decay"] for g in model.param_groups() for p in g["params"]}
    assert groups[id(model.decoder.mask_token)] == 0.05  # timm's rule decays tokens (test_mae_recipe.py)
    assert groups[id(model.decoder.blocks[0].attn.qkv.weight)] == 0.05


def test_registers_work(tmp_path):
    cfg = mim_cfg(tmp_path, "mae", "backbone.num_registers=2")
    model = build_method(cfg, build_datamodule(cfg))
    assert model.backbone.num_prefix_tokens == 3
    x = torch.randn(3, 3, 28, 28)
    out = model.step({"views": x})
    assert torch.isfinite(out["loss"]) and out["features"].shape == (3, 192)
    assert model.forward_masked(x)["pred"].shape == (3, 16, 49)  # 7 x 7 x 1 channel (Fashion-MNIST)


@pytest.mark.parametrize("method", ["mae", "diffmae"])
def test_greyscale_data_is_reconstructed_in_its_own_channel(tmp_path, method):
    """Fashion-MNIST has 1 channel: the decoder predicts 7 x 7 x 1 values per patch, the targets are the
    grey channel, and every reconstruction column is grey (R = G = B), not colour noise."""
    extra = ["method.sample_steps=3", "method.decoder_depth=1"] if method == "diffmae" else []
    cfg = mim_cfg(tmp_path, method, *extra)
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm)
    assert dm.channels == 1 and model.data.channels == 1
    assert model.patch_dim == 7 * 7 and model.decoder.pred.out_features == 7 * 7
    x = torch.randn(2, 1, 28, 28).expand(-1, 3, -1, -1)  # the views repeat grey to RGB for the encoder
    target, _, _ = model.pixel_targets(x)
    assert target.shape == (2, 16, 49)
    assert torch.isfinite(model.step({"views": x})["loss"])
    images = torch.stack([dm.test_set[i]["image"] for i in range(2)])
    columns = model.reconstruct(images)
    for name, picture in columns.items():
        assert picture.shape == (2, 3, 28, 28), name
        assert torch.equal(picture[:, 0], picture[:, 1]) and torch.equal(picture[:, 0], picture[:, 2]), name


def test_cnn_backbone_is_refused(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [o for o in MIM_TINY if "backbone.depth" not in o]
        cfg = compose("config", overrides=[*overrides, "method=mae", "backbone=resnet18"])
    with pytest.raises(SSLabError) as info:
        build_method(cfg, build_datamodule(cfg))
    # train.py prints an SSLabError as `error: <message>` and exits 1 (tests/test_end_to_end.py checks that)
    assert str(info.value) == (
        "method=mae masks patch tokens, which backbone=resnet18 cannot do; use a ViT backbone"
    )


@pytest.mark.slow
def test_mae_trains_end_to_end_with_falling_loss_and_pictures(tmp_path, monkeypatch):
    from sslab.runs import evaluate as evaluate_module
    from sslab.runs.training import train

    cfg = mim_cfg(
        tmp_path,
        "mae",
        "trainer.max_steps=40",
        "method.base_lr=1.5e-2",
        "method.warmup_epochs=0",
        "callbacks=[knn,linear_probe,reconstruction]",
        "logger=[csv,wandb]",
    )
    metrics = train(cfg)
    losses = csv_losses(tmp_path)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert 0 <= metrics["eval/knn_top1"] <= 100 and 0 <= metrics["eval/linear_top1"] <= 100
    png = tmp_path / "images" / "reconstruction_step000040.png"
    with Image.open(png) as im:  # 8 rows x 3 columns of 28 px images enlarged 4x, 2 px padding
        assert im.size == (3 * (112 + 2) + 2, 8 * (112 + 2) + 2)
    # the same picture reached W&B (offline run file read back): one image under images/reconstruction
    run_file = finished(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    logged = [r for r in history(run_file) if "images/reconstruction/_type" in r]
    assert len(logged) == 1 and logged[0]["trainer/global_step"] == 40
    assert logged[0]["images/reconstruction/captions"] == ["columns: masked | reconstruction | original"]
    assert (logged[0]["images/reconstruction/width"], logged[0]["images/reconstruction/height"]) == (344, 914)
    assert (run_file.parent / "files" / logged[0]["images/reconstruction/filenames"][0]).is_file()

    # eval.py's offline linear probe takes MAE's BatchNorm (no affine) unless linear.batchnorm says otherwise
    seen: list[bool] = []
    real_probe = evaluate_module.linear_probe_accuracy

    def recording_probe(*args, **kwargs):
        seen.append(kwargs["batchnorm"])
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "linear_probe_accuracy", recording_probe)
    ckpt = next(tmp_path.glob("checkpoints/last*.ckpt"))
    for choice, expected in (("null", True), ("false", False)):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            eval_cfg = compose(
                "eval",
                overrides=[f"ckpt={ckpt}", "eval=linear", "linear.epochs=1", f"linear.batchnorm={choice}"],
            )
        result = evaluate_module.evaluate(eval_cfg)
        assert seen[-1] is expected and 0 <= result["eval/linear_top1"] <= 100
