"""Backbone names users type (``backbone=vit_s``) mapped to timm architectures."""

from __future__ import annotations

from collections.abc import Sequence

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
    flexi: bool = False,
    flexi_patch_sizes: Sequence[int] | None = None,
    channels_last: bool | None = None,
    **vit_overrides,
) -> Backbone:
    """Build an encoder by its short name; ``vit_overrides`` (depth, num_heads, ...) go to timm ViTs.
    ``flexi`` makes a FlexiViT that trains with a patch size drawn per step from ``flexi_patch_sizes``.
    Freshly initialised: ``backbone.weights=FILE`` is loaded from above (``sslab.init_from.build_with_weights``),
    so this floor never reads checkpoints. ``channels_last`` (CNNs only; default true): NHWC weights and inputs."""
    if name in VIT:
        if channels_last:
            raise SSLabError(f"backbone.channels_last is for CNN backbones; {name} is a ViT, remove it")
        if img_size % patch_size:
            raise SSLabError(
                f"image size {img_size} is not a multiple of patch size {patch_size}; "
                f"set backbone.patch_size to a divisor of {img_size}"
            )
        sizes = _flexi_sizes(img_size, flexi_patch_sizes) if flexi else ()
        model: Backbone = ViTBackbone(
            VIT[name],
            img_size,
            patch_size,
            num_registers,
            drop_path_rate,
            in_chans,
            flexi=flexi,
            flexi_patch_sizes=sizes,
            **vit_overrides,
        )
    elif name in CNN:
        if flexi:
            raise SSLabError(f"{name} is a CNN and has no patches; drop backbone.flexi or use a ViT")
        if num_registers:
            raise SSLabError(
                f"{name} is a CNN and has no register tokens; drop backbone.num_registers or use a ViT"
            )
        if vit_overrides:
            raise SSLabError(f"{name} does not take ViT options {sorted(vit_overrides)}; remove them")
        model = CNNBackbone(CNN[name], img_size, in_chans, drop_path_rate, channels_last is not False)
    else:
        raise SSLabError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    model.name = name
    return model


def _flexi_sizes(img_size: int, sizes: Sequence[int] | None) -> tuple[int, ...]:
    """FlexiViT patch sizes: a non-empty list of divisors of the image size."""
    sizes = tuple(int(p) for p in (sizes or ()))
    divisors = [d for d in range(2, img_size) if img_size % d == 0]
    bad = [p for p in sizes if p < 1 or img_size % p]
    if not sizes or bad:
        raise SSLabError(
            f"backbone.flexi_patch_sizes={list(sizes)} must be a non-empty list of divisors of the image size "
            f"{img_size}; choose from {divisors}"
        )
    return sizes
