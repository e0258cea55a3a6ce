"""CutLER's class-agnostic detector: torchvision Mask R-CNN on our ViT encoder, trained with DropLoss.

Reference (facebookresearch/CutLER): a Cascade Mask R-CNN with a ResNet-50 FPN initialised from DINO, one
foreground class, DropLoss (IoU threshold 0.01) in the ROI heads, copy-paste augmentation. Here: torchvision's
plain (non-cascade) Mask R-CNN, ``num_classes=2`` (background + "object"), so box regression is class-agnostic
by construction, around our ViT through a ViTDet-style simple feature pyramid (Li et al., "Exploring Plain
Vision Transformer Backbones for Object Detection", ECCV 2022): the last layer's patch tokens, upsampled by a
transposed convolution, kept, and max-pooled, give three maps at strides p/2, p and 2p.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign

from sslab.backbones.base import Backbone
from sslab.backbones.vit import ViTBackbone
from sslab.cutler.droploss import drop_keep, droploss_classification, max_iou_to_gt
from sslab.errors import SSLabError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALES = (2.0, 1.0, 0.5)  # pyramid levels relative to the patch grid: strides p/2, p, 2p


class ViTSimplePyramid(nn.Module):
    """A ViT as a torchvision detection backbone: ``out_channels`` and an OrderedDict of feature maps.

    ViTDet's simple pyramid from the last block only: scale 2 = ConvTranspose(2, 2) (with LayerNorm + GELU
    between, as ViTDet's 4x branch, when the scale is 4), scale 1 = identity, scale 0.5 = max-pool; each level
    then gets a 1x1 and a 3x3 convolution with channel LayerNorm.
    """

    def __init__(self, vit: ViTBackbone, out_channels: int = 128, scales: Sequence[float] = SCALES) -> None:
        super().__init__()
        self.vit = vit
        self.out_channels = out_channels
        d = vit.embed_dim
        self.strides = [vit.patch_size / s for s in scales]
        self.levels = nn.ModuleList()
        for s in scales:
            if s == 4.0:
                pre = [nn.ConvTranspose2d(d, d // 2, 2, 2), LayerNorm2d(d // 2), nn.GELU()]
                pre += [nn.ConvTranspose2d(d // 2, d // 4, 2, 2)]
                dim = d // 4
            elif s == 2.0:
                pre, dim = [nn.ConvTranspose2d(d, d // 2, 2, 2)], d // 2
            elif s == 1.0:
                pre, dim = [], d
            elif s == 0.5:
                pre, dim = [nn.MaxPool2d(2, 2)], d
            else:
                raise SSLabError(f"pyramid scale {s} is not one of 4, 2, 1, 0.5")
            self.levels.append(
                nn.Sequential(
                    *pre,
                    nn.Conv2d(dim, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        p = self.vit.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        patch = self.vit.forward_tokens(x)["patch"]  # (B, h*w, D)
        fmap = patch.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return OrderedDict((str(i), level(fmap)) for i, level in enumerate(self.levels))


def droploss_keep(
    regions: torch.Tensor, image_of_box: torch.Tensor, gt_boxes: list[torch.Tensor], drop_iou: float
) -> torch.Tensor:
    """Regions (N, 4) whose classification loss DropLoss keeps (CutLER, Wang et al. 2023, Eq. 1): max IoU with
    the pseudo-boxes of the region's own image > ``drop_iou``. If any image of the batch has no pseudo-box,
    every region is kept (the reference's ``no_gt_found`` fallback to the plain loss, for the whole batch)."""
    if any(len(g) == 0 for g in gt_boxes):
        return torch.ones(len(regions), dtype=torch.bool, device=regions.device)
    return drop_keep(max_iou_to_gt(regions, image_of_box, gt_boxes), drop_iou)


class DropLossRoIHeads(RoIHeads):
    """torchvision's RoIHeads whose training classification loss is DropLoss (``sslab.cutler.droploss``).

    As in the reference, a region's IoU is that of the box the head predicts for it (proposal + regression,
    detached), with ``drop_on_proposals=True`` the raw proposal's, and it is compared only with the
    pseudo-boxes of the region's own image. Inference is torchvision's, unchanged.

    A batch holding an image without any pseudo-box falls back to the plain classification loss for the whole
    batch, as the reference does (facebookresearch/CutLER ``cutler/modeling/roi_heads/roi_heads.py``
    ``_forward_box``: such an image's proposals carry no ``gt_boxes``, the try block fails, ``no_gt_found``).
    Dropping instead would silence every region of that image, all of which are background.
    One difference: the reference takes an image's pseudo-boxes as ``gt_boxes[:gt_num]`` of the sampled
    proposals' matched boxes (gt_num = distinct boxes among the first 100), which can repeat one box and miss
    another; we use the image's full pseudo-box list, the set that selection approximates.
    """

    def __init__(self, *args, drop_iou: float = 0.01, drop_on_proposals: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_iou = drop_iou
        self.drop_on_proposals = drop_on_proposals

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        if self.drop_on_proposals:
            regions = torch.cat(proposals)
        else:  # the box predicted for the foreground class (index 1 of background, object)
            regions = self.box_coder.decode(box_regression.detach(), proposals)[:, 1]
        counts = torch.tensor([len(p) for p in proposals], device=regions.device)
        image_of_box = torch.repeat_interleave(torch.arange(len(counts), device=regions.device), counts)
        keep = droploss_keep(regions, image_of_box, [t["boxes"] for t in targets], self.drop_iou)
        all_labels = torch.cat(labels)
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {
            "loss_classifier": droploss_classification(class_logits, all_labels, keep),
            "loss_box_reg": loss_box_reg,
        }

        positive = [lab > 0 for lab in labels]  # masks are learnt on foreground regions only
        mask_proposals = [p[m] for p, m in zip(proposals, positive, strict=True)]
        pos_matched = [i[m] for i, m in zip(matched_idxs, positive, strict=True)]
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
        )
        losses["loss_mask"] = maskrcnn_loss(
            mask_logits,
            mask_proposals,
            [t["masks"] for t in targets],
            [t["labels"] for t in targets],
            pos_matched,
        )
        self.last_kept_fraction = keep.float().mean().detach()
        return [], losses


def build_detector(
    backbone: Backbone,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    fpn_channels: int = 64,
    drop_iou: float = 0.01,
    drop_on_proposals: bool = False,
    rpn_nms: float = 0.65,
    rois_per_image: int = 64,
    mask_pool: int = 7,
    detections_per_image: int = 100,
    patch_size: int | None = None,
) -> MaskRCNN:
    """Class-agnostic Mask R-CNN around ``backbone`` for ``image_size`` inputs (nothing is rescaled).

    Reference values kept: RPN NMS 0.65, positive fraction 0.25, test score threshold 0.0, 100 detections.
    Scaled to small images: anchors 2 and 4 strides wide per level (8-64 px at patch 8), ROI sampling
    ``rois_per_image`` (512 in the reference), mask RoIAlign ``mask_pool`` (14 in the reference; 7 gives
    14 x 14 masks, enough for objects of a 64 px image and 4x cheaper), FPN width ``fpn_channels`` (256),
    RoIAlign level assignment centred on half the image at stride p (FPN's 224 px -> level 4 is tuned for
    800 px images and would send every box to the finest map).

    The pyramid's strides must be powers of two (torchvision infers each level's scale as one), so a ViT
    pretrained with another patch size (Fashion-MNIST's 7) runs at ``patch_size`` through FlexiViT's
    PI-resized kernel and interpolated position embeddings (``ViTBackbone.eval_patch_size``).
    """
    if not isinstance(backbone, ViTBackbone):
        raise SSLabError(
            f"the CutLER detector is built on ViT backbones; backbone={backbone.name or type(backbone).__name__} "
            "is not supported, use backbone=vit_*"
        )
    if patch_size is not None:
        backbone.eval_patch_size = int(patch_size)
        backbone.set_patch_size(None)
    p = backbone.patch_size
    if p < 2 or p & (p - 1) or image_size % (2 * p):
        raise SSLabError(
            f"detector patch size {p} must be a power of two with image size {image_size} a multiple of {2 * p}; "
            "set the detector's patch_size (e.g. 8 for 64 px images)"
        )
    body = ViTSimplePyramid(backbone, fpn_channels)
    names = [str(i) for i in range(len(body.strides))]
    sizes = tuple((int(2 * s), int(4 * s)) for s in body.strides)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    level_of_p = p.bit_length() - 1  # log2 of the stride-p level
    box_pool = MultiScaleRoIAlign(
        names, 7, 2, canonical_scale=max(image_size // 2, 8), canonical_level=level_of_p
    )
    mask_roi_pool = MultiScaleRoIAlign(
        names, mask_pool, 2, canonical_scale=max(image_size // 2, 8), canonical_level=level_of_p
    )
    c = fpn_channels
    model = MaskRCNN(
        body,
        num_classes=None,  # 2 (background + object) via the predictors below
        min_size=image_size,
        max_size=image_size,
        image_mean=list(mean),
        image_std=list(std),
        size_divisible=max(32, 2 * p),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=200,
        rpn_nms_thresh=rpn_nms,
        rpn_batch_size_per_image=128,
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(c * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, 2),
        box_score_thresh=0.0,
        box_detections_per_img=detections_per_image,
        box_batch_size_per_image=rois_per_image,
        box_positive_fraction=0.25,
        mask_roi_pool=mask_roi_pool,
        mask_head=MaskRCNNHeads(c, (c, c), 1),
        mask_predictor=MaskRCNNPredictor(c, c, 2),
    )
    old = model.roi_heads
    model.roi_heads = DropLossRoIHeads(
        old.box_roi_pool,
        old.box_head,
        old.box_predictor,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=rois_per_image,
        positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=0.0,
        nms_thresh=0.5,
        detections_per_img=detections_per_image,
        mask_roi_pool=old.mask_roi_pool,
        mask_head=old.mask_head,
        mask_predictor=old.mask_predictor,
        drop_iou=drop_iou,
        drop_on_proposals=drop_on_proposals,
    )
    return model
