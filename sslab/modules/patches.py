"""Pixel patches for masked image modelling: (un)patchify, MAE's normalised-pixel target and the masked-patch
loss (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022). The fixed 2-D sin-cos
position embeddings live with the encoders (``sslab.backbones.pos_embed``)."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, each flattened as (p, p, C)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, N, p*p*C) with N = gh * gw -> (B, C, gh*p, gw*p)."""
    b = patches.shape[0]
    gh, gw = grid
    p = patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


def normalized_patches(
    patches: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-patch normalised pixel target: (x - mean) / sqrt(var + eps) over each patch's pixels.

    As in the official code, ``var`` is the unbiased (n - 1) variance. Returns (target, mean, std) so that
    a prediction in the normalised space maps back to pixels as ``pred * std + mean``.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    std = (var + eps).sqrt()
    return (patches - mean) / std, mean, std


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE loss: per-patch mean squared error, averaged over the masked patches only.

    pred, target: (B, N, D); mask: (B, N) bool, True where masked. Unmasked patches get zero weight, so
    their predictions do not change the loss.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
