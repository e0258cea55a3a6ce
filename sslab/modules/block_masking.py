"""Block-wise masking for masked image modeling (BEiT, Bao et al. 2022; iBOT, Zhou et al. 2022; DINOv2,
Oquab et al. 2024).

Each image gets a masking budget ``N * r`` with ratio r ~ U(lo, hi); a share of the images stays unmasked.
iBOT (``loader.py``) keeps the budget as the float ``r * H * W``; DINOv2 (``collate.py``) floors it,
``int(N * r)`` (``integer_budget``). Blocks are added while the count is below the budget, so the float
bound allows a last block where the floored one stops. Rectangular blocks are added until the count is reached: a block has area ~ U(min_area,
remaining), aspect ratio log-uniform in (min_aspect, 1 / min_aspect), h = round(sqrt(area * aspect)),
w = round(sqrt(area / aspect)), must be smaller than the grid (h < H, w < W) and is accepted only if it adds
between 1 and ``remaining`` new patches, so the count never overshoots. An image gives up after 10 failed
draws in a row, as in the reference generators (so a target may be missed by a little on tiny grids).

Unlike the per-sample reference code, one draw is made for every image of the batch at once: the loop runs
over draws (tens), never over images. All randomness comes from torch's RNG (``generator`` or the global
one, which ``SSLMethod`` seeds per step), so a resumed run draws the same masks.
"""

from __future__ import annotations

import math

import torch

MAX_FAILED_DRAWS = 10  # per block, as in BEiT / iBOT / DINOv2


def default_min_block(height: int, width: int) -> int:
    """iBOT's smallest block area, (min(H, W) // 3)^2 (16 on a 14 x 14 grid), at least one patch."""
    return max(1, (min(height, width) // 3) ** 2)


def mask_targets(
    batch: int,
    num_patches: int,
    probability: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
    stratified: bool = False,
    generator: torch.Generator | None = None,
    integer_budget: bool = False,
) -> torch.Tensor:
    """(B,) float budget of patches to mask per image (floored with ``integer_budget``).

    iBOT (default): each image is masked with ``probability``, its ratio ~ U(lo, hi).
    DINOv2 (``stratified``): exactly int(B * probability) images are masked, the i-th of them with a ratio
    drawn from the i-th of equal strata of (lo, hi), then the images are shuffled.
    """
    lo, hi = ratio
    u = torch.rand(batch, generator=generator)
    if stratified:
        n_masked = int(batch * probability)
        edges = torch.linspace(lo, hi, n_masked + 1)
        r = torch.zeros(batch)
        r[:n_masked] = edges[:-1] + (edges[1:] - edges[:-1]) * u[:n_masked]
        r = r[torch.randperm(batch, generator=generator)]
    else:
        masked = torch.rand(batch, generator=generator) < probability
        r = torch.where(masked, lo + (hi - lo) * u, torch.zeros(()))
    budget = num_patches * r
    return budget.floor() if integer_budget else budget


def draw_blocks(
    remaining: torch.Tensor,
    height: int,
    width: int,
    min_area: float,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One candidate block per image: (top, left, h, w, fits), all (B,) long/bool.

    area ~ U(min_area, remaining) (as in the reference, the interval may be reversed when remaining <
    min_area), aspect log-uniform in (min_aspect, 1 / min_aspect); ``fits`` is h < H and w < W, and the
    position is uniform over the places where the block lies inside the grid.
    """
    b = remaining.shape[0]
    u_area, u_aspect, u_top, u_left = torch.rand(4, b, generator=generator)
    area = min_area + (remaining.float() - min_area) * u_area
    log_lo = math.log(min_aspect)
    aspect = torch.exp(log_lo + (-2 * log_lo) * u_aspect)
    h = torch.round(torch.sqrt(area * aspect)).long()
    w = torch.round(torch.sqrt(area / aspect)).long()
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    hc, wc = h.clamp(1, height), w.clamp(1, width)
    top = (u_top * (height - hc + 1)).long().clamp(max=height - 1)
    left = (u_left * (width - wc + 1)).long().clamp(max=width - 1)
    return top, left, h, w, fits


def block_masks(
    targets: torch.Tensor,
    height: int,
    width: int,
    min_block_patches: int | None = None,
    max_block_patches: float | None = None,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, H, W) bool masks with at most ``targets[b]`` patches each (a float or integer budget), made of
    rectangular blocks.

    ``min_block_patches`` defaults to iBOT's rule (``default_min_block``); DINOv2 uses 4. ``max_block_patches``
    caps one block (DINOv2: half the patches; iBOT: no cap).
    """
    b = targets.shape[0]
    min_area = default_min_block(height, width) if min_block_patches is None else min_block_patches
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    mask = torch.zeros(b, height, width, dtype=torch.bool)
    count = torch.zeros(b, dtype=torch.long)
    failed = torch.zeros(b, dtype=torch.long)
    while True:
        active = (count < targets) & (failed < MAX_FAILED_DRAWS)
        if not bool(active.any()):
            return mask
        remaining = targets - count
        allowed = remaining if max_block_patches is None else remaining.clamp(max=max_block_patches)
        top, left, h, w, fits = draw_blocks(allowed, height, width, min_area, min_aspect, generator)
        top, left, h, w = (t.view(b, 1, 1) for t in (top, left, h, w))
        block = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        new = (block & ~mask).flatten(1).sum(1)  # accepted when 0 < new <= allowed (a float bound)
        accept = active & fits & (new > 0) & (new <= allowed)
        mask |= block & accept.view(b, 1, 1)
        count += torch.where(accept, new, 0)
        failed = torch.where(accept, 0, failed + active.long())


class BlockMasking:
    """Masks for ``batch`` images on a ``height`` x ``width`` patch grid, with the iBOT/DINOv2 options."""

    def __init__(
        self,
        probability: float = 0.5,
        ratio: tuple[float, float] = (0.1, 0.5),
        min_aspect: float = 0.3,
        min_block_patches: int | None = None,
        max_block_fraction: float | None = None,
        stratified: bool = False,
        integer_budget: bool = False,
    ) -> None:
        lo, hi = ratio
        if not (0.0 <= lo <= hi <= 1.0 and 0.0 <= probability <= 1.0 and 0.0 < min_aspect <= 1.0):
            raise ValueError(
                f"masking needs 0 <= ratio lo <= hi <= 1, probability in [0, 1] and min_aspect in (0, 1]; "
                f"got ratio={ratio}, probability={probability}, min_aspect={min_aspect}"
            )
        self.probability, self.ratio, self.min_aspect = probability, (lo, hi), min_aspect
        self.min_block_patches, self.max_block_fraction = min_block_patches, max_block_fraction
        self.stratified = stratified
        self.integer_budget = integer_budget

    def __call__(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        n = height * width
        targets = mask_targets(
            batch, n, self.probability, self.ratio, self.stratified, generator, self.integer_budget
        )
        cap = None if self.max_block_fraction is None else max(1.0, self.max_block_fraction * n)
        return block_masks(targets, height, width, self.min_block_patches, cap, self.min_aspect, generator)
