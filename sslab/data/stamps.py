"""The ``stamps`` DataModule: tuxpaint cut-outs on real backgrounds, with masks (COCO JSON) and captions.

The dataset is built once by ``sslab.dataset_builders.stamps`` into ``root/<spec dirname>`` (or read from ``root``
itself when it already holds a build) and loaded into memory as uint8 arrays. Labels are the top-level
tuxpaint category of each image's largest visible object; "text" is the image caption, tokenized.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslab.data.base import SSLDataModule
from sslab.data.datasets import ArrayDataset
from sslab.data.text import tokenize
from sslab.dataset_builders.stamps import GNOME_DIR, STAMPS_DIR, BuildSpec, build, list_stamps
from sslab.errors import SSLabError

log = logging.getLogger(__name__)


class StampsDataset(ArrayDataset):
    """``ArrayDataset`` plus "text": one token row (L,) per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, text: torch.Tensor) -> None:
        super().__init__(images, labels)
        self.text = text

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        item["text"] = self.text[i]
        return item


def image_labels(coco: dict) -> np.ndarray:
    """0-based category index (in ``categories`` order) of each image's largest-area annotation; the first
    annotation wins ties, as in the builder."""
    index = {c["id"]: k for k, c in enumerate(coco["categories"])}
    best: dict[int, tuple[int, int]] = {}
    for a in coco["annotations"]:
        if a["image_id"] not in best or a["area"] > best[a["image_id"]][0]:
            best[a["image_id"]] = (a["area"], index[a["category_id"]])
    missing = [im["file_name"] for im in coco["images"] if im["id"] not in best]
    if missing:
        raise SSLabError(
            f"stamps image {missing[0]} has no annotation; delete the dataset directory to rebuild"
        )
    return np.array([best[im["id"]][1] for im in coco["images"]], dtype=np.int64)


def read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(uint8 images (N, 3, S, S), labels (N,), captions, class names) of one split."""
    coco = json.loads((root / f"{split}.json").read_text())
    images = np.stack(
        [np.asarray(Image.open(root / im["file_name"]).convert("RGB")) for im in coco["images"]]
    )
    captions = [im["caption"] for im in coco["images"]]
    names = [c["name"] for c in coco["categories"]]
    return images.transpose(0, 3, 1, 2), image_labels(coco), captions, names


class StampsDataModule(SSLDataModule):
    """Batches: "image" uint8 (3, S, S), "label" int64, "index", "text" int64 (context_length,).

    ``root`` is the cache base; the build lives in ``root/<image size, counts, seed, spec hash>`` so different
    builds never collide (``self.root`` is that directory). A ``root`` that already holds a ``meta.json`` is
    used as it is (e.g. one written by ``python -m sslab.dataset_builders.stamps --out DIR``)."""

    provides = ("image", "label", "index", "text")

    def __init__(
        self,
        root: str,
        build_seed: int = 0,
        num_train: int = 2000,
        num_test: int = 500,
        gnome: bool = True,
        stamps_dir: str | None = None,
        gnome_dir: str | None = None,
        context_length: int = 32,
        progress: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = BuildSpec(
            image_size=self.image_size, num_train=num_train, num_test=num_test, seed=build_seed, gnome=gnome
        )
        base = Path(root).expanduser()
        self.root = base if (base / "meta.json").is_file() else base / self.spec.dirname()
        self.stamps_dir = Path(stamps_dir) if stamps_dir else STAMPS_DIR
        self.gnome_dir = Path(gnome_dir) if gnome_dir else GNOME_DIR
        self.context_length = context_length
        self.progress = progress
        self.class_names = self._categories()

    def _categories(self) -> list[str]:
        """Category names before set-up (from the build, else from the stamps; empty if neither exists)."""
        meta = self.root / "meta.json"
        if meta.is_file():
            return list(json.loads(meta.read_text())["categories"])
        if self.stamps_dir.is_dir():
            return sorted({s.category for s in list_stamps(self.stamps_dir)})
        return []

    def prepare_data(self) -> None:
        """Build the dataset if ``self.root`` does not hold one yet (a one-off: ~20-30 s at the defaults)."""
        if (self.root / "meta.json").is_file():
            return
        if self.root.exists() and not self.root.is_dir():
            raise SSLabError(f"data.root {self.root} is not a directory; point data.root at a directory")
        log.info("building the stamps dataset into %s (once)", self.root)
        build(self.root, self.spec, self.stamps_dir, self.gnome_dir, progress=self.progress)

    def coco_json(self, split: str) -> Path:
        """Path of the split's COCO instances JSON (the dataset is built first if needed)."""
        if split not in ("train", "test"):
            raise SSLabError(f"stamps has splits 'train' and 'test'; got {split!r}")
        self.prepare_data()
        return self.root / f"{split}.json"

    def _check_build(self) -> None:
        meta = json.loads((self.root / "meta.json").read_text())
        size = meta["spec"]["image_size"]
        if size != self.image_size:
            raise SSLabError(
                f"{self.root} holds stamps built at image_size {size}, but data.image_size={self.image_size}; "
                f"set data.image_size={size} or point data.root at the cache base to build a matching copy"
            )

    def load_splits(self):
        self.prepare_data()
        self._check_build()
        xtr, ytr, ctr, names = read_split(self.root, "train")
        xte, yte, cte, _ = read_split(self.root, "test")
        self.class_names = names
        train = StampsDataset(xtr, ytr, tokenize(ctr, self.context_length))
        test = StampsDataset(xte, yte, tokenize(cte, self.context_length))
        return train, ytr, test, yte
