"""The DINO family in one student/teacher class, as DINOv2's ``ssl_meta_arch.py`` holds it:

- DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021): CLS
  self-distillation across multi-crop views;
- iBOT (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022): plus
  self-distillation of block-masked patch tokens, on when the config has ``masking``;
- DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024): iBOT plus
  KoLeo (``koleo_weight``) and optional Sinkhorn-Knopp centring (``centering``).

``conf/method/{dino,ibot,dinov2}.yaml`` (each inheriting the one before) switch the parts on. ``IBOT`` and
``DINOv2`` are names for what the builders must know before building (a masking backbone, the reference's
weight-decay rule and reductions), nothing more.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from sslab.augment import MultiCropViews
from sslab.errors import SSLabError
from sslab.modules.block_masking import BlockMasking
from sslab.modules.dino_loss import (
    centered_targets,
    cls_distillation_loss,
    koleo_loss,
    masked_patch_loss,
    masked_token_index,
    sinkhorn_knopp,
    update_center,
    update_patch_center,
)
from sslab.modules.ema import ema_update_
from sslab.modules.heads import DINOHead
from sslab.modules.schedules import CosineSchedule, LinearWarmupSchedule

from .base import SSLMethod

TEMPERATURE_STEPS = ("epoch", "step")
CENTERINGS = ("center", "sinkhorn_knopp")


class DINO(SSLMethod):
    """Student and EMA teacher (backbone + DINO head) trained on multi-crop views.

    DINO:
    - The teacher sees only the global crops; the student sees all crops; same-view pairs are skipped.
    - The teacher is the student's architecture without stochastic depth (official DINO/iBOT build it with
      drop_path 0), starting from the student's weights. It stays in train mode, as in DINO, so a head with
      BatchNorm normalises teacher outputs with batch statistics; ``teacher_eval_mode`` (DINOv2) keeps it
      in eval mode instead.
    - Teacher outputs become targets first (``cls_targets``: centred with an EMA ``center_momentum`` over
      all ranks and sharpened by a temperature warmed up linearly from ``warmup_teacher_temp`` to
      ``teacher_temp``, per epoch with ``teacher_temp_per=epoch`` as DINO/iBOT, per step as DINOv2), then
      the student's crops are scored by cross-entropy against them (``cls_distillation_loss``).
    - Teacher momentum follows a cosine from ``momentum_teacher`` to 1.
    - The heads' last layers get no update during the first ``freeze_last_layer_epochs`` epochs.
    - Gradients are clipped per tensor at ``grad_clip`` (3.0 in the paper).
    - Weight decay skips biases and 1-D parameters only (DINO ``utils.get_params_groups``); the lr warm-up
      is ``np.linspace`` (peak at the last warm-up step).

    iBOT (on when ``masking`` is set):
    - The global crops are block-masked (``masking``: a share ``probability`` of the crops is masked, each
      with a ratio ~ U(``ratio``)); the student sees them with a learnable mask token in place of the masked
      patches, the teacher sees them intact. The student's masked patch tokens are distilled from the
      teacher's tokens of the same view (``masked_patch_loss``); its CLS tokens (of the masked global crops
      and the unmasked local crops) from the teacher's CLS tokens of the other views.
    - Patch targets get their own center (EMA ``center_momentum_patch``) and temperature schedule
      (``warmup_teacher_patch_temp`` -> ``teacher_patch_temp``).
    - The patch tokens share the CLS head (``separate_patch_head=false``, iBOT's choice for ViT-S) or get
      their own head with ``patch_out_dim`` prototypes (DINOv2's ``separate_head``).
    - Loss = ``cls_loss_weight`` * CLS loss + ``patch_loss_weight`` * patch loss (lambda1, lambda2). Masks are
      drawn per step after the views (and after a FlexiViT patch-size draw) from a generator seeded by the
      step, so resume is exact.

    DINOv2 (``koleo_weight``, ``centering``; the reductions of ``ssl_meta_arch`` by ``dinov2_reductions``):
    - KoLeo (weight ``koleo_weight``, 0.1 in the paper) on the student's backbone CLS features of each global
      crop separately, in fp32; it needs at least 2 images per device batch.
    - ``centering``: ``center`` (DINO/iBOT centering) or ``sinkhorn_knopp`` (``sinkhorn_iterations`` = 3
      rounds over the global batch; the patch targets are balanced over the masked tokens of all ranks).
    - The teacher's patch head runs on the masked tokens only, and the patch center follows their mean; the
      CLS term is the sum over (teacher, student) crop pairs divided by n_global * (n_global - 1) +
      max(n_local * n_global, 1) (with no local crops that is 2 / 3 of iBOT's mean over pairs).
    - The rest comes from the config: layer-wise lr decay 0.9 (``layer_decay``), patch-embedding lr x 0.2
      (``patch_embed_lr_mult``), lr x sqrt(batch / 1024) (``lr_scaling``), a trainable weight-norm gain
      (``norm_last_layer=false``), teacher momentum 0.992 -> 1, 4 register tokens
      (``backbone.num_registers=4``), DINOv2's stratified masking with min block 4 (``masking``).
    Not reproduced: DINOv2's FSDP/xFormers machinery.

    Student and teacher are the same named parts (``student_parts``: backbone, head, and the patch head when
    separate); the teacher's carry a ``teacher_`` prefix, so the EMA pairs, the trained modules and the frozen
    last layers all follow from that one list.
    """

    weight_decay_rule = "dino"
    lr_warmup_linspace = True
    dinov2_reductions = False  # ssl_meta_arch.py's patch head on masked tokens only and CLS-pair count

    def __init__(
        self,
        *args,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        norm_last_layer: bool,
        use_bn_in_head: bool,
        freeze_last_layer_epochs: float,
        student_temp: float,
        warmup_teacher_temp: float,
        teacher_temp: float,
        teacher_temp_warmup_epochs: float,
        teacher_temp_per: str,
        teacher_eval_mode: bool,
        center_momentum: float,
        momentum_teacher: float,
        # iBOT's masked patch tokens: off unless the config has ``masking`` (conf/method/ibot.yaml)
        masking: dict[str, Any] | None = None,
        separate_patch_head: bool = False,
        patch_out_dim: int | None = None,
        warmup_teacher_patch_temp: float | None = None,
        teacher_patch_temp: float | None = None,
        teacher_patch_temp_warmup_epochs: float | None = None,
        center_momentum_patch: float | None = None,
        cls_loss_weight: float = 1.0,
        patch_loss_weight: float = 0.0,
        # DINOv2's additions: off unless set (conf/method/dinov2.yaml)
        koleo_weight: float = 0.0,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
        **kwargs,
    ) -> None:
        if teacher_temp_per not in TEMPERATURE_STEPS:
            raise SSLabError(
                f"method.teacher_temp_per={teacher_temp_per!r} is unknown; choose one of "
                f"{', '.join(TEMPERATURE_STEPS)}"
            )
        if centering not in CENTERINGS:
            raise SSLabError(
                f"method.centering={centering!r} is unknown; choose one of {', '.join(CENTERINGS)}"
            )
        super().__init__(*args, **kwargs)
        self.head_kwargs = {
            "hidden_dim": hidden_dim,
            "bottleneck_dim": bottleneck_dim,
            "norm_last_layer": norm_last_layer,
            "use_bn": use_bn_in_head,
        }
        self.head = DINOHead(self.backbone.embed_dim, out_dim, **self.head_kwargs)
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
        self.cls_loss_weight, self.patch_loss_weight = cls_loss_weight, patch_loss_weight
        self.koleo_weight, self.centering, self.sinkhorn_iterations = (
            koleo_weight,
            centering,
            sinkhorn_iterations,
        )
        self.separate_patch_head = separate_patch_head
        self.masking: BlockMasking | None = None
        if masking is not None:
            self.init_patch_distillation(
                masking,
                patch_out_dim,
                warmup_teacher_patch_temp,
                teacher_patch_temp,
                teacher_patch_temp_warmup_epochs,
                center_momentum_patch,
            )

    def init_patch_distillation(
        self,
        masking: dict[str, Any],
        patch_out_dim: int | None,
        warmup_teacher_patch_temp: float | None,
        teacher_patch_temp: float | None,
        teacher_patch_temp_warmup_epochs: float | None,
        center_momentum_patch: float | None,
    ) -> None:
        """iBOT's parts: the block masking, the patch head when separate, its center and temperatures."""
        if not self.backbone.supports_masking:
            raise SSLabError(
                f"{type(self).__name__} masks patch tokens, which backbone {self.backbone.name} cannot do; "
                "use a ViT backbone"
            )
        out_dim = self.center.shape[-1]
        if patch_out_dim is not None and patch_out_dim != out_dim and not self.separate_patch_head:
            raise SSLabError(
                f"method.patch_out_dim={patch_out_dim} differs from method.out_dim={out_dim}, which needs "
                "method.separate_patch_head=true (a shared head has one output size)"
            )
        self.masking = BlockMasking(**dict(masking))
        if self.separate_patch_head:
            self.patch_head = DINOHead(self.backbone.embed_dim, patch_out_dim or out_dim, **self.head_kwargs)
            self.teacher_patch_head = teacher_copy(self.patch_head)
        self.register_buffer("patch_center", torch.zeros(1, patch_out_dim or out_dim))
        self.warmup_teacher_patch_temp, self.teacher_patch_temp = (
            warmup_teacher_patch_temp,
            teacher_patch_temp,
        )
        self.teacher_patch_temp_warmup_epochs = (
            self.teacher_temp_warmup_epochs
            if teacher_patch_temp_warmup_epochs is None
            else teacher_patch_temp_warmup_epochs
        )
        self.center_momentum_patch = center_momentum_patch

    # -- modules ---------------------------------------------------------------------------------------
    def make_views(self) -> nn.Module:
        return MultiCropViews(
            global_size=self.data.image_size,
            local_size=self.data.local_crop_size,
            mean=self.data.mean,
            std=self.data.std,
            **self.view_cfg,
        )

    def student_parts(self) -> list[str]:
        """The student's part names; the teacher's part of each is ``teacher_<name>``."""
        return ["backbone", "head", *(["patch_head"] if self.separate_patch_head else [])]

    def trainable_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.student_parts()]

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) modules the teacher EMA updates: every student part and its teacher twin."""
        return [(getattr(self, f"teacher_{name}"), getattr(self, name)) for name in self.student_parts()]

    def teacher_modules(self) -> list[nn.Module]:
        return [teacher for teacher, _ in self.ema_pairs()]

    def frozen_last_layers(self) -> list[nn.Module]:
        """Head output layers that get no update during the first ``freeze_last_layer_epochs``."""
        return [getattr(self, name).last_layer for name in self.student_parts() if name != "backbone"]

    def student_patch_head(self) -> nn.Module:
        return self.patch_head if self.separate_patch_head else self.head

    def teacher_patch_head_module(self) -> nn.Module:
        return self.teacher_patch_head if self.separate_patch_head else self.teacher_head

    def train(self, mode: bool = True) -> DINO:
        """Lightning switches the whole module to train mode each epoch; ``teacher_eval_mode`` keeps the
        teacher's modules in eval mode (DINOv2 ``SSLMetaArch.train``)."""
        super().train(mode)
        if self.teacher_eval_mode:
            for module in self.teacher_modules():
                module.eval()
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher_backbone(images)

    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone

    def on_fit_start(self) -> None:
        super().on_fit_start()
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if self.koleo_weight and batch_size is not None and batch_size < 2:
            raise SSLabError(
                f"DINOv2's KoLeo loss needs at least 2 images per device batch (data.batch_size={batch_size}); "
                "raise data.batch_size or set method.koleo_weight=0"
            )

    # -- schedules -------------------------------------------------------------------------------------
    def extra_schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        schedules: dict[str, Any] = {
            "momentum": CosineSchedule(self.momentum_teacher, 1.0, total_steps),
            "teacher_temp": self.temperature_schedule(
                self.warmup_teacher_temp, self.teacher_temp, self.teacher_temp_warmup_epochs, steps_per_epoch
            ),
        }
        if self.masking is not None:
            warmup = int(self.teacher_patch_temp_warmup_epochs * steps_per_epoch)
            schedules["teacher_patch_temp"] = LinearWarmupSchedule(
                self.warmup_teacher_patch_temp, self.teacher_patch_temp, warmup
            )
        return schedules

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

    # -- masks -----------------------------------------------------------------------------------------
    def mask_grid(self, crop_size: int) -> tuple[int, int]:
        """Patch grid of a global crop at the backbone's current patch size (FlexiViT rounds to the nearest
        multiple)."""
        side = max(1, math.floor(crop_size / self.backbone.patch_size + 0.5))
        return side, side

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "views" in batch and self.masking is not None:
            crops = batch["views"]
            n = crops[0].shape[0] * self.views.num_global
            h, w = self.mask_grid(crops[0].shape[-1])
            g = torch.Generator().manual_seed((self.step_seed(self.global_step) * 31 + 7) % (2**63 - 1))
            masks = self.masking(n, h, w, generator=g)
            index = masked_token_index(masks)  # found on the CPU, so the step needs no device sync
            batch["masks"] = masks.to(crops[0].device, non_blocking=True)
            batch["mask_index"] = index.to(crops[0].device, non_blocking=True)
        return batch

    # -- teacher targets -------------------------------------------------------------------------------
    @torch.no_grad()
    def cls_targets(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Teacher CLS probabilities: Sinkhorn-Knopp, or centred and sharpened (then the center moves)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations)
        probs = centered_targets(logits, self.center, temperature)
        self.center.copy_(update_center(self.center, logits, self.center_momentum))
        return probs

    @torch.no_grad()
    def patch_targets(
        self, patch_tokens: torch.Tensor, index: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Teacher probabilities (M, K) of the masked tokens, ``index`` into the flattened (B * N) tokens.
        iBOT runs the head on all patch tokens and its center follows their mean; DINOv2
        (``dinov2_reductions``) runs it on the masked tokens only and the center follows their mean (this
        rank's mean, averaged over ranks, as ``iBOTPatchLoss.update_center``)."""
        head = self.teacher_patch_head_module()
        if not self.dinov2_reductions:
            logits = head(patch_tokens)
            probs = centered_targets(
                logits.flatten(0, 1).index_select(0, index), self.patch_center, temperature
            )
            self.patch_center.copy_(
                update_patch_center(self.patch_center, logits, self.center_momentum_patch)
            )
            return probs
        logits = head(patch_tokens.flatten(0, 1).index_select(0, index))
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations)
        probs = centered_targets(logits, self.patch_center, temperature)
        if index.numel():  # a shape, so no device sync; no masked token leaves the center as it is
            masked_mean = logits.float().mean(dim=0, keepdim=True)
            self.patch_center.copy_(update_center(self.patch_center, masked_mean, self.center_momentum_patch))
        return probs

    def cls_loss_pairs(self, n_global: int, n_local: int) -> int:
        """What the summed CLS cross-entropies are divided by: the number of (teacher, student) pairs, a
        plain mean as in DINO and iBOT; DINOv2 counts the local term as at least one pair."""
        if self.dinov2_reductions:
            return n_global * (n_global - 1) + max(n_local * n_global, 1)
        return n_global * (n_global - 1 + n_local)

    def extra_losses(self, student_global_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted extra terms on the student's global-crop CLS features: KoLeo (``koleo_weight``)."""
        if not self.koleo_weight:
            return {}
        per_crop = student_global_cls.chunk(self.views.num_global)  # never pairs two crops of one image
        return {"koleo": self.koleo_weight * sum(koleo_loss(c) for c in per_crop)}

    # -- step ------------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.masked_step(batch) if self.masking is not None else self.dino_step(batch)

    def dino_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """DINO: the teacher's CLS targets of the global crops against the student's CLS of every crop."""
        crops: list[torch.Tensor] = batch["views"]
        n_global = self.views.num_global
        with torch.no_grad():
            teacher_cls = self.teacher_backbone(torch.cat(crops[:n_global]))
            probs = self.cls_targets(
                self.teacher_head(teacher_cls), self.schedules["teacher_temp"](self.global_step)
            )
        student = features_by_resolution(self.backbone, crops)
        student_logits = list(self.head(student).chunk(len(crops)))
        loss_cls = cls_distillation_loss(student_logits, list(probs.chunk(n_global)), self.student_temp)
        extra = self.extra_losses(student[: n_global * crops[0].shape[0]])
        loss = self.cls_loss_weight * loss_cls + sum(extra.values())
        logs = {"teacher_entropy": entropy(probs), **{k: v.detach() for k, v in extra.items()}}
        return {"loss": loss, "features": teacher_cls[: crops[0].shape[0]], "logs": logs}

    def masked_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """iBOT / DINOv2: the DINO CLS term on the masked global crops, plus the masked patch tokens' term."""
        crops: list[torch.Tensor] = batch["views"]
        n_global = self.views.num_global
        batch_size = crops[0].shape[0]
        masks = batch["masks"].flatten(1)  # (n_global * B, N), crop-major like torch.cat(crops)
        index = batch["mask_index"] if "mask_index" in batch else masked_token_index(masks)
        step = self.global_step
        global_crops = torch.cat(crops[:n_global])
        with torch.no_grad():
            teacher = self.teacher_backbone.forward_tokens(global_crops)
            cls_probs = self.cls_targets(
                self.teacher_head(teacher["cls"]), self.schedules["teacher_temp"](step)
            )
            patch_probs = self.patch_targets(
                teacher["patch"], index, self.schedules["teacher_patch_temp"](step)
            )
        student = self.backbone.forward_tokens(global_crops, mask=masks)
        student_cls = student["cls"]
        if len(crops) > n_global:
            student_cls = torch.cat([student_cls, features_by_resolution(self.backbone, crops[n_global:])])
        student_patch = student["patch"].flatten(0, 1).index_select(0, index)  # (M, D): masked tokens only
        if self.separate_patch_head:
            cls_logits, patch_logits = self.head(student_cls), self.patch_head(student_patch)
        else:
            out = self.head(torch.cat([student_cls, student_patch]))
            cls_logits, patch_logits = out[: len(student_cls)], out[len(student_cls) :]
        n_local = len(crops) - n_global
        loss_cls = cls_distillation_loss(
            list(cls_logits.chunk(len(crops))), list(cls_probs.chunk(n_global)), self.student_temp
        ) * (n_global * (n_global - 1 + n_local) / self.cls_loss_pairs(n_global, n_local))
        loss_patch = masked_patch_loss(patch_logits, patch_probs, masks, self.student_temp, index)
        extra = self.extra_losses(student["cls"])
        loss = self.cls_loss_weight * loss_cls + self.patch_loss_weight * loss_patch + sum(extra.values())
        logs = {
            "loss_cls": loss_cls.detach(),
            "loss_patch": loss_patch.detach(),
            "teacher_entropy": entropy(cls_probs),
            "mask_ratio": masks.float().mean(),
            **{k: v.detach() for k, v in extra.items()},
        }
        return {"loss": loss, "features": teacher["cls"][:batch_size], "logs": logs}

    # -- optimisation ----------------------------------------------------------------------------------
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


class IBOT(DINO):
    """iBOT: ``DINO`` with ``masking`` set (conf/method/ibot.yaml). A class of its own only for what the
    builders check before building: it masks patch tokens, so it needs a ViT backbone."""

    requires_masking = True


class DINOv2(IBOT):
    """DINOv2: iBOT with KoLeo and optional Sinkhorn-Knopp (conf/method/dinov2.yaml), DINOv2's weight-decay
    rule (biases, norms and LayerScale gammas skipped: ``dinov2/utils/param_groups.py``) and the reductions
    of its ``ssl_meta_arch.py`` (``dinov2_reductions``)."""

    weight_decay_rule = "dinov2"
    dinov2_reductions = True


@torch.no_grad()
def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the teacher's target distributions (a collapse signal: 0 = one-hot, log K = uniform)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


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
