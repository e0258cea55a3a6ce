"""Online linear probe: a classifier trained beside the SSL objective on detached features, with its own
optimizer (as in solo-learn); it never sends gradients into the encoder."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from sslab.callbacks.common import FeatureEvaluation, log_eval
from sslab.evaluation.linear import train_linear_probe


class OnlineLinearProbe(FeatureEvaluation):
    """BatchNorm (no affine) + Linear on the features each training step returns; ``eval/linear_top1`` is
    its accuracy on the test split, at the same times as k-NN.

    When the training batches carry no labels but the evaluation splits do (``data.eval_path``), there is
    nothing to train online: the probe is then fitted at each evaluation on the bank features (``bank_epochs``
    epochs, as ``eval.py eval=linear``) and scored on the test split. Without labels anywhere it is off."""

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        every_n_epochs: int = 1,
        bank_epochs: int = 100,
        skip: bool = False,
    ) -> None:
        super().__init__(every_n_epochs, skip)  # skip: trainer=debug, off, said in one line
        self.lr, self.weight_decay, self.bank_epochs = lr, weight_decay, bank_epochs
        self.probe: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None

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
        if self.skip or not known.any():
            return
        if self.probe is None:
            self._build(feats.shape[1], len(trainer.datamodule.class_names), feats.device)
        with torch.enable_grad():
            loss = F.cross_entropy(self.probe(feats[known]), labels[known])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        pl_module.log("train/probe_loss", loss.detach())

    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, f: dict[str, torch.Tensor]) -> None:
        if self.probe is None:  # no labelled training batch (data.eval_path): fit on the labelled bank
            probe = train_linear_probe(
                f["bank"], f["bank_labels"], epochs=self.bank_epochs, lr=self.lr, seed=pl_module.seed
            )
            with torch.no_grad():
                pred = probe(f["test"].float()).argmax(1)
        else:
            self.probe.eval()
            with torch.no_grad():
                pred = self.probe(f["test"].to(pl_module.device)).argmax(1).cpu()
            self.probe.train()
        log_eval(trainer, {"eval/linear_top1": 100.0 * (pred == f["test_labels"]).float().mean().item()})

    def state_dict(self) -> dict[str, Any]:
        if self.probe is None:
            return {}
        return {"probe": self.probe.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict or None
