"""Official checkpoints (DINO, DINOv2, MAE, timm) through ``init_from`` and ``backbone.weights``.

Each file is a state dict that the test builds with the reference's key names and shapes (facebookresearch/dino
``vision_transformer.py`` and ``main_dino.py``'s save_dict, facebookresearch/dinov2 ``models/vision_transformer.py``
and ``layers/``, facebookresearch/mae ``models_mae.py``, a real timm model), at small widths: embed 64, depth 2,
2 heads, the reference's grid (14 x 14 at patch 16 / 224 px; DINOv2's 37 x 37 at patch 14 / 518 px), so the
position embeddings are resized to our grid.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sslab.build import build_backbone, build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.init_from import build_with_weights as build
from sslab.modules.heads import DINOHead
from sslab.official_weights import dino_head_state, load_dino_head, read_weights_file
from tests.conftest import make_cfg

D, DEPTH, HEADS = 64, 2, 2
SMALL = [f"++backbone.embed_dim={D}", f"++backbone.num_heads={HEADS}"]  # TINY already sets depth 2


def reference_vit(
    grid: int = 14, patch: int = 16, depth: int = DEPTH, layer_scale: bool = False, seed: int = 0
):
    """A ViT state dict in DINO's / MAE's / DINOv2's names (timm's too): cls + patches in ``pos_embed``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + grid * grid, D),
        "patch_embed.proj.weight": r(D, 3, patch, patch),
        "patch_embed.proj.bias": r(D),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": r(D),
            b + "norm1.bias": r(D),
            b + "attn.qkv.weight": r(3 * D, D),
            b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D),
            b + "attn.proj.bias": r(D),
            b + "norm2.weight": r(D),
            b + "norm2.bias": r(D),
            b + "mlp.fc1.weight": r(4 * D, D),
            b + "mlp.fc1.bias": r(4 * D),
            b + "mlp.fc2.weight": r(D, 4 * D),
            b + "mlp.fc2.bias": r(D),
        }
        if layer_scale:  # dinov2/layers/layer_scale.py: LayerScale.gamma
            sd |= {b + "ls1.gamma": r(D), b + "ls2.gamma": r(D)}
    sd |= {"norm.weight": r(D), "norm.bias": r(D)}
    return sd


def dinov2_hub(registers: int = 0, chunked: bool = False) -> dict[str, torch.Tensor]:
    """dinov2_vits14(_reg)_pretrain.pth layout: 37 x 37 grid at patch 14, LayerScale, (1, D) mask token,
    ``register_tokens`` outside the position table; ``chunked``: BlockChunk names of training checkpoints."""
    sd = reference_vit(grid=37, patch=14, layer_scale=True, seed=1)
    sd["mask_token"] = torch.randn(1, D)
    if registers:
        sd["register_tokens"] = torch.randn(1, registers, D)
    if chunked:  # block_chunks=1: every block under chunk 0, keeping its global index
        sd = {
            k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in sd.items()
        }
    return sd


def mae_checkpoint() -> dict:
    """main_pretrain.py's save_model: {"model": encoder + decoder_* + the decoder's mask_token, ...}."""
    dd = 32
    model = reference_vit(seed=2)
    model |= {
        "mask_token": torch.randn(1, 1, dd),
        "decoder_embed.weight": torch.randn(dd, D),
        "decoder_embed.bias": torch.randn(dd),
        "decoder_pos_embed": torch.randn(1, 197, dd),
        "decoder_blocks.0.norm1.weight": torch.randn(dd),
        "decoder_norm.weight": torch.randn(dd),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, dd),
    }
    return {"model": model, "epoch": 799}


def dino_full_checkpoint() -> dict:
    """main_dino.py's save_dict: student (DDP, ``module.``) and teacher MultiCropWrapper(backbone, DINOHead)
    with the old ``nn.utils.weight_norm`` names, plus the argparse ``args`` (needs a full unpickle)."""
    backbone = reference_vit(seed=3)
    head = reference_dino_head()
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | {f"head.{k}": v for k, v in head.items()}
    student = {f"module.{k}": v + 1 for k, v in teacher.items()}
    return {
        "student": student,
        "teacher": teacher,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small"),
    }


