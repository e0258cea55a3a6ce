"""What the evaluation callbacks share: when to evaluate (``PeriodicCallback``), the once-per-evaluation
features, the results of the run (``EvalResults``), and logging."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from sslab.evaluation.features import extract
from sslab.modules.distributed import is_distributed

log = logging.getLogger(__name__)


def should_evaluate(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    return every_n_epochs > 0 and (trainer.current_epoch + 1) % every_n_epochs == 0


@dataclass
class EvalResults:
    """What one run's evaluation callbacks share: the latest value of every metric (what the run reports at
    its end), the bank and test features of the last evaluated step (extracted once, read by k-NN and the
    probe alike), and whether the reason evaluation is off has been said. One per Trainer (``results_of``),
    so the method being evaluated carries none of it."""

    metrics: dict[str, float] = field(default_factory=dict)
    features: dict[str, Any] | None = None
    off_said: bool = False


_RESULTS: WeakKeyDictionary[pl.Trainer, EvalResults] = WeakKeyDictionary()


def results_of(trainer: pl.Trainer) -> EvalResults:
    """The ``EvalResults`` of the run ``trainer`` fits (made on first use, gone with the Trainer)."""
    return _RESULTS.setdefault(trainer, EvalResults())


class PeriodicCallback(pl.Callback):
    """A callback that ``evaluate``s every ``every_n_epochs`` epochs and once more at the end of training,
    at most once per global step: the last epoch's end and the end of training are usually the same step,
    and evaluating twice there would only cost time (and log the same point twice)."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs
        self.last_step = -1

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    def evaluate_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last_step != trainer.global_step:
            self.last_step = trainer.global_step
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.evaluate_once(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate_once(trainer, pl_module)


class FeatureEvaluation(PeriodicCallback):
    """A periodic evaluation of the bank and test features (k-NN, linear probe): off, said once at the start
    of the run, under ``skip`` (``trainer=debug``) or when the data has no labelled evaluation splits."""

    def __init__(self, every_n_epochs: int = 1, skip: bool = False) -> None:
        super().__init__(every_n_epochs)
        self.skip = skip

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        evaluation_off(trainer, pl_module, self.skip)  # says once, at the start, why evaluation will not run

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not evaluation_off(trainer, pl_module, self.skip):
            self.score(trainer, pl_module, eval_features(trainer, pl_module))

    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, f: dict[str, torch.Tensor]) -> None:
        """Evaluate this step's features ``f`` (``eval_features``) and ``log_eval`` the result."""
        raise NotImplementedError


SKIPPED = "k-NN and linear probe are off: trainer=debug skips evaluation (skip_evaluation=true)"


def evaluation_off(trainer: pl.Trainer, pl_module: pl.LightningModule, skip: bool = False) -> bool:
    """True when evaluation is skipped (``skip``: ``trainer=debug``) or the DataModule has no labelled
    evaluation splits (an unlabelled folder without ``data.eval_path``). The first caller of a run says why
    in one line (rank 0), for every evaluation callback at once, so such a run trains instead of failing or
    spending minutes at its first evaluation."""
    reason = SKIPPED if skip else getattr(trainer.datamodule, "eval_off_reason", None)
    if not reason:
        return False
    results = results_of(trainer)
    if not results.off_said:
        results.off_said = True
        if trainer.is_global_zero:
            log.warning(reason)
    return True


def cached_features(trainer: pl.Trainer) -> dict[str, torch.Tensor] | None:
    """This step's bank and test features if an evaluation callback already extracted them, else None."""
    cache = results_of(trainer).features
    return cache if cache is not None and cache["step"] == trainer.global_step else None


def eval_features(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Bank and test features, extracted once per global step and shared by every evaluation callback."""
    cache = cached_features(trainer)
    if cache is not None:
        return cache
    bank_loader, test_loader = trainer.datamodule.eval_dataloaders()
    bank, bank_labels = extract_sharded(pl_module.embed_uint8, bank_loader)
    test, test_labels = extract_sharded(pl_module.embed_uint8, test_loader)
    cache = {
        "step": trainer.global_step,
        "bank": bank,
        "bank_labels": bank_labels,
        "test": test,
        "test_labels": test_labels,
    }
    results_of(trainer).features = cache
    return cache


def extract_sharded(embed, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract`` split over ranks: rank r embeds the r-th contiguous block of the split, then every rank
    gets the whole split in order (all-gather), so W ranks do 1/W of the work each and never disagree."""
    if not is_distributed():
        return extract(embed, loader)
    rank, world, n = dist.get_rank(), dist.get_world_size(), len(loader.dataset)
    bounds = [r * n // world for r in range(world + 1)]
    part = Subset(loader.dataset, range(bounds[rank], bounds[rank + 1]))
    feats, labels = extract(
        embed, DataLoader(part, batch_size=loader.batch_size, num_workers=loader.num_workers)
    )
    sizes = [bounds[r + 1] - bounds[r] for r in range(world)]
    return _all_gather_rows(feats, sizes), _all_gather_rows(labels, sizes)


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate rank r's first ``sizes[r]`` rows; rows are padded to the largest size for the collective."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    padded = x.new_zeros((max(sizes), *x.shape[1:]), device=device)
    padded[: len(x)] = x.to(padded.device)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:k] for o, k in zip(out, sizes, strict=True)]).cpu()


def log_eval(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send metrics to every logger (works in any hook, unlike ``self.log``) and keep the latest values
    (``results_of(trainer).metrics``)."""
    results_of(trainer).metrics.update(metrics)
    for name, value in metrics.items():
        trainer.callback_metrics[name] = torch.tensor(value)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=trainer.global_step)
