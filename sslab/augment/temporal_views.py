"""Views of stacked Atari observations for VICReg / TOV-VICReg, made for the whole batch on the device.

The official TOV-VICReg code applies BYOL's recipe to o_t: RandomResizedCrop(scale 0.08-1), colour jitter
(0.4, 0.4, 0.2, 0.1) with p 0.8, greyscale p 0.2, Gaussian blur (kernel 7, sigma 0.1-0.2) with p 1.0 / 0.1,
solarisation p 0.2 on the second view only, horizontal flip; the neighbours o_{t-1}, o_{t+1} get colour jitter
and greyscale only (no crop). Our observations are 3 stacked greyscale frames, so the "colour" channels are
time steps: saturation, hue and greyscale conversion would mix frames of different times. They are off by
default (``saturation``, ``hue``, ``grayscale_p`` restore the official recipe); brightness and contrast act on
all three frames alike and stay on.

``crop="shift"`` replaces the resized crop by DrQ's random shift (Kostrikov, Yarats & Fergus, 2021: pad by
``shift_pad`` pixels replicating the border, then crop back to ``size``), the view used for Atari agents: sprites
move by a few pixels but keep their scale. ``crop="none"`` keeps the evaluation's centre crop (the views then
differ only photometrically). Neither made the RAM probe beat random init at CPU budgets (README).
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn

from sslab.augment.color import RandomColorJitter
from sslab.augment.crops import CropPipeline, RandomResizedCrop, valid_boxes
from sslab.augment.multicrop import eval_view, normalize, to_float
from sslab.errors import SSLabError


def _jitter(brightness: float, contrast: float, saturation: float, hue: float, p: float) -> list[nn.Module]:
    if p <= 0 or not (brightness or contrast or saturation or hue):
        return []
    return [RandomColorJitter(brightness, contrast, saturation, hue, p=p)]  # op order per image


class ObservationViews(nn.Module):
    """uint8 (B, C, H, W) -> ``num_views`` normalised float views (B, C, size, size) with independent draws."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_views: int = 2,
        crop: str = "resized",
        scale: Sequence[float] = (0.08, 1.0),
        shift_pad: int = 4,
        flip_p: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.0,
        hue: float = 0.0,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.0,
        blur_p: Sequence[float] = (1.0, 0.1),
        blur_sigma: Sequence[float] = (0.1, 0.2),
        blur_kernel: int = 7,
        solarize_p: Sequence[float] = (0.0, 0.2),
    ) -> None:
        super().__init__()
        self.size, self.mean, self.std = size, list(mean), list(std)
        self.photometric = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        if crop not in ("resized", "shift", "none"):
            raise SSLabError(f"method.views.crop={crop!r}: choose resized, shift or none")
        pipelines = []
        for i in range(num_views):
            if crop == "resized":
                cropper = RandomResizedCrop(size, scale)  # inside each image's valid region
            elif crop == "shift":
                cropper = K.RandomCrop((size, size), padding=shift_pad, padding_mode="replicate")
            else:
                cropper = K.CenterCrop((size, size))
            ops: list[nn.Module] = [cropper, *_jitter(brightness, contrast, saturation, hue, jitter_p)]
            if grayscale_p > 0:
                ops.append(K.RandomGrayscale(p=grayscale_p))
            bp = blur_p[min(i, len(blur_p) - 1)]
            if bp > 0:
                ops.append(K.RandomGaussianBlur((blur_kernel, blur_kernel), tuple(blur_sigma), p=bp))
            sp = solarize_p[min(i, len(solarize_p) - 1)]
            if sp > 0:
                ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=sp))  # threshold exactly 0.5
            if flip_p > 0:
                ops.append(K.RandomHorizontalFlip(p=flip_p))
            pipelines.append(CropPipeline(*ops))
        self.pipelines = nn.ModuleList(pipelines)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        boxes = valid_boxes(images)
        x = to_float(images)
        return [normalize(aug(x, boxes).clamp_(0, 1), self.mean, self.std) for aug in self.pipelines]


class TemporalViews(nn.Module):
    """``frames`` uint8 (B, 3, C, H, W) = (o_{t-1}, o_t, o_{t+1}) -> {"views": two crops of o_t,
    "adjacent": [o_{t-1}, o_{t+1}]}. Neighbours get no crop (the evaluation's centre crop to ``size``) and
    only the photometric jitter / greyscale, as in the official code."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], **view_kwargs) -> None:
        """``view_kwargs`` are ``ObservationViews``' (its defaults are the one source); the neighbours take
        its photometric settings."""
        super().__init__()
        self.size, self.mean, self.std = size, list(mean), list(std)
        self.current = ObservationViews(size, mean, std, **view_kwargs)
        ops = _jitter(**self.current.photometric, p=self.current.jitter_p)
        if self.current.grayscale_p > 0:
            ops.append(K.RandomGrayscale(p=self.current.grayscale_p))
        self.adjacent = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (B, 3, C, H, W), got {tuple(frames.shape)}")
        b = frames.shape[0]
        views = self.current(frames[:, 1])
        neighbours = torch.cat([frames[:, 0], frames[:, 2]])
        x = eval_view(neighbours, self.size, (0.0,) * 3, (1.0,) * 3)  # centre crop, float in [0, 1]
        x = self.adjacent(x).clamp_(0, 1) if len(self.adjacent) else x
        x = normalize(x, self.mean, self.std)
        return {"views": views, "adjacent": [x[:b], x[b:]]}
