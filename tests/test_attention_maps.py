"""CLS attention maps: the recomputed attention is timm's own, and a real run shows them in W&B and on disk."""

import pytest
import torch
from PIL import Image

from sslab.backbones import build
from sslab.callbacks.attention_maps import attention_grid, attention_weights, cls_attention
from sslab.train import train
from tests.wandb_file import history


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


def test_grid_layout():
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    grid = attention_grid(images, torch.rand(2, 3, 4, 4), scale=2, pad=2)
    cell = 56 + 2
    assert grid.shape == (2 * cell + 2, 4 * cell + 2, 3) and grid.dtype.name == "uint8"
    first = torch.from_numpy(
        grid[2 : 2 + 56, 2 : 2 + 56, 0]
    )  # the first image, upsampled x2, grey -> red channel
    assert torch.equal(first[::2, ::2], images[0, 0])


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
    assert (width, height) == (4 * 114 + 2, 3 * 114 + 2)  # image + 3 heads of vit_t; 3 images; 112 px tiles
    run_file = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = [r for r in history(run_file) if "attention_maps/_type" in r]
    assert len(rows) == 1 and rows[0]["attention_maps/count"] == 1
    assert (rows[0]["attention_maps/width"], rows[0]["attention_maps/height"]) == (width, height)
