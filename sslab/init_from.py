"""Start a run from another run's encoder (``init_from=PATH``): MAE -> WSP, DINO -> a CutLER detector; or from
an official checkpoint file (DINO, DINOv2, MAE, timm; ``sslab.official_weights``).

A train.py checkpoint names the prefix of its evaluation encoder (the teacher for DINO-family methods), so the
weights are taken without rebuilding the method or its data. Any other file is read as an official one.
Reopening a whole run (method, config, data) is ``sslab.runs.reopen``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sslab import backbones
from sslab.backbones import Backbone
from sslab.checkpoint_io import atomic_torch_save, read_checkpoint
from sslab.errors import SSLabError
from sslab.official_weights import load_official_weights, read_weights_file


def load_eval_backbone_state(
    ckpt_path: str | Path, checkpoint: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(backbone config, state dict) of the evaluation encoder stored in a train.py checkpoint (read from
    ``ckpt_path`` unless the caller already holds it as ``checkpoint``). The config's ``weights`` (a file the
    run started from) is dropped: the state dict replaces those weights, and the file may be gone."""
    ckpt = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path, "init_from")
    prefix = ckpt.get("sslab_eval_backbone", "backbone.")
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise SSLabError(
            f"init_from={ckpt_path}: no weights under {prefix!r}; the checkpoint holds no encoder"
        )
    backbone_cfg = dict(ckpt["sslab_config"]["backbone"])
    backbone_cfg.pop("weights", None)
    return backbone_cfg, state


def build_with_weights(name: str, weights: str | None = None, **backbone_cfg: Any) -> Backbone:
    """``backbones.build(name, **backbone_cfg)`` with ``weights`` (``backbone.weights=FILE``: a train.py checkpoint's
    evaluation encoder or an official DINO / DINOv2 / MAE / timm file) loaded into it."""
    backbone = backbones.build(name, **backbone_cfg)
    if weights:
        init_backbone(backbone, weights, option="backbone.weights")
    return backbone


def init_backbone(
    backbone: nn.Module,
    ckpt_path: str | Path,
    checkpoint: dict[str, Any] | None = None,
    option: str = "init_from",
) -> dict[str, Any]:
    """Copy a checkpoint's encoder into ``backbone``. A train.py checkpoint must hold the same architecture
    (a different one is refused in one line rather than half-loaded); an official file is mapped by
    ``sslab.official_weights`` (keys renamed, position embeddings resized, leftovers listed). Returns the
    source's backbone config (train.py) or what the official loader did (``layout``, ``loaded``, ...)."""
    ckpt = checkpoint if checkpoint is not None else read_weights_file(ckpt_path, option)
    if "sslab_config" not in ckpt:
        return load_official_weights(backbone, ckpt, ckpt_path, option)
    source_cfg, state = load_eval_backbone_state(ckpt_path, ckpt)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or mismatched:
        what = f"missing {missing[:3]}" if missing else f"shape mismatch at {mismatched[:3]}"
        raise SSLabError(
            f"{option}={ckpt_path}: its backbone ({source_cfg.get('name')}) does not fit this one ({what}); "
            "use the same backbone (and depth/patch size) as the run that wrote it"
        )
    backbone.load_state_dict({k: state[k] for k in own})
    return source_cfg


def is_train_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a train.py checkpoint (cheap: the tensors are memory-mapped, not read). Only
    ``.ckpt`` files are unpickled in full, as ``read_checkpoint`` does; another file that needs it (DINO's
    full checkpoint) counts as not ours, and ``init_backbone`` still tells the two apart when it reads it."""
    path = Path(path).expanduser()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=path.suffix != ".ckpt", mmap=True)
    except Exception:  # not a zip-format torch file (old .pth, safetensors) or not tensors-only: not ours
        return False
    return isinstance(ckpt, dict) and "sslab_config" in ckpt


def as_train_checkpoint(
    weights: str | Path, cfg: DictConfig, out: str | Path, option: str = "init_from"
) -> Path:
    """Write ``out``: a train.py-style checkpoint whose encoder is ``cfg.backbone`` loaded from an official
    file, so tools that read train.py checkpoints (MaskCut, the CutLER detector) take official weights too.
    The stored config keeps ``backbone.weights`` null (the state dict holds them) and names the file in
    ``sslab_weights_source``."""
    backbone_cfg: dict[str, Any] = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone_cfg.pop("weights", None)
    backbone = backbones.build(**backbone_cfg)
    init_backbone(backbone, weights, option=option)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["backbone"]["weights"] = None
    ckpt = {
        "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
        "sslab_config": config,
        "sslab_eval_backbone": "backbone.",
        "sslab_weights_source": str(weights),
        "global_step": 0,
    }
    out = Path(out)
    atomic_torch_save(ckpt, out)
    return out
