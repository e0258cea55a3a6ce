"""DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024)."""

from __future__ import annotations

import torch

from sslab.errors import SSLabError
from sslab.modules.koleo import koleo_loss
from sslab.modules.sinkhorn import sinkhorn_knopp

from .ibot import IBOT

CENTERINGS = ("center", "sinkhorn_knopp")


class DINOv2(IBOT):
    """iBOT (image-level DINO loss + masked patch loss) with DINOv2's additions:

    - KoLeo (weight ``koleo_weight``, 0.1 in the paper) on the student's backbone CLS features of each global
      crop separately, in fp32; it needs at least 2 images per device batch.
    - ``centering``: ``center`` (DINO/iBOT centering) or ``sinkhorn_knopp`` (``sinkhorn_iterations`` = 3
      rounds over the global batch; the patch targets are balanced over the masked tokens of all ranks).
    - The rest comes from the config: layer-wise lr decay 0.9 (``layer_decay``), teacher momentum 0.992 -> 1,
      4 register tokens (``backbone.num_registers=4``), DINOv2's stratified masking (``masking.stratified``).
    Not reproduced: the 0.2 lr multiplier on the patch embedding and the FSDP/xFormers machinery.
    """

    def __init__(
        self,
        *args,
        koleo_weight: float = 0.1,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
        **kwargs,
    ) -> None:
        if centering not in CENTERINGS:
            raise SSLabError(
                f"method.centering={centering!r} is unknown; choose one of {', '.join(CENTERINGS)}"
            )
        super().__init__(*args, **kwargs)
        self.koleo_weight = koleo_weight
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations

    def on_fit_start(self) -> None:
        super().on_fit_start()
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if self.koleo_weight and batch_size is not None and batch_size < 2:
            raise SSLabError(
                f"DINOv2's KoLeo loss needs at least 2 images per device batch (data.batch_size={batch_size}); "
                "raise data.batch_size or set method.koleo_weight=0"
            )

    @torch.no_grad()
    def cls_targets(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations)
        return super().cls_targets(logits, temperature)

    @torch.no_grad()
    def patch_targets(
        self, patch_tokens: torch.Tensor, index: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":  # the head runs on the masked tokens only, as in DINOv2
            masked = patch_tokens.flatten(0, 1).index_select(0, index)
            return sinkhorn_knopp(
                self.teacher_patch_head_module()(masked), temperature, self.sinkhorn_iterations
            )
        return super().patch_targets(patch_tokens, index, temperature)

    def extra_losses(self, student_global_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.koleo_weight:
            return {}
        per_crop = student_global_cls.chunk(self.views.num_global)  # never pairs two crops of one image
        return {"koleo": self.koleo_weight * sum(koleo_loss(c) for c in per_crop)}
