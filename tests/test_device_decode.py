"""``data.decode=gpu`` (issue 17, item 5) on real JPEG files written to disk: the device decode gives the CPU
path's tensor layout (same letterbox and alpha, pixels within decoder rounding), with the device a parameter
so that all of it runs on a CPU; the Lightning hook, the evaluation loaders, the refusal on a machine without
CUDA, and on a GPU the same checks with nvjpeg."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from sslab.data import ImageFolderDataModule
from sslab.data.device_decode import decode_batch
from sslab.data.imagefolder import load_image, read_encoded
from tests.conftest import ROOT
from tests.test_bad_input import ENV, digest, error_line, run
from tests.test_unlabelled import COMMON as SMALL
from tests.test_unlabelled import class_tree, flat_folder, tiny_imagefolder_cfg

HAS_CUDA = torch.cuda.is_available()
COMMON = {**SMALL, "image_size": 64, "local_crop_size": 32, "patch_size": 8}  # load size 91
# photo-like sizes, landscape and portrait, one below the load size (upscaled) and one twice it (draft)
SIZES = [(480, 360), (300, 500), (224, 224), (500, 281), (64, 48), (333, 250)]


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients, a ripple and a solid block: content a decoder reproduces to rounding."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 60 * np.sin(xx / (7 + seed))], 2)
    arr[h // 3 : h // 2, w // 4 : w // 2] = (200, 30, 40)
    return np.clip(arr, 0, 255).astype(np.uint8)


def jpeg_folder(root: Path, odd_files: bool = True) -> list[Path]:
    """JPEGs of SIZES (one greyscale) and, with ``odd_files``, what the worker decodes on the CPU: a PNG, a
    CMYK JPEG and an EXIF-rotated JPEG."""
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (w, h) in enumerate(SIZES):
        im = Image.fromarray(photo(w, h, i))
        files.append(root / f"{i}.jpg")
        (im.convert("L") if i == 2 else im).save(files[-1], quality=95)
    if odd_files:
        Image.fromarray(photo(200, 150, 9)).save(root / "png.png")
        Image.fromarray(photo(200, 150, 9)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(photo(240, 160, 3)).save(root / "rotated.jpg", exif=exif, quality=95)
        files += [root / "png.png", root / "cmyk.jpg", root / "rotated.jpg"]
    return files


def assert_close_to_cpu_path(decoded: torch.Tensor, reference: torch.Tensor) -> None:
    """Same layout, identical alpha (the valid box), colour within JPEG-decoder rounding (PIL's reduced-DCT
    ``draft`` decode of large photos against a full decode and an antialiased resize)."""
    assert decoded.shape == reference.shape and decoded.dtype == torch.uint8
    assert torch.equal(decoded[:, -1].cpu(), reference[:, -1])
    diff = (decoded[:, :-1].cpu().int() - reference[:, :-1].int()).abs().float()
    for d in diff:
        assert d.mean() < 2.5 and d.flatten().quantile(0.99) <= 8, (d.mean(), d.max())


@pytest.mark.parametrize(("load_size", "channels"), [(320, 3), (96, 3), (128, 1)])
def test_decode_batch_matches_the_cpu_path(tmp_path, load_size, channels):
    files = jpeg_folder(tmp_path)
    reference = torch.stack([load_image(f, load_size, channels) for f in files])
    read = [read_encoded(f, load_size, channels) for f in files]
    device_decoded = [size != (0, 0) for _, size in read]
    assert device_decoded == [True] * len(SIZES) + [False] * 3  # the PNG, CMYK and rotated JPEG: CPU path
    out = decode_batch([b for b, _ in read], [s for _, s in read], load_size, channels, "cpu")
    assert_close_to_cpu_path(out, reference)
    assert torch.equal(out[len(SIZES) :], reference[len(SIZES) :])  # the worker's own decode, bit for bit


def test_chunks_bound_memory_and_change_nothing(tmp_path, monkeypatch):
    """Decoding a few files at a time and resizing one photo per call (what bounds device memory for big
    photos) gives the very same batch."""
    import sslab.data.device_decode as device_decode

    files = jpeg_folder(tmp_path) * 2
    read = [read_encoded(f, 96, 3) for f in files]
    whole = decode_batch([b for b, _ in read], [s for _, s in read], 96, 3, "cpu")
    monkeypatch.setattr(device_decode, "DECODE_CHUNK", 4)
    monkeypatch.setattr(device_decode, "RESIZE_ELEMENTS", 1)
    assert torch.equal(decode_batch([b for b, _ in read], [s for _, s in read], 96, 3, "cpu"), whole)


def test_datamodule_decodes_in_the_batch_transfer(tmp_path):
    """decode="gpu" on the CPU device: the training loader yields bytes, ``transfer_batch_to_device`` turns
    them into the images the CPU-decode module gives for the same indices; the evaluation loaders, which
    are read outside Lightning's transfer, still give decoded images, identical to decode="cpu"."""
    data = tmp_path / "data"
    for c in ("a", "b"):
        jpeg_folder(data / c)
    kw = dict(path=str(data), val_fraction=0.25, num_workers=1, **COMMON)
    gpu, cpu = ImageFolderDataModule(decode="gpu", **kw), ImageFolderDataModule(**kw)
    for dm in (gpu, cpu):
        dm.setup()
    batches = list(gpu.train_dataloader())
    assert batches and all("image" not in b and len(b["encoded"]) == 4 for b in batches)
    for batch in batches:
        moved = gpu.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        assert set(moved) == {"image", "label", "index"}
        reference = torch.stack([cpu.train_set[int(i)]["image"] for i in moved["index"]])
        assert_close_to_cpu_path(moved["image"], reference)
        assert moved["label"].tolist() == [int(cpu.train_set[int(i)]["label"]) for i in moved["index"]]
    for gpu_loader, cpu_loader in zip(gpu.eval_dataloaders(), cpu.eval_dataloaders(), strict=True):
        for g, c in zip(gpu_loader, cpu_loader, strict=True):
            assert torch.equal(g["image"], c["image"]) and torch.equal(g["label"], c["label"])


