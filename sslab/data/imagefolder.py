"""Image trees, each image decoded to one fixed-size letterboxed square: class folders (``root/<class>/<image>``)
or unlabelled (a flat folder, or any tree with ``labels=none``; ``eval_path`` then gives the labelled
evaluation splits).

Why the images look the way they do:

- **Full field of view.** Official DINO, MAE and iBOT draw RandomResizedCrop from the whole photo; a centre
  pre-crop would discard up to a quarter of a 4:3 photo before any crop is drawn. Each image is resized so
  its *long* side is ``load_size`` and letterboxed to ``load_size`` x ``load_size``. Batches stay fixed-size
  uint8 (what the batched on-device views need) and nothing is cut away. An alpha channel marks the photo's
  pixels (255) against the pad (0); ``sslab.augment`` reads the valid box from it, so training crops are drawn
  inside the photo exactly as torchvision draws them on the full image, and the evaluation view is the
  official "resize 256, centre crop 224" of the photo. The pad repeats the photo's edge pixels, so the bicubic
  taps at a crop's border read what they would at the border of the real photo. (Storing variable-size
  images would break fixed-size batches; a separate ``valid`` batch key would have to be passed along by every
  view and evaluation caller, whereas the alpha channel travels with the image through all of them.)
- **Bounded decoding.** A JPEG is decoded at a reduced DCT scale (``Image.draft``) and other formats are
  shrunk by an integer factor (``Image.reduce``) before the final bicubic resize, so a 6000 x 4000 photo
  costs about what a 750 x 500 one does.
- **Every PIL mode converts correctly.** EXIF orientation is applied; 16-bit and 32-bit integer images are
  scaled by their value range (not clipped, which made 16-bit PNGs all white); palette images keep their
  transparency; transparent pixels (RGBA, LA, PA, P with transparency) are composited on white, what an
  image viewer shows, rather than exposing whatever colour the transparent pixels happen to store; CMYK goes
  through PIL's conversion.
- **Bad files never crash a run.** Files that fail PIL's ``verify`` are dropped when the folder is scanned;
  a file that passes it but fails to decode later (a truncated JPEG) is replaced by the next readable file in
  the list, so batch sizes and an exact resume hold. Every skipped file (unreadable, symlink loop, broken
  link) is counted in one log line and listed in ``<run dir>/bad_files.txt`` (path, tab, reason).
"""

from __future__ import annotations

import errno
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from sslab.data.base import SSLDataModule
from sslab.data.device_decode import DECODE_MODES, decode_batch
from sslab.errors import SSLabError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BAD_FILES = "bad_files.txt"
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
EXIF_ORIENTATION = 0x0112
REDUCING_GAP = 2.0  # reduce() keeps at least this multiple of the target size for the final bicubic resize


# -- scanning ----------------------------------------------------------------------------------------------
LABEL_MODES = ("auto", "none")


