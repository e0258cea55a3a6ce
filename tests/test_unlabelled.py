"""Unlabelled image folders (issue 16, item 1), on real PNG/JPEG files written by PIL: a flat folder or any tree
trains with labels -1; k-NN and the linear probe switch off with one line; ``data.eval_path`` (class folders)
gives their numbers on a labelled subset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from sslab.data import ImageFolderDataModule
from sslab.data.imagefolder import scan_folder
from sslab.errors import SSLabError
from tests.conftest import CONF

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def write_image(
    path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (30, 22)
) -> None:
    """A coloured photo-like image with noise (JPEG or PNG by suffix)."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def flat_folder(root: Path, n: int = 24) -> Path:
    for i in range(n):
        write_image(root / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}", COLOURS[i % 3], i)
    return root


def class_tree(root: Path, n_per_class: int = 10) -> Path:
    for c, colour in enumerate(COLOURS):
        for i in range(n_per_class):
            write_image(root / f"class{c}" / f"{i}.png", colour, 100 * c + i)
    return root


def tiny_imagefolder_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "data=imagefolder",
                "data.image_size=16",
                "data.local_crop_size=8",
                "data.patch_size=4",
                "data.batch_size=8",
                "data.num_workers=0",
                "++backbone.depth=2",
                "method.out_dim=64",
                "method.hidden_dim=32",
                "method.bottleneck_dim=16",
                "method.views.num_local=2",
                "logger=[csv]",
                "callbacks=[knn,linear_probe]",
                "trainer.enable_progress_bar=false",
                "trainer.log_every_n_steps=1",
                "trainer.max_steps=2",
                "final_eval.baselines=false",
                f"paths.output_dir={tmp_path / 'runs'}",
                *overrides,
            ],
        )


COMMON = dict(
    name="imagefolder",
    image_size=16,
    local_crop_size=8,
    patch_size=4,
    channels=3,
    mean=[0.5] * 3,
    std=[0.25] * 3,
    batch_size=4,
)


def test_flat_folders_and_free_trees_are_unlabelled(tmp_path):
    flat = flat_folder(tmp_path / "flat", 6)
    files, labels, classes = scan_folder(flat)
    assert len(files) == 6 and classes == [] and (labels == -1).all()

    mixed = flat_folder(tmp_path / "mixed", 2)  # images at the top and in sub-folders: not class folders
    write_image(mixed / "2023" / "01" / "a.png", COLOURS[0], 7)
    files, labels, classes = scan_folder(mixed)
    assert len(files) == 3 and classes == [] and (labels == -1).all()

    tree = class_tree(tmp_path / "tree", 2)
    files, labels, classes = scan_folder(tree)
    assert classes == ["class0", "class1", "class2"] and sorted(set(labels.tolist())) == [0, 1, 2]
    files, labels, classes = scan_folder(tree, labels="none")  # a date tree is not classes: labels=none
    assert len(files) == 6 and classes == [] and (labels == -1).all()


def test_unlabelled_module_trains_on_everything_and_refuses_evaluation(tmp_path):
    dm = ImageFolderDataModule(path=str(flat_folder(tmp_path / "flat", 10)), **COMMON)
    dm.setup()
    assert len(dm.train_set) == 10  # nothing held out: no labels to hold out for
    assert int(dm.train_set[0]["label"]) == -1 and dm.train_set[0]["image"].shape == (4, 23, 23)
    assert dm.eval_off_reason and "data.eval_path" in dm.eval_off_reason
    with pytest.raises(SSLabError, match=r"no class folders.*set data.eval_path=DIR"):
        dm.eval_dataloaders()


def test_eval_path_gives_the_labelled_splits(tmp_path):
    dm = ImageFolderDataModule(
        path=str(class_tree(tmp_path / "train_tree", 4)),
        eval_path=str(class_tree(tmp_path / "labelled", 10)),
        val_fraction=0.2,
        **COMMON,
    )
    dm.setup()
    assert len(dm.train_set) == 12 and all(int(dm.train_set[i]["label"]) == -1 for i in range(12))
    assert dm.class_names == ["class0", "class1", "class2"] and dm.eval_off_reason is None
    assert len(dm.bank_set) == 24 and len(dm.test_set) == 6  # 8 + 2 per class
    assert {int(dm.test_set[i]["label"]) for i in range(6)} == {0, 1, 2}
    with pytest.raises(SSLabError, match="has no class folders"):
        flat = str(flat_folder(tmp_path / "flat", 3))
        ImageFolderDataModule(path=str(tmp_path / "train_tree"), eval_path=flat, **COMMON).setup()


@pytest.mark.slow
def test_flat_folder_trains_and_evaluation_says_it_is_off(tmp_path, caplog):
    from sslab.runs.training import train

    cfg = tiny_imagefolder_cfg(tmp_path, f"data.path={flat_folder(tmp_path / 'flat')}")
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    assert metrics["global_step"] == 2
    assert not any(k.startswith("eval/") for k in metrics)
    off = [r.getMessage() for r in caplog.records if "k-NN and linear probe are off" in r.getMessage()]
    assert len(off) == 1 and "set data.eval_path=DIR" in off[0], off


@pytest.mark.slow
def test_eval_path_gives_knn_and_probe_numbers(tmp_path):
    from sslab.runs.training import train

    cfg = tiny_imagefolder_cfg(
        tmp_path,
        f"data.path={flat_folder(tmp_path / 'flat')}",
        f"data.eval_path={class_tree(tmp_path / 'labelled')}",
        "data.val_fraction=0.3",
        "callbacks.linear_probe.bank_epochs=20",
    )
    metrics = train(cfg)
    assert metrics["global_step"] == 2
    # three colours: even 2 training steps of a tiny ViT separate them far above chance (33%)
    assert metrics["eval/knn_top1"] > 50 and 0 <= metrics["eval/linear_top1"] <= 100
