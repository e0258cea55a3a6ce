"""The last block's CLS attention per head on a few fixed test images, as DINO's Fig. 1 (Caron et al., 2021)
shows it: W&B image (``attention_maps``) and a PNG under ``<run dir>/attention_maps/``.

The attention is recomputed from the last block's input without touching the backbone: a forward pre-hook
on ``blocks[-1].attn`` keeps its input x (already normalised by ``norm1``), and softmax(q k^T * scale) is
rebuilt from ``attn.qkv`` (and ``q_norm`` / ``k_norm``) exactly as timm's ``Attention`` computes it. The
maps come from the method's evaluation encoder (``eval_backbone()``: the teacher for DINO, iBOT, DINOv2).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from sslab.augment import eval_view, to_float
from sslab.callbacks.common import should_evaluate

log = logging.getLogger(__name__)


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, T) softmax attention of a timm ``Attention`` module for its input x (B, T, D)."""
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def cls_attention(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w) attention of the CLS token to each patch in the last block of a ViT backbone."""
    attn = backbone.vit.blocks[-1].attn
    captured: dict[str, torch.Tensor] = {}
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
    try:
        backbone.forward_tokens(x)
    finally:
        handle.remove()
    weights = attention_weights(attn, captured["x"]).float()
    patches = weights[:, :, 0, backbone.num_prefix_tokens :]  # CLS row, patch columns
    n = patches.shape[-1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"attention maps need a square patch grid, got {n} patches")
    return patches.reshape(*patches.shape[:2], side, side)


def hot_colormap(v: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (..., H, W) -> RGB (..., 3, H, W) in [0, 1] (black -> red -> yellow -> white)."""
    return torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], dim=-3)


def attention_grid(images: torch.Tensor, maps: torch.Tensor, scale: int = 4, pad: int = 2) -> np.ndarray:
    """One row per image: the image, then one map per head (min-max normalised, upsampled to the image).

    ``images`` uint8 (B, C, H, W) or float pictures in [0, 1], ``maps`` (B, heads, h, w); returns uint8
    (rows, cols, 3)."""
    b, heads = maps.shape[:2]
    size = images.shape[-1] * scale
    pictures = to_float(images.cpu()) if images.dtype == torch.uint8 else images.float().cpu()
    pictures = F.interpolate(pictures, size=(size, size), mode="nearest")
    m = maps.float().cpu()
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    m = F.interpolate(m, size=(size, size), mode="nearest")
    tiles = torch.cat([pictures.unsqueeze(1), hot_colormap(m)], dim=1)  # (B, 1 + heads, 3, S, S)
    cell = size + pad
    grid = torch.ones(3, b * cell + pad, (heads + 1) * cell + pad)
    for r in range(b):  # a handful of rows, once per evaluation
        for c in range(heads + 1):
            grid[:, pad + r * cell : pad + r * cell + size, pad + c * cell : pad + c * cell + size] = tiles[
                r, c
            ]
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


class AttentionMaps(pl.Callback):
    """Every ``every_n_epochs`` epochs and at the end of training, render the CLS attention maps of
    ``num_images`` fixed test images (evenly spaced through the test split) from the evaluation encoder."""

    def __init__(
        self, num_images: int = 4, every_n_epochs: int = 1, scale: int = 4, key: str = "attention_maps"
    ):
        self.num_images, self.every_n_epochs, self.scale, self.key = num_images, every_n_epochs, scale, key
        self.last_step = -1
        self._images: torch.Tensor | None = None
        self._warned = False

    def fixed_images(self, trainer: pl.Trainer) -> torch.Tensor:
        if self._images is None:
            test_set = trainer.datamodule.test_set
            picks = np.linspace(0, len(test_set) - 1, min(self.num_images, len(test_set))).round().astype(int)
            self._images = torch.stack([test_set[int(i)]["image"] for i in picks])
        return self._images

    @torch.no_grad()
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> np.ndarray | None:
        if self.last_step == trainer.global_step:
            return None
        self.last_step = trainer.global_step
        eval_backbone = getattr(pl_module, "eval_backbone", None)
        backbone = eval_backbone() if callable(eval_backbone) else pl_module.backbone
        if not hasattr(getattr(backbone, "vit", None), "blocks"):
            if not self._warned:
                log.warning(
                    "attention maps need a ViT backbone; %s has none, so none are drawn", backbone.name
                )
                self._warned = True
            return None
        images = self.fixed_images(trainer)
        spec = pl_module.data
        was_training = backbone.training
        backbone.eval()
        try:
            x = eval_view(images.to(pl_module.device), spec.image_size, spec.mean, spec.std)
            maps = cls_attention(backbone, x)
        finally:
            backbone.train(was_training)
        pictures = eval_view(images, spec.image_size, (0.0,) * 3, (1.0,) * 3)  # the crop the maps are of
        grid = attention_grid(pictures, maps, self.scale)
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir) / "attention_maps" / f"step{trainer.global_step:06d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(out)
            caption = f"step {trainer.global_step}: rows = images; columns = image, then CLS attention of heads 1-{maps.shape[1]}"
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=self.key, images=[grid], step=trainer.global_step, caption=[caption])
        return grid

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.render(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.render(trainer, pl_module)
