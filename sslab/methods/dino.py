"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from sslab.augment import MultiCropViews
from sslab.errors import SSLabError
from sslab.modules.dino_loss import dino_loss, update_center
from sslab.modules.ema import ema_update_
from sslab.modules.heads import DINOHead
from sslab.modules.schedules import CosineSchedule, LinearWarmupSchedule

from .base import SSLMethod

TEMPERATURE_STEPS = ("epoch", "step")


class DINO(SSLMethod):
    """Student and EMA teacher (backbone + DINO head) trained on multi-crop views.

    - The teacher sees only the global crops; the student sees all crops; same-view pairs are skipped.
    - The teacher is the student's architecture without stochastic depth (official DINO/iBOT build it with
      drop_path 0), starting from the student's weights. It stays in train mode, as in DINO, so a head with
      BatchNorm normalises teacher outputs with batch statistics; ``teacher_eval_mode`` (DINOv2) keeps it
      in eval mode instead.
    - Teacher outputs are centred (center EMA ``center_momentum`` over all ranks) and sharpened by a
      temperature warmed up linearly from ``warmup_teacher_temp`` to ``teacher_temp``; with
      ``teacher_temp_per=epoch`` it changes once per epoch (DINO/iBOT), with ``step`` every step (DINOv2).
    - Teacher momentum follows a cosine from ``momentum_teacher`` to 1.
    - The head's last layer gets no update during the first ``freeze_last_layer_epochs`` epochs.
    - Gradients are clipped per tensor at ``grad_clip`` (3.0 in the paper).
    - Weight decay skips biases and 1-D parameters only (DINO ``utils.get_params_groups``); the lr warm-up
      is ``np.linspace`` (peak at the last warm-up step).
    """

    weight_decay_rule = "dino"
    lr_warmup_linspace = True

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
        teacher_temp_per: str = "epoch",
        teacher_eval_mode: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.head_kwargs = {
            "hidden_dim": hidden_dim,
            "bottleneck_dim": bottleneck_dim,
            "norm_last_layer": norm_last_layer,
            "use_bn": use_bn_in_head,
        }  # subclasses build further heads (iBOT's patch head) the same way
        self.head = DINOHead(self.backbone.embed_dim, out_dim, **self.head_kwargs)
        if teacher_temp_per not in TEMPERATURE_STEPS:
            raise SSLabError(
                f"method.teacher_temp_per={teacher_temp_per!r} is unknown; choose one of "
                f"{', '.join(TEMPERATURE_STEPS)}"
            )
        self.teacher_temp_per = teacher_temp_per
        self.teacher_eval_mode = teacher_eval_mode
        self.teacher_backbone = teacher_copy(self.backbone)
        self.teacher_head = teacher_copy(self.head)
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
        return {
            "momentum": CosineSchedule(self.momentum_teacher, 1.0, total_steps),
            "teacher_temp": self.temperature_schedule(
                self.warmup_teacher_temp, self.teacher_temp, self.teacher_temp_warmup_epochs, steps_per_epoch
            ),
        }

    def temperature_schedule(
        self, start: float, end: float, warmup_epochs: float, steps_per_epoch: int
    ) -> LinearWarmupSchedule:
        """A teacher temperature ramp as the reference steps it: ``np.linspace(start, end, n)`` indexed by
        the epoch over int(warmup_epochs) epochs (DINO/iBOT), or by the step over the warm-up's steps
        (DINOv2)."""
        if self.teacher_temp_per == "epoch":
            epochs = int(warmup_epochs)
            return LinearWarmupSchedule(start, end, epochs * steps_per_epoch, steps_per_epoch, linspace=True)
        return LinearWarmupSchedule(start, end, int(warmup_epochs * steps_per_epoch), linspace=True)

    def train(self, mode: bool = True) -> DINO:
        """Lightning switches the whole module to train mode each epoch; ``teacher_eval_mode`` keeps the
        teacher's modules in eval mode (DINOv2 ``SSLMetaArch.train``)."""
        super().train(mode)
        if self.teacher_eval_mode:
            for module in self.teacher_modules():
                module.eval()
        return self

    def teacher_modules(self) -> list[nn.Module]:
        return [teacher for teacher, _ in self.ema_pairs()]

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


def teacher_copy(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` without stochastic depth: the same parameters and buffers (so the EMA
    pairs them one to one), with every DropPath's rate set to 0, as DINO/iBOT build their teacher with
    drop_path_rate 0 (``main_dino.py``)."""
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


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
