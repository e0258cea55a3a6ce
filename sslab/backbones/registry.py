"""Backbone names users type (``backbone=vit_s``) mapped to timm architectures."""

from __future__ import annotations

from sslab.backbones.base import Backbone
from sslab.backbones.cnn import CNNBackbone
from sslab.backbones.vit import ViTBackbone
from sslab.errors import SSLabError

VIT = {
    "vit_t": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_b": "vit_base_patch16_224",
    "vit_l": "vit_large_patch16_224",
}
CNN = {"resnet18": "resnet18", "resnet50": "resnet50", "convnext_t": "convnext_tiny"}
BACKBONES = sorted(VIT) + sorted(CNN)


def build(
    name: str,
    img_size: int,
    patch_size: int = 16,
    num_registers: int = 0,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
    **vit_overrides,
) -> Backbone:
    """Build an encoder by its short name; ``vit_overrides`` (depth, num_heads, ...) go to timm ViTs."""
    if name in VIT:
        if img_size % patch_size:
            raise SSLabError(
                f"image size {img_size} is not a multiple of patch size {patch_size}; "
                f"set backbone.patch_size to a divisor of {img_size}"
            )
        model: Backbone = ViTBackbone(
            VIT[name], img_size, patch_size, num_registers, drop_path_rate, in_chans, **vit_overrides
        )
    elif name in CNN:
        if num_registers:
            raise SSLabError(
                f"{name} is a CNN and has no register tokens; drop backbone.num_registers or use a ViT"
            )
        if vit_overrides:
            raise SSLabError(f"{name} does not take ViT options {sorted(vit_overrides)}; remove them")
        model = CNNBackbone(CNN[name], img_size, in_chans, drop_path_rate)
    else:
        raise SSLabError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    model.name = name
    return model
