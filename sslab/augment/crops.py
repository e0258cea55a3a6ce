"""Crops that respect each image's valid region, batched on the device.

``data=imagefolder`` letterboxes every photo into a square (long side = load size) so that batches stay
fixed-size uint8 while nothing of the photo is cut away; an extra alpha channel marks the photo's pixels
(255) against the pad (0). Images with 2 (grey + alpha) or 4 (RGB + alpha) channels carry that mask; 1- and
3-channel images are valid everywhere. The samplers here read the box from the alpha channel, so every view
pipeline and the evaluation crop see exactly the full photo, as official DINO/MAE/iBOT crop from the full
decoded image, without a second batch key that each caller would have to pass along.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def has_alpha(images: torch.Tensor) -> bool:
    """True for (B, 2|4, H, W) images: grey or RGB plus a validity (alpha) channel."""
    return images.shape[1] in (2, 4)


def valid_boxes(images: torch.Tensor) -> torch.Tensor:
    """(B, 4) float boxes ``(x0, y0, x1, y1)`` in pixels, end exclusive, of each image's valid region: the
    bounding box of the alpha channel where there is one (an empty mask counts as all valid), else the image."""
    b, _, h, w = images.shape
    full = torch.tensor([0.0, 0.0, float(w), float(h)], device=images.device).expand(b, 4)
    if not has_alpha(images):
        return full.clone()
    alpha = images[:, -1] > 0
    rows, cols = alpha.any(2), alpha.any(1)  # (B, H), (B, W)
    y0 = rows.int().argmax(1)
    y1 = h - rows.flip(1).int().argmax(1)
    x0 = cols.int().argmax(1)
    x1 = w - cols.flip(1).int().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(rows.any(1, keepdim=True), boxes, full)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Each image's box ``(x0, y0, x1, y1)`` resampled to ``size`` x ``size`` in one ``grid_sample`` call.
    Output pixel centres sit where a crop-then-resize would put them (pixel-edge coordinates); the result is
    clamped to [0, 1] because bicubic overshoots, as PIL clips it."""
    b, _, h, w = x.shape
    x0, y0, x1, y1 = boxes.to(x.dtype).unbind(1)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = (x1 - x0) / w
    theta[:, 0, 2] = (x0 + x1) / w - 1
    theta[:, 1, 1] = (y1 - y0) / h
    theta[:, 1, 2] = (y0 + y1) / h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def sample_resized_crops(
    boxes: torch.Tensor, scale: Sequence[float], ratio: Sequence[float], attempts: int = 10
) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameters for every image at once, inside each image's box.

    Per image: up to ``attempts`` draws of area fraction U(scale) and log-uniform aspect ratio; the first
    whose rounded width and height fit is placed uniformly at random; when none fits, the largest centred crop
    with the ratio clamped into ``ratio``. All draws come from torch's global generator on the boxes' device,
    so a seeded step gives the same crops."""
    dev = boxes.device
    n = boxes.shape[0]
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = (bw * bh)[:, None]
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, device=dev)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(n, attempts, device=dev))
    cw = torch.round(torch.sqrt(area * s * r))
    ch = torch.round(torch.sqrt(area * s / r))
    fits = (cw > 0) & (ch > 0) & (cw <= bw[:, None]) & (ch <= bh[:, None])
    first = fits.int().argmax(1, keepdim=True)
    found = fits.any(1)
    in_ratio = bw / bh
    rmin, rmax = min(ratio), max(ratio)
    fb_w = torch.where(in_ratio > rmax, torch.round(bh * rmax), bw)
    fb_h = torch.where(in_ratio < rmin, torch.round(bw / rmin), bh)
    w = torch.where(found, cw.gather(1, first).squeeze(1), fb_w)
    h = torch.where(found, ch.gather(1, first).squeeze(1), fb_h)
    u = torch.rand(n, 2, device=dev)
    left = torch.where(found, torch.floor(u[:, 0] * (bw - w + 1)), torch.floor((bw - w) / 2))
    top = torch.where(found, torch.floor(u[:, 1] * (bh - h + 1)), torch.floor((bh - h) / 2))
    x0, y0 = boxes[:, 0] + left, boxes[:, 1] + top
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def centre_crop_boxes(boxes: torch.Tensor, fraction: float) -> torch.Tensor:
    """The centred square of side ``fraction`` x the short side of each box: "resize the short side to S, centre
    crop fraction x S" expressed on the box itself (``fraction`` = 224 / 256 for the official evaluation)."""
    side = fraction * torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1)


class RandomResizedCrop(nn.Module):
    """float (B, C, H, W) in [0, 1] + valid boxes (B, 4) -> (B, C, size, size): torchvision's random resized
    crop drawn per image inside its box, resampled bicubically (DINO and MAE use bicubic)."""

    def __init__(
        self,
        size: int,
        scale: Sequence[float],
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        mode: str = "bicubic",
    ) -> None:
        super().__init__()
        self.size, self.scale, self.ratio, self.mode = size, tuple(scale), tuple(ratio), mode

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        if boxes is None:
            h, w = x.shape[-2:]
            boxes = torch.tensor([0.0, 0.0, float(w), float(h)], device=x.device).expand(x.shape[0], 4)
        return crop_resize(x, sample_resized_crops(boxes, self.scale, self.ratio), self.size, self.mode)


class CropPipeline(nn.Sequential):
    """A crop, then per-image ops: ``forward(x, boxes)`` hands the valid boxes to a ``RandomResizedCrop`` in
    first place (other croppers, e.g. kornia's, take the images only). A ``Sequential`` so that the ops keep
    the state-dict keys of the plain ``nn.Sequential`` this replaced (solarisation holds buffers)."""

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        crop, *ops = list(self)
        x = crop(x, boxes) if isinstance(crop, RandomResizedCrop) else crop(x)
        for op in ops:
            x = op(x)
        return x
