"""FlexiViT's patch-size resizing (Beyer et al., "FlexiViT: One Model for All Patch Sizes", CVPR 2023).

The patch-embedding kernel is stored at one underlying size and resized on the fly to the patch size of the
current forward. Resizing the kernel like an image would change the tokens; FlexiViT's PI-resize instead keeps
them: with B the bilinear resize operator written as a matrix (vec(resize(x)) = B vec(x)), the new kernel is

    w' = argmin_w' E_x [ (<x, w> - <B x, w'>)^2 ] = pinv(B^T) w,

so that <x, w> = <B x, w'> holds exactly for every patch x whenever B has full column rank (upsampling,
new size >= old size), and in the least-squares sense when downsampling. B follows big_vision's
``resample_patchemb``: bilinear, half-pixel centres, no antialiasing (``tf.image.resize``). Position
embeddings are resized bilinearly to the token grid (big_vision: ``jax.image.resize(..., "linear")``, which
antialiases when it shrinks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


def bilinear_resize_matrix(old: int, new: int) -> torch.Tensor:
    """B (new*new, old*old), float64: the bilinear resize of an old x old patch to new x new as a matrix,
    built by resizing each basis image."""
    basis = torch.eye(old * old, dtype=torch.float64).view(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(new, new), mode="bilinear", align_corners=False)
    return resized.view(old * old, new * new).T.contiguous()


@lru_cache(maxsize=64)
def pi_resize_matrix(old: int, new: int) -> torch.Tensor:
    """pinv(B^T) (new*new, old*old), float64 on the CPU; cached because it only depends on the two sizes."""
    return torch.linalg.pinv(bilinear_resize_matrix(old, new).T)


def pi_resize_kernel(weight: torch.Tensor, new: int) -> torch.Tensor:
    """PI-resize a square conv kernel (D, C, p, p) to (D, C, new, new): w' = pinv(B^T) w per (D, C) slice.
    Differentiable, so the stored kernel is what training updates."""
    d, c, h, w = weight.shape
    if h != w:
        raise ValueError(f"PI-resize expects a square kernel, got {h}x{w}")
    if h == new:
        return weight
    m = pi_resize_matrix(h, new).to(device=weight.device, dtype=weight.dtype)
    return (weight.reshape(d * c, h * w) @ m.T).reshape(d, c, new, new)


def resize_pos_embed(pos: torch.Tensor, old_hw: Sequence[int], new_hw: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of grid position embeddings (1, H*W, D) -> (1, h*w, D)."""
    old_hw, new_hw = tuple(old_hw), tuple(new_hw)
    if old_hw == new_hw:
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, *old_hw, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_hw, mode="bilinear", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], d)


def fit_to_patch_grid(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Resize images whose side is not a multiple of ``patch_size`` to the nearest multiple (at least one
    patch), so every token covers a whole patch; e.g. a 14 px crop at patch size 4 becomes 16 px (4 x 4)."""
    h, w = x.shape[-2:]
    if h % patch_size == 0 and w % patch_size == 0:
        return x
    size = tuple(max(1, math.floor(s / patch_size + 0.5)) * patch_size for s in (h, w))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def draw_patch_size(sizes: Sequence[int], seed: int, step: int) -> int:
    """FlexiViT's per-step draw: uniform over ``sizes``, from a torch generator seeded by (seed, step) only,
    so every rank, student and teacher use the same size and a resumed run draws the same sequence."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + 17) % (2**63 - 1))
    return int(sizes[int(torch.randint(len(sizes), (1,), generator=g))])


def flexible_backbones(module: nn.Module) -> list[nn.Module]:
    """Every sub-module that can run at another patch size (ViT backbones)."""
    return [m for m in module.modules() if callable(getattr(m, "set_patch_size", None))]


def set_eval_patch_size(module: nn.Module, patch_size: int) -> int:
    """Make every ViT backbone inside ``module`` evaluate at ``patch_size``; returns how many were set."""
    found = flexible_backbones(module)
    for b in found:
        b.eval_patch_size = int(patch_size)
    return len(found)
