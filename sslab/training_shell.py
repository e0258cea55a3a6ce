"""The training shell that pretraining (``sslab.runs.training``) and CutLER's detector share.

Resuming bit for bit needs the same few pieces in every training loop, so they live here once: the random
draws of a step seeded by (seed, step, rank), a non-finite loss stopping the run before it is applied, and a
Trainer whose checkpoints are atomic, periodic and of finite weights only, ``last.ckpt`` among them. The
training order that resumes mid-epoch is the data floor's (``sslab.data.sampling``); writing the final step
into ``last.ckpt`` is ``sslab.checkpoint_io.save_final_checkpoint``.

It sits below the runners and imports no method, callback or runner, so any training loop can use it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from sslab.checkpoint_io import AtomicCheckpointIO, FiniteCheckpoint
from sslab.errors import SSLabError
from sslab.resume import LAST

# Lightning's "dataloader is not resumable" on a mid-epoch resume: our DataModules record where in the epoch a
# checkpoint was taken and their samplers skip those batches (tests/test_resume.py checks it bit for bit).
for _message in (
    r".*ended before the epoch ended and your dataloader is not resumable.*",
    r".*isinstance\(treespec, LeafSpec\).*",
):
    warnings.filterwarnings("ignore", message=_message)


class NonFiniteLossError(SSLabError):
    """A training step's loss is NaN or inf; the step was not applied."""


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of every random draw of training step ``step`` on ``rank``: a resumed run draws what a run
    that never stopped would."""
    return (seed * 1_000_003 + step * 1009 + rank) % (2**63 - 1)


def check_finite_loss(loss: torch.Tensor, step: int, advice: str, what: str = "loss") -> None:
    """Stop the run before a NaN or inf loss is applied, in one line that says what to change."""
    if not torch.isfinite(loss.detach()).item():
        raise NonFiniteLossError(f"{what} is {loss.item()} at step {step}; {advice}")


def last_checkpoint(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints/last.ckpt``: where a run resumes from and what later stages read."""
    return Path(run_dir) / "checkpoints" / LAST


def make_trainer(
    run_dir: Path,
    every_n_steps: int | None,
    save_top_k: int,
    callbacks: list[pl.Callback],
    plugins: list[Any] | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A Trainer writing into ``run_dir``: ``callbacks``, then periodic checkpoints ``checkpoints/stepNNNNNN``
    (every ``every_n_steps`` steps, else every epoch; ``save_top_k`` kept) and ``last.ckpt``, all written
    atomically and only of finite weights. ``trainer_kwargs`` go to ``pl.Trainer``; the DataModules shard the
    data per rank themselves, so Lightning's distributed sampler is off unless asked for."""
    checkpoints = FiniteCheckpoint(
        dirpath=Path(run_dir) / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        save_last=True,
        every_n_train_steps=every_n_steps,
        save_top_k=save_top_k,
        save_on_train_epoch_end=True,
    )
    trainer_kwargs.setdefault("use_distributed_sampler", False)
    return pl.Trainer(
        **trainer_kwargs,
        callbacks=[*callbacks, checkpoints],
        plugins=[AtomicCheckpointIO(), *(plugins or [])],
        default_root_dir=str(run_dir),
    )
