"""Block-wise masking (BEiT / iBOT / DINOv2): ratios, shares, block shapes, and the same law as the published
per-sample algorithm."""

import math
import random

import pytest
import torch

from sslab.modules.block_masking import (
    BlockMasking,
    block_masks,
    default_min_block,
    draw_blocks,
    mask_targets,
)


def reference_mask(height, width, target, min_area, min_aspect, rng):
    """The published per-image generator (BEiT's MaskingGenerator as used by iBOT), written out as a plain
    loop: blocks of area U(min_area, remaining), log-uniform aspect, up to 10 draws per block."""
    mask = [[False] * width for _ in range(height)]
    count = 0
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    while count < target:
        remaining = target - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_area, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                new = sum(not mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < new <= remaining:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            mask[i][j] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return count


def test_min_block_follows_ibot_rule():
    assert default_min_block(14, 14) == 16
    assert default_min_block(16, 16) == 25
    assert default_min_block(4, 4) == 1
    assert default_min_block(2, 2) == 1


@pytest.mark.parametrize("grid", [4, 14])
def test_ratio_and_share_of_unmasked_images(grid):
    g = torch.Generator().manual_seed(0)
    n_img, n = 4000, grid * grid
    masks = BlockMasking(probability=0.5, ratio=(0.1, 0.5))(n_img, grid, grid, generator=g)
    assert masks.shape == (n_img, grid, grid) and masks.dtype == torch.bool
    counts = masks.flatten(1).sum(1)
    masked = counts > 0
    # half of the images are left unmasked (binomial sd 0.008 at 4000 draws)
    assert abs(masked.float().mean().item() - 0.5) < 0.03
    ratio = counts[masked].float() / n
    assert ratio.max().item() < 0.5  # never above the drawn ratio, which is < 0.5
    # the ratio of masked images is ~ int(N * U(0.1, 0.5)) / N, a little less when blocks do not fit
    expected = sum(int(n * (0.1 + 0.4 * (i + 0.5) / 1000)) for i in range(1000)) / 1000 / n
    assert expected - 0.02 < ratio.mean().item() <= expected + 0.005


def test_counts_never_exceed_targets_and_match_the_published_algorithm():
    g = torch.Generator().manual_seed(1)
    grid, n_img = 14, 3000
    targets = mask_targets(n_img, grid * grid, probability=1.0, ratio=(0.1, 0.5), generator=g)
    masks = block_masks(targets, grid, grid, generator=g)
    counts = masks.flatten(1).sum(1)
    assert torch.all(counts <= targets)
    ours = (counts.float() / targets.clamp(min=1)).mean().item()
    rng = random.Random(1)
    ref = [
        reference_mask(grid, grid, t, default_min_block(grid, grid), 0.3, rng) / max(t, 1)
        for t in targets.tolist()
    ]
    ref_mean = sum(ref) / len(ref)
    # same process, different random streams: mean coverage of the target agrees (sd of the mean ~0.001)
    assert abs(ours - ref_mean) < 0.006
    assert 0.95 < ours <= 1.0


def test_blocks_lie_in_the_grid_with_bounded_aspect():
    g = torch.Generator().manual_seed(2)
    h_grid, w_grid, n_draws = 14, 10, 20000
    remaining = torch.randint(1, 80, (n_draws,), generator=g)
    top, left, h, w, fits = draw_blocks(remaining, h_grid, w_grid, min_area=16, min_aspect=0.3, generator=g)
    top, left, h, w = top[fits], left[fits], h[fits], w[fits]
    assert fits.float().mean() > 0.5
    assert torch.all((h >= 1) & (h < h_grid) & (w >= 1) & (w < w_grid))
    assert torch.all((top >= 0) & (top + h <= h_grid) & (left >= 0) & (left + w <= w_grid))
    # h / w = aspect up to rounding h, w to integers: the interval [(h-.5)/(w+.5), (h+.5)/(w-.5)] meets [0.3, 1/0.3]
    hf, wf = h.float(), w.float()
    assert torch.all((hf - 0.5) / (wf + 0.5) <= 1 / 0.3 + 1e-6)
    assert torch.all((hf + 0.5) / (wf - 0.5).clamp(min=1e-6) >= 0.3 - 1e-6)
    # both extremes of the aspect range are used, and both edges of the grid are reached
    big = h * w >= 20
    assert (hf / wf)[big].max() > 2.5 and (hf / wf)[big].min() < 0.4
    assert (top == 0).any() and (top + h == h_grid).any() and (left + w == w_grid).any()


def test_a_single_block_is_a_filled_rectangle():
    # a target equal to the minimum block: every accepted first block is at most the target, and when it
    # covers the target exactly the mask is one rectangle
    g = torch.Generator().manual_seed(3)
    targets = torch.full((500,), 6)
    masks = block_masks(targets, 8, 8, min_block_patches=6, generator=g)
    for m in masks[masks.flatten(1).sum(1) == 6][:50]:
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        box = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        if box.numel() == 6:
            assert box.all()
    assert (masks.flatten(1).sum(1) == 6).float().mean() > 0.5


def test_stratified_masking_masks_exact_share_with_stratified_ratios():
    g = torch.Generator().manual_seed(4)
    n_img, n = 64, 196
    targets = mask_targets(
        n_img, n, probability=0.5, ratio=(0.1, 0.5), stratified=True, generator=g, integer_budget=True
    )
    masked = targets[targets > 0].sort().values
    assert (targets > 0).sum() == 32  # exactly int(B * p) images masked
    edges = torch.linspace(0.1, 0.5, 33)
    assert torch.all(masked >= (n * edges[:-1]).floor().long())  # the i-th smallest lies in the i-th stratum
    assert torch.all(masked <= (n * edges[1:]).floor().long())
    assert not torch.equal(targets[:32], targets.sort(descending=True).values[:32])  # shuffled


def test_masks_come_from_the_given_generator():
    masking = BlockMasking()
    a = masking(16, 4, 4, generator=torch.Generator().manual_seed(5))
    b = masking(16, 4, 4, generator=torch.Generator().manual_seed(5))
    c = masking(16, 4, 4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_masking_options_are_refused():
    with pytest.raises(ValueError, match="ratio"):
        BlockMasking(ratio=(0.6, 0.2))


def test_ibot_budget_is_the_float_ratio_times_the_grid_and_dinov2_floors_it():
    """bytedance/ibot ``loader.py``: ``high = get_pred_ratio() * H * W`` bounds the count as a float;
    DINOv2 ``dinov2/data/collate.py`` passes ``int(N * uniform(lo, hi))``."""
    g = torch.Generator().manual_seed(7)
    ibot = mask_targets(256, 196, probability=1.0, ratio=(0.1, 0.5), generator=g)
    assert (ibot != ibot.floor()).float().mean() > 0.9
    g = torch.Generator().manual_seed(7)
    dinov2 = mask_targets(256, 196, probability=1.0, ratio=(0.1, 0.5), generator=g, integer_budget=True)
    assert torch.equal(dinov2, ibot.floor())
    masks = block_masks(ibot, 14, 14, generator=torch.Generator().manual_seed(8))
    assert torch.all(masks.flatten(1).sum(1) <= ibot.floor())
