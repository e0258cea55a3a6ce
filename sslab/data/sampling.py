"""Training order as a pure function of (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch from ``seed + epoch``; can start part-way into one epoch.

    Lightning calls ``set_epoch`` before each epoch. ``resume_at(epoch, batches_done)`` makes the next
    iteration of that epoch skip the samples a checkpointed run had already trained on.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
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
        order = self.permutation(self.epoch)
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1] * self.batch_size
            self._resume = None
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples
