"""Checkpoints written atomically: a temporary file in the same folder, fsync, then rename over the target.

A crash or a full disk during the write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from sslab.errors import SSLabError


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            raise SSLabError(
                f"disk full while writing checkpoint {path}; the previous checkpoint is untouched. "
                "Free space or set paths.output_dir to a larger disk, then resume=auto"
            ) from e
        raise


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain: torch's zip writer often masks it with a RuntimeError of its own."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        atomic_torch_save(checkpoint, path)


def read_checkpoint(path: str | Path, option: str = "ckpt") -> dict[str, Any]:
    """A checkpoint written by train.py, loaded on the CPU; ``option`` names the setting that pointed at it
    (``ckpt``, ``init_from``) so each failure is one line that says what to pass instead."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SSLabError(
            f"{option}={path}: no such file; pass a .ckpt written by train.py (runs keep them in checkpoints/)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SSLabError(
            f"{option}={path} could not be read ({type(e).__name__}); is it a complete train.py checkpoint?"
        ) from e
    if "sslab_config" not in ckpt:
        raise SSLabError(
            f"{option}={path} has no sslab_config; pass a checkpoint written by sslab's train.py"
        )
    return ckpt


def save_final_checkpoint(trainer: Any, last: Path) -> None:
    """Make last.ckpt hold the final step: Lightning skips it at train end when a periodic checkpoint was
    written earlier in the run, which would hand a stale model to ``init_from``, eval.py or the next round."""
    saved_step = None
    if last.is_file():
        saved_step = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("global_step")
    saved_step = trainer.strategy.broadcast(saved_step)
    if saved_step != trainer.global_step:
        trainer.save_checkpoint(last)
