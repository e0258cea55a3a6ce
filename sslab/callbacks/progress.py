"""Training progress that reads well both in a terminal and in a job log.

On a terminal, Lightning's rich bar. When stdout is not a terminal (SLURM job logs, ``nohup``, a pipe) the rich
bar only prints when the run exits, so a job log shows nothing for hours; there ``PlainProgress`` prints one
flushed line every ``every_n_steps`` optimizer steps or every ``every_seconds`` seconds, whichever comes first:

    step 120/1000  loss 5.812  312 img/s  eta 4m10s
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar

from sslab.progress_lines import format_duration


def progress_bar(
    every_n_steps: int = 50, every_seconds: float = 30.0, plain: bool | None = None
) -> ProgressBar:
    """The rich bar on a terminal, plain periodic lines otherwise (``plain`` forces one or the other)."""
    if plain is None:
        plain = not sys.stdout.isatty()
    return PlainProgress(every_n_steps, every_seconds) if plain else RichProgressBar()


def batch_images(batch: Any) -> int:
    """Images in one batch: the length of its ``image`` tensor (or of its first tensor)."""
    if isinstance(batch, dict):
        tensors = [batch["image"]] if "image" in batch else [v for v in batch.values() if torch.is_tensor(v)]
    elif isinstance(batch, list | tuple):
        tensors = [v for v in batch if torch.is_tensor(v)]
    else:
        tensors = [batch] if torch.is_tensor(batch) else []
    return int(tensors[0].shape[0]) if tensors else 0


class PlainProgress(ProgressBar):
    """A progress "bar" of plain lines on global rank 0: step/total, the logged ``train/loss``, images per
    second over the last interval (all ranks) and the remaining time at the mean step time since the first
    step (which holds compilation and warm-up, so it is left out). Reading the loss syncs the device, which
    happens only on the printed steps."""

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 30.0) -> None:
        super().__init__()
        self.every_n_steps, self.every_seconds = max(1, int(every_n_steps)), float(every_seconds)
        self.enabled = True
        self._start: tuple[float, int] | None = None  # (time, step) after the first step
        self._last: tuple[float, int] = (0.0, 0)  # (time, images) at the last printed line
        self._images = 0
        self._printed_step = -1
        self._fit_start = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def total_steps(self, trainer: pl.Trainer) -> float:
        total = trainer.estimated_stepping_batches
        return float(total) if total is not None else math.inf

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._start, self._last, self._images = None, (self._fit_start, 0), 0
        if self.enabled and trainer.is_global_zero:
            total = self.total_steps(trainer)
            first = trainer.global_step
            where = f" from step {first}" if first else ""
            steps = "?" if math.isinf(total) else int(total)
            self.print(
                f"training {steps} steps{where}; a line every {self.every_n_steps} steps or "
                f"{format_duration(self.every_seconds)}",
                flush=True,
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._images += batch_images(batch) * trainer.world_size
        step = trainer.global_step
        if self._start is None:
            self._start = (now, step)
        if not self.enabled or not trainer.is_global_zero or step == self._printed_step:
            return
        total = self.total_steps(trainer)
        due = step % self.every_n_steps == 0 or now - self._last[0] >= self.every_seconds or step >= total
        if due:
            self.print(self.line(trainer, step, total, now), flush=True)

    def line(self, trainer: pl.Trainer, step: int, total: float, now: float) -> str:
        self._printed_step = step
        parts = [f"step {step}/{'?' if math.isinf(total) else int(total)}"]
        loss = trainer.progress_bar_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        last_time, last_images = self._last
        if now > last_time and self._images > last_images:
            parts.append(f"{(self._images - last_images) / (now - last_time):.0f} img/s")
        self._last = (now, self._images)
        start_time, start_step = self._start or (now, step)
        if step > start_step:
            eta = (total - step) * (now - start_time) / (step - start_step)
            parts.append(f"eta {format_duration(eta)}")
        return "  ".join(parts)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero:
            elapsed = time.perf_counter() - self._fit_start
            self.print(f"trained to step {trainer.global_step} in {format_duration(elapsed)}", flush=True)
