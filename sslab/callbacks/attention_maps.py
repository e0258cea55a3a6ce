"""The last block's CLS attention per head on a few fixed test images, as DINO's Fig. 1 (Caron et al., 2021)
shows it: W&B image (``attention_maps``) and a PNG under ``<run dir>/attention_maps/``.

Each row shows the image, the head-mean map, DINO's mass threshold (the smallest set of patches that holds
60% of the head-mean CLS attention, as ``threshold`` in DINO's ``visualize_attention.py``) and one map per
head, each blended over the image. Tiles shrink so that the PNG's long side stays under ``max_size``.

The attention is recomputed without hooks, so it also works when the blocks are compiled (``compile=true``;
dynamo ignores hooks registered after compilation): for one forward the last block is swapped for a plain
module that keeps the block's input and runs the block eagerly (``_orig_mod`` of a ``torch.compile``
wrapper, or ``forward`` of a block compiled in place by ``nn.Module.compile``). softmax(q k^T * scale) is then
rebuilt from ``norm1``, ``attn.qkv`` (and ``q_norm`` / ``k_norm``) exactly as timm's ``Attention`` computes
it. The maps come from the method's evaluation encoder (``eval_backbone()``: the teacher for DINO, iBOT,
DINOv2).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from sslab.augment import eval_view, to_float
from sslab.callbacks.common import PeriodicCallback
from sslab.callbacks.pictures import patch_pca, pca_grid, save_picture
from sslab.eval_mode import eval_mode

log = logging.getLogger(__name__)


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, T) softmax attention of a timm ``Attention`` module for its input x (B, T, D)."""
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def uncompiled(module: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else itself."""
    return getattr(module, "_orig_mod", module)


class _InputKeeper(nn.Module):
    """Stands in for a block for one forward: keeps its input and runs the block eagerly. ``forward`` (not
    ``__call__``) skips the compiled path of a block compiled in place and any hooks on it."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = uncompiled(block)
        self.x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.x = x
        return self.block.forward(x, *args, **kwargs)


@torch.no_grad()
def cls_attention(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w) attention of the CLS token to each patch in the last block of a ViT backbone."""
    blocks = backbone.vit.blocks
    original = blocks[-1]
    keeper = _InputKeeper(original)
    blocks[-1] = keeper
    try:
        backbone.forward_tokens(x)
    finally:
        blocks[-1] = original
    block = keeper.block
    weights = attention_weights(block.attn, block.norm1(keeper.x)).float()
    patches = weights[:, :, 0, backbone.num_prefix_tokens :]  # CLS row, patch columns
    n = patches.shape[-1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"attention maps need a square patch grid, got {n} patches")
    return patches.reshape(*patches.shape[:2], side, side)


def mass_threshold(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Bool mask (..., h, w) of the smallest set of patches that holds ``mass`` of each map's total: patches
    taken in decreasing order while the mass before them is below ``mass`` (DINO's ``visualize_attention.py``
    keeps those whose ascending cumulative share exceeds 1 - mass: the same set)."""
    flat = maps.float().flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True).clamp_min(1e-12)
    values, order = flat.sort(dim=-1, descending=True)
    keep_sorted = values.cumsum(-1) - values < mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.view(maps.shape)


