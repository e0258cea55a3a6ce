"""Layer-wise learning-rate decay (BEiT, Bao et al. 2022; used by MAE fine-tuning and DINOv2).

A parameter in transformer block i (0-based) of an L-block ViT gets lr x decay^(L - i); the patch
embedding, tokens and position embeddings (layer 0) get decay^(L + 1); everything after the last block
(final norm, heads) keeps the full lr. Lower layers hold more generic features, so they move less.
"""

from __future__ import annotations

import re

_EMBEDDING_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token", "patch_embed")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, num_blocks: int) -> int:
    """0 for embeddings and tokens, i + 1 for ``blocks.i``, ``num_blocks + 1`` for the rest."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(part in _EMBEDDING_NAMES for part in name.split(".")):
        return 0
    return num_blocks + 1


def lr_scale(name: str, num_blocks: int, decay: float) -> float:
    return decay ** (num_blocks + 1 - layer_id(name, num_blocks))
