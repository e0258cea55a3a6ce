"""``data=streaming``: litdata shards (Lightning's streaming format) on a local disk or an object store.

``python -m sslab.dataset_builders.streaming_shards src=DIR out=SHARDS`` writes them: each sample is the
image exactly as ``data=imagefolder`` yields it (decoded, letterboxed to ``load_size``, uint8 with its alpha
validity channel), its label (-1 when unlabelled) and its source path; ``SHARDS/train`` (and ``SHARDS/val``
for class folders), ``SHARDS/sslab.json`` (load size, channels, class names) and the labels as ``.npy``.

Why litdata, and why read it this way:

- litdata installs cleanly beside our pinned torch / Lightning (it adds obstore only) and reads ``s3://``,
  ``gs://`` and ``azure://`` paths through the same ``StreamingDataset``, caching chunks locally
  (``cache_dir``); webdataset would need its own resume and sharding logic all the same.
- litdata's own shuffling and resume state live in its ``StreamingDataLoader``. Our runs instead resume from
  the DataModule's ``(epoch, batches_done)`` like every other dataset (``tests/test_resume.py``), so the
  order here is a pure function of (seed, epoch, rank): ``ChunkShuffleSampler`` permutes whole chunks, gives
  each rank a contiguous 1/W of that chunk order (a rank reads about 1/W of the chunks, the point of
  sharding at scale) and shuffles samples within windows of ``shuffle_window`` samples, so that a batch mixes
  several chunks while reads stay chunk-local. Samples are read by index (``StreamingDataset[i]``).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sslab.data.base import SSLDataModule
from sslab.data.imagefolder import ImageFolderDataModule, ImageFolderDataset
from sslab.data.sampling import EpochShuffleSampler
from sslab.errors import SSLabError

log = logging.getLogger(__name__)
META = "sslab.json"
ENCODINGS = ("raw", "png")


def is_remote(path: str) -> bool:
    return "://" in path


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if is_remote(root) else str(Path(root, *parts))


def decode_sample(image: Any, encoding: str) -> torch.Tensor:
    """A stored image back to uint8 (C, H, W): ``raw`` is the array itself, ``png`` lossless PNG bytes."""
    if encoding == "png":
        with Image.open(io.BytesIO(image)) as im:
            arr = np.asarray(im)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return torch.from_numpy(np.array(image, dtype=np.uint8))  # a copy: litdata's arrays are read-only views


class ShardDataset(Dataset):
    """Map-style access to one litdata shard directory: {"image", "label", "index"} as the other datasets.
    The ``StreamingDataset`` is opened lazily in each process (DataLoader workers included) and never pickled."""

    def __init__(self, input_dir: str, encoding: str = "raw", cache_dir: str | None = None) -> None:
        self.input_dir, self.encoding, self.cache_dir = input_dir, encoding, cache_dir
        self._reader: Any = None
        self._pid = os.getpid()
        self.chunk_sizes = [end - start for start, end in self.reader().region_of_interest]

    def reader(self) -> Any:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own reader
            self._reader, self._pid = None, os.getpid()
        if self._reader is None:
            from litdata import StreamingDataset

            try:
                self._reader = StreamingDataset(self.input_dir, cache_dir=self.cache_dir)
            except Exception as e:  # litdata raises ValueError/FileNotFoundError/... for a missing index
                raise SSLabError(
                    f"cannot open litdata shards at {self.input_dir} ({type(e).__name__}: {e}); write them with "
                    "python -m sslab.dataset_builders.streaming_shards src=DIR out=SHARDS and pass data.path=SHARDS"
                ) from None
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return sum(self.chunk_sizes)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.reader()[int(i)]
        return {
            "image": decode_sample(item["image"], self.encoding),
            "label": torch.tensor(int(item["label"])),
            "index": torch.tensor(int(i)),
        }


class ChunkShuffleSampler(EpochShuffleSampler):
    """Per epoch: chunks in a random order, rank r takes the r-th contiguous 1/W of the samples in that order,
    shuffled within windows of ``window`` samples; every rank gets ``len(self)`` samples (whole batches).
    A pure function of (seed, epoch, rank, world), so ``resume_at`` skips exactly the batches trained on."""

    def __init__(
        self,
        chunk_sizes: list[int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        window: int = 4096,
    ) -> None:
        super().__init__(sum(chunk_sizes), batch_size, seed, rank, world_size)
        self.chunk_sizes, self.window = list(chunk_sizes), max(1, int(window))
        self.offsets = np.concatenate([[0], np.cumsum(self.chunk_sizes)]).astype(np.int64)

    def rank_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        chunks = torch.randperm(len(self.chunk_sizes), generator=g).tolist()
        order = torch.from_numpy(
            np.concatenate([np.arange(self.offsets[c], self.offsets[c + 1]) for c in chunks])
        )
        share = self.num_samples // self.world_size
        mine = order[self.rank * share : (self.rank + 1) * share].clone()
        g_rank = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank)
        for start in range(0, len(mine), self.window):
            block = mine[start : start + self.window]
            mine[start : start + self.window] = block[torch.randperm(len(block), generator=g_rank)]
        return mine[: len(self)]

    def __iter__(self) -> Iterator[int]:
        order = self.rank_order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] * self.batch_size :]
            self._resume = None
        return iter(order.tolist())


def read_meta(root: str) -> dict[str, Any]:
    """``sslab.json`` written by convert (local paths; an object store's run takes the data config as it is)."""
    path = Path(root) / META
    if is_remote(root) or not path.is_file():
        return {}
    return json.loads(path.read_text())


def read_labels(root: str, split: str, n: int) -> np.ndarray:
    path = Path(root) / f"labels_{split}.npy"
    if not is_remote(root) and path.is_file():
        labels = np.load(path)
        if len(labels) == n:
            return labels.astype(np.int64)
    return np.full(n, -1, dtype=np.int64)


class StreamingDataModule(SSLDataModule):
    """Trains on ``path/train`` shards; the k-NN bank is a class-balanced subset of them and the test split is
    ``path/val`` when the shards carry labels, or both come from ``eval_path`` (a class-folder tree, as for
    ``data=imagefolder``); without labels, k-NN and the linear probe are off, saying why in one line."""

    def __init__(
        self,
        path: str,
        eval_path: str | None = None,
        load_size: int | None = None,
        cache_dir: str | None = None,
        shuffle_window: int = 4096,
        val_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path = str(path) if is_remote(str(path)) else str(Path(path).expanduser())
        self.eval_path, self.cache_dir, self.shuffle_window = eval_path, cache_dir, shuffle_window
        self.val_fraction = val_fraction
        self.meta = read_meta(self.path)
        self.load_size = int(load_size or self.meta.get("load_size") or round(self.image_size * 10 / 7))
        self._bank: tuple[Dataset, np.ndarray] | None = None

    def _check_meta(self) -> None:
        """At setup, not in ``__init__``: Hydra's instantiate would wrap the one-line error in its traceback."""
        if not is_remote(self.path) and not (Path(self.path) / "train").is_dir():
            raise SSLabError(
                f"data.path={self.path} has no train/ shards; write them with "
                f"python -m sslab.dataset_builders.streaming_shards src=IMAGE_DIR out={self.path}"
            )
        for key, mine in (("load_size", self.load_size), ("channels", self.channels)):
            theirs = self.meta.get(key)
            if theirs is not None and int(theirs) != int(mine):
                raise SSLabError(
                    f"the shards at {self.path} hold images with {key}={theirs}, but data.{key}={mine}; "
                    f"set data.{key}={theirs} or convert again with {key}={mine}"
                )

    def load_splits(self):
        self._check_meta()
        encoding = self.meta.get("encoding", "raw")
        train = ShardDataset(join(self.path, "train"), encoding, self.cache_dir)
        train_labels = read_labels(self.path, "train", len(train))
        self.class_names = list(self.meta.get("classes") or [])
        test, test_labels = train, train_labels  # unlabelled: the pictures show training images
        if self.meta.get("splits", {}).get("val"):
            test = ShardDataset(join(self.path, "val"), encoding, self.cache_dir)
            test_labels = read_labels(self.path, "val", len(test))
        if self.eval_path:  # the user's labelled subset, decoded as data=imagefolder does
            folder = ImageFolderDataModule(
                path=self.eval_path,
                val_fraction=self.val_fraction,
                load_size=self.load_size,
                **{k: getattr(self, k) for k in ("name", "image_size", "local_crop_size", "patch_size")},
                channels=self.channels,
                mean=self.mean,
                std=self.std,
                seed=self.seed,
            )
            bank_files, bank_labels, test_files, test_labels, classes = folder._split(Path(self.eval_path))
            if not classes:
                raise SSLabError(
                    f"data.eval_path {self.eval_path} has no class folders; expected "
                    f"{self.eval_path}/<class_name>/<image files>"
                )
            self.class_names = classes
            self._bank = (
                ImageFolderDataset(bank_files, bank_labels, self.load_size, self.channels),
                bank_labels,
            )
            test = ImageFolderDataset(test_files, test_labels, self.load_size, self.channels)
        if not self.class_names or (test_labels < 0).all():
            self.class_names, self._bank = [], None
            self.eval_off_reason = (
                f"the shards at data.path={self.path} have no labels: k-NN and linear probe are off; set "
                "data.eval_path=DIR (DIR/<class>/<images>) for their numbers on a labelled subset"
            )
        return train, train_labels, test, test_labels

    def load_bank(self) -> tuple[Dataset, np.ndarray] | None:
        return self._bank

    def make_sampler(self, rank: int, world: int) -> EpochShuffleSampler:
        return ChunkShuffleSampler(
            self.train_set.chunk_sizes, self.batch_size, self.seed, rank, world, self.shuffle_window
        )