def hot_colormap(v: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (..., H, W) -> RGB (..., 3, H, W) in [0, 1] (black -> red -> yellow -> white)."""
    return torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], dim=-3)


def tile_size(image_size: int, rows: int, cols: int, scale: int, max_size: int, pad: int) -> int:
    """Tile side in pixels: ``scale`` x the image, shrunk so that the grid's long side is <= ``max_size``."""
    fit = (max_size - pad) // max(rows, cols) - pad
    return max(1, min(image_size * scale, fit))


def resize(x: torch.Tensor, size: int, smooth: bool) -> torch.Tensor:
    """Integer enlargements stay pixel-exact (nearest); other sizes use antialiased bilinear for pictures."""
    if x.shape[-1] == size:
        return x
    if not smooth or size % x.shape[-1] == 0:
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def attention_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    scale: int = 4,
    pad: int = 2,
    max_size: int = 1024,
    alpha: float = 0.5,
    mass: float = 0.6,
) -> np.ndarray:
    """One row per image: the image, the head-mean map, the ``mass`` threshold of the head mean, then one map
    per head. Maps are min-max normalised, coloured (``hot_colormap``) and blended over the image with
    weight ``alpha``; the threshold column shows the kept patches of the image and dims the rest.

    ``images`` uint8 (B, C, H, W) or float pictures in [0, 1], ``maps`` (B, heads, h, w); returns uint8
    (rows, cols, 3) with both sides at most ``max_size`` (``tile_size``)."""
    b, heads = maps.shape[:2]
    cols = heads + 3
    size = tile_size(images.shape[-1], b, cols, scale, max_size, pad)
    pictures = to_float(images.cpu()) if images.dtype == torch.uint8 else images.float().cpu()
    pictures = resize(pictures, size, smooth=True).clamp(0, 1)  # (B, 3, S, S)
    m = maps.float().cpu()
    m = torch.cat([m.mean(1, keepdim=True), m], dim=1)  # head mean first
    kept = resize(mass_threshold(m[:, :1], mass).float(), size, smooth=False)  # (B, 1, S, S)
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    m = resize((m - lo) / (hi - lo).clamp_min(1e-12), size, smooth=False)
    overlays = (1 - alpha) * pictures.unsqueeze(1) + alpha * hot_colormap(m)  # (B, 1 + heads, 3, S, S)
    threshold = pictures * (0.2 + 0.8 * kept)
    tiles = torch.cat(
        [pictures.unsqueeze(1), overlays[:, :1], threshold.unsqueeze(1), overlays[:, 1:]], dim=1
    )
    cell = size + pad
    grid = torch.ones(3, b * cell + pad, cols * cell + pad)
    for r in range(b):  # a handful of rows, once per evaluation
        for c in range(cols):
            grid[:, pad + r * cell : pad + r * cell + size, pad + c * cell : pad + c * cell + size] = tiles[
                r, c
            ]
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


class AttentionMaps(PeriodicCallback):
    """Every ``every_n_epochs`` epochs and at the end of training, render the CLS attention maps of
    ``num_images`` fixed test images (evenly spaced through the test split) from the evaluation encoder."""

    def __init__(
        self,
        num_images: int = 4,
        every_n_epochs: int = 1,
        scale: int = 4,
        key: str = "attention_maps",
        max_size: int = 1024,
        alpha: float = 0.5,
        mass: float = 0.6,
        pca: bool = True,
        pca_key: str = "patch_pca",
    ) -> None:
        super().__init__(every_n_epochs)
        self.num_images, self.scale, self.key = num_images, scale, key
        self.max_size, self.alpha, self.mass = max_size, alpha, mass
        self.pca, self.pca_key = pca, pca_key
        self._images: torch.Tensor | None = None
        self._warned = False

    def fixed_images(self, trainer: pl.Trainer) -> torch.Tensor:
        if self._images is None:
            test_set = trainer.datamodule.test_set
            picks = np.linspace(0, len(test_set) - 1, min(self.num_images, len(test_set))).round().astype(int)
            self._images = torch.stack([test_set[int(i)]["image"] for i in picks])
        return self._images

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> np.ndarray | None:
        backbone = pl_module.eval_backbone()
        if not hasattr(getattr(backbone, "vit", None), "blocks"):
            if not self._warned:
                log.warning(
                    "attention maps need a ViT backbone; %s has none, so none are drawn", backbone.name
                )
                self._warned = True
            return None
        images = self.fixed_images(trainer)
        spec = pl_module.data
        with eval_mode(backbone):
            x = eval_view(images.to(pl_module.device), spec.image_size, spec.mean, spec.std)
            maps = cls_attention(backbone, x)
            tokens = backbone.forward_tokens(x)["patch"] if self.pca else None
        pictures = eval_view(images, spec.image_size, (0.0,) * 3, (1.0,) * 3)  # the crop the maps are of
        grid = attention_grid(
            pictures, maps, self.scale, max_size=self.max_size, alpha=self.alpha, mass=self.mass
        )
        step = trainer.global_step
        caption = (
            f"step {step}: rows = images; columns = image, head-mean CLS attention, "
            f"{self.mass:.0%} of its mass, then heads 1-{maps.shape[1]}"
        )
        save_picture(trainer, "attention_maps", f"step{step:06d}", grid, self.key, caption)
        if tokens is not None:
            pca = pca_grid(pictures, patch_pca(tokens.float().cpu()), self.scale, self.max_size)
            pca_caption = (
                f"step {step}: rows = images; image, then the first 3 principal components of the last "
                "layer's patch tokens over these images as RGB"
            )
            save_picture(trainer, "attention_maps", f"pca_step{step:06d}", pca, self.pca_key, pca_caption)
        return grid
