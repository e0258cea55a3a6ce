"""DINO multi-crop views, made for the whole batch at once on the training device.

The recipe follows DINO (Caron et al., 2021, Appendix; BYOL's colour pipeline): random resized crop
(inside each image's valid region, ``sslab.augment.crops``), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with
p 0.8 and its op order drawn per image, greyscale p 0.2, Gaussian blur with p 1.0 on the first global crop,
0.1 on the second and 0.5 on local crops, solarisation with p 0.2 on the second global crop only. Blur
sigma (0.1-2.0 px at 224 px) scales with the crop size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from sslab.augment.color import RandomColorJitter
from sslab.augment.crops import (
    CropPipeline,
    RandomResizedCrop,
    centre_crop_boxes,
    crop_resize,
    has_alpha,
    valid_boxes,
)

# the official evaluation transform: resize the short side to 256, centre crop 224
EVAL_CROP_FRACTION = 224 / 256


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1], with greyscale repeated to 3 channels so every backbone
    and colour augmentation sees RGB. A validity (alpha) channel (C = 2 or 4, see ``sslab.augment.crops``) is
    dropped here; read it with ``valid_boxes`` first."""
    if has_alpha(images):
        images = images[:, :-1]
    x = images.float().div_(255.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def eval_view(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_fraction: float = EVAL_CROP_FRACTION,
) -> torch.Tensor:
    """Deterministic evaluation view, normalised. Letterboxed images (with an alpha channel) get the official
    transform on their valid region: the centred square of ``crop_fraction`` x the short side (resize 256 /
    centre crop 224), resampled to ``size``. Others: centre crop to ``size``, or a resize when smaller."""
    if has_alpha(images):
        boxes = centre_crop_boxes(valid_boxes(images), crop_fraction)
        return normalize(crop_resize(to_float(images), boxes, size), mean, std)
    x = to_float(images)
    h, w = x.shape[-2:]
    if h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        x = x[..., top : top + size, left : left + size]
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, mean, std)


def _blur(size: int, p: float) -> nn.Module:
    scale = size / 224.0
    sigma = (0.1 * scale, 2.0 * scale)
    kernel = 2 * math.ceil(3 * sigma[1]) + 1
    return K.RandomGaussianBlur(kernel, sigma, p=p)


def _crop_pipeline(size: int, scale: Sequence[float], blur_p: float, solarize_p: float) -> CropPipeline:
    ops: list[nn.Module] = [
        K.RandomHorizontalFlip(),
        RandomColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),  # per-image op order, as torchvision
        K.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        ops.append(_blur(size, blur_p))
    if solarize_p > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))  # threshold exactly 0.5
    return CropPipeline(RandomResizedCrop(size, scale), *ops)


class MultiCropViews(nn.Module):
    """uint8 batch -> list of normalised float crops: ``num_global`` at ``global_size`` then ``num_local``
    at ``local_size``. Crops of one size are returned contiguously so the model can run one forward per size.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_global: int = 2,
        num_local: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        global_blur_p: Sequence[float] = (1.0, 0.1),
        global_solarize_p: Sequence[float] = (0.0, 0.2),
        local_blur_p: float = 0.5,
    ) -> None:
        super().__init__()
        if num_global < 1:
            raise ValueError("multi-crop needs at least one global crop")
        self.mean, self.std = list(mean), list(std)
        self.global_size, self.local_size = global_size, local_size
        self.num_global, self.num_local = num_global, num_local
        blur = [global_blur_p[min(i, len(global_blur_p) - 1)] for i in range(num_global)]
        solar = [global_solarize_p[min(i, len(global_solarize_p) - 1)] for i in range(num_global)]
        self.global_crops = nn.ModuleList(
            _crop_pipeline(global_size, global_scale, blur[i], solar[i]) for i in range(num_global)
        )
        self.local_crop = _crop_pipeline(local_size, local_scale, local_blur_p, 0.0) if num_local else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        boxes = valid_boxes(images)  # crops come from the whole photo, never from letterbox padding
        x = to_float(images)
        crops = [aug(x, boxes) for aug in self.global_crops]
        if self.local_crop is not None and self.num_local:
            # one call for all local crops: each image appears num_local times with independent parameters
            many = self.local_crop(x.repeat(self.num_local, 1, 1, 1), boxes.repeat(self.num_local, 1))
            crops += list(many.chunk(self.num_local))
        return [normalize(c, self.mean, self.std) for c in crops]