def corrupt_huffman_tables(path: Path) -> None:
    """A JPEG whose header parses and which ends in EOI, so the worker sends it to the device, but whose
    Huffman table is garbage: nvjpeg, libjpeg and PIL all fail on it."""
    data = bytearray(path.read_bytes())
    k = data.find(b"\xff\xc4")
    data[k + 5 : k + 21] = b"\x00\xff" * 8
    path.write_bytes(bytes(data))


def test_a_jpeg_no_decoder_takes_is_replaced_as_on_the_cpu(tmp_path, caplog):
    data = tmp_path / "data"
    files = jpeg_folder(data, odd_files=False)
    corrupt_huffman_tables(files[1])
    kw = dict(path=str(data), val_fraction=0.0, **{**COMMON, "batch_size": len(files)})
    gpu, cpu = ImageFolderDataModule(decode="gpu", **kw), ImageFolderDataModule(**kw)
    for dm in (gpu, cpu):
        dm.setup()
    batch = next(iter(gpu.train_dataloader()))
    broken = gpu.train_set.files.index(files[1])
    assert batch["photo_size"][batch["index"].tolist().index(broken)].tolist() != [0, 0]  # sent to the device
    with caplog.at_level("WARNING"):
        moved = gpu.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert f"skipped {files[1]}" in caplog.text and broken in gpu.train_set.known_bad
    at = moved["index"].tolist().index(broken)
    assert torch.equal(moved["image"][at], cpu.train_set[broken]["image"])  # the next file, as on the CPU
    with pytest.raises(RuntimeError, match="cannot be decoded"):  # without a fallback: an error, not garbage
        decode_batch([files[1].read_bytes()], [(64, 48)], 64, 3, "cpu")


def test_unlabelled_folder_with_eval_path(tmp_path):
    dm = ImageFolderDataModule(
        path=str(flat_folder(tmp_path / "flat", 8)),
        eval_path=str(class_tree(tmp_path / "labelled", 4)),
        val_fraction=0.25,
        decode="gpu",
        **SMALL,
    )
    dm.setup()
    sample = dm.train_set[0]
    assert int(sample["label"]) == -1 and isinstance(sample["encoded"], bytes)
    for loader in dm.eval_dataloaders():  # the labelled subset, decoded in the workers
        batch = next(iter(loader))
        assert batch["image"].shape[1:] == (4, 23, 23) and (batch["label"] >= 0).all()


