"""Periodic k-NN evaluation (cosine, weighted vote) on the DataModule's bank and test splits."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl

from sslab.callbacks.common import eval_features, log_eval, should_evaluate
from sslab.evaluation.knn import knn_accuracy


class KNNEval(pl.Callback):
    """Logs ``eval/knn_top1`` (k=``k``) and ``eval/knn_top1_k{k'}`` for each ``extra_k``, every
    ``every_n_epochs`` epochs and once more at the end of the run."""

    def __init__(
        self, k: int = 20, temperature: float = 0.07, extra_k: Sequence[int] = (), every_n_epochs: int = 1
    ):
        self.k, self.temperature, self.extra_k, self.every_n_epochs = (
            k,
            temperature,
            list(extra_k),
            every_n_epochs,
        )
        self.last_step = -1

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last_step == trainer.global_step:
            return
        self.last_step = trainer.global_step
        f = eval_features(trainer, pl_module)
        metrics = {}
        for k in [self.k, *self.extra_k]:
            acc = knn_accuracy(f["bank"], f["bank_labels"], f["test"], f["test_labels"], k, self.temperature)
            metrics["eval/knn_top1" if k == self.k else f"eval/knn_top1_k{k}"] = acc
        log_eval(trainer, pl_module, metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate(trainer, pl_module)