HEAD = {"in_dim": D, "out_dim": 40, "hidden_dim": 48, "bottleneck_dim": 16}


def reference_dino_head() -> dict[str, torch.Tensor]:
    """DINO's DINOHead (nlayers 3, no BN): mlp.0 / mlp.2 / mlp.4 and a weight-normed last layer."""
    g = torch.Generator().manual_seed(4)
    h, b, o = HEAD["hidden_dim"], HEAD["bottleneck_dim"], HEAD["out_dim"]
    shapes = {"mlp.0.weight": (h, D), "mlp.0.bias": (h,), "mlp.2.weight": (h, h), "mlp.2.bias": (h,)}
    shapes |= {
        "mlp.4.weight": (b, h),
        "mlp.4.bias": (b,),
        "last_layer.weight_g": (o, 1),
        "last_layer.weight_v": (o, b),
    }
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def vit(**kwargs):
    """Our ViT at the test's width: 2 blocks of 64-d, 2 heads, 32 px at patch 16 (a 2 x 2 grid) unless given."""
    args = {"img_size": 32, "patch_size": 16, "depth": DEPTH, "embed_dim": D, "num_heads": HEADS}
    return build("vit_t", **(args | kwargs))


def save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


def ours(model) -> dict[str, torch.Tensor]:
    """Our ViT's tensors in the reference's names (``vit.`` stripped)."""
    return {k.removeprefix("vit."): v for k, v in model.state_dict().items()}


def assert_loaded(model, source: dict[str, torch.Tensor], skip: tuple[str, ...] = ("pos_embed",)) -> None:
    state = ours(model)
    for k, v in source.items():
        if k in skip:
            continue
        assert torch.equal(state[k], v), k


def expected_pos(source_pos: torch.Tensor, prefix: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    m = int((source_pos.shape[1] - 1) ** 0.5)
    patches = source_pos[:, 1:].reshape(1, m, m, D).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)


# -- the four layouts through init_from (train.py's path: method.init_backbone_from) ------------------------
def test_dino_pretrain_file_through_init_from_resizes_pos_embed(tmp_path, caplog):
    src = reference_vit()
    path = save(src, tmp_path / "dino_vits16_pretrain.pth")
    cfg = make_cfg(tmp_path, "data.image_size=32", "data.patch_size=16", "data.local_crop_size=16", *SMALL)
    model = build_method(cfg, build_datamodule(cfg))
    with caplog.at_level(logging.INFO):
        model.init_backbone_from(path)
    student = model.backbone
    assert_loaded(student, src)
    pos = ours(student)["pos_embed"]
    assert pos.shape == (1, 1 + 2 * 2, D)
    torch.testing.assert_close(pos, expected_pos(src["pos_embed"], src["pos_embed"][:, :1], (2, 2)))
    for name, tensor in model.teacher_backbone.state_dict().items():  # the EMA teacher starts equal to it
        assert torch.equal(tensor, student.state_dict()[name]), name
    assert "dino layout" in caplog.text and "pos_embed 14x14 -> 2x2" in caplog.text
    assert "not in" not in caplog.text  # every key matched: no warning


def test_pos_embed_equals_the_source_when_the_grid_matches(tmp_path):
    src = reference_vit()
    backbone = vit(img_size=224, weights=save(src, tmp_path / "dino.pth"))
    assert torch.equal(ours(backbone)["pos_embed"], src["pos_embed"])
    assert_loaded(backbone, src, skip=())


def test_a_grey_scale_backbone_gets_the_kernel_summed_over_rgb(tmp_path, caplog):
    src = reference_vit()
    with caplog.at_level(logging.INFO):
        backbone = vit(in_chans=1, weights=save(src, tmp_path / "dino.pth"))
    assert torch.equal(
        ours(backbone)["patch_embed.proj.weight"], src["patch_embed.proj.weight"].sum(1, keepdim=True)
    )
    assert "summed over its 3 input channels" in caplog.text


