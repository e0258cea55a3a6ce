"""iBOT: masked image modeling with an online tokenizer (Zhou et al., "iBOT: Image BERT Pre-Training with
Online Tokenizer", ICLR 2022)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from sslab.errors import SSLabError
from sslab.modules.block_masking import BlockMasking
from sslab.modules.dino_loss import update_center
from sslab.modules.heads import DINOHead
from sslab.modules.ibot_loss import (
    centered_targets,
    cls_distillation_loss,
    masked_patch_loss,
    masked_token_index,
    update_patch_center,
)
from sslab.modules.schedules import LinearWarmupSchedule

from .dino import DINO, features_by_resolution


class IBOT(DINO):
    """DINO (CLS self-distillation across views) plus self-distillation of masked patch tokens.

    - The global crops are block-masked (``masking``: a share ``probability`` of the crops is masked, each
      with a ratio ~ U(``ratio``)); the student sees them with a learnable mask token in place of the masked
      patches, the teacher sees them intact. The student's masked patch tokens are distilled from the
      teacher's tokens of the same view (``masked_patch_loss``); its CLS tokens (of the masked global crops
      and the unmasked local crops) from the teacher's CLS tokens of the other views.
    - Patch targets get their own center (EMA ``center_momentum_patch``) and temperature schedule
      (``warmup_teacher_patch_temp`` -> ``teacher_patch_temp``).
    - The patch tokens share the CLS head (``separate_patch_head=false``, iBOT's choice for ViT-S) or get
      their own head with ``patch_out_dim`` prototypes (DINOv2's ``separate_head``).
    - Loss = ``cls_loss_weight`` * CLS loss + ``patch_loss_weight`` * patch loss (lambda1, lambda2).
    Schedules, EMA teacher, last-layer freezing and exact resume are DINO's. Masks are drawn per step after
    the views (and after a FlexiViT patch-size draw) from a generator seeded by the step, so resume is exact.
    """

    requires_masking = True

    def __init__(
        self,
        *args,
        separate_patch_head: bool = False,
        patch_out_dim: int | None = None,
        warmup_teacher_patch_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        teacher_patch_temp_warmup_epochs: float | None = None,
        center_momentum_patch: float = 0.9,
        cls_loss_weight: float = 1.0,
        patch_loss_weight: float = 1.0,
        masking: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not self.backbone.supports_masking:
            raise SSLabError(
                f"{type(self).__name__} masks patch tokens, which backbone {self.backbone.name} cannot do; "
                "use a ViT backbone"
            )
        out_dim = self.center.shape[-1]
        if patch_out_dim is not None and patch_out_dim != out_dim and not separate_patch_head:
            raise SSLabError(
                f"method.patch_out_dim={patch_out_dim} differs from method.out_dim={out_dim}, which needs "
                "method.separate_patch_head=true (a shared head has one output size)"
            )
        self.masking = BlockMasking(**dict(masking or {}))
        self.separate_patch_head = separate_patch_head
        if separate_patch_head:
            self.patch_head = DINOHead(self.backbone.embed_dim, patch_out_dim or out_dim, **self.head_kwargs)
            self.teacher_patch_head = copy.deepcopy(self.patch_head)
            for p in self.teacher_patch_head.parameters():
                p.requires_grad = False
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
        self.cls_loss_weight, self.patch_loss_weight = cls_loss_weight, patch_loss_weight

    # -- modules ---------------------------------------------------------------------------------------
    def student_patch_head(self) -> nn.Module:
        return self.patch_head if self.separate_patch_head else self.head

    def teacher_patch_head_module(self) -> nn.Module:
        return self.teacher_patch_head if self.separate_patch_head else self.teacher_head

    def trainable_modules(self) -> list[nn.Module]:
        return [*super().trainable_modules(), *([self.patch_head] if self.separate_patch_head else [])]

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        extra = [(self.teacher_patch_head, self.patch_head)] if self.separate_patch_head else []
        return [*super().ema_pairs(), *extra]

    def frozen_last_layers(self) -> list[nn.Module]:
        extra = [self.patch_head.last_layer] if self.separate_patch_head else []
        return [*super().frozen_last_layers(), *extra]

    def extra_schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        warmup = int(self.teacher_patch_temp_warmup_epochs * steps_per_epoch)
        return {
            **super().extra_schedules(total_steps, steps_per_epoch),
            "teacher_patch_temp": LinearWarmupSchedule(
                self.warmup_teacher_patch_temp, self.teacher_patch_temp, warmup
            ),
        }

    # -- masks -----------------------------------------------------------------------------------------
    def mask_grid(self, crop_size: int) -> tuple[int, int]:
        """Patch grid of a global crop at the backbone's current patch size (FlexiViT rounds to the nearest
        multiple)."""
        side = max(1, math.floor(crop_size / self.backbone.patch_size + 0.5))
        return side, side

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "views" in batch:
            crops = batch["views"]
            n = crops[0].shape[0] * self.views.num_global
            h, w = self.mask_grid(crops[0].shape[-1])
            g = torch.Generator().manual_seed((self.step_seed(self.global_step) * 31 + 7) % (2**63 - 1))
            masks = self.masking(n, h, w, generator=g)
            index = masked_token_index(masks)  # found on the CPU, so the step needs no device sync
            batch["masks"] = masks.to(crops[0].device, non_blocking=True)
            batch["mask_index"] = index.to(crops[0].device, non_blocking=True)
        return batch

    # -- teacher targets (DINOv2 swaps in Sinkhorn-Knopp) ----------------------------------------------
    @torch.no_grad()
    def cls_targets(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Centered, sharpened teacher CLS probabilities; updates the CLS center."""
        probs = centered_targets(logits, self.center, temperature)
        self.center.copy_(update_center(self.center, logits, self.center_momentum))
        return probs

    @torch.no_grad()
    def patch_targets(
        self, patch_tokens: torch.Tensor, index: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Teacher probabilities (M, K) of the masked tokens, ``index`` into the flattened (B * N) tokens.
        As in iBOT the patch center follows the mean over all patch tokens, so the head runs on all of them."""
        logits = self.teacher_patch_head_module()(patch_tokens)
        probs = centered_targets(logits.flatten(0, 1).index_select(0, index), self.patch_center, temperature)
        self.patch_center.copy_(update_patch_center(self.patch_center, logits, self.center_momentum_patch))
        return probs

    def cls_loss_pairs(self, n_global: int, n_local: int) -> int:
        """What the summed CLS cross-entropies are divided by: the number of (teacher, student) pairs,
        a plain mean as in iBOT's ``DINOLoss``. DINOv2 counts the local term as at least one pair."""
        return n_global * (n_global - 1 + n_local)

    def extra_losses(self, student_global_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted extra terms on the student's global-crop CLS features (DINOv2: KoLeo)."""
        return {}

    # -- step ------------------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
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
        with torch.no_grad():
            entropy = -(cls_probs * cls_probs.clamp_min(1e-12).log()).sum(-1).mean()
        logs = {
            "loss_cls": loss_cls.detach(),
            "loss_patch": loss_patch.detach(),
            "teacher_entropy": entropy,
            "mask_ratio": masks.float().mean(),
            **{k: v.detach() for k, v in extra.items()},
        }
        return {"loss": loss, "features": teacher["cls"][:batch_size], "logs": logs}
