"""The next self-training round's annotations (CutLER, cutler/tools/get_self_training_ann.py).

Round r trains on the predictions of round r - 1 that score >= ``threshold`` (the reference uses 0.7 for round
1 and 0.65 for round 2), merged with the previous round's pseudo-masks: an old mask is kept when its mask IoU
with every confident prediction of its image is < 0.5, so objects the detector missed are not forgotten.
Images keep the previous file's ``images`` list; annotation ids are renumbered from 1; empty masks are
left out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from sslab.cutler.detector_data import compressed_rle, load_coco
from sslab.cutler.pseudo_masks import write_coco
from sslab.errors import SSLabError
from sslab.progress_lines import track

OVERLAP_IOU = 0.5


def _rle(segm: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(segm, dict) or isinstance(segm.get("counts"), list):
        raise SSLabError("self-training expects compressed RLE segmentations (as MaskCut and predict write)")
    return compressed_rle(segm)


def merge_round(
    prev: list[dict[str, Any]], preds: list[dict[str, Any]], threshold: float
) -> list[dict[str, Any]]:
    """One image's next annotations: confident predictions, then the old masks none of them overlaps."""
    confident = [p for p in preds if p["score"] >= threshold]
    if not confident or not prev:
        return confident + prev
    iou = mask_utils.iou(
        [_rle(a["segmentation"]) for a in prev],
        [_rle(p["segmentation"]) for p in confident],
        [0] * len(confident),
    )  # (len(prev), len(confident))
    kept_old = [a for a, row in zip(prev, iou, strict=True) if row.max() < OVERLAP_IOU]
    return confident + kept_old


def self_training_json(
    prev_json: str | Path,
    predictions: list[dict[str, Any]] | str | Path,
    threshold: float,
    out_json: str | Path,
) -> Path:
    """Write the round's COCO json (category 1 "object"; each annotation with bbox, area, score) and return it."""
    prev = load_coco(prev_json)
    if not isinstance(predictions, list):
        predictions = json.loads(Path(predictions).read_text())
    image_ids = {im["id"] for im in prev["images"]}
    old_by_image: dict[int, list[dict]] = defaultdict(list)
    for a in prev.get("annotations", []):
        old_by_image[a["image_id"]].append(a)
    new_by_image: dict[int, list[dict]] = defaultdict(list)
    for p in predictions:
        if p["image_id"] not in image_ids:
            raise SSLabError(
                f"prediction for image_id {p['image_id']}, which {prev_json} does not list; predict on its images"
            )
        new_by_image[p["image_id"]].append(p)

    annotations = []
    for im in track(prev["images"], f"self-training labels (score >= {threshold})", unit="images"):
        for a in merge_round(old_by_image[im["id"]], new_by_image[im["id"]], threshold):
            rle = _rle(a["segmentation"])
            area = float(mask_utils.area(rle))
            if area == 0:  # a confident box whose mask is empty teaches no mask
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": im["id"],
                    "category_id": 1,
                    "bbox": [float(v) for v in a["bbox"]],
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                    "score": float(a.get("score", 1.0)),
                }
            )
    return write_coco(out_json, prev["images"], annotations)
