"""Pictures researchers look at besides the attention maps: the PCA of patch features and nearest neighbours.

- **Patch PCA** (the DINOv2 paper's Fig. 1 and its notebooks): the last layer's patch tokens of a fixed set
  of images are pooled, the first 3 principal components are computed over all their patches together,
  each component is min-max scaled to [0, 1] over the whole set and the three become the R, G and B of a
  patch. Parts that the encoder treats alike get the same colour across images, which shows at a glance
  whether the features separate objects and parts (a random encoder gives noise). ``AttentionMaps`` draws it
  beside the attention maps (``attention_maps/pca_stepNNNNNN.png``, W&B key ``patch_pca``).
- **Nearest neighbours**: a query image and its nearest bank images under the k-NN's cosine similarity, from
  the features the k-NN evaluation already extracted; a green frame marks a neighbour of the query's class,
  red another class. ``KNNEval`` draws it for the DINO family (``neighbours/stepNNNNNN.png``).

Principal components are defined up to sign; each is oriented so that its largest loading is positive, so
the colours of a run do not flip between evaluations for no reason.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import WandbLogger


def principal_components(x: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), components (k, D)) of the rows of ``x`` (M, D), by the eigendecomposition of their
    covariance (exact, float64), in decreasing order of variance, each oriented with its largest-magnitude
    loading positive."""
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / max(1, len(x) - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    comps = vectors[:, -k:].flip(1).T  # (k, D), largest variance first
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return mean, comps * torch.where(signs == 0, 1.0, signs)


def patch_pca(tokens: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Patch tokens (B, N, D) of a square grid -> (B, k, h, w) in [0, 1]: the projections of every patch on
    the first ``k`` principal components of all B x N patches, each min-max scaled over the whole set."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"patch PCA needs a square patch grid, got {n} patches")
    flat = tokens.reshape(b * n, d).double()
    mean, comps = principal_components(flat, k)
    proj = (flat - mean) @ comps.T  # (B*N, k)
    lo, hi = proj.amin(0), proj.amax(0)
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return proj.T.reshape(k, b, side, side).transpose(0, 1).float()


def tile_side(image_size: int, rows: int, cols: int, scale: int, max_size: int, pad: int) -> int:
    """``scale`` x the image, shrunk so that a grid of framed tiles stays within ``max_size`` pixels."""
    return max(1, min(image_size * scale, max_size // max(rows, cols) - 2 * pad))


def smooth_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pictures (B, 3, H, W) to ``size`` x ``size``: antialiased bilinear, clamped to [0, 1]."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def framed_grid(tiles: torch.Tensor, frames: torch.Tensor | None = None, pad: int = 3) -> np.ndarray:
    """Tiles (rows, cols, 3, S, S) in [0, 1] -> uint8 (H, W, 3) on white; ``frames`` (rows, cols, 3) colours
    the ``pad``-wide border of each tile (None: white)."""
    rows, cols, _, size, _ = tiles.shape
    cell = size + 2 * pad
    grid = torch.ones(3, rows * cell, cols * cell)
    for r in range(rows):  # a handful of tiles, once per evaluation
        for c in range(cols):
            y, x = r * cell, c * cell
            if frames is not None:
                grid[:, y : y + cell, x : x + cell] = frames[r, c].view(3, 1, 1)
            grid[:, y + pad : y + pad + size, x + pad : x + pad + size] = tiles[r, c]
    return (grid.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def pca_grid(pictures: torch.Tensor, pca: torch.Tensor, scale: int = 4, max_size: int = 1024) -> np.ndarray:
    """One row per image: the image and its patch PCA as RGB (nearest-upsampled patches, so each patch is
    one flat colour); both sides of the PNG at most ``max_size``."""
    size = tile_side(pictures.shape[-1], len(pictures), 2, scale, max_size, 3)
    images = smooth_resize(pictures.float().cpu(), size)
    colours = F.interpolate(pca.float().cpu(), size=(size, size), mode="nearest")
    return framed_grid(torch.stack([images, colours], 1))


GREEN, RED = torch.tensor([0.1, 0.7, 0.2]), torch.tensor([0.85, 0.1, 0.1])


def neighbour_grid(
    queries: torch.Tensor,
    neighbours: torch.Tensor,
    same_class: torch.Tensor | None = None,
    scale: int = 4,
    max_size: int = 1024,
) -> np.ndarray:
    """Rows: a query picture (Q, 3, S, S) then its K neighbours (Q, K, 3, S, S); a neighbour's frame is green
    when ``same_class`` (Q, K) is true, red when false, white without labels; the query's frame is grey."""
    q, k = neighbours.shape[:2]
    size = tile_side(queries.shape[-1], q, k + 1, scale, max_size, 3)
    tiles = torch.cat([queries.unsqueeze(1), neighbours], 1).flatten(0, 1).float().cpu()
    tiles = smooth_resize(tiles, size).view(q, k + 1, 3, size, size)
    frames = torch.ones(q, k + 1, 3)
    frames[:, 0] = 0.5
    if same_class is not None:
        frames[:, 1:] = torch.where(same_class.cpu().unsqueeze(-1), GREEN, RED)
    return framed_grid(tiles, frames)


def save_picture(
    trainer: pl.Trainer, folder: str, name: str, grid: np.ndarray, key: str, caption: str
) -> Path:
    """``<run dir>/<folder>/<name>.png`` and a W&B image under ``key`` (rank 0 only)."""
    out = Path(trainer.default_root_dir) / folder / f"{name}.png"
    if trainer.is_global_zero:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(out)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[grid], step=trainer.global_step, caption=[caption])
    return out
