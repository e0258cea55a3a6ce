"""Batched views: crops of letterboxed images equal crops of the full photo, the evaluation crop is the official
"resize 256, centre crop 224" of the photo, and colour jitter draws its op order per image (torchvision)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sslab.augment import MultiCropViews, eval_view
from sslab.augment.color import RandomColorJitter
from sslab.augment.crops import sample_resized_crops, valid_boxes
from sslab.augment.mae_views import MAEViews
from sslab.augment.temporal_views import ObservationViews
from sslab.data.imagefolder import letterbox


def photos_and_letterboxed(n=6, w=40, h=30):
    """n random RGB photos (uint8, n x 3 x h x w) and the same photos as the loader stores them (alpha, square)."""
    rng = np.random.default_rng(0)
    photos = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    boxed = torch.stack([letterbox(Image.fromarray(p), max(w, h), 3) for p in photos])
    plain = torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous()
    top = (max(w, h) - h) // 2
    assert torch.equal(boxed[:, :3, top : top + h], plain)  # the loader kept every pixel
    return plain, boxed


@pytest.mark.parametrize(
    "make",
    [
        lambda: MAEViews(16, [0.5] * 3, [0.25] * 3, scale=(0.05, 1.0)),
        lambda: MultiCropViews(16, 8, [0.5] * 3, [0.25] * 3, num_local=3),
        lambda: ObservationViews(16, [0.5] * 3, [0.25] * 3, saturation=0.2, hue=0.1),
    ],
    ids=["mae", "multicrop", "observation"],
)
def test_crops_of_the_letterboxed_image_are_crops_of_the_full_photo(make):
    """Same seed, same views: drawn inside the valid box of the stored square, or on the bare photo. The old
    pipelines drew from the whole square (pad included) and could not pass this."""
    plain, boxed = photos_and_letterboxed()
    views = make()
    torch.manual_seed(3)
    from_boxed = views(boxed)
    torch.manual_seed(3)
    from_plain = views(plain)
    as_list = lambda v: [v] if torch.is_tensor(v) else v  # noqa: E731
    for a, b in zip(as_list(from_boxed), as_list(from_plain), strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-4)


def test_crop_parameters_follow_torchvision_inside_each_box():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.0, 5.0, 40.0, 35.0], [3.0, 0.0, 19.0, 40.0]]).repeat(2000, 1)
    crops = sample_resized_crops(boxes, (0.08, 1.0), (3 / 4, 4 / 3))
    assert (crops[:, :2] >= boxes[:, :2]).all() and (crops[:, 2:] <= boxes[:, 2:]).all()
    w, h = crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]
    area = w * h / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    assert area.min() >= 0.05 and area.max() <= 1.0
    assert (w / h).min() >= 0.6 and (w / h).max() <= 1.6  # 3/4..4/3 up to integer rounding
    # the placement spans the whole box: crops touch every side somewhere
    assert (crops[::2, 0] == 0).any() and (crops[::2, 2] == 40).any() and (crops[::2, 1] == 5).any()
    # no draw fits a 100 x 10 box at scale >= 0.9: torchvision's fallback, the centred crop at ratio 4/3
    wide = sample_resized_crops(torch.tensor([[0.0, 0.0, 100.0, 10.0]]), (0.9, 1.0), (3 / 4, 4 / 3))
    assert wide.tolist() == [[43.0, 0.0, 56.0, 10.0]]


def test_eval_view_is_the_official_centre_crop_of_the_photo():
    """A horizontal ramp photo (value = column) letterboxed: the evaluation view spans exactly the centred
    square of 224/256 of the short side, as Resize(256) + CenterCrop(224) does on the full photo."""
    w, h, size = 160, 120, 56
    ramp = np.repeat(np.linspace(0, 255, w, dtype=np.float64)[None, :], h, 0)
    photo = np.rint(ramp).astype(np.uint8)
    boxed = letterbox(Image.fromarray(photo), w, 1)[None]
    assert valid_boxes(boxed).tolist() == [[0.0, 20.0, 160.0, 140.0]]
    x = eval_view(boxed, size, [0.0] * 3, [1.0] * 3)[0, 0] * 255
    side = h * 224 / 256
    left = (w - side) / 2
    centres = left + (torch.arange(size) + 0.5) * side / size - 0.5  # photo column of each output pixel
    expected = centres * 255 / (w - 1)
    assert torch.allclose(x.mean(0), expected.float(), atol=1.0)
    assert torch.allclose(x, x.mean(0, keepdim=True).expand_as(x), atol=1e-3)  # no pad rows inside


def test_colour_jitter_order_is_drawn_per_image():
    """Fixed brightness x1.8 and contrast x0.3: the two orders give different images (every step clamps).
    Sixty-four copies of one image must show both orders, each exactly torchvision's formula. kornia's
    ColorJitter draws one order per call, so all 64 would be equal."""
    torch.manual_seed(0)
    img = torch.rand(1, 3, 8, 8)
    batch = img.repeat(64, 1, 1, 1)
    out = RandomColorJitter(brightness=(1.8, 1.8), contrast=(0.3, 0.3), p=1.0)(batch)

    def brightness(x):
        return (x * 1.8).clamp(0, 1)

    def contrast(x):
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean((-2, -1))
        return (0.3 * x + 0.7 * grey[:, None, None, None]).clamp(0, 1)

    b_then_c, c_then_b = contrast(brightness(img)), brightness(contrast(img))
    assert (b_then_c - c_then_b).abs().max() > 0.05
    first = torch.stack([(o - b_then_c[0]).abs().max() < 1e-4 for o in out])
    second = torch.stack([(o - c_then_b[0]).abs().max() < 1e-4 for o in out])
    assert (first | second).all()
    assert 10 < first.sum() < 54  # both orders, about half each


def test_the_view_pipelines_use_the_per_image_jitter():
    import kornia.augmentation as K

    for views in (
        MultiCropViews(16, 8, [0.5] * 3, [0.25] * 3, num_local=2),
        ObservationViews(16, [0.5] * 3, [0.25] * 3),
    ):
        kinds = [type(m) for m in views.modules()]
        assert RandomColorJitter in kinds and K.ColorJitter not in kinds


def test_colour_jitter_probability_and_identity_ops():
    torch.manual_seed(1)
    x = torch.rand(400, 3, 4, 4)
    out = RandomColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8)(x)
    changed = (out - x).flatten(1).abs().amax(1) > 1e-6
    assert 0.7 < changed.float().mean() < 0.9
    assert torch.equal(RandomColorJitter(0.0, 0.0, 0.0, 0.0, p=1.0)(x), x)
    assert math.isclose(RandomColorJitter(hue=0.1).ranges[3][0], -0.1)
