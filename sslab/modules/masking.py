"""MAE random masking (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3)."""

from __future__ import annotations

import torch


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise, as in MAE.

    Each sample draws noise u ~ U(0, 1)^N (or takes ``noise``, (B, N), e.g. to compare with another
    implementation); the ``K = int(N * (1 - mask_ratio))`` patches with the smallest noise are kept. K is
    floored exactly as facebookresearch/mae ``models_mae.py`` (``random_masking``: ``len_keep``) computes it,
    e.g. N=7, ratio 0.75 keeps 1 patch (rounding the masked count would keep 2). No Python loop over
    samples: one ``argsort`` and index gathers only.

    Returns:
        keep_idx: (B, K) long, the kept patch indices (in the order of increasing noise).
        mask: (B, N) bool, True where a patch is masked (removed from the encoder input).
        restore_idx: (B, N) long, the inverse permutation: ``cat([kept, masked])[restore_idx]`` puts the
            tokens back in patch order (the MAE decoder's "unshuffle").
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    elif noise.shape != (batch, num_patches):
        raise ValueError(f"noise must have shape ({batch}, {num_patches}), got {tuple(noise.shape)}")
    device = noise.device
    shuffle_idx = noise.argsort(dim=1)
    restore_idx = shuffle_idx.argsort(dim=1)
    keep_idx = shuffle_idx[:, :num_keep]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask, restore_idx
