import numpy as np
import pytest
import torch
from PIL import Image

from sslab.data import FashionMNISTDataModule, ImageFolderDataModule
from sslab.data.base import balanced_subset
from sslab.data.sampling import EpochShuffleSampler
from sslab.errors import SSLabError

COMMON = dict(
    image_size=16, local_crop_size=8, patch_size=4, channels=3, mean=[0.5] * 3, std=[0.25] * 3, batch_size=4
)


def test_embedded_fashion_mnist_is_class_balanced_uint8():
    dm = FashionMNISTDataModule(source="embedded", name="fashion_mnist", **{**COMMON, "channels": 1})
    dm.setup()
    assert len(dm.train_set) == 10_000 and len(dm.test_set) == 2_000
    item = dm.train_set[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 28, 28)
    labels = dm.train_set.labels.numpy()
    assert np.bincount(labels).tolist() == [1000] * 10
    assert dm.class_names[0] == "T-shirt/top"


def test_balanced_subset():
    labels = np.repeat(np.arange(4), 50)
    idx = balanced_subset(labels, 40, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10] * 4
    assert len(balanced_subset(labels, None, 0)) == 200


def test_sampler_resume_skips_exactly_the_done_batches():
    s = EpochShuffleSampler(20, batch_size=4, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.resume_at(epoch=2, batches_done=3)
    assert list(s) == full[12:]
    assert list(s) == full  # the skip applies once
    s.set_epoch(3)
    assert list(s) != full and sorted(s) == list(range(20))


def _write_tree(root, n_per_class=6):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_skips_and_counts_corrupt_files(tmp_path, caplog):
    _write_tree(tmp_path)
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "dog" / "empty.png").write_bytes(b"")
    dm = ImageFolderDataModule(path=str(tmp_path), val_fraction=0.5, name="imagefolder", **COMMON)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert len(dm.skipped) == 2
    assert "skipped 2 file(s) (2 unreadable)" in caplog.text
    assert len(dm.train_set) + len(dm.test_set) == 12
    assert dm.class_names == ["cat", "dog"]
    batch = next(iter(dm.train_dataloader()))
    # RGB + validity alpha, letterboxed at the default load size round(16 * 10 / 7)
    assert batch["image"].shape == (4, 4, 23, 23) and batch["image"].dtype == torch.uint8


def test_imagefolder_wrong_path_is_one_clear_line(tmp_path):
    dm = ImageFolderDataModule(path=str(tmp_path / "nope"), name="imagefolder", **COMMON)
    with pytest.raises(SSLabError, match="is not a directory"):
        dm.setup()
