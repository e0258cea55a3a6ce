"""CLS attention maps: the recomputed attention is timm's own (also with compiled blocks), the grid has the
overlays, the head mean and DINO's mass threshold within a bounded size, and a real run shows them in W&B
and on disk."""

import time

import pytest
import torch
from PIL import Image

from sslab.backbones import build
from sslab.callbacks.attention_maps import (
    attention_grid,
    attention_weights,
    cls_attention,
    mass_threshold,
    tile_size,
)
from sslab.runs.training import train
from tests.wandb_file import finished, history


def test_recomputed_attention_reproduces_the_block_output():
    torch.manual_seed(0)
    vit = build("vit_t", img_size=28, patch_size=7, depth=2).eval()
    attn = vit.vit.blocks[-1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    vit.forward_tokens(torch.randn(3, 3, 28, 28))
    handle.remove()
    x = seen["x"]
    w = attention_weights(attn, x)  # (B, heads, T, T)
    b, t, d = x.shape
    v = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
    out = attn.proj((w @ v).transpose(1, 2).reshape(b, t, d))
    assert torch.allclose(out, seen["out"], atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(b, attn.num_heads, t), atol=1e-5)


def test_cls_attention_skips_prefix_tokens_and_keeps_the_grid():
    torch.manual_seed(0)
    vit = build("vit_t", img_size=28, patch_size=7, depth=2, num_registers=2).eval()
    maps = cls_attention(vit, torch.randn(2, 3, 28, 28))
    assert maps.shape == (2, 3, 4, 4)  # 3 heads, 4 x 4 patches; CLS and 2 registers left out
    total = maps.sum(dim=(-2, -1))
    assert torch.all(total > 0) and torch.all(total < 1)  # the rest went to the prefix tokens


def test_grid_layout_and_overlays():
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    maps = torch.rand(2, 3, 4, 4)
    grid = attention_grid(images, maps, scale=2, pad=2, alpha=0.5)
    cell = 56 + 2
    cols = 1 + 1 + 1 + 3  # image, head mean, 60% threshold, 3 heads
    assert grid.shape == (2 * cell + 2, cols * cell + 2, 3) and grid.dtype.name == "uint8"
    first = torch.from_numpy(grid[2 : 2 + 56, 2 : 2 + 56, 0]).int()  # the image, upsampled x2, grey -> red
    assert torch.equal(first[::2, ::2], images[0, 0].int())
    # head 1's tile (column 3) is half image, half hot colour: its blue channel is image / 2 where the map's
    # min-max value is below 2/3 (the colormap's blue is 0 there)
    tile = torch.from_numpy(grid[2 : 2 + 56, 2 + 3 * cell : 2 + 3 * cell + 56, 2]).float()
    m = maps[0, 0]
    low = ((m - m.min()) / (m.max() - m.min()) < 0.6).repeat_interleave(14, 0).repeat_interleave(14, 1)
    expected = images[0, 0].float().repeat_interleave(2, 0).repeat_interleave(2, 1) / 2
    assert torch.allclose(tile[low], expected[low], atol=1.0)


def test_png_long_side_is_bounded():
    # a 224 px ViT-S/16 (6 heads) with 4 images wrote 3594 x 3594 px; now at most 1024 on the long side
    grid = attention_grid(torch.rand(4, 3, 224, 224), torch.rand(4, 6, 14, 14), scale=4, max_size=1024)
    assert max(grid.shape[:2]) <= 1024 and grid.shape[1] > 900  # 9 columns, tiles as large as fit
    assert tile_size(28, 3, 6, scale=4, max_size=1024, pad=2) == 112  # small images keep the full scale


def test_mass_threshold_keeps_the_fewest_patches_holding_the_mass():
    maps = torch.tensor([[0.5, 0.05], [0.3, 0.15]]).view(1, 2, 2)
    assert mass_threshold(maps, 0.6).view(-1).tolist() == [True, False, True, False]  # 0.5 + 0.3 >= 0.6
    assert mass_threshold(maps, 0.5).view(-1).tolist() == [True, False, False, False]  # 0.5 alone suffices
    uniform = torch.ones(1, 10, 10)
    assert mass_threshold(uniform, 0.6).sum() == 60
    # DINO's rule (visualize_attention.py): ascending sort, cumulative share > 1 - mass
    torch.manual_seed(0)
    a = torch.rand(5, 49)
    val, idx = torch.sort(a)
    val = val / val.sum(dim=1, keepdim=True)
    dino = (val.cumsum(1) > 0.4).gather(1, idx.argsort(1))
    assert torch.equal(mass_threshold(a.view(5, 7, 7), 0.6).view(5, 49), dino)


def test_attention_of_compiled_blocks_matches_eager():
    """compile=true compiles each block in place (``nn.Module.compile``); hooks are ignored there, so the maps
    must come without them. A ``torch.compile`` wrapper (``_orig_mod``) in the block list works too."""
    torch.manual_seed(0)
    vit = build("vit_t", img_size=28, patch_size=7, depth=2).eval()
    x = torch.randn(2, 3, 28, 28)
    eager = cls_attention(vit, x)
    wrapped = build("vit_t", img_size=28, patch_size=7, depth=2).eval()
    wrapped.load_state_dict(vit.state_dict())
    wrapped.vit.blocks[-1] = torch.compile(wrapped.vit.blocks[-1])
    assert hasattr(wrapped.vit.blocks[-1], "_orig_mod")
    assert torch.allclose(cls_attention(wrapped, x), eager, atol=1e-6)
    start = time.perf_counter()
    for block in vit.vit.blocks:
        block.compile()
    with torch.no_grad():
        vit.forward_tokens(x)  # compiles the blocks (a C++ compiler on CPU; ~10 s here)
    compiled = cls_attention(vit, x)
    assert torch.allclose(compiled, eager, atol=1e-6)
    assert time.perf_counter() - start < 120
    assert all(type(b).__name__ == "Block" for b in vit.vit.blocks)  # the last block is put back


@pytest.mark.slow
def test_ibot_run_logs_attention_maps_to_wandb_and_disk(tiny_cfg, tmp_path):
    train(
        tiny_cfg(
            "method=ibot",
            "trainer.max_steps=2",
            "callbacks=[attention_maps]",
            "callbacks.attention_maps.num_images=3",
            "logger=[csv,wandb]",
        )
    )
    pngs = sorted((tmp_path / "attention_maps").glob("step*.png"))
    assert [p.name for p in pngs] == ["step000002.png"]
    width, height = Image.open(pngs[0]).size
    # image, head mean, 60% threshold, 3 heads of vit_t; 3 images; 112 px tiles
    assert (width, height) == (6 * 114 + 2, 3 * 114 + 2)
    run_file = finished(next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")))
    rows = [r for r in history(run_file) if "attention_maps/_type" in r]
    assert len(rows) == 1 and rows[0]["attention_maps/count"] == 1
    assert (rows[0]["attention_maps/width"], rows[0]["attention_maps/height"]) == (width, height)


@pytest.mark.slow
def test_compiled_run_draws_attention_maps(tiny_cfg, tmp_path):
    """compile=true (the blocks compiled in place) with the callback: the maps are drawn (~40 s on CPU)."""
    train(tiny_cfg("compile=true", "trainer.max_steps=2", "callbacks=[attention_maps]"))
    pngs = sorted((tmp_path / "attention_maps").glob("step*.png"))
    assert [p.name for p in pngs] == ["step000002.png"]
    assert Image.open(pngs[0]).size == (6 * 114 + 2, 4 * 114 + 2)  # 4 images (the default)
