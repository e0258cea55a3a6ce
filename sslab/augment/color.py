"""Colour jitter with torchvision's semantics, batched: each image draws its own factors *and its own order*.

kornia's ``ColorJitter`` draws one order of (brightness, contrast, saturation, hue) per call, so a whole
batch shares it; torchvision (used by the official DINO/iBOT/TOV-VICReg code) draws one per image. The order
matters because every step clamps to [0, 1] and contrast/saturation blend towards statistics of the current
image. Here each image gets a random permutation; position by position, the images whose permutation puts
op j there are gathered and adjusted together, so the work is one adjustment per image and op, as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from torch import nn


def _factor_range(value: float | Sequence[float], centre: float) -> tuple[float, float]:
    """torchvision's convention: a number v means [max(0, centre - v), centre + v] (hue: [-v, v]); a pair is
    the range itself."""
    if isinstance(value, (int, float)):
        lo = -float(value) if centre == 0 else max(0.0, centre - float(value))
        return lo, centre + float(value)
    lo, hi = (float(v) for v in value)
    return lo, hi


def _hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    return adjust_hue(x, turns * (2 * math.pi))  # torchvision's factor is a fraction of a turn


class RandomColorJitter(nn.Module):
    """float (B, 3, H, W) in [0, 1] -> jittered with probability ``p`` per image; factors and op order per image.

    Strengths follow ``torchvision.transforms.ColorJitter`` (numbers or (min, max) pairs). Adjustments use
    torchvision's formulas (kornia's ``*_accumulative`` / ``*_subtraction`` functions); an op whose range is
    the identity is skipped."""

    OPS = (
        adjust_brightness_accumulative,
        adjust_contrast_with_mean_subtraction,
        adjust_saturation_with_gray_subtraction,
        _hue,
    )

    def __init__(
        self,
        brightness: float | Sequence[float] = 0.0,
        contrast: float | Sequence[float] = 0.0,
        saturation: float | Sequence[float] = 0.0,
        hue: float | Sequence[float] = 0.0,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        self.p = p
        self.ranges = [
            _factor_range(brightness, 1.0),
            _factor_range(contrast, 1.0),
            _factor_range(saturation, 1.0),
            _factor_range(hue, 0.0),
        ]
        identity = (1.0, 1.0, 1.0, 0.0)
        self.active = [r != (i, i) for r, i in zip(self.ranges, identity, strict=True)]

    def extra_repr(self) -> str:
        return f"ranges={self.ranges}, p={self.p}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        # every draw is made whatever applies, so the random stream does not depend on the data
        apply = torch.rand(n, device=dev) < self.p
        factors = [lo + (hi - lo) * torch.rand(n, device=dev, dtype=x.dtype) for lo, hi in self.ranges]
        order = torch.rand(n, 4, device=dev).argsort(1)  # a uniform random permutation per image
        out = x.clone()
        for position in range(4):
            for op, fn in enumerate(self.OPS):
                if not self.active[op]:
                    continue
                idx = torch.nonzero(apply & (order[:, position] == op)).squeeze(1)
                if idx.numel():
                    y = fn(out.index_select(0, idx).clamp_(0, 1), factors[op].index_select(0, idx))
                    out.index_copy_(0, idx, y.clamp_(0, 1))
        return out
