"""The stamps dataset: COCO validity, exact visible masks under occlusion, determinism, captions, DataModule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sslab.data.text import tokenize
from sslab.dataset_builders import stamps as sb
from sslab.errors import SSLabError

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = sb.BuildSpec(image_size=32, num_train=12, num_test=6, seed=0, gnome=False)
needs_tuxpaint = pytest.mark.skipif(
    not sb.STAMPS_DIR.is_dir(), reason="tuxpaint-stamps-default not installed (make install-stamps)"
)


def stamps_dm(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "data=stamps",
                f"data.root={root}",
                "data.image_size=32",
                "data.local_crop_size=16",
                "data.num_train=12",
                "data.num_test=6",
                "data.gnome=false",
                "data.progress=false",
                "data.batch_size=4",
                *overrides,
            ],
        )
    return instantiate(cfg.data)


@pytest.fixture(scope="module")
def real_dm(tmp_path_factory):
    """A tiny build from the real tuxpaint stamps, made by the DataModule on first use."""
    if not sb.STAMPS_DIR.is_dir():
        pytest.skip("tuxpaint-stamps-default not installed (make install-stamps)")
    dm = stamps_dm(tmp_path_factory.mktemp("stamps"))
    assert not dm.root.exists()
    dm.setup()
    return dm


def _coco(dm, split: str) -> dict:
    return json.loads(dm.coco_json(split).read_text())


# -- pure pieces, hand-worked -----------------------------------------------------------------------------
def test_paste_composites_over_and_cuts_earlier_masks():
    canvas = np.full((6, 6, 3), 100.0, dtype=np.float32)
    red = np.zeros((3, 3, 4), dtype=np.float32)
    red[...] = [1.0, 0.0, 0.0, 1.0]  # premultiplied, opaque
    canvas, vis = sb.paste(canvas, [], red, 0, 0)
    blue = np.zeros((3, 3, 4), dtype=np.float32)
    blue[...] = [0.0, 0.0, 1.0, 1.0]
    blue[2, 2] = [0.0, 0.0, 0.4, 0.4]  # a 40% edge pixel: blended, but not part of the mask
    canvas, vis = sb.paste(canvas, vis, blue, 2, 2)
    expect_red = np.zeros((6, 6), bool)
    expect_red[:3, :3] = True
    expect_red[2, 2] = False  # covered by blue's opaque corner
    expect_blue = np.zeros((6, 6), bool)
    expect_blue[2:5, 2:5] = True
    expect_blue[4, 4] = False
    assert (vis[0] == expect_red).all() and (vis[1] == expect_blue).all()
    assert canvas[2, 2].tolist() == [0.0, 0.0, 255.0]
    assert canvas[0, 0].tolist() == [255.0, 0.0, 0.0]
    # over: 0.4 * 255 + (1 - 0.4) * 100 in blue, (1 - 0.4) * 100 elsewhere
    np.testing.assert_allclose(canvas[4, 4], [60.0, 60.0, 0.4 * 255 + 60.0], rtol=1e-6)
    assert canvas[5, 5].tolist() == [100.0, 100.0, 100.0]


def test_short_phrase_and_compose_caption():
    assert (
        sb.short_phrase("A stethoscope lets your doctor listen to your heart and lungs.") == "a stethoscope"
    )
    assert sb.short_phrase("Venus\u2014the second planet in the solar system") == "Venus"
    assert sb.short_phrase("The Spanish letter n with a tilde.") == "the Spanish letter n with a tilde"
    assert (
        sb.short_phrase("The sign for the number 8 in American Sign Language.") == "the sign for the number 8"
    )
    assert sb.short_phrase("An owl.") == "an owl"
    assert sb.compose_caption(["an owl"]) == "an owl."
    assert sb.compose_caption(["an owl", "a cat"]) == "an owl and a cat."
    assert sb.compose_caption(["an owl", "a cat", "a hat"]) == "an owl, a cat and a hat."


def test_split_is_disjoint_per_category_and_seeded():
    stamps = [sb.Stamp(f"{c}/{i}.png", c, f"A {c} {i}.", f"a {c} {i}") for c in "abc" for i in range(10)]
    stamps += [sb.Stamp("d/0.png", "d", "A d.", "a d")]
    split = sb.split_stamps(stamps, seed=0, test_fraction=0.2)
    train, test = {s.path for s in split["train"]}, {s.path for s in split["test"]}
    assert not train & test and train | test == {s.path for s in stamps}
    assert sorted(s.category for s in split["test"]) == ["a", "a", "b", "b", "c", "c"]  # 20% of 10 each
    assert "d/0.png" in train  # a lone stamp stays in train
    assert sb.split_stamps(stamps, 0, 0.2) == split and sb.split_stamps(stamps, 1, 0.2) != split


# -- synthetic stamps: exact colours make the visible masks checkable pixel by pixel -----------------------
COLOURS = [
    (255, 0, 255),
    (0, 255, 255),
    (17, 250, 3),
    (250, 3, 200),
    (3, 90, 250),
    (128, 255, 1),
]  # not in photos


def _synthetic_stamps(root: Path) -> dict[tuple[int, int, int], str]:
    """Opaque one-colour rectangles (2 categories x 3 stamps) in a tuxpaint-like tree; returns colour -> path.
    A cut-out of one opaque colour stays exactly that colour and fully opaque after any resize."""
    out = {}
    for k, colour in enumerate(COLOURS):
        cat = "boxes" if k < 3 else "bars"
        path = root / cat / f"s{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        rgba = np.zeros((60, 60, 4), np.uint8)
        h, w = (40, 30) if k % 2 else (20, 50)
        rgba[5 : 5 + h, 7 : 7 + w] = [*colour, 255]  # transparent margin: the builder crops to the alpha box
        Image.fromarray(rgba, "RGBA").save(path)
        path.with_suffix(".txt").write_text(f"A box number {k}.\nde.utf8=Eine Kiste.\n")
        out[colour] = f"{cat}/s{k}.png"
    (root / "bars" / "no_caption.png").write_bytes(path.read_bytes())  # skipped: no .txt
    return out


def test_visible_masks_are_exactly_the_pasted_pixels(tmp_path):
    colour_of = {p: c for c, p in _synthetic_stamps(tmp_path / "stamps").items()}
    spec = sb.BuildSpec(image_size=32, num_train=24, num_test=4, seed=3, gnome=False)
    out = sb.build(tmp_path / "ds", spec, stamps_dir=tmp_path / "stamps")
    coco = COCO(str(out / "train.json"))
    occluded = 0
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        pixels = np.asarray(Image.open(out / info["file_name"]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        covered = np.zeros((32, 32), bool)
        per_stamp: dict[str, np.ndarray] = {}  # a stamp may be pasted twice: compare the union of its masks
        for a in anns:
            mask = coco.annToMask(a).astype(bool)
            assert not (covered & mask).any()
            covered |= mask
            per_stamp[a["stamp"]] = per_stamp.get(a["stamp"], np.zeros_like(mask)) | mask
            ys, xs = np.nonzero(mask)
            occluded += int(mask.sum() < (np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # a rectangle with a bite out
        for stamp, mask in per_stamp.items():
            exact = (pixels == colour_of[stamp]).all(axis=2)
            assert (mask == exact).all(), f"{info['file_name']}: the mask of {stamp} differs from its pixels"
        assert 1 <= len(anns) <= 4
    assert occluded > 0  # the occlusion path ran
    meta = json.loads((out / "meta.json").read_text())
    assert meta["categories"] == ["bars", "boxes"] and meta["counts"]["train"]["stamps"] == 4


def test_build_is_deterministic_and_seeded(tmp_path):
    _synthetic_stamps(tmp_path / "stamps")
    kw = dict(stamps_dir=tmp_path / "stamps")
    a = sb.build(tmp_path / "a", TINY, **kw)
    b = sb.build(tmp_path / "b", TINY, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 12 + 6 + 3
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = sb.build(tmp_path / "c", dataclasses.replace(TINY, seed=1), **kw)
    assert (c / "train.json").read_bytes() != (a / "train.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "stamps"]  # no temp dirs left


# -- the real tuxpaint stamps ------------------------------------------------------------------------------
@needs_tuxpaint
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_build_is_valid_coco_with_tight_boxes_and_disjoint_masks(real_dm, split):
    coco_dict = _coco(real_dm, split)
    coco = COCO(str(real_dm.coco_json(split)))
    names = sorted(p.name for p in sb.STAMPS_DIR.iterdir() if p.is_dir())
    assert [c["name"] for c in coco_dict["categories"]] == [n for n in names if n in real_dm.class_names]
    assert [c["id"] for c in coco_dict["categories"]] == list(range(1, len(real_dm.class_names) + 1))
    assert len(coco.getImgIds()) == {"train": 12, "test": 6}[split]
    min_px = max(4, round(0.01 * 32 * 32))
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        with Image.open(real_dm.root / info["file_name"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 1 <= len(anns) <= 4
        union = np.zeros((32, 32), np.int64)
        for a in anns:
            mask = coco.annToMask(a)
            assert a["segmentation"]["size"] == [32, 32] and isinstance(a["segmentation"]["counts"], str)
            assert a["area"] == int(mask.sum()) == int(mask_utils.area(a["segmentation"])) >= min_px
            ys, xs = np.nonzero(mask)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["iscrowd"] == 0
            union += mask
        assert union.max() == 1  # visible masks never overlap


@needs_tuxpaint
def test_real_captions_come_from_the_stamps_and_test_objects_are_unseen(real_dm):
    train, test = _coco(real_dm, "train"), _coco(real_dm, "test")
    assert not {a["stamp"] for a in train["annotations"]} & {a["stamp"] for a in test["annotations"]}
    for coco in (train, test):
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
            txt = (sb.STAMPS_DIR / a["stamp"]).with_suffix(".txt").read_text(encoding="utf-8")
            assert a["caption"] == txt.splitlines()[0].strip() and a["phrase"] == sb.short_phrase(
                a["caption"]
            )
            assert a["stamp"].split("/")[0] == coco["categories"][a["category_id"] - 1]["name"]
        for im in coco["images"]:
            anns = sorted(by_image[im["id"]], key=lambda a: -a["area"])
            assert im["caption"] and im["caption"] == sb.compose_caption([a["phrase"] for a in anns])


@needs_tuxpaint
def test_datamodule_batches_labels_and_text(real_dm):
    assert real_dm.provides == ("image", "label", "index", "text")
    batch = next(iter(real_dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 32, 32)
    assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    assert batch["text"].dtype == torch.int64 and batch["text"].shape == (4, 32)
    coco = _coco(real_dm, "train")
    for k in range(4):
        i = int(batch["index"][k])
        im = coco["images"][i]
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        largest = max(anns, key=lambda a: a["area"])
        assert int(batch["label"][k]) == largest["category_id"] - 1
        assert real_dm.class_names[int(batch["label"][k])] == largest["stamp"].split("/")[0]
        assert torch.equal(batch["text"][k], tokenize([im["caption"]], 32)[0])
        pixels = np.asarray(Image.open(real_dm.root / im["file_name"]))
        assert (batch["image"][k].permute(1, 2, 0).numpy() == pixels).all()
    assert len(real_dm.class_names) == len(coco["categories"])


@needs_tuxpaint
def test_datamodule_reuses_a_build_and_rejects_a_mismatched_one(real_dm, tmp_path):
    again = stamps_dm(real_dm.root.parent)
    assert again.root == real_dm.root and again.coco_json("test") == real_dm.root / "test.json"
    direct = stamps_dm(real_dm.root)  # a root that holds a build is used as it is
    assert direct.root == real_dm.root
    with pytest.raises(SSLabError, match="image_size") as e:
        stamps_dm(real_dm.root, "data.image_size=48").setup()
    assert "\n" not in str(e.value)
    with pytest.raises(SSLabError, match="splits"):
        real_dm.coco_json("val")


def test_missing_package_and_bad_root_are_one_line_errors(tmp_path, capsys):
    dm = stamps_dm(tmp_path / "cache", f"data.stamps_dir={tmp_path / 'nowhere'}")
    with pytest.raises(SSLabError, match="make install-stamps") as e:
        dm.setup()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-built
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SSLabError, match="writable") as e:
        stamps_dm(tmp_path / "file").setup()
    assert "\n" not in str(e.value)
    assert sb.main(["--out", str(tmp_path / "x"), "--stamps-dir", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tuxpaint stamps not found") and "\n" not in err


def test_failed_build_leaves_nothing_behind(tmp_path):
    _synthetic_stamps(tmp_path / "stamps")
    spec = dataclasses.replace(TINY, gnome=True)
    with pytest.raises(SSLabError, match="gnome"):
        sb.build(tmp_path / "out" / "ds", spec, tmp_path / "stamps", gnome_dir=tmp_path / "no-gnome")
    assert list((tmp_path / "out").iterdir()) == []
