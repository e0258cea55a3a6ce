"""MaskCut pseudo-masks over a dataset split, written as COCO instances JSON (CutLER's first stage; run from a
checkpoint by ``sslab.runs.cutler``: the pipeline's ``maskcut`` stage and ``eval.py eval=discovery``).

Images are read from the split's COCO JSON (``datamodule.coco_json(split)``, file names relative to
``datamodule.root``), resized to the data's image size, normalised, and cut by ``sslab.cutler.maskcut`` on
the checkpoint's evaluation encoder (the teacher for DINO). Masks are upsampled from the patch grid to each
image's own size with nearest interpolation (no CRF), stored as RLE with their tight box.

Score: a pseudo-mask from MaskCut round r of n gets ``1 - r / n`` (1.0 for the first cut). Earlier rounds
cut the most salient object left, so discovery order is the ranking MaskCut itself implies; evaluation (AP,
CorLoc's top box) needs some ranking, and this one involves no tuned constant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from torch import nn

from sslab.augment.multicrop import normalize, to_float
from sslab.cutler.detector_data import load_image
from sslab.cutler.maskcut import maskcut, patch_keys, upsample_masks
from sslab.devices import resolve_device
from sslab.errors import SSLabError
from sslab.progress_lines import track

CATEGORIES = [{"id": 1, "name": "object"}]


def model_input(
    images: list[torch.Tensor], size: int, mean: list[float], std: list[float], device: torch.device
) -> torch.Tensor:
    """uint8 (3, H_i, W_i) images -> normalised float (B, 3, size, size), each resized whole (no crop, so the
    patch grid maps back onto the full image)."""
    out = []
    for img in images:
        x = to_float(img.unsqueeze(0).to(device))
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x)
    return normalize(torch.cat(out), mean, std)


def mask_annotation(mask: np.ndarray, image_id: int, ann_id: int, score: float) -> dict[str, Any]:
    """One COCO annotation for a bool (H, W) mask: RLE (counts as str), tight xywh box, area, score."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "area": float(mask_util.area(rle)),
        "iscrowd": 0,
        "segmentation": rle,
        "score": float(score),
    }


@torch.no_grad()
def maskcut_annotations(
    backbone: nn.Module,
    images: list[dict[str, Any]],
    root: str | Path,
    image_size: int,
    mean: list[float],
    std: list[float],
    n_masks: int = 3,
    tau: float = 0.15,
    batch_size: int = 64,
    device: str | torch.device = "auto",
) -> list[dict[str, Any]]:
    """MaskCut annotations (category 1, scored ``1 - round / n_masks``) for COCO ``images`` entries."""
    device = resolve_device(device) if isinstance(device, str) else device
    backbone = backbone.to(device).eval()
    annotations: list[dict[str, Any]] = []
    starts = range(0, len(images), batch_size)
    for start in track(starts, f"MaskCut: {len(images)} images, {n_masks} cuts each", unit="batches"):
        infos = images[start : start + batch_size]
        x = model_input(
            [load_image(Path(root), i["file_name"]) for i in infos], image_size, mean, std, device
        )
        result = maskcut(patch_keys(backbone, x), n_masks=n_masks, tau=tau)
        masks, keep = result.masks.cpu(), result.keep.cpu()
        for info, image_masks, image_keep in zip(infos, masks, keep, strict=True):
            rounds = torch.nonzero(image_keep).flatten().tolist()
            if not rounds:
                continue
            full = upsample_masks(image_masks[rounds], (int(info["height"]), int(info["width"]))).numpy()
            for r, m in zip(rounds, full, strict=True):
                annotations.append(mask_annotation(m, info["id"], len(annotations) + 1, 1.0 - r / n_masks))
    return annotations


def write_coco(
    path: str | Path, images: list[dict], annotations: list[dict], info: dict | None = None
) -> Path:
    """COCO instances JSON with one category ("object"), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    payload = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    if info is not None:
        payload = {"info": info, **payload}
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
    return path


def coco_source(dm: Any, split: str) -> tuple[Path, Path]:
    """(split JSON, image root) of a data module with COCO annotations (``data=stamps``)."""
    if not callable(getattr(dm, "coco_json", None)) or not hasattr(dm, "root"):
        raise SSLabError(
            f"data={getattr(dm, 'name', type(dm).__name__)} has no COCO masks; MaskCut pseudo-masks and "
            "discovery evaluation need data=stamps (or a data module with coco_json(split) and root)"
        )
    path = Path(dm.coco_json(split))
    if not path.is_file():
        raise SSLabError(
            f"{path} is missing; build the dataset first (python -m sslab.dataset_builders.stamps)"
        )
    return path, Path(dm.root)
