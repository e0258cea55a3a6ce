"""Datasets yield dicts of uint8 tensors of one fixed size; augmentation happens later, on the device."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """In-memory uint8 images (N, H, W) or (N, C, H, W) with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim == 3:
            images = images[:, None]
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


class CaptionedArrayDataset(ArrayDataset):
    """``ArrayDataset`` plus "text": token rows looked up from a precomputed (classes, variants, L) table by
    (label, index mod variants), so ``__getitem__`` stays a tensor index (templated captions)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, text_table: torch.Tensor) -> None:
        super().__init__(images, labels)
        self.text_table = text_table

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        item["text"] = self.text_table[item["label"], i % self.text_table.shape[1]]
        return item