def scan_folder(
    root: Path, skipped: dict[Path, str] | None = None, labels: str = "auto"
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files under ``root``, sorted, with integer labels and the class names. Symlink loops and broken
    links go into ``skipped`` with their reason instead of vanishing.

    ``labels="auto"``: class folders (``root/<class>/...``, label = the folder) when every image lies inside a
    sub-folder; a flat folder, or a tree with images directly in ``root``, is unlabelled. ``labels="none"``:
    any tree is unlabelled. Unlabelled files get label -1 and no class names (self-supervised training needs
    none; evaluation then takes its labels from ``data.eval_path``)."""
    if labels not in LABEL_MODES:
        raise SSLabError(f"data.labels={labels!r} is unknown; choose one of {', '.join(LABEL_MODES)}")
    skipped = {} if skipped is None else skipped
    classes, top_images = [], False
    for d in sorted(root.iterdir()):
        if d.is_dir():
            classes.append(d.name)
        elif d.is_symlink():
            skipped[d] = _link_problem(d)
        elif d.suffix.lower() in IMAGE_EXTENSIONS:
            top_images = True
    if labels == "none" or top_images or not classes:
        files = _image_files(root, skipped)
        if not files:
            raise SSLabError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        return files, np.full(len(files), -1, dtype=np.int64), []
    files, label_list = [], []
    for label, name in enumerate(classes):
        found = _image_files(root / name, skipped)
        files += found
        label_list += [label] * len(found)
    if not files:
        raise SSLabError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files, np.asarray(label_list, dtype=np.int64), classes


def _image_files(root: Path, skipped: dict[Path, str]) -> list[Path]:
    """Every file with an image extension in the tree under ``root`` (symlinked folders are not followed)."""
    files = []
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if f.is_file():
            files.append(f)
        elif f.is_symlink():
            skipped[f] = _link_problem(f)
    return files


def _link_problem(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as e:
        return "symlink loop" if e.errno == errno.ELOOP else "broken link"
    return "link to a non-file"


def readable(path: Path) -> bool:
    """PIL's cheap header check; a truncated JPEG passes it and is caught when decoded."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


# -- decoding ----------------------------------------------------------------------------------------------
def fit_long_side(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) scaled so that the long side is ``size``, aspect kept, each side at least 1."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def reduce_factor(width: int, height: int, load_size: int) -> int:
    """The integer ``Image.reduce`` factor that keeps ``REDUCING_GAP`` x the target size (<= 1: none)."""
    target_w, target_h = fit_long_side(width, height, load_size)
    return int(min(width / target_w, height / target_h) / REDUCING_GAP)


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth pixels to 8 bits by their value range: 16-bit modes by 65535; mode ``I`` by 65535 when its
    values fit 16 bits (PNG/TIFF/PGM 16-bit), else by its min-max; ``F`` by 1 when in [0, 1], else min-max."""
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> ``L`` (channels 1) or ``RGB`` (channels 3), following the module's rules."""
    if im.mode.startswith("I") or im.mode == "F":
        im = Image.fromarray(_scale_to_uint8(np.asarray(im), im.mode), "L")
    elif im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (*BACKGROUND, 255))
        im = Image.alpha_composite(background, im).convert("RGB")
    return im.convert("L" if channels == 1 else "RGB")


