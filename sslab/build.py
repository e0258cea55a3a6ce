"""Turn a composed config into a DataModule and a method; shared by train.py, eval.py and the tests."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from sslab import backbones
from sslab.data import SSLDataModule
from sslab.errors import SSLabError
from sslab.init_from import build_with_weights
from sslab.methods import DataSpec, SSLMethod


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)


def auto_precision() -> str:
    """bf16 autocast on GPUs that support it, full fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


_register_resolvers()


def build_datamodule(cfg: DictConfig) -> SSLDataModule:
    dm = instantiate(cfg.data, _convert_="all")
    if not isinstance(dm, SSLDataModule):
        raise SSLabError(f"data config {cfg.data.get('name')} does not build an SSLDataModule")
    return dm


def build_backbone(cfg: DictConfig, pretrained: bool = True) -> backbones.Backbone:
    """The configured encoder; ``pretrained=False`` skips ``backbone.weights`` (a random-init baseline, or a
    model whose weights come from a checkpoint next)."""
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.backbone, resolve=True)
    if not pretrained:
        kwargs.pop("weights", None)
    return build_with_weights(**kwargs)


def build_method(cfg: DictConfig, dm: SSLDataModule, pretrained: bool = True) -> SSLMethod:
    """Instantiate ``cfg.method`` around a fresh backbone, refusing method/backbone/data mismatches;
    ``pretrained`` as in ``build_backbone``."""
    method_cfg: dict[str, Any] = OmegaConf.to_container(cfg.method, resolve=True)
    target = method_cfg.pop("_target_")
    method_name = method_cfg.pop("name", target.rsplit(".", 1)[-1])
    cls = get_class(target)
    backbone = build_backbone(cfg, pretrained)
    if cls.requires_masking and not backbone.supports_masking:
        raise SSLabError(
            f"method={method_name} masks patch tokens, which backbone={backbone.name} cannot do; use a ViT backbone"
        )
    dm.setup()  # surfaces a wrong path or empty dataset now, before any model work
    missing = [k for k in cls.required_keys if k not in dm.provides]
    if missing:
        raise SSLabError(
            f"method={method_name} needs batch key(s) {missing}, which data={dm.name} does not provide"
        )
    return cls(backbone=backbone, data=data_spec(dm), seed=int(cfg.seed), **method_cfg)


def data_spec(dm: SSLDataModule) -> DataSpec:
    """What a method needs to know of a set-up DataModule: sizes, normalisation, classes, channels."""
    return DataSpec(
        image_size=dm.image_size,
        local_crop_size=dm.local_crop_size,
        mean=tuple(dm.mean),
        std=tuple(dm.std),
        num_classes=len(dm.class_names),
        channels=int(dm.channels),
    )
