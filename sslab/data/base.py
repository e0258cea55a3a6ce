"""Shared DataModule behaviour: a resumable training order and class-balanced evaluation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sslab.data.sampling import EpochShuffleSampler, ResumableDataModule
from sslab.errors import SSLabError


def balanced_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Indices of a class-balanced random subset of ``size`` items (all items when ``size`` is None or too big)."""
    n = len(labels)
    if size is None or size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = size // len(classes)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(picks))


class SSLDataModule(ResumableDataModule):
    """Base for every dataset: subclasses fill ``train_set``, ``bank_set`` (k-NN bank / probe training) and
    ``test_set`` in ``setup``, each yielding {"image": uint8 (C,H,W), "label": int64, "index": int64}."""

    provides: tuple[str, ...] = ("image", "label", "index")

    def __init__(
        self,
        name: str,
        image_size: int,
        local_crop_size: int,
        patch_size: int,
        channels: int,
        mean: list[float],
        std: list[float],
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        eval_bank_size: int | None = None,
        eval_test_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.name = name
        self.image_size = image_size
        self.local_crop_size = local_crop_size
        self.patch_size = patch_size
        self.channels = channels
        self.mean = list(mean)
        self.std = list(std)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.eval_bank_size = eval_bank_size
        self.eval_test_size = eval_test_size
        self.seed = seed
        self.train_set: Dataset | None = None
        self.bank_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.class_names: list[str] = []
        self._sampler: EpochShuffleSampler | None = None
        # Why k-NN / linear-probe evaluation cannot run (e.g. an unlabelled folder without data.eval_path);
        # None when the bank and test splits carry labels. Evaluation callbacks switch off with this line.
        self.eval_off_reason: str | None = None

    # -- subclasses ---------------------------------------------------------------------------------
    def load_splits(self) -> tuple[Dataset, np.ndarray, Dataset, np.ndarray]:
        """Return (train dataset, train labels, test dataset, test labels)."""
        raise NotImplementedError

    def load_bank(self) -> tuple[Dataset, np.ndarray] | None:
        """(dataset, labels) the k-NN bank and probe training split are drawn from when that is not the training
        set (``data.eval_path``: the user's labelled subset); None draws them from the training set."""
        return None

    # -- Lightning ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            train, train_labels, test, test_labels = self.load_splits()
            self.train_set = train
            bank, bank_labels = self.load_bank() or (train, train_labels)
            self.bank_set = Subset(
                bank, balanced_subset(bank_labels, self.eval_bank_size, self.seed).tolist()
            )
            self.test_set = Subset(
                test, balanced_subset(test_labels, self.eval_test_size, self.seed + 1).tolist()
            )
        if stage == "fit":  # Lightning's setup before training (build_method's early setup has no stage)
            self.check_one_batch()

    def check_one_batch(self) -> None:
        """Refuse a training set smaller than one global batch: with drop_last it would train 0 steps and the
        run would report an untrained model as trained."""
        world = self.trainer.world_size if getattr(self, "trainer", None) is not None else 1
        n = len(self.train_set)
        if n < self.batch_size * world:
            devices = f" x {world} devices" if world > 1 else ""
            raise SSLabError(
                f"data={self.name} has {n} training images, fewer than one batch "
                f"(data.batch_size={self.batch_size}{devices}); lower data.batch_size or add images"
            )

    def run_dir(self) -> Path | None:
        """The run directory once a Trainer is attached (``train.py`` makes it the ``default_root_dir``)."""
        trainer = getattr(self, "trainer", None)
        return Path(trainer.default_root_dir) if trainer is not None else None

    def global_rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        self.setup()
        # each rank takes its own share (train.py sets use_distributed_sampler=False)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self._sampler = self.resuming(self.make_sampler(rank, world))
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self._sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def make_sampler(self, rank: int, world: int) -> EpochShuffleSampler:
        """The training order: a pure function of (seed, epoch, rank), so that ``resume_at`` is exact."""
        return EpochShuffleSampler(len(self.train_set), self.batch_size, self.seed, rank, world)

    def eval_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        """(bank, test) loaders in a fixed order, for k-NN and linear-probe evaluation; refused in one line when
        the splits have no labels (``eval_off_reason``)."""
        self.setup()
        if self.eval_off_reason:
            raise SSLabError(self.eval_off_reason)
        kw = dict(batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)
        return DataLoader(self.bank_set, **kw), DataLoader(self.test_set, **kw)
