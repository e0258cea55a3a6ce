"""Projection heads."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """DINO projection head (Caron et al., 2021, Sec. 3.1 and Appendix).

    MLP (``nlayers`` linear layers, GELU, hidden ``hidden_dim``, output ``bottleneck_dim``) ->
    L2 normalisation -> weight-normalised linear layer to ``out_dim`` without bias. With
    ``norm_last_layer`` the weight-norm gain g is fixed at 1, so the last layer is a cosine
    classifier over ``out_dim`` prototypes, which the paper found stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(_trunc_normal_init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        if norm_last_layer:
            gain.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` is (..., in_dim): CLS features (B, D) or patch tokens (B, N, D). The MLP sees the tokens
        flattened, so with ``use_bn`` BatchNorm normalises each feature over the batch and the tokens, as
        iBOT's head does for token inputs (``models/head.py``, ``CustomSequential``)."""
        x = self.mlp(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


def _trunc_normal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
