"""DropLoss (Wang et al., "Cut and Learn for Unsupervised Object Detection and Instance Segmentation", CVPR 2023).

Pseudo-masks miss objects, so a detector trained on them as if they were complete would learn to call every
undiscovered object background. DropLoss removes the classification loss of every predicted region r_i that
overlaps no pseudo-ground-truth box:

    L_drop(r_i) = 1[IoU_i^max > tau] * L_vanilla(r_i),      tau = 0.01 (``drop_iou``)

where IoU_i^max is the largest IoU of r_i with any pseudo-GT box of its image. As in the reference code
(cutler/modeling/roi_heads/roi_heads.py), the weighted cross-entropy is averaged over *all* sampled regions, so
the dropped ones count as zero rather than being renormalised away, and the box-regression loss is unchanged
(it only sees foreground regions, which always overlap a box).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence


def pairwise_box_iou(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of each box (N, 4) with each of its own K candidates (N, K, 4), boxes as (x1, y1, x2, y2) -> (N, K).

    Degenerate (zero-area) candidates, used as padding, have IoU 0 with everything."""
    lt = torch.maximum(boxes[:, None, :2], gt[..., :2])
    rb = torch.minimum(boxes[:, None, 2:], gt[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_b = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1)
    area_g = (gt[..., 2:] - gt[..., :2]).clamp(min=0).prod(-1)
    union = area_b[:, None] + area_g - inter
    return torch.where(inter > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def max_iou_to_gt(
    boxes: torch.Tensor, image_of_box: torch.Tensor, gt_boxes: list[torch.Tensor]
) -> torch.Tensor:
    """Largest IoU of each region (N, 4) with the pseudo-GT boxes of its own image (``image_of_box`` (N,)).

    The per-image GT lists are padded to one (B, K, 4) tensor of zero-area boxes, so the whole batch is one
    gather and one IoU; an image without GT gives 0."""
    padded = pad_sequence([g.to(boxes.dtype) for g in gt_boxes], batch_first=True)
    if padded.shape[1] == 0:  # no image has a box: nothing overlaps
        return boxes.new_zeros(len(boxes))
    return pairwise_box_iou(boxes, padded[image_of_box]).amax(dim=1)


def drop_keep(max_iou: torch.Tensor, drop_iou: float) -> torch.Tensor:
    """Regions whose classification loss is kept: max IoU strictly above ``drop_iou`` (<= is dropped)."""
    return max_iou > drop_iou


def droploss_classification(
    class_logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """sum_i keep_i * CE(logits_i, label_i) / N over all N sampled regions (the reference's normalisation)."""
    ce = F.cross_entropy(class_logits, labels, reduction="none")
    return (ce * keep.to(ce.dtype)).sum() / max(labels.numel(), 1)