def test_a_real_fit_runs_through_the_hook(tmp_path):
    """Lightning calls the DataModule's ``transfer_batch_to_device`` and then the method's
    ``on_after_batch_transfer`` (the views): two DINO steps on the CPU train on device-decoded images."""
    from sslab.build import build_datamodule, build_method

    cfg = tiny_imagefolder_cfg(tmp_path, f"data.path={flat_folder(tmp_path / 'flat', 16)}", "data.decode=gpu")
    dm = build_datamodule(cfg)
    seen = []
    original = dm.transfer_batch_to_device

    def spy(batch, device, idx):
        out = original(batch, device, idx)
        seen.append(out["image"].shape)
        return out

    dm.transfer_batch_to_device = spy
    model = build_method(cfg, dm)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and seen == [(8, 4, 23, 23)] * 2


@pytest.mark.skipif(HAS_CUDA, reason="the refusal is for a machine without CUDA")
def test_decode_gpu_without_cuda_is_refused_in_one_line(tmp_path):
    data = flat_folder(tmp_path / "flat", 4)
    out = tmp_path / "out"
    before = digest(data)
    r = run(
        "train.py",
        "data=imagefolder",
        f"data.path={data}",
        "data.decode=gpu",
        f"paths.output_dir={out}",
        cwd=tmp_path,
        env={**ENV, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 1, r.stderr[-3000:]
    line = error_line(r)
    assert "data.decode=gpu" in line and "use data.decode=cpu" in line, line
    logs = list(out.rglob("train.log"))
    assert logs and all(line in p.read_text() for p in logs)
    assert digest(data) == before
    assert not list(out.rglob("checkpoints")) and not list(out.rglob("*.ckpt"))


@pytest.mark.slow
def test_decode_bench_runs_on_cpu_tiny():
    """bench/decode.py end to end at toy sizes (no speed is asserted): every side timed, the fidelity check
    passed, the JSON line last."""
    proc = subprocess.run(
        [sys.executable, "bench/decode.py", "--device", "cpu", "--tiny", "--threads", "1"],
        cwd=ROOT,
        env={**ENV, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert (
        len(table) == 4
        and any("data.decode=cpu" in t for t in table)
        and any("decode_jpeg" in t for t in table)
    )
    result = json.loads(proc.stdout.rstrip().splitlines()[-1])
    assert (
        result["bench"] == "decode" and result["same_valid_boxes"] and result["mean_abs_pixel_difference"] < 2
    )
    assert (
        result["images_per_s_per_core_cpu_decode"] > 0 and result["images_per_s_per_core_device_decode"] > 0
    )


@pytest.mark.skipif(not HAS_CUDA, reason="nvjpeg needs a CUDA GPU")
def test_nvjpeg_batch_matches_the_cpu_path(tmp_path):
    files = jpeg_folder(tmp_path / "data")
    for load_size, channels in ((320, 3), (128, 1)):
        reference = torch.stack([load_image(f, load_size, channels) for f in files])
        read = [read_encoded(f, load_size, channels) for f in files]
        out = decode_batch([b for b, _ in read], [s for _, s in read], load_size, channels, "cuda")
        assert out.is_cuda
        assert_close_to_cpu_path(out, reference)
    progressive = io.BytesIO()  # nvjpeg's hardware batch may refuse it: then alone, or libjpeg, decodes it
    Image.fromarray(photo(100, 80, 1)).save(progressive, "JPEG", progressive=True)
    out = decode_batch([progressive.getvalue(), read[0][0]], [(100, 80), read[0][1]], 128, 1, "cuda")
    assert out.shape == (2, 2, 128, 128) and out.is_cuda
    assert int((out[0, -1] > 0).sum()) == 100 * 80 and out[0, 0, 64, 64] > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="nvjpeg needs a CUDA GPU")
def test_train_py_with_gpu_decode(tmp_path):
    from sslab.runs.training import train

    cfg = tiny_imagefolder_cfg(
        tmp_path, f"data.path={flat_folder(tmp_path / 'flat')}", "data.decode=gpu", "data.num_workers=1"
    )
    assert train(cfg)["global_step"] == 2
