import pytest

from sslab.backbones import build
from sslab.modules.lr_decay import layer_id, lr_scale


def test_layer_ids_follow_beit_numbering():
    assert layer_id("vit.cls_token", 12) == 0
    assert layer_id("vit.patch_embed.proj.weight", 12) == 0
    assert layer_id("vit.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("vit.blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("vit.norm.weight", 12) == 13


def test_scales_by_hand():
    # 2 blocks, decay 0.5: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm 1.
    assert lr_scale("vit.pos_embed", 2, 0.5) == pytest.approx(0.125)
    assert lr_scale("vit.blocks.0.norm1.weight", 2, 0.5) == pytest.approx(0.25)
    assert lr_scale("vit.blocks.1.norm1.weight", 2, 0.5) == pytest.approx(0.5)
    assert lr_scale("vit.norm.bias", 2, 0.5) == 1.0


def test_every_vit_parameter_gets_a_scale_in_range():
    vit = build("vit_t", img_size=28, patch_size=7, depth=2)
    ids = {layer_id(n, 2) for n, _ in vit.named_parameters()}
    assert ids == {0, 1, 2, 3}
