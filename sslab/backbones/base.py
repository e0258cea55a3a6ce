"""The encoder interface every method relies on."""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """An encoder with ``embed_dim``, ``patch_size``, ``num_prefix_tokens`` and ``forward_tokens``.

    ``forward_tokens(x, mask=None, keep=None)`` returns {"cls": (B, D), "patch": (B, N, D), "reg": (B, R, D)}.
    ``mask`` (B, N) bool replaces masked patch embeddings by a learnable token (iBOT/DINOv2);
    ``keep`` (B, K) long keeps only those patch tokens (MAE). CNNs support neither.
    """

    embed_dim: int
    patch_size: int
    num_prefix_tokens: int
    supports_masking: bool = False
    name: str = ""

    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global image features (B, D): the CLS token for ViTs, pooled features for CNNs."""
        return self.forward_tokens(x)["cls"]
