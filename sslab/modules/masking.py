"""MAE random masking (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 3)."""

from __future__ import annotations

import torch


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise, as in MAE.

    Each sample draws noise u ~ U(0, 1)^N; the ``K = N - round(N * mask_ratio)`` patches with the smallest
    noise are kept. No Python loop over samples: one ``argsort`` and index gathers only.

    Returns:
        keep_idx: (B, K) long, the kept patch indices (in the order of increasing noise).
        mask: (B, N) bool, True where a patch is masked (removed from the encoder input).
        restore_idx: (B, N) long, the inverse permutation: ``cat([kept, masked])[restore_idx]`` puts the
            tokens back in patch order (the MAE decoder's "unshuffle").
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = num_patches - round(num_patches * mask_ratio)
    noise = torch.rand(batch, num_patches, device=device)
    shuffle_idx = noise.argsort(dim=1)
    restore_idx = shuffle_idx.argsort(dim=1)
    keep_idx = shuffle_idx[:, :num_keep]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask, restore_idx
