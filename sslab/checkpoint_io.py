"""Checkpoints written atomically: a temporary file in the same folder, fsync, then rename over the target.

A crash, a full disk or a read-only file system during the write leaves the previous checkpoint as it was.
Only checkpoints of finite weights are written, and a periodic checkpoint replaced by a newer one is deleted
only once the newer one's weights have given a finite loss, so a NaN never leaves the run without a usable
checkpoint from before it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from sslab.errors import SSLabError

log = logging.getLogger(__name__)
WRITTEN: dict[str, int | None] = {}  # checkpoints this process wrote -> their global_step (NaN clean-up)
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # on a read-only disk this fails too; the first error is the news
            tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            raise SSLabError(
                f"disk full while writing checkpoint {path}; the previous checkpoint is untouched. "
                "Free space or set paths.output_dir to a larger disk, then resume=auto"
            ) from e
        unwritable = _os_error(e, UNWRITABLE)
        if unwritable is not None:
            raise SSLabError(
                f"cannot write checkpoint {path}: {unwritable.strerror}; the previous checkpoint is untouched. "
                f"Make {path.parent} writable or set paths.output_dir elsewhere, then resume={path}"
            ) from e
        raise
    if isinstance(obj, dict):
        WRITTEN[str(path)] = obj.get("global_step")


def _os_error(e: BaseException | None, codes: tuple[int, ...]) -> OSError | None:
    while e is not None:
        if isinstance(e, OSError) and e.errno in codes:
            return e
        e = e.__cause__ or e.__context__
    return None


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


def read_checkpoint(path: str | Path, option: str = "ckpt", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint written by train.py, loaded on the CPU; ``option`` names the setting that pointed at it
    (``ckpt``, ``init_from``, ``resume``) so each failure is one line that says what to pass instead.
    ``mmap``: map the tensors instead of reading them (cheap when only the config and step are wanted)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SSLabError(
            f"{option}={path}: no such file; pass a .ckpt written by train.py (runs keep them in checkpoints/)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        if not isinstance(ckpt, dict):
            raise TypeError(f"a {type(ckpt).__name__}, not a dict")
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


class FiniteCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that (1) writes nothing when a weight is not finite and (2) deletes a
    replaced periodic checkpoint only after the next training step's loss came out finite: the newest file holds
    the weights that step ran on, so until then the older one is the last known good state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_removal: list[str] = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        finite = all(bool(torch.isfinite(p).all()) for p in trainer.lightning_module.parameters())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            log.warning(
                "not writing %s: the weights hold NaN or inf at step %d", filepath, trainer.global_step
            )
            return
        super()._save_checkpoint(trainer, filepath)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._pending_removal.append(filepath)

    def _flush_removals(self, trainer: pl.Trainer) -> None:
        pending, self._pending_removal = self._pending_removal, []
        for filepath in pending:
            super()._remove_checkpoint(trainer, filepath)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kw: Any
    ) -> None:
        self._flush_removals(trainer)  # this step's loss was finite: the files it replaced can go
        super().on_train_batch_end(trainer, pl_module, *args, **kw)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_removals(trainer)
        super().on_train_end(trainer, pl_module)


def checkpoint_step(path: Path) -> int | None:
    """The ``global_step`` stored in a checkpoint, or None when it cannot be read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step"))
    except Exception:
        return None
