"""data=imagefolder on real files written by PIL: full field of view, every image mode, bounded decoding, bad
files that never crash a run (and are listed in the run dir), symlink loops counted, too-small data refused."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from sslab.data import ImageFolderDataModule
from sslab.data.imagefolder import BAD_FILES, decode, load_image, readable
from sslab.errors import SSLabError
from tests.conftest import ROOT

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


def valid_region(image: torch.Tensor) -> torch.Tensor:
    """The photo's pixels (C-1, h, w) of a letterboxed (C, S, S) image, cut out by its alpha channel."""
    rows = torch.nonzero(image[-1].amax(1)).flatten()
    cols = torch.nonzero(image[-1].amax(0)).flatten()
    return image[:-1, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


# -- field of view --------------------------------------------------------------------------------------------
def test_load_keeps_the_whole_photo_letterboxed(tmp_path):
    """A 4:3 photo whose outer columns are red and blue: both survive (a centre crop to a square cut them off),
    the photo keeps its aspect, and the alpha channel marks exactly the photo's rows."""
    arr = np.full((60, 80, 3), 128, dtype=np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, -8:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    img = load_image(tmp_path / "wide.png", 40, 3)
    assert img.shape == (4, 40, 40) and img.dtype == torch.uint8
    alpha = img[3]
    assert set(alpha.unique().tolist()) == {0, 255}
    assert (alpha[5:35] == 255).all() and (alpha[:5] == 0).all() and (alpha[35:] == 0).all()
    photo = valid_region(img)
    assert photo.shape == (3, 30, 40)
    assert photo[:, :, 0].float().mean(1).tolist() == pytest.approx([255, 0, 0], abs=2)
    assert photo[:, :, -1].float().mean(1).tolist() == pytest.approx([0, 0, 255], abs=2)
    # the pad repeats the edge rows, so a bicubic tap just outside the photo reads the photo's edge
    assert torch.equal(img[:3, 0], img[:3, 5]) and torch.equal(img[:3, -1], img[:3, 34])


def test_greyscale_folder_gets_grey_plus_alpha(tmp_path):
    Image.fromarray(np.full((10, 30), 77, dtype=np.uint8)).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png", 30, 1)
    assert img.shape == (2, 30, 30)
    assert (valid_region(img) == 77).all() and valid_region(img).shape == (1, 10, 30)


# -- modes ---------------------------------------------------------------------------------------------------
def photo_of(path, channels=3, size=8):
    """The decoded photo's pixels, letterbox removed, as an int array (h, w, C)."""
    return valid_region(load_image(path, size, channels)).permute(1, 2, 0).numpy().astype(int)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    arr[:, :4] = 65535
    arr[:, :2] = 0
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    px = photo_of(tmp_path / "deep.png")
    assert px[0, 0].tolist() == [0, 0, 0]
    assert px[0, 3].tolist() == [255, 255, 255]
    assert px[0, 7].tolist() == [128, 128, 128]  # 32768 / 257, not clipped to 255 (the old all-white image)


def test_32_bit_integer_and_float_tiffs(tmp_path):
    Image.fromarray(np.full((8, 8), 1000, dtype=np.int32), "I").save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert (photo_of(tmp_path / "i32.tif") == round(1000 / 257)).all()  # 16-bit range
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert (photo_of(tmp_path / "f.tif") == 128).all()


def test_palette_with_transparency_composites_on_white(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (0, 0, 4, 8))
    im.save(tmp_path / "pal.png", transparency=0)
    im.save(tmp_path / "pal_opaque.png")
    px = photo_of(tmp_path / "pal.png")
    assert px[0, 0].tolist() == [0, 0, 255] and px[0, 7].tolist() == [255, 255, 255]
    assert photo_of(tmp_path / "pal_opaque.png")[0, 7].tolist() == [255, 0, 0]


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black: dropping alpha would give black
    rgba[:, :4] = (0, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    px = photo_of(tmp_path / "rgba.png")
    assert px[0, 0].tolist() == [0, 0, 0] and px[0, 7].tolist() == [255, 255, 255]
    la = np.zeros((8, 8, 2), dtype=np.uint8)
    la[:, :, 0] = 40
    la[:, :4, 1] = 255
    la[:, 4:, 1] = 128  # half transparent: 40 * 128/255 + 255 * 127/255 = 148
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    for channels in (1, 3):
        px = photo_of(tmp_path / "la.png", channels)
        assert (px[:, :4] == 40).all()
        assert np.abs(px[:, 4:] - 148).max() <= 1


def test_cmyk_jpeg_and_greyscale(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(photo_of(tmp_path / "cmyk.jpg", 3, 16) - [255, 0, 0]).max() <= 8
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    assert (photo_of(tmp_path / "grey.png") == 77).all()
    Image.new("1", (8, 8), 1).save(tmp_path / "bits.png")
    assert (photo_of(tmp_path / "bits.png") == 255).all()


def test_exif_rotated_jpeg_is_upright(tmp_path):
    """Stored landscape, red on the left, EXIF orientation 6 (shown turned 90 degrees clockwise): the viewer
    shows a portrait image with red on top, and so must we."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    im = decode(tmp_path / "rot.jpg", 40, 3)
    assert im.size == (20, 40)
    px = photo_of(tmp_path / "rot.jpg", 3, 40)
    assert px.shape == (40, 20, 3)
    assert np.abs(px[5, 10] - [255, 0, 0]).max() <= 12 and np.abs(px[-5, 10] - [0, 0, 255]).max() <= 12


# -- bounded decoding -----------------------------------------------------------------------------------------
def test_big_images_are_decoded_at_a_bounded_size(tmp_path):
    big = Image.new("RGB", (6000, 4000), (30, 60, 90))
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    Image.new("I;16", (3000, 2000), 30000).save(tmp_path / "big16.png")  # reduce() refuses I;16 itself
    # JPEG: the DCT decoder scales by 1/8 (draft), never the full 24 Mpx
    assert decode(tmp_path / "big.jpg", 320, 3).size == (750, 500)
    # others: reduce() by an integer factor, keeping at least twice the target for the final resize
    w, h = decode(tmp_path / "big.png", 320, 3).size
    assert 640 <= w <= 960 and h == round(4000 / (6000 / w))
    assert decode(tmp_path / "big16.png", 320, 3).size == (750, 500)  # 3000 / 4
    img = load_image(tmp_path / "big.jpg", 320, 3)
    assert img.shape == (4, 320, 320) and valid_region(img).shape == (3, 213, 320)
    assert valid_region(img).float().mean((1, 2)).tolist() == pytest.approx([30, 60, 90], abs=3)


# -- bad files ------------------------------------------------------------------------------------------------
def _write_tree(root, n_per_class=6, size=(24, 20)):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])


def _trainer(run_dir):
    return pl.Trainer(
        default_root_dir=str(run_dir), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False
    )


def _fit_ready(data, run_dir, **kw):
    dm = ImageFolderDataModule(path=str(data), val_fraction=0.0, **{**COMMON, **kw})
    dm.trainer = _trainer(run_dir)
    dm.setup("fit")
    return dm


def test_truncated_jpeg_is_replaced_listed_and_resume_survives(tmp_path, caplog):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    _write_tree(data)
    (data / "dog" / "5.png").unlink()  # 12 files: every one is drawn in the 3 batches of 4
    bad = data / "cat" / "2_truncated.jpg"
    _truncated_jpeg(bad)
    assert readable(bad)  # PIL verify passes: only decoding finds it
    with pytest.raises(OSError, match="truncated"):
        Image.open(bad).convert("RGB")

    dm = _fit_ready(data, run_dir, num_workers=1)
    files = [str(f) for f in dm.train_set.files]
    i_bad = files.index(str(bad))
    batches = list(dm.train_dataloader())  # a real worker process decodes the broken file
    assert len(batches) == 3 and all(b["image"].shape == (4, 4, 23, 23) for b in batches)
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert i_bad not in seen
    listed = (run_dir / BAD_FILES).read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{bad}\tcannot decode")
    # the stand-in is the next file in the list: the same for every worker and every run (exact resume)
    assert torch.equal(dm.train_set[i_bad]["image"], dm.train_set[i_bad + 1]["image"])

    # a resumed run in the same run dir: the listed file is skipped without decoding, nothing crashes
    resumed = ImageFolderDataModule(path=str(data), val_fraction=0.0, **{**COMMON, "num_workers": 1})
    resumed.load_state_dict({"epoch": 0, "batches_done": 1})
    resumed.trainer = _trainer(run_dir)
    with caplog.at_level("WARNING"):
        resumed.setup("fit")
    assert "1 file(s) listed in" in caplog.text
    assert i_bad in resumed.train_set.known_bad
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(batches) - 1
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, batches[1:], strict=True))
    assert (run_dir / BAD_FILES).read_text().splitlines() == listed


def test_setup_time_failures_and_symlink_loops_are_counted_and_listed(tmp_path, caplog):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    _write_tree(data)
    (data / "cat" / "empty.png").write_bytes(b"")
    (data / "dog" / "a.jpg").symlink_to(data / "dog" / "b.jpg")
    (data / "dog" / "b.jpg").symlink_to(data / "dog" / "a.jpg")
    (data / "dog" / "gone.png").symlink_to(data / "nowhere.png")
    (data / "loop_class").symlink_to(data / "loop_class")
    with caplog.at_level("WARNING"):
        dm = _fit_ready(data, run_dir)
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "skipped 5 file(s) (1 broken link, 3 symlink loop, 1 unreadable)" in line
    assert dm.class_names == ["cat", "dog"] and len(dm.train_set) == 12
    listed = dict(ln.split("\t") for ln in (run_dir / BAD_FILES).read_text().splitlines())
    assert listed[str(data / "dog" / "a.jpg")] == "symlink loop"
    assert listed[str(data / "loop_class")] == "symlink loop"
    assert listed[str(data / "dog" / "gone.png")] == "broken link"
    assert listed[str(data / "cat" / "empty.png")].startswith("unreadable")


def test_a_folder_of_only_broken_images_is_one_clear_error(tmp_path):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    for i in range(4):
        _truncated_jpeg(data / "cat" / f"{i}.jpg")
    dm = ImageFolderDataModule(path=str(data), val_fraction=0.0, **COMMON)
    dm.setup()
    with pytest.raises(SSLabError, match="none of the 4 image files can be decoded"):
        dm.train_set[0]


# -- too little data ------------------------------------------------------------------------------------------
def test_fewer_images_than_one_batch_is_refused_before_training(tmp_path):
    data = tmp_path / "data"
    _write_tree(data, n_per_class=3)
    dm = ImageFolderDataModule(path=str(data), val_fraction=0.0, **{**COMMON, "batch_size": 8})
    dm.setup()  # build_method's early setup (no stage) still works: the method/key checks come first
    dm.trainer = _trainer(tmp_path / "run")
    with pytest.raises(
        SSLabError, match=r"has 6 training images, fewer than one batch \(data.batch_size=8\)"
    ):
        dm.setup("fit")


@pytest.mark.slow
def test_train_py_refuses_too_little_data_in_one_line(tmp_path):
    data = tmp_path / "data"
    _write_tree(data, n_per_class=3, size=(40, 30))
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "data=imagefolder",
            f"data.path={data}",
            "data.image_size=32",
            "data.local_crop_size=16",
            "data.batch_size=8",
            "data.num_workers=0",
            "backbone.patch_size=8",
            "++backbone.depth=1",
            "method.out_dim=64",
            "method.hidden_dim=32",
            "method.bottleneck_dim=16",
            "logger=[csv]",
            "callbacks=[]",
            f"paths.output_dir={tmp_path / 'runs'}",
            "trainer.max_steps=2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert (
        "error: data=imagefolder has 6 training images, fewer than one batch (data.batch_size=8)" in r.stderr
    )
    assert "(trained)" not in r.stdout