def test_dino_full_checkpoint_takes_the_teacher_and_drops_its_head(tmp_path, caplog):
    ckpt = dino_full_checkpoint()
    path = save(ckpt, tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth")
    cfg = make_cfg(
        tmp_path,
        "data.image_size=32",
        "data.patch_size=16",
        "data.local_crop_size=16",
        *SMALL,
        f"backbone.weights={path}",
    )
    with caplog.at_level(logging.INFO):
        backbone = build_backbone(cfg)
    teacher = {
        k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")
    }
    assert_loaded(backbone, teacher)  # the teacher, not the student (whose tensors are +1)
    assert "dino_full layout" in caplog.text and "dropped 8 head/decoder tensors: head.* (8)" in caplog.text


def test_random_init_baselines_and_reopened_runs_skip_backbone_weights(tmp_path):
    """``pretrained=False`` (the random-init baseline, a model whose weights come from a checkpoint next)
    builds the encoder without reading ``backbone.weights``, so a baseline never shows the official
    weights and a moved weights file does not break evaluation."""
    ckpt = dino_full_checkpoint()
    path = save(ckpt, tmp_path / "full.pth")
    args = ("data.image_size=32", "data.patch_size=16", "data.local_crop_size=16", *SMALL)
    teacher = {
        k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")
    }
    cfg = make_cfg(tmp_path, *args, f"backbone.weights={path}")
    assert_loaded(build_backbone(cfg), teacher)
    random = build_backbone(cfg, pretrained=False)
    assert not torch.equal(ours(random)["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])
    moved = make_cfg(tmp_path, *args, f"backbone.weights={tmp_path / 'moved.pth'}")
    model = build_method(moved, build_datamodule(moved), pretrained=False)  # no read of the missing file
    assert model.backbone is not None


def test_dinov2_hub_file_with_registers(tmp_path):
    src = dinov2_hub(registers=4)
    path = save(src, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    cfg = make_cfg(
        tmp_path,
        "data.patch_size=14",
        "data.local_crop_size=14",
        *SMALL,
        "backbone.num_registers=4",
        "++backbone.init_values=1.0",
    )
    model = build_method(cfg, build_datamodule(cfg))
    model.init_backbone_from(path)
    backbone = model.backbone
    state = ours(backbone)
    assert torch.equal(state["reg_token"], src["register_tokens"])
    assert torch.equal(backbone.mask_token.reshape(1, D), src["mask_token"])
    for i in range(DEPTH):  # LayerScale: DINOv2's LayerScale.gamma is timm's ls1.gamma / ls2.gamma
        assert torch.equal(state[f"blocks.{i}.ls1.gamma"], src[f"blocks.{i}.ls1.gamma"])
        assert torch.equal(state[f"blocks.{i}.ls2.gamma"], src[f"blocks.{i}.ls2.gamma"])
    assert_loaded(
        backbone, src, skip=("pos_embed", "patch_embed.proj.weight", "register_tokens", "mask_token")
    )
    # 37x37 (518 px / 14) -> 2x2 (28 px / 14); cls entry kept, registers get none (zero), as in DINOv2
    zeros = torch.zeros(1, 4, D)
    expected = expected_pos(src["pos_embed"], torch.cat([src["pos_embed"][:, :1], zeros], 1), (2, 2))
    assert state["pos_embed"].shape == (1, 1 + 4 + 4, D)
    torch.testing.assert_close(state["pos_embed"], expected)


def test_dinov2_registers_follow_the_reference_forward(tmp_path):
    """At the file's grid our forward equals DINOv2's prepare_tokens_with_masks: cls + pos[0], patches +
    pos[1:], then the registers inserted after cls without a position embedding."""
    src = dinov2_hub(registers=2)
    src["pos_embed"] = src["pos_embed"][:, : 1 + 4]  # a 2 x 2 grid: 28 px at patch 14
    backbone = vit(
        img_size=28, patch_size=14, num_registers=2, init_values=1.0, weights=save(src, tmp_path / "reg.pth")
    ).eval()
    x = torch.randn(2, 3, 28, 28)
    timm_vit = backbone.vit
    patches = F.conv2d(x, src["patch_embed.proj.weight"], src["patch_embed.proj.bias"], stride=14)
    tokens = torch.cat([src["cls_token"].expand(2, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    tokens = tokens + src["pos_embed"]
    tokens = torch.cat([tokens[:, :1], src["register_tokens"].expand(2, -1, -1), tokens[:, 1:]], 1)
    reference = timm_vit.norm(timm_vit.blocks(tokens))
    with torch.no_grad():
        out = backbone.forward_tokens(x)
        torch.testing.assert_close(out["cls"], reference[:, 0])
        torch.testing.assert_close(out["reg"], reference[:, 1:3])
        torch.testing.assert_close(out["patch"], reference[:, 3:])


def test_dinov2_without_registers_and_chunked_blocks(tmp_path):
    src = dinov2_hub(registers=0, chunked=True)
    backbone = vit(
        img_size=28,
        patch_size=14,
        init_values=1.0,
        weights=save(src, tmp_path / "dinov2_vits14_pretrain.pth"),
    )
    unchunked = {k.replace("blocks.0.", "blocks.", 1): v for k, v in src.items()}
    assert_loaded(backbone, unchunked, skip=("pos_embed", "mask_token"))
    assert ours(backbone)["pos_embed"].shape == (1, 1 + 4, D)


def test_mae_checkpoint_drops_the_decoder_and_its_mask_token(tmp_path, caplog):
    ckpt = mae_checkpoint()
    before = vit()
    path = save(ckpt, tmp_path / "mae_pretrain_vit_base.pth")
    torch.manual_seed(0)
    own_mask = vit().mask_token
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO):
        backbone = vit(weights=path)
    encoder = {k: v for k, v in ckpt["model"].items() if not k.startswith("decoder_") and k != "mask_token"}
    assert_loaded(backbone, encoder)
    assert torch.equal(backbone.mask_token, own_mask)  # ours stays at its init; MAE's is the decoder's
    assert before.mask_token.shape == backbone.mask_token.shape
    assert "mae layout" in caplog.text and "dropped 7" in caplog.text and "not in" not in caplog.text


@pytest.mark.parametrize("registers", [0, 2])
def test_timm_state_dict(tmp_path, registers):
    torch.manual_seed(0)
    ref = timm.create_model(
        "vit_tiny_patch16_224",
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=10,
        reg_tokens=registers,
    )
    src = ref.state_dict()
    backbone = vit(img_size=224, num_registers=registers, weights=save(src, tmp_path / "timm.pth")).eval()
    assert_loaded(backbone, {k: v for k, v in src.items() if not k.startswith("head.")}, skip=())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), ref.eval().forward_features(x)[:, 0])


def test_timm_no_embed_class_port(tmp_path):
    """timm's own DINOv2 ports: position table over the patches only (no_embed_class); ours gets zero
    entries for cls and registers, the same function."""
    torch.manual_seed(0)
    ref = timm.create_model(
        "vit_tiny_patch16_224",
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=0,
        reg_tokens=4,
        no_embed_class=True,
        img_size=32,
    ).eval()
    backbone = vit(num_registers=4, weights=save(ref.state_dict(), tmp_path / "port.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), ref.forward_features(x)[:, 0])


@torch.no_grad()
def test_torchvision_resnet_state_dict_into_a_cnn_backbone(tmp_path, caplog):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    with caplog.at_level(logging.INFO):
        backbone = build("resnet18", img_size=64, weights=save(ref.state_dict(), tmp_path / "r18.pth")).eval()
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(backbone(x), ref(x))
    assert "dropped 2 head/decoder tensors: fc.* (2)" in caplog.text and "not in" not in caplog.text


# -- what does not fit is said, never ignored ----------------------------------------------------------------
def test_leftover_keys_are_listed_in_one_warning_line(tmp_path, caplog):
    src = reference_vit(depth=3)
    with caplog.at_level(logging.WARNING):
        vit(weights=save(src, tmp_path / "deeper.pth"))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "not in backbone=vit_t, ignored: vit.blocks.{2}.* (12 each)" in lines[0]
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        vit(depth=3, weights=save(reference_vit(), tmp_path / "shallower.pth"))
    assert "not in the file, left at init: vit.blocks.{2}.* (12 each)" in caplog.text


@pytest.mark.parametrize(
    ("source", "kwargs", "match"),
    [
        ({"foo.weight": torch.zeros(3)}, {}, "none of its 1 tensors fits"),
        (dinov2_hub(), {"patch_size": 14, "img_size": 28}, r"LayerScale .*init_values"),
        (dinov2_hub(registers=4), {"patch_size": 14, "img_size": 28, "init_values": 1.0}, "num_registers=4"),
        (reference_vit(patch=8), {}, r"does not fit .*patch_embed.proj.weight"),
    ],
)
def test_what_cannot_load_is_refused_in_one_line(tmp_path, source, kwargs, match):
    with pytest.raises(SSLabError, match=match) as e:
        vit(**kwargs, weights=save(source, tmp_path / "w.pth"))
    assert "\n" not in str(e.value)


def test_weights_file_must_exist_and_be_a_dict(tmp_path):
    with pytest.raises(SSLabError, match="no such file"):
        read_weights_file(tmp_path / "nope.pth", "backbone.weights")
    with pytest.raises(SSLabError, match="not a state dict"):
        read_weights_file(save([1, 2], tmp_path / "list.pth"))


# -- the DINO head: weight_g / weight_v -> parametrizations.weight.original0 / original1 -------------------------
def test_dino_head_weight_norm_maps_to_our_parametrization():
    ckpt = dino_full_checkpoint()
    state = dino_head_state(ckpt)
    assert (
        state["last_layer.parametrizations.weight.original0"] is ckpt["teacher"]["head.last_layer.weight_g"]
    )
    assert (
        state["last_layer.parametrizations.weight.original1"] is ckpt["teacher"]["head.last_layer.weight_v"]
    )
    head = DINOHead(**HEAD)
    load_dino_head(head, ckpt)
    x = torch.randn(3, D)
    ref = ckpt["teacher"]
    h = F.gelu(F.linear(x, ref["head.mlp.0.weight"], ref["head.mlp.0.bias"]))
    h = F.gelu(F.linear(h, ref["head.mlp.2.weight"], ref["head.mlp.2.bias"]))
    h = F.normalize(F.linear(h, ref["head.mlp.4.weight"], ref["head.mlp.4.bias"]), dim=-1)
    v, g = ref["head.last_layer.weight_v"], ref["head.last_layer.weight_g"]
    expected = F.linear(h, g * v / v.norm(dim=1, keepdim=True))  # weight norm: w = g v / ||v||
    torch.testing.assert_close(head(x), expected)
    with pytest.raises(SSLabError, match="does not fit"):
        load_dino_head(DINOHead(**HEAD, use_bn=True), ckpt)


# -- CutLER: pipeline.dino_ckpt may be an official DINO file ---------------------------------------------------
def test_maskcut_takes_an_official_dino_checkpoint(tmp_path):
    from sslab.cutler.maskcut import maskcut, patch_keys
    from sslab.init_from import load_eval_backbone_state
    from sslab.runs.cutler import dino_checkpoint
    from sslab.runs.reopen import reopen

    ckpt = dino_full_checkpoint()
    path = save(ckpt, tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth")
    cfg = make_cfg(tmp_path, "data.image_size=32", "data.patch_size=16", "data.local_crop_size=16", *SMALL)
    stage_dir = tmp_path / "maskcut"
    converted = dino_checkpoint(path, cfg, stage_dir)
    assert converted == str(stage_dir / "dino_weights.ckpt")
    assert dino_checkpoint(converted, cfg, stage_dir) == converted  # a train.py checkpoint passes through
    teacher = {
        k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")
    }
    backbone, run_cfg, _, _ = reopen(
        converted, encoder_only=True
    )  # what maskcut_stage -> export_pseudo_masks reads
    assert_loaded(backbone, teacher)
    assert run_cfg.backbone.weights is None and OmegaConf.select(run_cfg, "backbone.embed_dim") == D
    backbone_cfg, _ = load_eval_backbone_state(converted)  # what the detector's round 0 reads
    assert backbone_cfg["name"] == "vit_t" and "weights" not in backbone_cfg
    keys = patch_keys(backbone, torch.randn(1, 3, 64, 64))  # MaskCut runs on the official teacher's keys
    assert maskcut(keys, n_masks=1, tau=0.0).masks.shape == (1, 1, 4, 4)
