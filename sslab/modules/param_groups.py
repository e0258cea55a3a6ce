"""AdamW parameter groups shared by pretraining (``SSLMethod``) and fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from sslab.modules.lr_decay import lr_scale

# Tokens and embeddings get no weight decay, like biases and norms (DINO/MAE/BEiT recipes).
NO_DECAY_NAMES = ("cls_token", "pos_embed", "reg_token", "mask_token", "token_embed")


def adamw_param_groups(
    modules: Sequence[nn.Module],
    weight_decay: float,
    layer_decay: float | None = None,
    layer_decayed: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Groups keyed by (weight decay on/off, layer-wise lr scale). No weight decay on parameters with
    ndim <= 1 (biases, norms) or on tokens; ``layer_decayed`` (a ViT encoder with ``vit.blocks``) gets
    BEiT-style layer-wise lr scales when ``layer_decay`` is set. ``lr_scale`` multiplies the scheduled lr;
    ``apply_wd`` says which groups follow a weight-decay schedule."""
    num_blocks = len(getattr(getattr(layer_decayed, "vit", None), "blocks", []))
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            apply_wd = p.ndim > 1 and name.split(".")[-1] not in NO_DECAY_NAMES
            scale = 1.0
            if layer_decay is not None and module is layer_decayed and num_blocks:
                scale = lr_scale(name, num_blocks, layer_decay)
            groups.setdefault((apply_wd, scale), []).append(p)
    return [
        {
            "params": params,
            "apply_wd": apply_wd,
            "weight_decay": weight_decay if apply_wd else 0.0,
            "lr_scale": scale,
        }
        for (apply_wd, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))
    ]
