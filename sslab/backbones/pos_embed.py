"""Fixed 2-D sin-cos position embeddings, for the ViT backbone (``ViTBackbone.use_fixed_sincos_pos_embed``) and MAE's
decoders. They live on the backbone floor because the encoder needs them and the decoders above reach down."""

from __future__ import annotations

import functools

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sinusoids (Vaswani et al., 2017) of integer positions: (M,) -> (M, dim), with
    out[m, i] = sin(pos_m * w_i) and out[m, dim/2 + i] = cos(pos_m * w_i), w_i = 10000^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@functools.lru_cache(maxsize=16)
def _sincos_2d_cached(dim: int, gh: int, gw: int) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be a multiple of 4, got {dim}")
    rows = torch.arange(gh).repeat_interleave(gw)  # patch n sits at row n // gw, column n % gw
    cols = torch.arange(gw).repeat(gh)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE's decoder; Chen et al. MoCo v3): (gh * gw, dim), the
    first half encodes each patch's column and the second half its row (1-D sinusoids of dim/2 each)."""
    return _sincos_2d_cached(dim, int(grid[0]), int(grid[1])).clone()
