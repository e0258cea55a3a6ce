"""The detector's predictions written out as COCO results: {image_id, category_id: 1, bbox (xywh), score,
segmentation (compressed RLE, str counts)}, what pycocotools' ``loadRes``, the discovery metrics and the next
self-training round read."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils


def coco_results(image_id: int, out: dict[str, torch.Tensor], score_threshold: float) -> list[dict]:
    """One image's detections (torchvision's output dict) scoring >= ``score_threshold`` as COCO results."""
    keep = out["scores"] >= score_threshold
    if not keep.any():
        return []
    boxes = out["boxes"][keep].cpu()
    scores = out["scores"][keep].cpu().tolist()
    masks = (out["masks"][keep, 0] >= 0.5).cpu().numpy().astype(np.uint8)  # (N, H, W)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    return [
        {
            "image_id": image_id,
            "category_id": 1,
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
        }
        for box, score, rle in zip(xywh, scores, rles, strict=True)
    ]
