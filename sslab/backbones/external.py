"""Any ``nn.Module`` that maps images (B, C, H, W) to features (B, D), behind the ``Backbone`` interface.

This is what lets a researcher bring their own encoder to a method (``SSLMethod.from_config(backbone=m)``):
the methods only call ``backbone(x)`` / ``forward_tokens(x)`` and read ``embed_dim``, so a thin adapter is
enough. What it cannot give is patch tokens, so methods that mask patches (iBOT, DINOv2, MAE, DiffMAE) are
refused at build time, and per-patch pictures (attention maps, patch PCA) are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from sslab.backbones.base import Backbone
from sslab.errors import SSLabError
from sslab.eval_mode import eval_mode


class ExternalBackbone(Backbone):
    """Wraps ``module``; ``embed_dim`` is passed or found by one dummy forward of a
    (2, ``channels``, ``image_size``, ``image_size``) zero batch in eval mode (train/eval mode restored)."""

    supports_masking = False
    patch_size = 0
    num_prefix_tokens = 0

    def __init__(
        self,
        module: nn.Module,
        embed_dim: int | None = None,
        image_size: int = 224,
        channels: int = 3,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise SSLabError(f"backbone= needs an nn.Module or a backbone name, got {type(module).__name__}")
        self.module = module
        self.name = name or type(module).__name__
        self.embed_dim = int(embed_dim) if embed_dim is not None else self.infer_dim(image_size, channels)

    @torch.no_grad()
    def infer_dim(self, image_size: int, channels: int) -> int:
        with eval_mode(self.module):
            param = next(self.module.parameters(), None)
            x = torch.zeros(
                2, channels, image_size, image_size, device=param.device if param is not None else None
            )
            out = self.module(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SSLabError(
                f"backbone {self.name} must return (B, D) features for a (B, {channels}, {image_size}, "
                f"{image_size}) batch, got {shape}; pool or flatten its output (e.g. timm num_classes=0)"
            )
        return int(out.shape[1])

    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if mask is not None or keep is not None:
            raise SSLabError(
                f"backbone {self.name} is a plain nn.Module and cannot mask or drop patch tokens"
            )
        feats = self.module(x)
        empty = feats.new_zeros(feats.shape[0], 0, feats.shape[-1])  # no patch or register tokens
        return {"cls": feats, "patch": empty, "reg": empty}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
