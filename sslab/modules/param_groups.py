"""AdamW parameter groups shared by pretraining (``SSLMethod``) and fine-tuning.

Which parameters get weight decay differs between the reference implementations, and it changes what a run
trains, so each method names its reference's rule (``WEIGHT_DECAY_RULES``):

- ``dino``: DINO / iBOT ``utils.get_params_groups``: no decay on biases (``.bias``) and 1-D parameters
  (norms); tokens and position embeddings *are* decayed.
- ``dinov2``: DINOv2 ``dinov2/utils/param_groups.py``: no decay where the name ends in ``.bias`` or contains
  ``norm`` or ``gamma`` (LayerScale); tokens, position embeddings and the weight-norm gain are decayed.
- ``timm``: timm's ``param_groups_weight_decay`` as MAE's ``main_pretrain.py`` calls it (empty skip list):
  no decay on 1-D parameters and biases.
- ``clip``: OpenCLIP ``training/main.py``: no decay where ``p.ndim < 2`` or the name contains ``bn``, ``ln``,
  ``bias`` or ``logit_scale``; the token and position embeddings are decayed.
- ``finetune``: MAE/BEiT fine-tuning (``util/lr_decay.py``): no decay on 1-D parameters and on the tokens
  and position embeddings (``no_weight_decay()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from sslab.errors import SSLabError
from sslab.modules.lr_decay import lr_scale

# Token and embedding parameters that fine-tuning (and the text tower) keeps free of weight decay.
NO_DECAY_NAMES = ("cls_token", "pos_embed", "reg_token", "mask_token", "token_embed")
PATCH_EMBED = "patch_embed"


def _dino_no_decay(name: str, p: nn.Parameter) -> bool:
    return name.endswith(".bias") or p.ndim == 1


def _dinov2_no_decay(name: str, p: nn.Parameter) -> bool:
    return name.endswith(".bias") or "norm" in name or "gamma" in name


def _clip_no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale"))


def _finetune_no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES


WEIGHT_DECAY_RULES: dict[str, Callable[[str, nn.Parameter], bool]] = {
    "dino": _dino_no_decay,
    "dinov2": _dinov2_no_decay,
    "timm": _dino_no_decay,  # same test as DINO's: 1-D or bias (timm: ndim <= 1 or name ends in .bias)
    "clip": _clip_no_decay,
    "finetune": _finetune_no_decay,
}


def adamw_param_groups(
    modules: Sequence[nn.Module],
    weight_decay: float,
    layer_decay: float | None = None,
    layer_decayed: nn.Module | None = None,
    rule: str = "finetune",
    patch_embed_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Groups keyed by (weight decay on/off, lr scale). ``rule`` (``WEIGHT_DECAY_RULES``) says which
    parameters get no weight decay; ``layer_decayed`` (a ViT encoder with ``vit.blocks``) gets BEiT-style
    layer-wise lr scales when ``layer_decay`` is set, and its patch embedding a further
    ``patch_embed_lr_mult`` (DINOv2: 0.2). ``lr_scale`` multiplies the scheduled lr; ``apply_wd`` says which
    groups follow a weight-decay schedule."""
    if rule not in WEIGHT_DECAY_RULES:
        raise SSLabError(
            f"weight-decay rule {rule!r} is unknown; choose one of {', '.join(WEIGHT_DECAY_RULES)}"
        )
    no_decay = WEIGHT_DECAY_RULES[rule]
    num_blocks = len(getattr(getattr(layer_decayed, "vit", None), "blocks", []))
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            apply_wd = not no_decay(name, p)
            scale = 1.0
            if module is layer_decayed:
                if layer_decay is not None and num_blocks:
                    scale = lr_scale(name, num_blocks, layer_decay)
                if PATCH_EMBED in name.split("."):
                    scale *= patch_embed_lr_mult
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
