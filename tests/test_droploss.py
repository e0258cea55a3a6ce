"""DropLoss (CutLER): regions overlapping no pseudo-box (max IoU <= 0.01) lose their classification loss."""

import math
from collections import OrderedDict

import pytest
import torch

from sslab.backbones import build
from sslab.cutler.detector import build_detector
from sslab.cutler.droploss import (
    drop_keep,
    droploss_classification,
    max_iou_to_gt,
    pairwise_box_iou,
)

# image 0 has one pseudo-box, image 1 two
GT = [torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[20.0, 20, 30, 30], [0, 0, 4, 4]])]
# (box, its image, hand-worked max IoU with that image's boxes)
REGIONS = [
    ([0, 0, 10, 10], 0, 1.0),
    ([9, 9, 19, 19], 0, 1 / 199),  # 1 px of overlap: 1 / (100 + 100 - 1) = 0.005 -> dropped
    ([8, 8, 18, 18], 0, 4 / 196),  # 4 px: 0.0204 -> kept
    ([9, 8, 15, 25], 0, 2 / 200),  # 1 x 2 px with a 6 x 17 box: exactly 0.01 -> dropped (<=)
    ([20, 20, 30, 30], 0, 0.0),  # matches a box of image 1, not of its own image -> dropped
    ([20, 20, 30, 30], 1, 1.0),
    ([0, 0, 10, 10], 1, 16 / 100),  # contains the 4 x 4 box -> kept
    ([50, 50, 60, 60], 1, 0.0),
]


def test_pairwise_iou_hand_values():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[[5.0, 0, 15, 10], [0, 0, 0, 0], [10, 10, 20, 20]]])
    assert torch.allclose(pairwise_box_iou(a, b), torch.tensor([[50 / 150, 0.0, 0.0]]))


def test_max_iou_and_kept_regions_match_hand_worked_values():
    boxes = torch.tensor([r[0] for r in REGIONS], dtype=torch.float)
    image = torch.tensor([r[1] for r in REGIONS])
    expected = torch.tensor([r[2] for r in REGIONS])
    iou = max_iou_to_gt(boxes, image, GT)
    assert torch.allclose(iou, expected, atol=1e-7)
    assert drop_keep(iou, 0.01).tolist() == [True, False, True, False, False, True, True, False]
    # an image without any pseudo-box drops all its regions
    assert max_iou_to_gt(boxes[:2], torch.tensor([0, 1]), [GT[0], torch.zeros(0, 4)]).tolist() == [1.0, 0.0]


def test_classification_loss_is_kept_cross_entropy_over_all_regions():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    keep = torch.tensor([True, False, True, True])
    ce = [math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(-3)), math.log(1 + math.exp(2))]
    expected = (ce[0] + ce[2] + ce[3]) / 4  # the reference's normalisation: all sampled regions
    assert droploss_classification(logits, labels, keep).item() == pytest.approx(expected, rel=1e-6)
    assert droploss_classification(logits, labels, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(
        sum(ce) / 4, rel=1e-6
    )


@pytest.mark.parametrize("drop_iou", [0.01, -1.0])
def test_roi_heads_drop_exactly_the_regions_without_overlap(drop_iou):
    """Through torchvision's real proposal matching and sampling: with a zeroed box predictor every region
    scores CE = log 2, so the classification loss is log 2 * kept / sampled."""
    torch.manual_seed(0)
    vit = build("vit_t", img_size=64, patch_size=8, depth=1)
    heads = build_detector(vit, 64, drop_iou=drop_iou).roi_heads.train()
    for layer in (heads.box_predictor.cls_score, heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    features = OrderedDict(
        (str(i), torch.randn(2, 64, s, s)) for i, s in enumerate((16, 8, 4))
    )  # strides 4, 8, 16 of a 64 px image
    proposals = [torch.tensor([r[0] for r in REGIONS if r[1] == i], dtype=torch.float) for i in (0, 1)]
    masks = [torch.zeros(len(g), 64, 64, dtype=torch.uint8) for g in GT]
    targets = [
        {"boxes": g, "labels": torch.ones(len(g), dtype=torch.int64), "masks": m}
        for g, m in zip(GT, masks, strict=True)
    ]
    _, losses = heads(features, proposals, [(64, 64), (64, 64)], targets)
    sampled = len(REGIONS) + 3  # torchvision adds the 3 pseudo-boxes as regions; all fit in the sample
    kept = 4 + 3 if drop_iou >= 0 else sampled
    assert losses["loss_classifier"].item() == pytest.approx(math.log(2) * kept / sampled, rel=1e-5)
    assert heads.last_kept_fraction.item() == pytest.approx(kept / sampled)


def test_a_batch_with_an_image_without_pseudo_boxes_falls_back_to_the_plain_loss():
    """facebookresearch/CutLER ``cutler/modeling/roi_heads/roi_heads.py`` (``_forward_box``): when an image of
    the batch has no pseudo-box its proposals carry no ``gt_boxes``, ``no_gt_found`` is set and the whole
    batch gets the plain classification loss. With a zeroed predictor every region scores log 2, so the loss
    is exactly log 2 (all regions kept), where DropLoss would have dropped regions and given less."""
    torch.manual_seed(0)
    vit = build("vit_t", img_size=64, patch_size=8, depth=1)
    heads = build_detector(vit, 64, drop_iou=0.01).roi_heads.train()
    for layer in (heads.box_predictor.cls_score, heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    features = OrderedDict((str(i), torch.randn(2, 64, s, s)) for i, s in enumerate((16, 8, 4)))
    proposals = [torch.tensor([r[0] for r in REGIONS if r[1] == i], dtype=torch.float) for i in (0, 1)]
    gt = [GT[0], torch.zeros(0, 4)]  # image 1 has no pseudo-box
    targets = [
        {"boxes": g, "labels": torch.ones(len(g), dtype=torch.int64), "masks": torch.zeros(len(g), 64, 64)}
        for g in gt
    ]
    _, losses = heads(features, proposals, [(64, 64), (64, 64)], targets)
    assert losses["loss_classifier"].item() == pytest.approx(math.log(2), rel=1e-5)
    assert heads.last_kept_fraction.item() == 1.0
    # with both images boxed, DropLoss applies again (image 0's 3 non-overlapping regions are dropped)
    targets[1] = {"boxes": GT[1], "labels": torch.ones(2, dtype=torch.int64), "masks": torch.zeros(2, 64, 64)}
    _, losses = heads(features, proposals, [(64, 64), (64, 64)], targets)
    assert losses["loss_classifier"].item() < math.log(2) - 0.1
