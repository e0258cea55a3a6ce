"""Training order as a pure function of (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch from ``seed + epoch``, sharded over ranks; can start part-way into one epoch.

    Lightning calls ``set_epoch`` before each epoch. ``resume_at(epoch, batches_done)`` makes the next
    iteration of that epoch skip the samples a checkpointed run had already trained on.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self._resume = (epoch, batches_done)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        """With ``world_size`` ranks, global batch g is ``order[g*B*W : (g+1)*B*W]`` and rank r trains on its
        r-th block of B, so W ranks at batch B see exactly the samples one process sees at batch W*B."""
        order = self.permutation(self.epoch)
        global_batch = self.batch_size * self.world_size
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1] * global_batch
            self._resume = None
        rest = order[start:]
        rest = rest[: len(rest) // global_batch * global_batch]  # whole global batches only (drop_last)
        mine = rest.view(-1, self.world_size, self.batch_size)[:, self.rank]
        return iter(mine.flatten().tolist())

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size) * self.batch_size


class ResumableDataModule(pl.LightningDataModule):
    """A DataModule whose training order resumes mid-epoch: a checkpoint records the epoch and the batches done
    (``state_dict``), and the next sampler made through ``resuming`` skips exactly those batches."""

    def __init__(self) -> None:
        super().__init__()
        self._resume: tuple[int, int] | None = None

    def resuming(self, sampler: EpochShuffleSampler) -> EpochShuffleSampler:
        """``sampler``, told where a resumed run's first epoch starts."""
        if self._resume is not None:
            sampler.resume_at(*self._resume)
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """Where in the epoch a checkpoint was taken, so a resumed run skips the batches already trained on."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._resume = (state["epoch"], state["batches_done"])
