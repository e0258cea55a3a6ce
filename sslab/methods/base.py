"""What every method shares: the backbone, the view pipeline, optimisation, per-step schedules and ``embed``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from sslab import hooks
from sslab.augment import eval_view
from sslab.backbones import Backbone
from sslab.backbones.flexi import draw_patch_size, flexible_backbones
from sslab.errors import SSLabError
from sslab.eval_mode import eval_mode
from sslab.modules.collapse import effective_rank, feature_std
from sslab.modules.lars import LARS
from sslab.modules.param_groups import adamw_param_groups
from sslab.modules.schedules import (
    CosineSchedule,
    ExtendedCosineSchedule,
    LinearWarmupSchedule,
    extend_cosine,
)
from sslab.training_shell import check_finite_loss, step_seed

log = logging.getLogger(__name__)
SCHEDULE_TYPES = {
    "CosineSchedule": CosineSchedule,
    "LinearWarmupSchedule": LinearWarmupSchedule,
    "ExtendedCosineSchedule": ExtendedCosineSchedule,
}
# Peak lr = base_lr x f(global batch): DINO/iBOT/MAE scale linearly from 256 (Goyal et al., 2017); DINOv2
# (``optim.scaling_rule: sqrt_wrt_1024``) by the square root from 1024.
LR_SCALINGS: dict[str, Callable[[int], float]] = {
    "linear_wrt_256": lambda batch: batch / 256,
    "sqrt_wrt_1024": lambda batch: math.sqrt(batch / 1024),
}
OPTIMIZERS = ("adamw", "lars")


@dataclass(frozen=True)
class DataSpec:
    """What a method needs to know about its data: sizes for the crops and normalisation statistics."""

    image_size: int
    local_crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 0
    channels: int = 3  # the data's own channels (1 for greyscale), before the views repeat grey to RGB


class SSLMethod(pl.LightningModule):
    """Base LightningModule. A subclass implements ``make_views``, ``step`` and ``embed`` and may add schedules.

    Optimisation follows the DINO/MAE recipes: AdamW over parameter groups with and without weight decay
    (which parameters get none is the method's reference rule, ``weight_decay_rule``), lr = ``base_lr`` x
    global batch / 256 (``lr_scaling=sqrt_wrt_1024``: x sqrt(batch / 1024), DINOv2's rule) with a linear
    warm-up (``lr_warmup_linspace``: DINO's ``np.linspace`` form or MAE's step / warmup) then cosine decay,
    and an optional cosine weight-decay schedule. Schedules are plain objects of the global step, set by
    hand each step, and stored in checkpoints so that a resumed run continues them exactly.
    ``optimizer=lars`` swaps AdamW for LARS (``sslab.modules.lars``; VICReg's recipe, trust coefficient
    ``lars_eta``, momentum ``lars_momentum``) over the same groups, with the same lr and wd schedules.

    Hyperparameters have one source, ``conf/method/<name>.yaml``: what a method yaml sets is a required
    keyword argument here and in the subclasses; only settings no yaml needs to name keep a code default.
    """

    # -- what a method declares (class attributes; the callbacks and eval.py read them, never probe) --------
    requires_masking: bool = False  # the backbone must take ``mask=`` / ``keep=`` (ViTs)
    required_keys: tuple[str, ...] = ("image",)  # batch keys the DataModule must provide
    supports_flexi: bool = True  # False where the method's targets are tied to one patch size (MAE pixels)
    view_key: str = "image"  # the batch key the view pipeline reads (TOV-VICReg: "frames")
    weight_decay_rule: str = "timm"  # which parameters get no weight decay (modules.param_groups)
    lr_warmup_linspace: bool = False  # True: the lr reaches its peak at the last warm-up step (DINO, DINOv2)
    # Optional capabilities: a method that has one sets the flag and implements what it names.
    reconstructs: bool = False  # ``reconstruct(images_uint8, seed)`` -> picture columns (MAE, DiffMAE)
    zero_shot: bool = False  # ``encode_image_uint8`` + ``class_embeddings`` (a text tower: WSP)
    probe_batchnorm: bool = False  # linear probes put BatchNorm (no affine) before the layer (MAE)
    embed_pool: str = "cls"  # what ``embed`` pools (cls | mean); fine-tuning pools the same way
    flexi_patch_size: int | None = None  # this step's FlexiViT patch size (logged as train/patch_size)
    resume_step: int | None = None  # the checkpoint's step when resumed (set by the training run)

    def __init__(
        self,
        backbone: Backbone,
        data: DataSpec,
        *,
        base_lr: float,
        min_lr: float,
        warmup_epochs: float,
        weight_decay: float,
        weight_decay_end: float | None = None,
        betas: tuple[float, float],
        grad_clip: float | None,
        layer_decay: float | None = None,
        patch_embed_lr_mult: float = 1.0,
        lr_scaling: str = "linear_wrt_256",
        optimizer: str,
        lars_momentum: float = 0.9,
        lars_eta: float = 0.001,
        views: dict[str, Any] | None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if getattr(backbone, "flexi", False) and not self.supports_flexi:
            raise SSLabError(
                f"{type(self).__name__} predicts per-patch targets at one patch size; drop backbone.flexi=true"
            )
        self.backbone = backbone
        self.data = data
        self.base_lr, self.min_lr, self.warmup_epochs = base_lr, min_lr, warmup_epochs
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end
        self.betas = tuple(betas)
        self.grad_clip = grad_clip
        self.layer_decay = layer_decay
        self.patch_embed_lr_mult = patch_embed_lr_mult
        if lr_scaling not in LR_SCALINGS:
            raise SSLabError(
                f"method.lr_scaling={lr_scaling!r} is unknown; choose one of {', '.join(LR_SCALINGS)}"
            )
        self.lr_scaling = lr_scaling
        if optimizer not in OPTIMIZERS:
            raise SSLabError(
                f"method.optimizer={optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}"
            )
        self.optimizer_name, self.lars_momentum, self.lars_eta = optimizer, lars_momentum, lars_eta
        self.seed = seed
        self.view_cfg = dict(views or {})  # the method's ``views`` settings, read by ``make_views``
        self.views = self.make_views()
        self.schedules: dict[str, Any] = {}
        self.steps_per_epoch = 1
        self.trained_step = 0
        self.sslab_config: dict | None = None  # the resolved run config, stored in checkpoints

    @classmethod
    def from_config(
        cls,
        method: str | None = None,
        backbone: nn.Module | str = "vit_t6",
        data: Any = None,
        embed_dim: int | None = None,
        **overrides: Any,
    ) -> SSLMethod:
        """Build ``conf/method/<method>.yaml`` (default: the one whose class is ``cls``) around any ``nn.Module``
        returning (B, D) features, or a backbone name, for the user's own ``pl.Trainer().fit(model, dm)``;
        ``data`` is that DataModule (or a data config name / ``DataSpec``). The work needs the config tree and
        the builders, which sit on the floors above: ``sslab.api.method_from_config`` does it and hands itself
        down through ``sslab.hooks`` when ``sslab`` is imported."""
        return hooks.method_from_config(cls, method, backbone, data, embed_dim, **overrides)

    # -- what a method provides --------------------------------------------------------------------
    def make_views(self) -> nn.Module:
        raise NotImplementedError

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Forward + loss for one batch whose ``views`` are ready; returns {"loss", "features", "logs"}."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) features of normalised float images, for evaluation."""
        raise NotImplementedError

    def eval_backbone(self) -> Backbone:
        """The encoder that ``embed`` uses (fine-tuning starts from it); DINO-style methods return the teacher."""
        return self.backbone

    def extra_schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
        """The method's own per-step schedules (teacher momentum, temperatures) beside lr and weight decay."""
        return {}

    def reconstruct(self, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """With ``reconstructs``: {column name: (B, 3, H, W) in [0, 1]} for uint8 ``images``."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct images")

    def encode_image_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """With ``zero_shot``: (B, E) normalised image embeddings in the text tower's space."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def class_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """With ``zero_shot``: (C, E) zero-shot classifier from the class names."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def init_backbone_from(self, ckpt_path: str) -> None:
        """Start from another run's evaluation encoder (``init_from``); an EMA teacher starts equal to it."""
        from sslab.init_from import init_backbone

        init_backbone(self.backbone, ckpt_path)
        if self.eval_backbone() is not self.backbone:
            self.eval_backbone().load_state_dict(self.backbone.state_dict())

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone]

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_uint8(
        self, images: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Features of raw uint8 images through the deterministic evaluation view, in eval mode; ``features``
        (default ``embed``) maps the normalised float images to (B, D)."""
        with eval_mode(self):
            x = eval_view(images.to(self.device), self.data.image_size, self.data.mean, self.data.std)
            return (features or self.embed)(x).float()

    # -- batch flow ----------------------------------------------------------------------------------
    def step_seed(self, step: int) -> int:
        """Every random draw of a training step comes from a seed fixed by (seed, step, rank)."""
        return step_seed(self.seed, step, self.global_rank)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if self.trainer is not None and self.trainer.training:
            torch.manual_seed(self.step_seed(self.global_step))
            self.draw_patch_size(self.global_step)  # first: masks made with the views see this step's grid
            batch["views"] = self.views(batch[self.view_key])
        return batch

    def draw_patch_size(self, step: int) -> None:
        """FlexiViT (Beyer et al., 2023): one patch size per training step, the same for every backbone of
        the method (student and teacher) and every rank; methods never see it (``backbone.patch_size``)."""
        flexi = [b for b in flexible_backbones(self) if b.flexi]
        if not flexi:
            return
        sizes = flexi[0].flexi_patch_sizes
        if any(b.flexi_patch_sizes != sizes for b in flexi):
            raise SSLabError(
                "the method's FlexiViT backbones differ in flexi_patch_sizes; give them one list"
            )
        self.flexi_patch_size = draw_patch_size(sizes, self.seed, step)
        for b in flexi:
            b.set_patch_size(self.flexi_patch_size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        self.trained_step = self.global_step  # schedules index the step being trained, also after it
        out = self.step(batch)
        loss = out["loss"]
        check_finite_loss(
            loss,
            self.global_step,
            "the run stopped before applying it and the last checkpoint is kept. Lower method.base_lr or set "
            "method.grad_clip, then resume=auto",
        )
        self.log("train/loss", loss.detach(), prog_bar=True)
        logs = {f"train/{k}": v for k, v in out.get("logs", {}).items()}
        logs.update({f"train/{k}": s(self.global_step) for k, s in self.schedules.items()})
        if self.flexi_patch_size is not None:
            logs["train/patch_size"] = float(self.flexi_patch_size)
        features = out["features"].detach()
        if self.logs_this_step():  # collapse statistics: an SVD, so only on the steps the loggers write
            logs["train/feature_std"] = feature_std(features)
            logs["train/feature_rank"] = effective_rank(features)
        self.log_dict(logs)
        return {"loss": loss, "features": features}

    def logs_this_step(self) -> bool:
        """Whether the loggers write this training step (every ``trainer.log_every_n_steps``), so that
        statistics that cost a sync or an SVD are computed only when someone will see them."""
        trainer = self._trainer
        if trainer is None:
            return False
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and hasattr(connector, "should_update_logs"):
            return bool(connector.should_update_logs)
        return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0

    # -- optimisation --------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        return adamw_param_groups(
            self.trainable_modules(),
            self.weight_decay,
            self.layer_decay,
            layer_decayed=self.backbone,
            rule=self.weight_decay_rule,
            patch_embed_lr_mult=self.patch_embed_lr_mult,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainer = self.trainer
        dm = trainer.datamodule
        world = trainer.world_size
        global_batch = dm.batch_size * world * trainer.accumulate_grad_batches
        self.steps_per_epoch = max(
            1, len(dm.train_set) // (dm.batch_size * world) // trainer.accumulate_grad_batches
        )
        total = int(trainer.estimated_stepping_batches)
        configured = self.make_schedules(total, self.steps_per_epoch, global_batch)
        mode = (self.sslab_config or {}).get("resume_schedules", "keep")
        if not self.schedules or mode == "reset":  # a new run, or resume_schedules=reset: this config's
            self.schedules = configured  # indexed by the global step, so they continue from the checkpoint's
        elif mode == "extend":  # the checkpoint's cosines, stretched from the resume step to this run's end
            step = int(self.resume_step or 0)
            self.schedules = {k: extend_cosine(s, step, total) for k, s in self.schedules.items()}
            log.info(
                "resume_schedules=extend: cosine schedules continue from step %d to step %d", step, total
            )
        elif self.schedules != configured:  # resumed: the checkpoint's schedules win, so the run stays exact
            changed = sorted(k for k in configured if configured[k] != self.schedules.get(k))
            log.warning(
                "resumed run keeps the checkpoint's %s schedules; pass resume_schedules=extend to stretch "
                "their cosines to this run's end (trainer.max_steps), or reset to use this config's",
                changed,
            )
        return self.make_optimizer(self.schedules["lr"](0))

    def make_schedules(
        self, total_steps: int, steps_per_epoch: int, global_batch: int | None = None
    ) -> dict[str, Any]:
        """This config's schedules for a run of ``total_steps`` optimizer steps: lr (peak ``base_lr`` scaled
        by ``global_batch``, unscaled when None), weight decay and the method's ``extra_schedules``."""
        warmup = int(self.warmup_epochs * steps_per_epoch)
        scale = 1.0 if global_batch is None else LR_SCALINGS[self.lr_scaling](global_batch)
        return {
            "lr": CosineSchedule(
                self.base_lr * scale, self.min_lr, total_steps, warmup, linspace=self.lr_warmup_linspace
            ),
            "wd": CosineSchedule(self.weight_decay, self.weight_decay_end, total_steps),
            **self.extra_schedules(total_steps, steps_per_epoch),
        }

    def setup_schedules(
        self, total_steps: int, steps_per_epoch: int, global_batch: int | None = None
    ) -> None:
        """Start this config's schedules (``make_schedules``) for a run of ``total_steps`` steps, as a new
        run's ``configure_optimizers`` does: what tests and benchmarks call to step a method by hand."""
        self.steps_per_epoch = steps_per_epoch
        self.schedules = self.make_schedules(total_steps, steps_per_epoch, global_batch)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """``optimizer=adamw`` (default) or ``lars`` over ``param_groups``; LARS as VICReg's official
        ``exclude_bias_and_norm``: groups without weight decay (biases, norms) are not adapted either."""
        groups = self.param_groups()
        if self.optimizer_name == "lars":
            for group in groups:
                group["lars_adapt"] = group["apply_wd"]
            return LARS(groups, lr=lr, momentum=self.lars_momentum, eta=self.lars_eta)
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=lr, betas=self.betas, fused=fused)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        lr, wd = self.schedules["lr"](step), self.schedules["wd"](step)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
                if group.get("apply_wd"):
                    group["weight_decay"] = wd

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.logs_this_step():  # before clipping; a few norms, no sync until the logger writes
            self.log("train/grad_norm", grad_norm(self.parameters()))
        if self.grad_clip:
            clip_per_tensor_(self.parameters(), self.grad_clip)

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sslab_schedules"] = {
            k: (type(s).__name__, s.state_dict()) for k, s in self.schedules.items()
        }
        checkpoint["sslab_steps_per_epoch"] = self.steps_per_epoch
        if self.sslab_config is not None:
            checkpoint["sslab_config"] = self.sslab_config
        checkpoint["sslab_eval_backbone"] = self.eval_backbone_prefix()

    def eval_backbone_prefix(self) -> str:
        """State-dict prefix of ``eval_backbone()`` (e.g. ``teacher_backbone.``), so a later run can take
        the evaluation encoder from a checkpoint without building this method (``init_from``)."""
        target = self.eval_backbone()
        name = next(n for n, m in self.named_modules() if m is target)
        return f"{name}."

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("sslab_schedules", {})
        self.schedules = {k: SCHEDULE_TYPES[t](**state) for k, (t, state) in saved.items()}
        self.steps_per_epoch = checkpoint.get("sslab_steps_per_epoch", self.steps_per_epoch)


@torch.no_grad()
def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of all gradients (the norm torch's ``clip_grad_norm_`` compares with its limit)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


@torch.no_grad()
def clip_per_tensor_(params, max_norm: float) -> None:
    """Scale each gradient tensor to L2 norm <= ``max_norm`` on its own, as DINO's ``clip_gradients`` does
    (unlike torch's global-norm clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
