"""Start a run from another run's encoder (``init_from=PATH``): MAE -> WSP, DINO -> a CutLER detector.

The checkpoint names the prefix of its evaluation encoder (the teacher for DINO-family methods), so the
weights are taken without rebuilding the method or its data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslab.checkpoint_io import read_checkpoint
from sslab.errors import SSLabError


def load_eval_backbone_state(
    ckpt_path: str | Path, checkpoint: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(backbone config, state dict) of the evaluation encoder stored in a train.py checkpoint (read from
    ``ckpt_path`` unless the caller already holds it as ``checkpoint``)."""
    ckpt = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path, "init_from")
    prefix = ckpt.get("sslab_eval_backbone", "backbone.")
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise SSLabError(
            f"init_from={ckpt_path}: no weights under {prefix!r}; the checkpoint holds no encoder"
        )
    return dict(ckpt["sslab_config"]["backbone"]), state


def init_backbone(
    backbone: nn.Module, ckpt_path: str | Path, checkpoint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Copy the checkpoint's evaluation encoder into ``backbone``; a different architecture is refused in
    one line rather than half-loaded."""
    source_cfg, state = load_eval_backbone_state(ckpt_path, checkpoint)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or mismatched:
        what = f"missing {missing[:3]}" if missing else f"shape mismatch at {mismatched[:3]}"
        raise SSLabError(
            f"init_from={ckpt_path}: its backbone ({source_cfg.get('name')}) does not fit this one ({what}); "
            "use the same backbone (and depth/patch size) as the run that wrote it"
        )
    backbone.load_state_dict({k: state[k] for k in own})
    return source_cfg
