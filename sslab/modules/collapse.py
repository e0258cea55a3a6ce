"""Collapse statistics of a batch of embeddings, the first thing to look at when a self-supervised run stalls.

- ``feature_std``: the mean over dimensions of the per-dimension std of the L2-normalised embeddings
  (SimSiam, Chen & He, CVPR 2021, Sec. 4.1). Isotropic embeddings give ~1/sqrt(D); complete collapse gives 0.
- ``effective_rank``: exp of the entropy of the normalised singular values (Roy & Vetterli, "The effective
  rank", EUSIPCO 2007), as RankMe (Garrido et al., ICML 2023) reads it off embeddings: ~1 when every
  embedding points along one direction (dimensional collapse), up to min(B, D) when they fill the space.

Both take the L2-normalised embeddings, so a few large-norm samples cannot dominate the rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of the L2-normalised rows of ``features`` (B, D); 1/sqrt(D) = no collapse."""
    z = F.normalize(features.detach().float(), dim=-1)
    return z.std(dim=0).mean()


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j over the singular values s of the L2-normalised,
    uncentred rows of ``features`` (B, D) (uncentred, as RankMe: a batch collapsed to one point has rank 1)."""
    z = F.normalize(features.detach().float(), dim=-1)
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(eps) + eps
    return torch.exp(-(p * p.log()).sum())
