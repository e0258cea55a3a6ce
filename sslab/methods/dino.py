"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sslab.augment import MultiCropViews
from sslab.modules.dino_loss import dino_loss, update_center
from sslab.modules.ema import ema_update_
from sslab.modules.heads import DINOHead
from sslab.modules.schedules import CosineSchedule, LinearWarmupSchedule

from .base import SSLMethod


class DINO(SSLMethod):
    """Student and EMA teacher (backbone + DINO head) trained on multi-crop views.

    - The teacher sees only the global crops; the student sees all crops; same-view pairs are skipped.
    - Teacher outputs are centred (center EMA ``center_momentum`` over all ranks) and sharpened by a
      temperature warmed up linearly from ``warmup_teacher_temp`` to ``teacher_temp``.
    - Teacher momentum follows a cosine from ``momentum_teacher`` to 1.
    - The head's last layer gets no update during the first ``freeze_last_layer_epochs`` epochs.
    - Gradients are clipped per tensor at ``grad_clip`` (3.0 in the paper).
    """

    def __init__(
        self,
        *args,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
        freeze_last_layer_epochs: float = 1,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        teacher_temp_warmup_epochs: float = 30,
        center_momentum: float = 0.9,
        momentum_teacher: float = 0.996,
        views: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        self.view_cfg = dict(views or {})
        super().__init__(*args, **kwargs)
        self.head_kwargs = {
            "hidden_dim": hidden_dim,
            "bottleneck_dim": bottleneck_dim,
            "norm_last_layer": norm_last_layer,
            "use_bn": use_bn_in_head,
        }  # subclasses build further heads (iBOT's patch head) the same way
        self.head = DINOHead(self.backbone.embed_dim, out_dim, **self.head_kwargs)
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_head = copy.deepcopy(self.head)
        for p in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad = False
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.student_temp = student_temp
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.teacher_temp_warmup_epochs = teacher_temp_warmup_epochs
        self.center_momentum = center_momentum
        self.momentum_teacher = momentum_teacher

    def make_views(self) -> nn.Module:
        return MultiCropViews(
            global_size=self.data.image_size,
            local_size=self.data.local_crop_size,
            mean=self.data.mean,
            std=self.data.std,
            **self.view_cfg,
        )

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.head]

    def extra_schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        warmup = int(self.teacher_temp_warmup_epochs * steps_per_epoch)
        return {
            "momentum": CosineSchedule(self.momentum_teacher, 1.0, total_steps),
            "teacher_temp": LinearWarmupSchedule(self.warmup_teacher_temp, self.teacher_temp, warmup),
        }

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher_backbone(images)

    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone

    def forward_crops(
        self, backbone: nn.Module, head: nn.Module, crops: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """One backbone call per crop resolution, one head call for all crops; (B, K) logits per crop."""
        return list(head(features_by_resolution(backbone, crops)).chunk(len(crops)))

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        crops: list[torch.Tensor] = batch["views"]
        n_global = self.views.num_global
        step = self.global_step
        with torch.no_grad():
            teacher_cls = self.teacher_backbone(torch.cat(crops[:n_global]))
            teacher_logits = self.teacher_head(teacher_cls)
        student_logits = self.forward_crops(self.backbone, self.head, crops)
        temp = self.schedules["teacher_temp"](step)
        loss = dino_loss(
            student_logits, list(teacher_logits.chunk(n_global)), self.center, self.student_temp, temp
        )
        with torch.no_grad():
            probs = torch.softmax((teacher_logits.float() - self.center) / temp, dim=-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            self.center.copy_(update_center(self.center, teacher_logits, self.center_momentum))
        batch_size = crops[0].shape[0]
        return {"loss": loss, "features": teacher_cls[:batch_size], "logs": {"teacher_entropy": entropy}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_step < self.freeze_last_layer_epochs * self.steps_per_epoch:
            for layer in self.frozen_last_layers():
                for p in layer.parameters():
                    p.grad = None
        super().on_before_optimizer_step(optimizer)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The teacher follows right after the student's update, inside the step, so a checkpoint taken
        at the end of the step (callbacks run before this module's batch-end hook) already holds it."""
        super().optimizer_step(*args, **kwargs)
        momentum = self.schedules["momentum"](self.trained_step)
        for teacher, student in self.ema_pairs():
            ema_update_(teacher, student, momentum)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) modules the teacher EMA updates; subclasses with more heads extend it."""
        return [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]

    def frozen_last_layers(self) -> list[nn.Module]:
        """Head output layers that get no update during the first ``freeze_last_layer_epochs``."""
        return [self.head.last_layer]


def features_by_resolution(backbone: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """Backbone features of all crops in order, with one backbone call per run of equal-size crops."""
    feats, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
            end += 1
        feats.append(backbone(torch.cat(list(crops[start:end]))))
        start = end
    return torch.cat(feats)