def letterbox(im: Image.Image, load_size: int, channels: int) -> torch.Tensor:
    """Long side resized to ``load_size`` (bicubic), centred in a square whose pad repeats the edge pixels;
    returns uint8 (channels + 1, load_size, load_size), the last channel 255 on the image and 0 on the pad."""
    w, h = fit_long_side(im.width, im.height, load_size)
    arr = np.asarray(im.resize((w, h), Image.BICUBIC), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    top, left = (load_size - h) // 2, (load_size - w) // 2
    pad = ((top, load_size - h - top), (left, load_size - w - left))
    image = np.pad(arr, (*pad, (0, 0)), mode="edge")
    alpha = np.pad(np.full((h, w, 1), 255, dtype=np.uint8), (*pad, (0, 0)))
    return torch.from_numpy(np.concatenate([image, alpha], 2)).permute(2, 0, 1).contiguous()


def decode(path: Path, load_size: int, channels: int) -> Image.Image:
    """Upright ``L``/``RGB`` image no larger than needed for a long side of ``load_size``: a JPEG is decoded
    through ``draft`` (the decoder drops DCT detail, up to 8x smaller), then any image is shrunk by ``reduce``
    with the integer factor that keeps ``REDUCING_GAP`` x the target size for the final bicubic resize."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(None, fit_long_side(*im.size, load_size))
        im.load()
        im = to_mode(ImageOps.exif_transpose(im), channels)  # reduce() needs an 8-bit mode
    factor = reduce_factor(im.width, im.height, load_size)
    return im.reduce(factor) if factor > 1 else im


def load_image(path: Path, load_size: int, channels: int) -> torch.Tensor:
    """Decode (bounded, any mode) and letterbox: uint8 (channels + 1, load_size, load_size)."""
    return letterbox(decode(path, load_size, channels), load_size, channels)


def device_photo_size(data: bytes, load_size: int) -> tuple[int, int] | None:
    """(w, h) of the photo inside the letterbox exactly as ``load_image`` sizes it (after ``draft`` and
    ``reduce``), when the device decodes ``data`` to what the CPU path would: a complete (ends in EOI) grey
    or YCbCr JPEG without an EXIF rotation (torchvision applies EXIF orientation on the CPU only); None for
    anything else. Reads the header only (``draft`` only picks the DCT scale): no pixel is decoded."""
    if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if (
                im.format != "JPEG"
                or im.mode not in ("L", "RGB")
                or im.getexif().get(EXIF_ORIENTATION, 1) != 1
            ):
                return None
            im.draft(None, fit_long_side(*im.size, load_size))
            w, h = im.size
    except Exception:  # a header PIL cannot parse: the CPU path decides (and records the file as bad)
        return None
    factor = reduce_factor(w, h, load_size)
    if factor > 1:  # Image.reduce rounds up
        w, h = -(-w // factor), -(-h // factor)
    return fit_long_side(w, h, load_size)


def read_encoded(path: Path, load_size: int, channels: int) -> tuple[bytes, tuple[int, int]]:
    """What a ``data.decode=gpu`` worker hands on: ``(the file's bytes, photo size)`` for a JPEG the device
    decodes (``device_photo_size``), else ``(the letterboxed image's raw bytes, (0, 0))``. Other formats (PNG,
    WebP, ...), CMYK and EXIF-rotated JPEGs are decoded here on the CPU by ``load_image``, with PIL as in
    ``data.decode=cpu`` rather than ``torchvision.io.decode_image``, so that this module's mode rules
    (transparency on white, 16-bit scaling, EXIF orientation) hold for them too. ``bytes`` because the default
    collate keeps them as a list (variable-length tensors would not stack)."""
    data = path.read_bytes()
    size = device_photo_size(data, load_size)
    if size is not None:
        return data, size
    return load_image(path, load_size, channels).numpy().tobytes(), (0, 0)


# -- dataset ----------------------------------------------------------------------------------------------
class ImageFolderDataset(Dataset):
    """Letterboxed images with labels. A file that fails to decode is replaced by the next readable one (in
    list order, wrapping), so the sample for an index depends only on the files: batch sizes and an exact
    resume hold. Failures are logged once per worker and appended to ``bad_files`` when it is set.

    ``encoded=True`` (``data.decode=gpu``): samples carry ``read_encoded``'s ``encoded`` bytes and
    ``photo_size`` instead of ``image``; ``ImageFolderDataModule.transfer_batch_to_device`` makes the images."""

    def __init__(
        self, files: list[Path], labels: np.ndarray, load_size: int, channels: int, encoded: bool = False
    ) -> None:
        self.files, self.labels, self.load_size, self.channels = files, labels, load_size, channels
        self.encoded = encoded
        self.bad_files: Path | None = None  # <run dir>/bad_files.txt once the run directory is known
        self.known_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def mark_known_bad(self, paths: set[str]) -> None:
        """Skip these files without decoding them again (a resumed run reads them from ``bad_files``)."""
        self.known_bad |= {i for i, f in enumerate(self.files) if str(f) in paths}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sample(i, self.encoded)

    def sample(self, i: int, encoded: bool) -> dict[str, torch.Tensor]:
        """Sample ``i``, or the next readable file's; ``encoded`` as the constructor's."""
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            if j in self.known_bad:
                continue
            try:
                if encoded:
                    data, size = read_encoded(self.files[j], self.load_size, self.channels)
                    sample = {"encoded": data, "photo_size": torch.tensor(size)}
                else:
                    sample = {"image": load_image(self.files[j], self.load_size, self.channels)}
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
                self._record_bad(j, e)
                continue
            return {**sample, "label": torch.tensor(int(self.labels[j])), "index": torch.tensor(j)}
        raise SSLabError(f"none of the {n} image files can be decoded, e.g. {self.files[0]}")

    def _record_bad(self, j: int, error: Exception) -> None:
        self.known_bad.add(j)
        name = str(self.files[j])
        reason = f"cannot decode: {type(error).__name__}: {error}".replace("\n", " ").replace("\t", " ")
        if self.bad_files is None:
            log.warning("imagefolder: skipped %s (%s), the next readable image stands in", name, reason)
            return
        try:  # one short append: atomic across workers; a failing write must not end the run either
            if name in read_bad_files(self.bad_files):
                return  # another worker (or an earlier run) found and reported it already
            self.bad_files.parent.mkdir(parents=True, exist_ok=True)
            with open(self.bad_files, "a", encoding="utf-8") as f:
                f.write(f"{name}\t{reason}\n")
        except OSError as e:
            log.warning("imagefolder: cannot write %s (%s)", self.bad_files, e)
        log.warning(
            "imagefolder: skipped %s (%s), the next readable image stands in; listed in %s",
            name,
            reason,
            self.bad_files,
        )


def read_bad_files(path: Path) -> dict[str, str]:
    """``bad_files.txt`` as {path: reason}, duplicates (several workers, several runs) merged."""
    if not path.is_file():
        return {}
    entries: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, reason = line.partition("\t")
        if name:
            entries.setdefault(name, reason)
    return entries


def summarise_skipped(skipped: dict[Path, str]) -> str:
    """One line: how many files were skipped for which reason, and one example."""
    counts: dict[str, int] = {}
    for reason in skipped.values():
        kind = "unreadable" if reason.startswith(("unreadable", "cannot decode")) else reason
        counts[kind] = counts.get(kind, 0) + 1
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return f"skipped {len(skipped)} file(s) ({parts}), e.g. {next(iter(skipped))}"


class ImageFolderDataModule(SSLDataModule):
    """``path/train`` and ``path/val`` when both exist, else a stratified ``val_fraction`` split of ``path``.

    ``load_size`` (default 10/7 x ``image_size``, 320 for 224) is the long side of the decoded images; a 4:3
    photo then keeps 240 px on its short side, about what "resize 256, crop 224" and 224 px crops use.
    Skipped files are counted in one log line and, once a run directory is known (Lightning's
    ``default_root_dir``, which ``train.py`` sets to the run directory), listed in ``bad_files.txt`` there.

    Unlabelled data (a flat folder, any tree with ``labels=none``): every image trains, labels are -1, and
    k-NN / linear-probe evaluation is off (``eval_off_reason``) unless ``eval_path`` names a class-folder tree;
    then the bank and test splits come from it (its ``train``/``val`` or a ``val_fraction`` split) and
    ``path`` is read as unlabelled training data.

    ``decode="gpu"``: the training loader's workers only read the files' bytes (``read_encoded``) and
    ``transfer_batch_to_device`` decodes the batch on the training device (``sslab.data.device_decode``). The
    evaluation loaders keep the CPU decode: their callers take decoded images straight from the DataLoader,
    outside Lightning's batch transfer.
    """

    def __init__(
        self,
        path: str,
        val_fraction: float = 0.1,
        load_size: int | None = None,
        eval_path: str | None = None,
        labels: str = "auto",
        decode: str = "cpu",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if decode not in DECODE_MODES:
            raise SSLabError(f"data.decode={decode!r} is unknown; choose one of {', '.join(DECODE_MODES)}")
        self.decode = decode
        self.path = Path(path).expanduser()
        self.eval_path = Path(eval_path).expanduser() if eval_path else None
        self.labels = labels
        self.val_fraction = val_fraction
        self.load_size = int(load_size) if load_size else round(self.image_size * 10 / 7)
        if self.load_size < self.image_size:
            raise SSLabError(
                f"data.load_size={self.load_size} is below data.image_size={self.image_size}; "
                "decode at least at the crop size"
            )
        self.skipped: dict[Path, str] = {}
        self._bank: tuple[Dataset, np.ndarray] | None = None

    def _scan(self, root: Path, labels: str | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
        files, file_labels, classes = scan_folder(root, self.skipped, labels or self.labels)
        ok = np.array([readable(f) for f in files], dtype=bool)
        self.skipped.update(
            {f: "unreadable (PIL verify failed)" for f, good in zip(files, ok, strict=True) if not good}
        )
        return [f for f, good in zip(files, ok, strict=True) if good], file_labels[ok], classes

    def _split(
        self, root: Path, labels: str | None = None
    ) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray, list[str]]:
        """(train files, labels, test files, labels, classes) of one tree: its ``train``/``val`` folders, a
        stratified ``val_fraction`` split of class folders, or, unlabelled, every image for training (the
        test split then only feeds the pictures, so it is a view of the training files)."""
        train_dir, val_dir = root / "train", root / "val"
        if train_dir.is_dir() and val_dir.is_dir():
            train_files, train_labels, classes = self._scan(train_dir, labels)
            test_files, test_labels, _ = self._scan(val_dir, labels)
            return train_files, train_labels, test_files, test_labels, classes
        files, file_labels, classes = self._scan(root, labels)
        if not classes:
            return files, file_labels, files, file_labels, classes
        rng = np.random.default_rng(self.seed)
        is_test = np.zeros(len(files), dtype=bool)
        for c in np.unique(file_labels):
            idx = rng.permutation(np.flatnonzero(file_labels == c))
            is_test[idx[: round(len(idx) * self.val_fraction)]] = True
        train_files = [f for f, t in zip(files, is_test, strict=True) if not t]
        test_files = [f for f, t in zip(files, is_test, strict=True) if t]
        return train_files, file_labels[~is_test], test_files, file_labels[is_test], classes

    def load_splits(self):
        for key, root in (("data.path", self.path), ("data.eval_path", self.eval_path)):
            if root is not None and not root.is_dir():
                raise SSLabError(f"{key} {root} is not a directory; point {key} at an image-folder tree")
        if self.eval_path is None:
            train_files, train_labels, test_files, test_labels, classes = self._split(self.path)
        else:  # the user's labelled subset gives the evaluation splits; data.path only trains
            train_files, train_labels, _, _, _ = self._split(self.path, labels="none")
            bank_files, bank_labels, test_files, test_labels, classes = self._split(self.eval_path)
            if not classes:
                raise SSLabError(
                    f"data.eval_path {self.eval_path} has no class folders; expected "
                    f"{self.eval_path}/<class_name>/<image files> (the labelled images k-NN and the probe use)"
                )
        if self.skipped:
            log.warning("imagefolder: %s", summarise_skipped(self.skipped))
        if not train_files:
            raise SSLabError(f"no readable training images under {self.path}")
        self.class_names = classes
        if not classes:
            self.eval_off_reason = (
                f"data.path={self.path} has no class folders, so there are no labels: k-NN and linear probe "
                "are off; set data.eval_path=DIR (DIR/<class>/<images>) for their numbers on a labelled subset"
            )
        make = lambda fs, ls, enc=False: ImageFolderDataset(fs, ls, self.load_size, self.channels, enc)  # noqa: E731
        self._datasets = [
            make(train_files, train_labels, self.decode == "gpu"),
            make(test_files, test_labels),
        ]
        if self.eval_path is None and self.decode == "gpu":  # the bank is the training files, decoded here
            bank_files, bank_labels = train_files, train_labels
        if self.eval_path is not None or self.decode == "gpu":
            self._datasets.append(make(bank_files, bank_labels))
            self._bank = (self._datasets[2], bank_labels)
        return self._datasets[0], train_labels, self._datasets[1], test_labels

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's move of a training batch to the device; with ``decode="gpu"`` it also decodes the batch
        there (a DataModule hook: the methods' ``on_after_batch_transfer``, which makes the views, still runs
        after it and finds ``image`` as with CPU decoding)."""
        if not isinstance(batch, dict) or "encoded" not in batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        encoded, sizes, index = batch.pop("encoded"), batch.pop("photo_size"), batch["index"].tolist()
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        on_cpu = lambda i: self.train_set.sample(index[i], encoded=False)["image"]  # noqa: E731  (a corrupt JPEG)
        batch["image"] = decode_batch(encoded, sizes.tolist(), self.load_size, self.channels, device, on_cpu)
        return batch

    def load_bank(self) -> tuple[Dataset, np.ndarray] | None:
        return self._bank

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        run_dir = self.run_dir()
        if stage == "fit" and run_dir is not None:
            self.attach_bad_files(run_dir / BAD_FILES)

    def attach_bad_files(self, path: Path) -> None:
        """Merge this scan's skipped files into ``path`` (rank 0), and have the datasets append decode failures
        there and skip the files it already lists (a resumed run does not decode them again)."""
        entries = read_bad_files(path)
        new = {str(f): reason for f, reason in self.skipped.items() if str(f) not in entries}
        if new and self.global_rank() == 0:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as f:
                    f.writelines(f"{name}\t{reason}\n" for name, reason in new.items())
            except OSError as e:
                log.warning("imagefolder: cannot write %s (%s)", path, e)
        known = set(entries)
        for ds in self._datasets:
            ds.bad_files = path
            ds.mark_known_bad(known)
        if entries:
            log.warning("imagefolder: %d file(s) listed in %s from before are skipped", len(entries), path)

    def teardown(self, stage: str | None = None) -> None:
        """At the end of fit, one line if files failed to decode during the run."""
        path = self.run_dir()
        if stage != "fit" or path is None:
            return
        entries = read_bad_files(path / BAD_FILES)
        decode_failures = sum(r.startswith("cannot decode") for r in entries.values())
        if decode_failures:
            log.warning(
                "imagefolder: %d image(s) could not be decoded and were replaced; see %s",
                decode_failures,
                path / BAD_FILES,
            )
