"""Embed every image under a folder: ``python -m sslab.embed ckpt=PATH data.path=DIR out=emb.parquet|emb.npy
[index=true]``.

One row per image (path, embedding), in sorted path order, from the checkpoint's evaluation encoder (the
teacher for the DINO family; ``sslab.export.FeatureEncoder``) through the evaluation view of the checkpoint's
data config: each file decoded and letterboxed as ``data=imagefolder`` does (long side ``load_size``), then
``eval_view`` (centre crop of the photo to ``image_size``, the run's mean and std), so the features are the
ones the run's k-NN and probes saw. The folder may be any tree, flat included; files that do not decode are
skipped and counted in one line.

``.npy`` writes the (N, D) float32 array and ``<stem>.paths.txt`` (one path a line, same order); ``.parquet``
writes columns ``path`` and ``embedding`` (needs pyarrow). ``index=true`` adds ``<stem>.faiss``: a FAISS
``IndexFlatIP`` over the L2-normalised embeddings (cosine similarity; row i is path i) for nearest-image
search.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sslab.augment.multicrop import eval_view
from sslab.cli import parse_overrides
from sslab.data.imagefolder import IMAGE_EXTENSIONS, load_image
from sslab.devices import resolve_device
from sslab.errors import SSLabError, fail, user_message
from sslab.export import load_encoder

log = logging.getLogger(__name__)
DEFAULTS = {
    "ckpt": "???",  # a train.py checkpoint
    "out": "???",  # emb.parquet (path, embedding) or emb.npy (+ emb.paths.txt)
    "data": {"path": "???", "batch_size": 64, "num_workers": 0},  # the image folder (any tree)
    "index": False,  # also write <stem>.faiss (IndexFlatIP on L2-normalised embeddings)
    "device": "auto",
}
OUTPUTS = (".parquet", ".npy")
LOAD_SIZE_RATIO = 10 / 7  # data=imagefolder's default long side: 320 px for 224 px crops


def image_files(root: str | Path) -> list[Path]:
    """Every file with an image extension under ``root`` (any depth), sorted."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SSLabError(f"data.path={root} is not a directory; point it at a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise SSLabError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


class ImageFiles(Dataset):
    """Letterboxed uint8 images (channels + alpha); a file that does not decode gives ``ok`` False."""

    def __init__(self, files: list[Path], load_size: int, channels: int) -> None:
        self.files, self.load_size, self.channels = files, load_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, ok = load_image(self.files[i], self.load_size, self.channels), True
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            image, ok = (
                torch.zeros(self.channels + 1, self.load_size, self.load_size, dtype=torch.uint8),
                False,
            )
        return {"image": image, "ok": ok, "index": i}


def output_paths(out: str | Path) -> dict[str, Path]:
    """Where ``out`` and its companions go: ``emb.npy`` -> ``emb.paths.txt``, ``emb.faiss``."""
    out = Path(out).expanduser()
    if out.suffix not in OUTPUTS:
        raise SSLabError(f"out={out}: write .parquet (path, embedding) or .npy (+ .paths.txt)")
    if out.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise SSLabError(
            f"out={out} needs pyarrow, which is not installed; write out={out.with_suffix('.npy')} "
            f"(embeddings, with paths in {out.with_suffix('.paths.txt').name}) or pip install pyarrow"
        )
    return {"out": out, "paths": out.with_suffix(".paths.txt"), "index": out.with_suffix(".faiss")}


def _progress(loader: DataLoader, description: str):
    from rich.console import Console
    from rich.progress import track

    return track(loader, description=description, total=len(loader), console=Console(stderr=True))


@torch.no_grad()
def embed_folder(
    ckpt: str | Path,
    path: str | Path,
    out: str | Path,
    index: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every image under ``path`` with ``ckpt``'s encoder and write ``out`` (and the index); returns
    {"paths", "embeddings", "files": written files, "skipped": {path: reason}}."""
    targets = output_paths(out)  # refuse a format we cannot write before any work
    files = image_files(path)
    encoder, run_cfg = load_encoder(ckpt)
    dev = resolve_device(device)
    encoder.to(dev)
    data = run_cfg.data
    size = int(data.image_size)
    load_size = int(data.get("load_size") or round(size * LOAD_SIZE_RATIO))
    dataset = ImageFiles(files, max(load_size, size), int(data.get("channels", 3)))
    loader = DataLoader(dataset, batch_size=int(batch_size), num_workers=int(num_workers), shuffle=False)
    batches = _progress(loader, f"embedding {len(files)} images") if progress else loader
    features, kept = [], []
    for batch in batches:
        ok = batch["ok"]
        if not ok.any():
            continue
        views = eval_view(batch["image"][ok].to(dev), size, data.mean, data.std)
        features.append(encoder(views).float().cpu())
        kept += batch["index"][ok].tolist()
    skipped = {str(files[i]): "cannot decode" for i in sorted(set(range(len(files))) - set(kept))}
    if skipped:
        log.warning(
            "embed: skipped %d file(s) that do not decode, e.g. %s", len(skipped), next(iter(skipped))
        )
    if not kept:
        raise SSLabError(f"none of the {len(files)} image files under {path} could be decoded")
    emb = torch.cat(features).numpy().astype(np.float32)
    paths = [str(files[i]) for i in kept]
    written = write_embeddings(targets["out"], paths, emb)
    if index:
        written.append(write_index(targets["index"], emb))
    return {"paths": paths, "embeddings": emb, "files": written, "skipped": skipped}


def write_embeddings(out: Path, paths: list[str], emb: np.ndarray) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, emb)
        names = out.with_suffix(".paths.txt")
        names.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
        return [out, names]
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    pq.write_table(pa.table({"path": pa.array(paths, pa.string()), "embedding": column}), out)
    return [out]


def write_index(path: Path, emb: np.ndarray) -> Path:
    """FAISS inner-product index over L2-normalised rows: a search returns cosine similarities."""
    import faiss

    normed = np.ascontiguousarray(emb, dtype=np.float32).copy()
    faiss.normalize_L2(normed)
    index = faiss.IndexFlatIP(normed.shape[1])
    index.add(normed)
    faiss.write_index(index, str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_overrides("embed", DEFAULTS, sys.argv[1:] if argv is None else argv)
        result = embed_folder(
            cfg.ckpt,
            cfg.data.path,
            cfg.out,
            index=bool(cfg.index),
            batch_size=int(cfg.data.batch_size),
            num_workers=int(cfg.data.num_workers),
            device=str(cfg.device),
        )
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise  # a bug: keep its traceback
        fail(message, log_file=False)
    n, d = result["embeddings"].shape
    skipped = f", skipped {len(result['skipped'])} undecodable" if result["skipped"] else ""
    print(f"wrote {n} embeddings ({d}-d{skipped}): {', '.join(str(p) for p in result['files'])}")


if __name__ == "__main__":
    main()
