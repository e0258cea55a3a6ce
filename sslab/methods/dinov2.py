"""DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024)."""

from __future__ import annotations

import torch

from sslab.errors import SSLabError
from sslab.modules.dino_loss import update_center
from sslab.modules.ibot_loss import centered_targets
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
    - The patch head runs on the masked tokens only, and the patch center follows their mean
      (``ssl_meta_arch.py``: the head input is the CLS tokens plus the selected masked patch tokens).
    - The CLS term is the sum over (teacher, student) crop pairs divided by
      n_global * (n_global - 1) + max(n_local * n_global, 1), as ``ssl_meta_arch`` does; with no local crops
      that is 2 / 3 of iBOT's mean over pairs.
    - The teacher stays in eval mode (``teacher_eval_mode``), the temperature ramps per step
      (``teacher_temp_per``), weight decay skips biases, norms and LayerScale gammas
      (``dinov2/utils/param_groups.py``), and the lr warm-up is ``np.linspace``.
    - The rest comes from the config: layer-wise lr decay 0.9 (``layer_decay``), patch-embedding lr x 0.2
      (``patch_embed_lr_mult``), lr x sqrt(batch / 1024) (``lr_scaling``), a trainable weight-norm gain
      (``norm_last_layer=false``), teacher momentum 0.992 -> 1, 4 register tokens
      (``backbone.num_registers=4``), DINOv2's stratified masking with min block 4 (``masking``).
    Not reproduced: the FSDP/xFormers machinery.
    """

    weight_decay_rule = "dinov2"

    def __init__(
        self,
        *args,
        koleo_weight: float = 0.1,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
        teacher_temp_per: str = "step",
        teacher_eval_mode: bool = True,
        **kwargs,
    ) -> None:
        if centering not in CENTERINGS:
            raise SSLabError(
                f"method.centering={centering!r} is unknown; choose one of {', '.join(CENTERINGS)}"
            )
        super().__init__(
            *args, teacher_temp_per=teacher_temp_per, teacher_eval_mode=teacher_eval_mode, **kwargs
        )
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
        """Teacher probabilities of the masked tokens; the head sees only them and the center follows
        their mean (this rank's mean, averaged over ranks, as DINOv2's ``iBOTPatchLoss.update_center``)."""
        logits = self.teacher_patch_head_module()(patch_tokens.flatten(0, 1).index_select(0, index))
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations)
        probs = centered_targets(logits, self.patch_center, temperature)
        if index.numel():  # a shape, so no device sync; no masked token leaves the center as it is
            masked_mean = logits.float().mean(dim=0, keepdim=True)
            self.patch_center.copy_(update_center(self.patch_center, masked_mean, self.center_momentum_patch))
        return probs

    def cls_loss_pairs(self, n_global: int, n_local: int) -> int:
        return n_global * (n_global - 1) + max(n_local * n_global, 1)

    def extra_losses(self, student_global_cls: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.koleo_weight:
            return {}
        per_crop = student_global_cls.chunk(self.views.num_global)  # never pairs two crops of one image
        return {"koleo": self.koleo_weight * sum(koleo_loss(c) for c in per_crop)}
