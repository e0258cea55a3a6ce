"""Class-folder image trees (``root/<class>/<image>``), decoded once to a fixed load size."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sslab.data.base import SSLDataModule
from sslab.errors import SSLabError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def scan_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files with image extensions under each class sub-folder, sorted, with integer labels."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SSLabError(f"no class folders under {root}; expected {root}/<class_name>/<image files>")
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append(f)
                labels.append(label)
    if not files:
        raise SSLabError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files, np.asarray(labels, dtype=np.int64), classes


def readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """Decode, resize the shorter side to ``size`` and centre-crop to ``size`` x ``size``; uint8 (C, H, W)."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ImageFolderDataset(Dataset):
    def __init__(self, files: list[Path], labels: np.ndarray, size: int, channels: int) -> None:
        self.files, self.labels, self.size, self.channels = files, labels, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": load_image(self.files[i], self.size, self.channels),
            "label": torch.tensor(int(self.labels[i])),
            "index": torch.tensor(i),
        }


class ImageFolderDataModule(SSLDataModule):
    """``path/train`` and ``path/val`` when both exist, else a stratified ``val_fraction`` split of ``path``.

    Unreadable or corrupt files are found once at set-up (PIL verify), skipped and counted in the log.
    """

    def __init__(self, path: str, val_fraction: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = Path(path).expanduser()
        self.val_fraction = val_fraction
        self.skipped: list[Path] = []

    def _scan(self, root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
        files, labels, classes = scan_folder(root)
        ok = np.array([readable(f) for f in files], dtype=bool)
        self.skipped += [f for f, good in zip(files, ok, strict=True) if not good]
        return [f for f, good in zip(files, ok, strict=True) if good], labels[ok], classes

    def load_splits(self):
        if not self.path.is_dir():
            raise SSLabError(
                f"data.path {self.path} is not a directory; point data.path at an image-folder tree"
            )
        train_dir, val_dir = self.path / "train", self.path / "val"
        if train_dir.is_dir() and val_dir.is_dir():
            train_files, train_labels, classes = self._scan(train_dir)
            test_files, test_labels, _ = self._scan(val_dir)
        else:
            files, labels, classes = self._scan(self.path)
            rng = np.random.default_rng(self.seed)
            is_test = np.zeros(len(files), dtype=bool)
            for c in np.unique(labels):
                idx = rng.permutation(np.flatnonzero(labels == c))
                is_test[idx[: round(len(idx) * self.val_fraction)]] = True
            train_files = [f for f, t in zip(files, is_test, strict=True) if not t]
            test_files = [f for f, t in zip(files, is_test, strict=True) if t]
            train_labels, test_labels = labels[~is_test], labels[is_test]
        if self.skipped:
            log.warning(
                "imagefolder: skipped %d unreadable file(s), e.g. %s", len(self.skipped), self.skipped[0]
            )
        if not train_files:
            raise SSLabError(f"no readable training images under {self.path}")
        self.class_names = classes
        make = lambda fs, ls: ImageFolderDataset(fs, ls, self.image_size, self.channels)  # noqa: E731
        return make(train_files, train_labels), train_labels, make(test_files, test_labels), test_labels
