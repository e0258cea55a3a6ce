"""Preemption: on SIGUSR1, SIGUSR2 or SIGTERM, finish the current step, write ``last.ckpt`` atomically and, in a
SLURM job, requeue it; the requeued job resumes from that checkpoint exactly.

Why not Lightning's ``SLURMEnvironment(auto_requeue=True)``: its handler saves from inside the signal handler,
wherever the step happens to be (between the student's update and the teacher's, for instance), and only for
SIGUSR1. Here the handler only records the signal; the save happens at the end of a training step, where
the checkpoint is the same one the periodic ``ModelCheckpoint`` writes and resumes exactly. SLURM sends
``--signal=USR1@T`` (or submitit's USR2) T seconds before the time limit, and SIGTERM on preemption.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from sslab import cluster
from sslab.errors import SSLabError

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class Preempted(SSLabError):
    """Training stopped at a step boundary after a preemption signal; ``requeued`` says whether SLURM will
    run the job again."""

    def __init__(self, message: str, requeued: bool) -> None:
        super().__init__(message)
        self.requeued = requeued


class Preemption(pl.Callback):
    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}  # handlers to restore while ours are installed
        self._originals: dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:  # async-signal context: only set a flag
        if self._previous:
            self.signum = signum
            return
        # Lightning re-installs the handlers it found (ours) after an exception: hand the signal to the
        # handler that was there before us, as if we had never been installed
        original = self._originals.get(signum, signal.SIG_DFL)
        if callable(original):
            original(signum, frame)
        elif original != signal.SIG_IGN:
            signal.signal(signum, original)
            os.kill(os.getpid(), signum)

    def _install(self) -> None:
        for s in SIGNALS:
            previous = signal.signal(s, self._record)
            if previous != self._record:
                self._previous.setdefault(
                    s, previous
                )  # what to put back at the end: the handlers before ours
        self._originals.update(self._previous)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def uninstall(self) -> None:
        """Put back the handlers found before the first install (Lightning re-installs ours after an
        exception in ``fit``)."""
        self._previous = {}
        for s, handler in self._originals.items():
            signal.signal(s, handler)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # early, so a signal during start-up is kept (SIGUSR1's default action would kill the process)
        self.signum = None
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()  # again, over the handlers Lightning registered in between

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _any_rank_signalled(self, trainer: pl.Trainer) -> bool:
        """All ranks stop at the same step: a signal seen by any rank counts for all (one small all-reduce)."""
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.signum is not None  # no tensor, no device sync
        flag = torch.tensor([0 if self.signum is None else 1], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # like Lightning's own per-step SIGTERM broadcast
        return bool(flag.item())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._any_rank_signalled(trainer):
            return
        name = signal.Signals(self.signum).name if self.signum else "a signal on another rank"
        trainer.save_checkpoint(self.checkpoint_path)  # every rank takes part; rank 0 writes, atomically
        requeued, what = cluster.requeue() if trainer.is_global_zero else (False, "")
        requeued = bool(trainer.strategy.broadcast(requeued, src=0))
        run_dir = self.checkpoint_path.parent.parent
        if requeued:
            then = f"{what or 'requeued by rank 0'}; it resumes from there"
        else:
            then = f"{what or 'not requeued'}; continue with resume={run_dir}"
        message = f"{name} at step {trainer.global_step}: wrote {self.checkpoint_path}; {then}"
        log.warning(message)
        raise Preempted(message, requeued)
