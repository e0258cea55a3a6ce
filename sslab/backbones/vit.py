"""timm Vision Transformers with registers, masking and any input size."""

from __future__ import annotations

import timm
import torch
from torch import nn

from sslab.backbones.base import Backbone


class ViTBackbone(Backbone):
    """A timm ``VisionTransformer`` with pos-embed interpolation (``dynamic_img_size``) for any crop size.

    Register tokens follow Darcet et al., "Vision Transformers Need Registers" (2024).
    """

    supports_masking = True

    def __init__(
        self,
        timm_name: str,
        img_size: int,
        patch_size: int,
        num_registers: int = 0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        self.vit = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            reg_tokens=num_registers,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            **timm_kwargs,
        )
        self.embed_dim = self.vit.embed_dim
        self.patch_size = patch_size
        self.num_registers = num_registers
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        vit = self.vit
        tokens = vit.patch_embed(x)  # (B, H', W', D) with dynamic_img_size
        if mask is not None:
            b, h, w, _ = tokens.shape
            tokens = torch.where(mask.view(b, h, w, 1), self.mask_token.to(tokens.dtype), tokens)
        tokens = vit._pos_embed(tokens)  # prefix tokens + position embeddings, (B, P + N, D)
        p = self.num_prefix_tokens
        if keep is not None:
            kept = torch.gather(tokens[:, p:], 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            tokens = torch.cat([tokens[:, :p], kept], dim=1)
        tokens = vit.norm_pre(tokens)
        tokens = vit.blocks(tokens)
        tokens = vit.norm(tokens)
        n_cls = 1 if vit.cls_token is not None else 0
        return {
            "cls": tokens[:, 0] if n_cls else tokens[:, p:].mean(1),
            "reg": tokens[:, n_cls:p],
            "patch": tokens[:, p:],
        }
