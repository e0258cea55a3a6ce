"""What the evaluation callbacks share: when to evaluate, the once-per-evaluation features, and logging."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from sslab.evaluation.features import extract


def should_evaluate(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    return every_n_epochs > 0 and (trainer.current_epoch + 1) % every_n_epochs == 0


def eval_features(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Bank and test features, extracted once per global step and shared by every evaluation callback."""
    cache = getattr(pl_module, "_sslab_eval_cache", None)
    if cache is not None and cache["step"] == trainer.global_step:
        return cache
    bank_loader, test_loader = trainer.datamodule.eval_dataloaders()
    bank, bank_labels = extract(pl_module.embed_uint8, bank_loader)
    test, test_labels = extract(pl_module.embed_uint8, test_loader)
    cache = {
        "step": trainer.global_step,
        "bank": bank,
        "bank_labels": bank_labels,
        "test": test,
        "test_labels": test_labels,
    }
    pl_module._sslab_eval_cache = cache
    return cache


def log_eval(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
    """Send metrics to every logger (works in any hook, unlike ``self.log``) and keep the latest values."""
    results = getattr(pl_module, "eval_results", None)
    if results is None:
        results = pl_module.eval_results = {}
    results.update(metrics)
    for name, value in metrics.items():
        trainer.callback_metrics[name] = torch.tensor(value)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=trainer.global_step)
