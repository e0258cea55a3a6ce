"""VICReg (Bardes, Ponce & LeCun, ICLR 2022): two views of each image, an expander MLP, and the
variance-invariance-covariance loss (``sslab.modules.vicreg_loss``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sslab.augment.temporal_views import ObservationViews
from sslab.modules.vicreg_loss import vicreg_loss

from .base import SSLMethod


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
    backbone's global feature (CLS for ViTs), not the expander output, as in the paper's evaluation."""

    def __init__(
        self,
        *args,
        projector_dims: Sequence[int] = (1024, 1024, 1024),
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        views: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        self.view_cfg = dict(views or {})
        super().__init__(*args, **kwargs)
        self.projector = expander(self.backbone.embed_dim, list(projector_dims))
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff

    def make_views(self) -> nn.Module:
        return ObservationViews(self.data.image_size, self.data.mean, self.data.std, **self.view_cfg)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def vicreg(self, h1: torch.Tensor, h2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Expand both views' features in one call and return the weighted loss and its terms."""
        z1, z2 = self.projector(torch.cat([h1, h2])).chunk(2)
        return vicreg_loss(z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff)

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        v1, v2 = batch["views"]
        h1, h2 = self.backbone(torch.cat([v1, v2])).chunk(2)
        loss, terms = self.vicreg(h1, h2)
        return {"loss": loss, "features": h1, "logs": terms}
