"""DiffMAE's decoder (Wei et al., "Diffusion Models as Masked Autoencoders", ICCV 2023, Sec. 3 and Fig. 3):
it denoises the noised masked patches at timestep t, conditioned on the encoder's tokens of the visible
patches through cross-attention. "Cross-self" blocks also let the noised tokens attend to each other; "cross"
blocks do not. The paper connects the decoder blocks top-down to the encoder blocks: the first decoder block
reads the last encoder block, the next one the block before, and so on."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from sslab.modules.diffusion import timestep_embedding
from sslab.modules.mae_decoder import SinCosTable, _init_weights

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` (B, M, dim) over a context (B, L, ctx_dim)."""

    def __init__(self, dim: int, ctx_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(ctx_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, m, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, m, d))


class CrossSelfBlock(nn.Module):
    """Pre-norm block: cross-attention to the (normalised) context, then optional self-attention among the
    noised tokens, then an MLP, each with a residual connection."""

    def __init__(
        self, dim: int, ctx_dim: int, num_heads: int, mlp_ratio: float = 4.0, self_attention: bool = True
    ) -> None:
        super().__init__()
        self.norm_ctx = LayerNorm(ctx_dim)
        self.norm_cross = LayerNorm(dim)
        self.cross = CrossAttention(dim, ctx_dim, num_heads)
        self.norm_self = LayerNorm(dim) if self_attention else None
        self.attn = Attention(dim, num_heads, qkv_bias=True) if self_attention else None
        self.norm_mlp = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.cross(self.norm_cross(x), self.norm_ctx(context))
        if self.attn is not None:
            x = x + self.attn(self.norm_self(x))
        return x + self.mlp(self.norm_mlp(x))


class DiffMAEDecoder(nn.Module):
    """(noised masked patches x_t (B, M, patch_dim), their patch indices (B, M), t (B,), one context per
    block) -> (B, M, patch_dim), the prediction of x_0 or of the noise, whichever the method trains for.

    Each noised patch is embedded linearly, plus the fixed 2-D sin-cos embedding of its position, plus an
    MLP of the sinusoidal embedding of t.
    """

    def __init__(
        self,
        ctx_dim: int,
        patch_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        self.pos_embed = SinCosTable(dim)
        self.dim, self.depth = dim, depth
        self.embed = nn.Linear(patch_dim, dim)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            CrossSelfBlock(dim, ctx_dim, num_heads, mlp_ratio, self_attention) for _ in range(depth)
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self.apply(_init_weights)

    def forward(
        self,
        x_t: torch.Tensor,
        patch_idx: torch.Tensor,
        t: torch.Tensor,
        contexts: list[torch.Tensor],
        grid: tuple[int, int],
    ) -> torch.Tensor:
        if len(contexts) != self.depth:
            raise ValueError(f"the decoder has {self.depth} blocks but got {len(contexts)} contexts")
        x = self.embed(x_t)
        x = x + self.pos_embed(grid, x)[patch_idx]
        x = x + self.time_mlp(timestep_embedding(t, self.dim).to(x.dtype)).unsqueeze(1)
        for block, context in zip(self.blocks, contexts, strict=True):
            x = block(x, context)
        return self.pred(self.norm(x))
