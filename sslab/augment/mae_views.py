"""MAE's pre-training augmentation, made for the whole batch at once on the training device: random
resized crop with scale (0.2, 1) (bicubic, inside each image's valid region) and horizontal flip only, then
normalisation (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 4 and
Appendix A.1)."""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from sslab.augment.crops import RandomResizedCrop, valid_boxes
from sslab.augment.multicrop import normalize, to_float


class MAEViews(nn.Module):
    """uint8 (B, C, H, W) -> one normalised float view (B, 3, size, size); every image draws its own crop."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: Sequence[float] = (0.2, 1.0),
        hflip_p: float = 0.5,
    ) -> None:
        super().__init__()
        self.mean, self.std = list(mean), list(std)
        self.crop = RandomResizedCrop(size, scale)
        self.flip = K.RandomHorizontalFlip(p=hflip_p)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.flip(self.crop(to_float(images), valid_boxes(images)))  # bicubic overshoot clipped, as PIL
        return normalize(x, self.mean, self.std)
