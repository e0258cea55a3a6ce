"""CLIP's text encoder, small (Radford et al., 2021, Sec. 2.4): token + learned position embeddings, a
pre-norm transformer with a causal mask, the feature at the end-of-text token, layer norm, a linear
projection. Tokens are bytes (``sslab.data.text``), so nothing is downloaded.

Why causal: it is CLIP's choice, and it makes the end-token feature depend on the tokens up to it only, so
the padding after it changes nothing without a per-row padding mask (one mask for the whole batch, which
``scaled_dot_product_attention`` runs on its fast causal path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslab.data.text import EOS_ID, VOCAB_SIZE


def eos_positions(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) index of the first end token of each row (``tokenize`` writes exactly one)."""
    return (tokens == EOS_ID).int().argmax(dim=1)


class TextTower(nn.Module):
    """(B, L) int64 token ids -> (B, embed_dim) projected text features (not normalised).

    Weight decay follows the method's rule (WSP: OpenCLIP's, ``param_groups.WEIGHT_DECAY_RULES['clip']``):
    norms, biases and the logit scale get none, the embeddings are decayed. Initialisation follows CLIP's code: token
    embedding std 0.02, position embedding std 0.01, projection std width^-0.5.
    """

    def __init__(
        self,
        embed_dim: int,
        context_length: int = 32,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        vocab_size: int = VOCAB_SIZE,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} must be divisible by heads {heads}")
        self.context_length = context_length
        self.token_embed = nn.Parameter(torch.randn(vocab_size, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                dim_feedforward=int(width * mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, width) layer-normed feature at each row's end token."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"text of {length} tokens is longer than the tower's context {self.context_length}"
            )
        x = F.embedding(tokens, self.token_embed) + self.pos_embed[:length]
        causal = torch.triu(torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype), 1)
        for block in self.blocks:
            x = block(x, src_mask=causal, is_causal=True)
        x = x[torch.arange(x.shape[0], device=x.device), eos_positions(tokens)]
        return self.ln_final(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(tokens))
