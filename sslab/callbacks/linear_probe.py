"""Online linear probe: a classifier trained beside the SSL objective on detached features, with its own
optimizer (as in solo-learn); it never sends gradients into the encoder."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from sslab.callbacks.common import eval_features, log_eval, should_evaluate


class OnlineLinearProbe(pl.Callback):
    """BatchNorm (no affine) + Linear on the features each training step returns; ``eval/linear_top1`` is
    its accuracy on the test split, at the same times as k-NN."""

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, every_n_epochs: int = 1) -> None:
        self.lr, self.weight_decay, self.every_n_epochs = lr, weight_decay, every_n_epochs
        self.probe: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self.last_step = -1

    def _build(self, dim: int, num_classes: int, device: torch.device) -> None:
        self.probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes)).to(device)
        self.optimizer = torch.optim.AdamW(
            self.probe.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        if self._pending_state is not None:
            self.probe.load_state_dict(self._pending_state["probe"])
            self.optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        feats, labels = outputs["features"].float(), batch["label"]
        known = labels >= 0
        if not known.any():
            return
        if self.probe is None:
            self._build(feats.shape[1], len(trainer.datamodule.class_names), feats.device)
        with torch.enable_grad():
            loss = F.cross_entropy(self.probe(feats[known]), labels[known])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        pl_module.log("train/probe_loss", loss.detach())

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None or self.last_step == trainer.global_step:
            return
        self.last_step = trainer.global_step
        f = eval_features(trainer, pl_module)
        self.probe.eval()
        with torch.no_grad():
            pred = self.probe(f["test"].to(pl_module.device)).argmax(1).cpu()
        self.probe.train()
        log_eval(
            trainer, pl_module, {"eval/linear_top1": 100.0 * (pred == f["test_labels"]).float().mean().item()}
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.probe is None:
            return {}
        return {"probe": self.probe.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict or None
