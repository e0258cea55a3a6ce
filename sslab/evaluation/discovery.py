"""Unsupervised object discovery against ground-truth masks: class-agnostic box / mask AP50 and AR@100
(pycocotools ``COCOeval``) and CorLoc (``eval.py eval=discovery`` runs them: ``sslab.runs.cutler``).

Class-agnostic: every ground-truth and predicted category becomes 1 ("object"), as CutLER evaluates.
AP50 is COCOeval's stats[1] (AP at IoU 0.5, all areas, 100 detections), AR100 its stats[8] (AR averaged over
IoU 0.5:0.95, 100 detections). CorLoc (Deselaers et al., 2012): the share of images holding at least one
ground-truth object whose top-scoring predicted box has IoU >= 0.5 with some ground-truth box.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("box_ap50", "mask_ap50", "box_ar100", "mask_ar100", "corloc")
COLUMNS = {
    "box_ap50": "box AP50",
    "mask_ap50": "mask AP50",
    "box_ar100": "box AR100",
    "mask_ar100": "mask AR100",
    "corloc": "CorLoc",
}


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def class_agnostic_gt(gt: dict[str, Any]) -> COCO:
    """A pycocotools COCO over ``gt`` with every annotation in category 1 (ids renumbered from 1)."""
    data = {
        "images": gt["images"],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": [
            {**a, "id": i + 1, "category_id": 1, "iscrowd": int(a.get("iscrowd", 0))}
            for i, a in enumerate(gt["annotations"])
        ],
    }
    coco = COCO()
    coco.dataset = data
    _quiet(coco.createIndex)
    return coco


def load_predictions(predictions: list[dict] | str | Path) -> list[dict]:
    """A COCO results list, or a JSON file holding one or a COCO instances dict (its ``annotations``)."""
    if isinstance(predictions, (str, Path)):
        predictions = json.loads(Path(predictions).read_text())
    if isinstance(predictions, dict):
        predictions = predictions["annotations"]
    return [{**p, "category_id": 1, "score": float(p.get("score", 1.0))} for p in predictions]


def coco_stats(gt: COCO, predictions: list[dict], iou_type: str) -> tuple[float, float]:
    """(AP50, AR100) of ``predictions`` for ``iou_type`` "bbox" or "segm"."""
    keep = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    results = [{k: copy.deepcopy(p[k]) for k in keep} for p in predictions]
    dt = _quiet(gt.loadRes, results)
    ev = COCOeval(gt, dt, iou_type)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return float(ev.stats[1]), float(ev.stats[8])


def corloc(gt: COCO, predictions: list[dict]) -> float:
    """Share of images with a ground-truth object whose top-scoring predicted box hits one (IoU >= 0.5)."""
    top: dict[int, dict] = {}
    for p in predictions:
        if p["image_id"] not in top or p["score"] > top[p["image_id"]]["score"]:
            top[p["image_id"]] = p
    hits, total = 0, 0
    for image_id in gt.getImgIds():
        boxes = [a["bbox"] for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id))]
        if not boxes:
            continue
        total += 1
        if image_id in top:
            iou = mask_util.iou([top[image_id]["bbox"]], boxes, [0] * len(boxes))
            hits += bool(np.max(iou) >= 0.5)
    return hits / total if total else float("nan")


def discovery_metrics(gt_json: str | Path, predictions: list[dict] | str | Path) -> dict[str, float]:
    """Class-agnostic {"box_ap50", "mask_ap50", "box_ar100", "mask_ar100", "corloc"} as fractions in [0, 1].

    ``predictions``: COCO results (image_id, bbox xywh, segmentation RLE, score) or a JSON file of them (a
    pseudo-mask / prediction file in COCO instances format works too). Missing boxes come from the masks."""
    gt = class_agnostic_gt(json.loads(Path(gt_json).read_text()))
    preds = load_predictions(predictions)
    for p in preds:
        if "bbox" not in p:
            p["bbox"] = [float(v) for v in mask_util.toBbox(p["segmentation"])]
    if not preds:
        return dict.fromkeys(METRICS, 0.0)
    box_ap50, box_ar100 = coco_stats(gt, preds, "bbox")
    if all("segmentation" in p for p in preds):
        mask_ap50, mask_ar100 = coco_stats(gt, preds, "segm")
    else:
        mask_ap50 = mask_ar100 = float("nan")
    return {
        "box_ap50": box_ap50,
        "mask_ap50": mask_ap50,
        "box_ar100": box_ar100,
        "mask_ar100": mask_ar100,
        "corloc": corloc(gt, preds),
    }
