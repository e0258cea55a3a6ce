"""Training throughput in images per second (wall time between consecutive steps, data loading included)."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class Throughput(pl.Callback):
    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._times = [*self._times[-self.window :], time.perf_counter()]
        if len(self._times) >= 2:
            steps = len(self._times) - 1
            ips = steps * batch["image"].shape[0] * trainer.world_size / (self._times[-1] - self._times[0])
            pl_module.log("train/images_per_sec", ips, prog_bar=True)
