"""Loggers: W&B offline unless the user is logged in (or sets WANDB_MODE), CSV always."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, WandbLogger


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; ``online`` when an API key is configured; else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def make_wandb_logger(
    save_dir: str | Path,
    project: str = "sslab",
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    run_id: str | None = None,
) -> WandbLogger:
    mode = wandb_mode()
    os.environ.setdefault("WANDB_MODE", mode)
    return WandbLogger(
        project=project,
        name=name,
        group=group,
        job_type=job_type,
        tags=list(tags or []),
        save_dir=str(save_dir),
        offline=mode == "offline",
        id=run_id,
        resume="allow" if run_id else None,
    )


def make_csv_logger(save_dir: str | Path, name: str = "csv") -> CSVLogger:
    return CSVLogger(save_dir=str(save_dir), name=name, version="")
