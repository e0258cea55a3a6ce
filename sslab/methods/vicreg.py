"""VICReg (Bardes, Ponce & LeCun, ICLR 2022): two views of each image, an expander MLP, and the
variance-invariance-covariance loss (``sslab.modules.vicreg_loss``).

BatchNorm statistics: the official code (facebookresearch/vicreg ``main_vicreg.py``, mgoulao/TOV-VICReg
``tov_vicreg/models/builder.py``) calls backbone and expander once per view, so every BatchNorm normalises each
view with that view's own batch mean and variance. ``bn_stats="per_view"`` (the default) does the same;
``"joint"`` runs both views through the expander in one call (statistics pooled over 2B rows), which was this
project's earlier behaviour and is kept only to measure the difference.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sslab.augment.temporal_views import ObservationViews
from sslab.errors import SSLabError
from sslab.modules.vicreg_loss import vicreg_loss

from .base import SSLMethod

BN_STATS = ("per_view", "joint")


def has_batchnorm(module: nn.Module) -> bool:
    """True when a BatchNorm layer sits in ``module``, i.e. when batching views together changes its output."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def expander(in_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """VICReg's projector: (Linear -> BatchNorm -> ReLU) for every hidden size, then a bias-free Linear."""
    if not dims:
        raise ValueError("method.projector_dims needs at least one size")
    sizes = [in_dim, *dims]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes[:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class VICReg(SSLMethod):
    """Backbone + expander trained on two augmented views with ``sim_coeff`` / ``std_coeff`` / ``cov_coeff``
    weighting the invariance / variance / covariance terms (25 / 25 / 1 in the paper). ``embed`` is the
    backbone's global feature (CLS for ViTs), not the expander output, as in the paper's evaluation.
    ``bn_stats``: "per_view" (official) or "joint" BatchNorm statistics (see the module docstring)."""

    def __init__(
        self,
        *args,
        projector_dims: Sequence[int],
        sim_coeff: float,
        std_coeff: float,
        cov_coeff: float,
        bn_stats: str,
        **kwargs,
    ) -> None:
        if bn_stats not in BN_STATS:
            raise SSLabError(f"method.bn_stats={bn_stats!r}: choose one of {', '.join(BN_STATS)}")
        super().__init__(*args, **kwargs)
        self.bn_stats = bn_stats
        self.projector = expander(self.backbone.embed_dim, list(projector_dims))
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff

    def make_views(self) -> nn.Module:
        return ObservationViews(self.data.image_size, self.data.mean, self.data.std, **self.view_cfg)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def encode(self, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Backbone features of each view. Per view, as the official code, when the backbone has BatchNorm
        (ResNets) and ``bn_stats`` is "per_view"; otherwise one batched call, which is the same function."""
        if self.bn_stats == "per_view" and has_batchnorm(self.backbone):
            return tuple(self.backbone(v) for v in views)
        return self.backbone(torch.cat(views)).chunk(len(views))

    def expand(self, h1: torch.Tensor, h2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expander outputs of the two views: one call per view (official BatchNorm statistics) or one joint call."""
        if self.bn_stats == "joint":
            z1, z2 = self.projector(torch.cat([h1, h2])).chunk(2)
            return z1, z2
        return self.projector(h1), self.projector(h2)

    def vicreg(self, h1: torch.Tensor, h2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Expand both views' features and return the weighted loss and its terms."""
        z1, z2 = self.expand(h1, h2)
        return vicreg_loss(z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff)

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        v1, v2 = batch["views"]
        h1, h2 = self.encode(v1, v2)
        loss, terms = self.vicreg(h1, h2)
        return {"loss": loss, "features": h1, "logs": terms}
