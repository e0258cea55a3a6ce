"""CutLER's detector as one LightningModule: the Mask R-CNN, its augmentations and its optimiser.

Reference schedule (facebookresearch/CutLER, CutLER-ImageNet configs): round 0 with DropLoss (IoU 0.01),
copy-paste (scale 0.3-1.0), lr 0.01 for batch 16 decayed by 0.02 at half the run, weight decay 5e-5, gradient
norm clipped at 1.0, linear warm-up; self-training rounds start from the previous round's detector with
DropLoss off, copy-paste scale 0.5-1.0 and a constant lr 0.005. The reference optimiser is SGD on a ResNet;
AdamW (the ViTDet choice for ViTs) is the default here, SGD with momentum 0.9 an option.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from sslab import backbones
from sslab.cutler.detector import IMAGENET_MEAN, IMAGENET_STD, build_detector
from sslab.cutler.detector_data import copy_paste, hflip, targets_from_masks
from sslab.errors import SSLabError
from sslab.training_shell import check_finite_loss, step_seed

# The detector's shape beyond its backbone, which a self-training round takes from the previous round's
ARCHITECTURE = ("fpn_channels", "rois_per_image", "mask_pool", "patch_size")


def lr_factor(step: int, warmup_steps: int, decay_step: int, gamma: float) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from 0.001, times ``gamma`` from ``decay_step`` on."""
    warm = 1.0 if step >= warmup_steps else 0.001 + (1 - 0.001) * step / warmup_steps
    return warm * (gamma if step >= decay_step else 1.0)


class DetectorModule(pl.LightningModule):
    """The Mask R-CNN, its augmentations (flip, optional copy-paste) and its optimiser, as one module.

    Every random draw of step s (flip, copy-paste, torchvision's RPN/ROI samplers) comes from a seed fixed by
    (seed, s), so a run resumed from a checkpoint trains exactly as one that never stopped.
    """

    def __init__(
        self,
        backbone_cfg: dict[str, Any],
        image_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        lr: float = 1e-4,
        optimizer: str = "adamw",
        weight_decay: float = 0.05,
        max_steps: int = 1000,
        warmup_steps: int | None = None,
        lr_decay_at: float = 0.5,
        lr_gamma: float = 0.02,
        copy_paste: bool = False,
        copy_paste_ratio: tuple[float, float] = (0.3, 1.0),
        flip: bool = True,
        drop_iou: float | None = 0.01,
        fpn_channels: int = 64,
        rois_per_image: int = 64,
        mask_pool: int = 7,
        patch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise SSLabError(f"detector optimizer={optimizer!r}; choose adamw or sgd")
        self.save_hyperparameters()
        self.model = build_detector(
            backbones.build(**backbone_cfg),
            image_size,
            mean=mean,
            std=std,
            drop_iou=-1.0 if drop_iou is None else drop_iou,  # None: plain loss (IoU >= 0 > -1 keeps all)
            **{key: self.hparams[key] for key in ARCHITECTURE},
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        torch.manual_seed(step_seed(self.hparams.seed, self.global_step))
        hp = self.hparams
        images, masks, valid = batch["image"], batch["masks"], batch["valid"]
        if hp.flip:
            images, masks = hflip(images, masks, torch.rand(len(images), device=images.device) < 0.5)
        if hp.copy_paste:
            images, masks, valid = copy_paste(images, masks, valid, *hp.copy_paste_ratio)
        targets = targets_from_masks(masks, valid)
        losses = self.model(list(images.float().div(255)), targets)
        loss = sum(losses.values())
        check_finite_loss(loss, self.global_step, "lower the learning rate", what="detector loss")
        self.log("train/loss", loss, prog_bar=True)
        for k, v in losses.items():
            self.log(f"train/{k}", v)
        self.log("train/droploss_kept", self.model.roi_heads.last_kept_fraction)
        self.log("train/instances", valid.sum(1).float().mean())
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and norms
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        warmup = hp.warmup_steps if hp.warmup_steps is not None else min(1000, max(hp.max_steps // 10, 1))
        decay_step = int(hp.lr_decay_at * hp.max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, warmup, decay_step, hp.lr_gamma)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
