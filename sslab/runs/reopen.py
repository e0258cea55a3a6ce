"""Reopen a trained run: read its checkpoint, rebuild its config, apply data overrides, build, load.

Every reader of a train.py checkpoint (``eval.py``, the Atari probe, MaskCut and discovery, export and embed)
goes through ``reopen``, so a checkpoint is read, refused and rebuilt the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sslab.build import build_backbone, build_datamodule, build_method
from sslab.checkpoint_io import read_checkpoint
from sslab.cli import fit_workers
from sslab.data import SSLDataModule
from sslab.errors import SSLabError
from sslab.init_from import init_backbone


class Reopened(NamedTuple):
    model: nn.Module  # the method, or (encoder_only) its evaluation encoder in eval mode
    cfg: DictConfig  # the run's config with the data overrides applied
    checkpoint: dict[str, Any]  # as read: global_step, state_dict, ...
    datamodule: SSLDataModule | None  # what the method was built on (None for encoder_only)


def reopen(
    ckpt_path: str | Path,
    data_overrides: Mapping[str, Any] | None = None,
    *,
    encoder_only: bool = False,
    random_init: bool = False,
    datamodule: SSLDataModule | None = None,
    option: str = "ckpt",
) -> Reopened:
    """The run of a train.py checkpoint, rebuilt. ``data_overrides``: ``data.<field>`` values over the
    checkpoint's data config (a field it lacks is refused in one line). ``encoder_only``: only the evaluation
    encoder (the teacher for DINO), built without the method or its data, whose files may not be on this
    machine; else the method on ``datamodule`` (default: one built from the data config). ``random_init``:
    the same architecture as initialised from the run's seed, without the checkpoint's weights (a baseline).
    ``option`` names the setting in error lines (``ckpt=PATH: ...``)."""
    ckpt = read_checkpoint(ckpt_path, option)
    cfg = OmegaConf.create(ckpt["sslab_config"])
    cfg.data = merge_data_overrides(cfg.data, data_overrides)
    if encoder_only:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("seed", 0)))
            backbone = build_backbone(cfg, pretrained=False)  # random init, or the checkpoint next
        if not random_init:
            init_backbone(backbone, ckpt_path, ckpt, option)  # the checkpoint already read above
        return Reopened(backbone.eval(), cfg, ckpt, None)
    if datamodule is None:
        fit_workers(cfg)
        datamodule = build_datamodule(cfg)
    if random_init:
        torch.manual_seed(int(cfg.seed))
    model = build_method(cfg, datamodule, pretrained=False)  # its weights come from the checkpoint
    if not random_init:
        model.load_state_dict(ckpt["state_dict"])
    return Reopened(model, cfg, ckpt, datamodule)


def merge_data_overrides(run_data: Any, overrides: Mapping[str, Any] | None) -> Any:
    """The checkpoint's data config with ``data.<field>=...`` from the command line (no ``+`` needed, so a
    mistyped field is refused here, naming the fields there are)."""
    # fields added to imagefolder after a checkpoint was written are accepted for it too
    later = {"eval_path", "labels"} if run_data.get("name") == "imagefolder" else set()
    unknown = sorted(set(overrides or {}) - set(run_data) - later)
    if unknown:
        raise SSLabError(
            f"data.{unknown[0]} is not a field of the checkpoint's data config ({run_data.get('name')}); "
            f"choose from {', '.join(sorted(k for k in run_data if not str(k).startswith('_')))}"
        )
    return OmegaConf.merge(run_data, overrides or {})
