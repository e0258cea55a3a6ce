"""Write litdata shards for ``data=streaming``:
``python -m sslab.dataset_builders.streaming_shards src=DIR out=SHARDS``.

Each image is decoded exactly as ``data=imagefolder`` decodes it (``sslab.data.imagefolder.load_image``: long
side to ``load_size``, letterboxed, uint8 with the alpha validity channel), so a run on the shards sees the
same tensors as a run on the folder, and the train/val split is the folder's (``train``/``val`` sub-folders,
else a stratified ``val_fraction`` split of class folders; an unlabelled tree is all training data). Images
are stored ``raw`` (the uint8 array: no decoding while training, ``load_size``^2 x (C+1) bytes each) or
``png`` (lossless, about 2-4x smaller, decoded by the loader workers). Unreadable files are skipped and
counted. The output folder must not exist yet or be empty: nothing a user wrote is overwritten.

    SHARDS/train/   litdata chunks + index.json      SHARDS/labels_train.npy, labels_val.npy
    SHARDS/val/     (class folders only)             SHARDS/sslab.json  load_size, channels, classes, counts
"""

from __future__ import annotations

import io
import json
import sys
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sslab.data.imagefolder import ImageFolderDataModule, load_image
from sslab.data.streaming import ENCODINGS, META
from sslab.errors import SSLabError, fail, user_message

DEFAULTS: dict[str, Any] = {
    "src": "???",
    "out": "???",
    "image_size": 224,  # as data.image_size; load_size defaults to 10/7 of it (320), as data=imagefolder
    "load_size": None,
    "channels": 3,
    "labels": "auto",  # auto | none, as data.labels
    "val_fraction": 0.1,
    "seed": 0,  # the split's seed (data.seed = seed of the run, 0 by default)
    "encoding": "raw",  # raw | png
    "chunk_bytes": "64MB",
    "num_workers": 0,  # decoding processes (0: this process)
}


def encode(args: tuple[str, int, int, str]) -> Any:
    """One file -> its stored image (uint8 array or PNG bytes), or None when it does not decode."""
    path, load_size, channels, encoding = args
    try:
        image = load_image(Path(path), load_size, channels).numpy()
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return None
    if encoding == "raw":
        return image
    buf = io.BytesIO()
    mode = "RGBA" if image.shape[0] == 4 else "LA"
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode).save(buf, format="PNG")
    return buf.getvalue()


def write_split(
    files: list[Path],
    labels: np.ndarray,
    out: Path,
    load_size: int,
    channels: int,
    encoding: str,
    chunk_bytes: str,
    num_workers: int,
) -> tuple[np.ndarray, list[str]]:
    """Shards of ``files`` in order under ``out``; returns the labels written and the files skipped."""
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
    jobs = [(str(f), load_size, channels, encoding) for f in files]
    written, skipped = [], []
    pool = get_context("spawn").Pool(num_workers) if num_workers > 0 else None
    try:
        results = pool.imap(encode, jobs, chunksize=16) if pool else map(encode, jobs)
        for f, label, image in zip(files, labels, results, strict=True):
            if image is None:
                skipped.append(str(f))
                continue
            writer.add_item(len(written), {"image": image, "label": int(label), "path": str(f)})
            written.append(int(label))
    finally:
        if pool:
            pool.close()
            pool.join()
    if not written:
        raise SSLabError(f"none of the {len(files)} images under {out.name} could be decoded")
    writer.done()
    writer.merge()
    return np.asarray(written, dtype=np.int64), skipped


def convert(
    src: str,
    out: str,
    image_size: int = 224,
    load_size: int | None = None,
    channels: int = 3,
    labels: str = "auto",
    val_fraction: float = 0.1,
    seed: int = 0,
    encoding: str = "raw",
    chunk_bytes: str = "64MB",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Convert the image tree ``src`` into shards under ``out``; returns what ``sslab.json`` records."""
    if encoding not in ENCODINGS:
        raise SSLabError(f"encoding={encoding} is unknown; choose one of {', '.join(ENCODINGS)}")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SSLabError(f"out={out_dir} exists and is not an empty folder; choose a new one")
    folder = ImageFolderDataModule(
        path=src,
        val_fraction=val_fraction,
        load_size=load_size,
        labels=labels,
        name="convert",
        image_size=image_size,
        local_crop_size=image_size,
        patch_size=1,
        channels=channels,
        mean=[0.0] * channels,
        std=[1.0] * channels,
        seed=seed,
    )
    if not folder.path.is_dir():
        raise SSLabError(f"src={folder.path} is not a directory; point src at an image folder")
    train_files, train_labels, val_files, val_labels, classes = folder._split(folder.path)
    splits = {"train": (train_files, train_labels)}
    if classes and val_files:
        splits["val"] = (val_files, val_labels)
    meta: dict[str, Any] = {
        "source": str(folder.path),
        "load_size": folder.load_size,
        "channels": channels,
        "classes": classes,
        "encoding": encoding,
        "splits": {},
        "skipped": sorted(str(f) for f in folder.skipped),
    }
    for name, (files, split_labels) in splits.items():
        print(f"convert: {name}: {len(files)} images -> {out_dir / name}", flush=True)
        written, skipped = write_split(
            files,
            split_labels,
            out_dir / name,
            folder.load_size,
            channels,
            encoding,
            chunk_bytes,
            num_workers,
        )
        np.save(out_dir / f"labels_{name}.npy", written)
        meta["splits"][name] = len(written)
        meta["skipped"] += skipped
    (out_dir / META).write_text(json.dumps(meta, indent=2))
    counts = ", ".join(f"{k} {v}" for k, v in meta["splits"].items())
    print(
        f"convert: wrote {counts} images ({len(classes)} classes, load_size {folder.load_size}, {encoding}); "
        f"skipped {len(meta['skipped'])} unreadable; train with data=streaming data.path={out_dir}",
        flush=True,
    )
    return meta


def main(argv: list[str] | None = None) -> None:
    try:
        from sslab.cli import parse_overrides

        cfg = parse_overrides(
            "dataset_builders.streaming_shards", DEFAULTS, sys.argv[1:] if argv is None else argv
        )
        convert(**{k: cfg[k] for k in DEFAULTS})
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        fail(message, log_file=False)


if __name__ == "__main__":
    main()
