"""MAE's lightweight decoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
Sec. 3): encoder tokens -> linear projection -> mask tokens appended and unshuffled -> fixed 2-D sin-cos
position embeddings -> Transformer blocks -> per-patch linear prediction of pixels."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from sslab.backbones.pos_embed import sincos_2d


class SinCosTable:
    """The decoders' fixed 2-D sin-cos position table (``sincos_2d``) for a patch grid, cached per (grid,
    device, dtype): not a parameter or buffer, so checkpoints hold none of it."""

    def __init__(self, dim: int) -> None:
        if dim % 4:
            raise ValueError(f"decoder dim must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
        self.dim = dim
        self.tables: dict[tuple, torch.Tensor] = {}

    def __call__(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        key = (tuple(grid), like.device, like.dtype)
        if key not in self.tables:
            self.tables[key] = sincos_2d(self.dim, grid).to(device=like.device, dtype=like.dtype)
        return self.tables[key]


class MAEDecoder(nn.Module):
    """Predicts every patch (B, N, patch_dim) from the encoder output of the visible patches.

    ``tokens`` are the encoder's output: ``num_prefix_tokens`` prefix tokens (CLS and registers) followed
    by the K kept patch tokens, in the order of ``keep_idx``. Prefix tokens join the decoder sequence
    without a position embedding (MAE gives its CLS token a zero one); their outputs are dropped.
    """

    def __init__(
        self,
        in_dim: int,
        patch_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.pos_embed = SinCosTable(dim)
        self.dim, self.num_prefix_tokens = dim, num_prefix_tokens
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        norm = partial(nn.LayerNorm, eps=1e-6)  # as the official code
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, restore_idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.embed(tokens)
        p = self.num_prefix_tokens
        b, n = restore_idx.shape
        kept = x[:, p:]
        full = torch.cat([kept, self.mask_token.to(x.dtype).expand(b, n - kept.shape[1], -1)], dim=1)
        full = torch.gather(full, 1, restore_idx.unsqueeze(-1).expand(-1, -1, self.dim))  # unshuffle
        full = full + self.pos_embed(grid, full)
        x = self.norm(self.blocks(torch.cat([x[:, :p], full], dim=1)))
        return self.pred(x[:, p:])


def _init_weights(m: nn.Module) -> None:
    """MAE's initialisation (facebookresearch/mae ``models_mae.py``, ``_init_weights``): xavier-uniform
    linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
