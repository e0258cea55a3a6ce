"""lightly-built twins of sslab's methods, for ``bench/learning.py`` (bench-only: sslab never imports this).

A twin is what a researcher would write with lightly 1.6.0 instead of sslab: lightly's per-sample transform in
a DataLoader, lightly's heads, losses, masking, momentum update and schedule functions, in a plain PyTorch
loop. Everything a comparison must hold equal comes from the same composed sslab config as the sslab run:
the backbone (built by ``sslab.build.build_backbone``, wrapped in lightly's ``MaskedVisionTransformerTIMM``),
data, batch size, steps, peak lr and its scaling rule, warm-up length, min lr, weight decay and its end value,
AdamW betas, teacher momentum and temperatures, head sizes, loss weights, grad-clip threshold, crop sizes,
scales and probabilities. Where lightly offers no component (per-tensor gradient clipping, DINOv2's layer-wise
lr decay, the parameter groups' lr scales), the twin has a few lines of its own. What lightly cannot express
is listed in ``bench/learning.py``'s docstring.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss, VICRegLoss
from lightly.models import utils as lutils
from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
from lightly.models.modules.heads import DINOv2ProjectionHead, VICRegProjectionHead
from lightly.transforms import DINOTransform, IBOTTransform, MAETransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.vicreg_transform import VICRegViewTransform
from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule, linear_warmup_schedule
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslab.augment import eval_view
from sslab.build import build_backbone

warnings.filterwarnings("ignore", message=r".*weight_norm.*")  # lightly's heads use torch's old weight_norm
warnings.filterwarnings("ignore", message=r".*MAEDecoderTIMM.*")  # deprecated in lightly 1.6, kept until 1.7

LR_SCALING: dict[str, Callable[[int], float]] = {
    "linear_wrt_256": lambda batch: batch / 256,
    "sqrt_wrt_1024": lambda batch: math.sqrt(batch / 1024),
}


# -- data ----------------------------------------------------------------------------------------------
class PerSampleViews(Dataset):
    """uint8 (N, C, H, W) images -> PIL RGB -> a lightly transform, one sample at a time, as a lightly user's
    DataLoader does it."""

    def __init__(self, images: torch.Tensor, transform: Callable[[Image.Image], list[torch.Tensor]]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        a = self.images[i].permute(1, 2, 0).numpy()
        pil = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
        return self.transform(pil)


def _seed_worker(worker_id: int) -> None:
    """lightly's blur / solarisation draw from numpy and its block masks from ``random``: seed both per worker."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def endless(loader: DataLoader) -> Iterator[list[torch.Tensor]]:
    while True:
        yield from loader


def normalize_cfg(cfg: DictConfig) -> dict[str, list[float]]:
    return {"mean": list(cfg.data.mean), "std": list(cfg.data.std)}


def multicrop_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """sslab's multi-crop view config (``MultiCropViews``) as DINOTransform / IBOTTransform arguments. Colour
    jitter (0.4, 0.4, 0.2, 0.1, p 0.8), greyscale p 0.2 and flip p 0.5 are both libraries' defaults."""
    v, d = cfg.method.views, cfg.data
    if int(v.num_global) != 2:
        raise ValueError(
            f"lightly's multi-crop transforms make 2 global crops; the config asks {v.num_global}"
        )
    if float(v.global_solarize_p[0]) != 0.0:
        raise ValueError("lightly solarises only the second global crop; global_solarize_p[0] must be 0")
    scale = d.image_size / 224.0  # sslab's blur sigma is 0.1-2.0 px at 224 px, scaled to the crop size
    return {
        "global_crop_size": int(d.image_size),
        "global_crop_scale": tuple(v.global_scale),
        "local_crop_size": int(d.local_crop_size),
        "local_crop_scale": tuple(v.local_scale),
        "n_local_views": int(v.num_local),
        "gaussian_blur": (float(v.global_blur_p[0]), float(v.global_blur_p[1]), float(v.local_blur_p)),
        "sigmas": (0.1 * scale, 2.0 * scale),  # one range for all crops (sslab: scaled per crop size)
        "solarization_prob": float(v.global_solarize_p[1]),
        "normalize": normalize_cfg(cfg),
    }


# -- optimisation helpers ------------------------------------------------------------------------------
def layer_id(name: str, num_blocks: int) -> int:
    """BEiT-style depth of a ViT parameter: 0 for embeddings and tokens, i + 1 for block i, the rest last."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if any(p in ("cls_token", "pos_embed", "reg_token", "patch_embed", "mask_token") for p in parts):
        return 0
    return num_blocks + 1


def param_groups(
    backbone: nn.Module,
    others: list[nn.Module],
    layer_decay: float | None = None,
    patch_embed_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """lightly's weight-decay split (``get_weight_decay_parameters``: no decay on norms and biases), with
    per-parameter lr scales for the backbone when layer-wise lr decay is on (DINOv2)."""
    decay, no_decay = lutils.get_weight_decay_parameters([backbone, *others])
    decay_ids = {id(p) for p in decay}
    scales: dict[int, float] = {}
    blocks = getattr(getattr(backbone, "vit", None), "blocks", [])
    for name, p in backbone.named_parameters():
        s = 1.0
        if layer_decay is not None and len(blocks):
            s = layer_decay ** (len(blocks) + 1 - layer_id(name, len(blocks)))
        if "patch_embed" in name.split("."):
            s *= patch_embed_lr_mult
        scales[id(p)] = s
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in [*decay, *no_decay]:
        if p.requires_grad:
            groups.setdefault((id(p) in decay_ids, scales.get(id(p), 1.0)), []).append(p)
    return [{"params": ps, "apply_wd": wd, "lr_scale": s} for (wd, s), ps in groups.items()]


@torch.no_grad()
def clip_each_(params: list[nn.Parameter], max_norm: float) -> None:
    """Clip every gradient tensor on its own (DINO's rule; lightly has no helper), with torch's utility."""
    for p in params:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_(p, max_norm)


def vit_wrapper(backbone: nn.Module, mae_init: bool = False) -> MaskedVisionTransformerTIMM:
    """lightly's ViT wrapper around the timm model inside sslab's backbone. It keeps the backbone's own
    initialisation, except for MAE, where lightly's MAE recipe (xavier init, fixed sin-cos position table)
    applies, as sslab's MAE does."""
    vit = getattr(backbone, "vit", None)
    if vit is None:
        raise ValueError("the lightly twins need a ViT backbone (lightly's masked ViT wraps a timm ViT)")
    if mae_init:
        return MaskedVisionTransformerTIMM(vit=vit)
    return MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization="skip")


# -- twins ---------------------------------------------------------------------------------------------
class Twin(nn.Module):
    """Shared loop parts: AdamW over lightly's parameter split, lightly's lr / wd schedules, per-tensor
    clipping. A subclass gives the transform, the loss of one batch of views and the evaluation encoder."""

    probe_batchnorm = False  # MAE's linear probe puts a BatchNorm without affine first, as sslab's MAE

    def __init__(self, cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.cfg, self.m = cfg, cfg.method
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        batch = int(cfg.data.batch_size)
        self.peak_lr = float(self.m.base_lr) * LR_SCALING[str(self.m.get("lr_scaling", "linear_wrt_256"))](
            batch
        )
        warmup = int(float(self.m.warmup_epochs) * steps_per_epoch)
        self.warmup_steps = min(warmup, total_steps)  # lightly refuses a warm-up longer than the run
        self.wd = float(self.m.weight_decay)
        wd_end = self.m.get("weight_decay_end")
        self.wd_end = self.wd if wd_end is None else float(wd_end)
        self.grad_clip = self.m.get("grad_clip")

    # what a subclass provides
    def transform(self) -> Callable[[Image.Image], list[torch.Tensor]]:
        raise NotImplementedError

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        raise NotImplementedError

    def encoder(self) -> nn.Module:
        """The module whose output (CLS) is the evaluation feature (DINO family: the teacher)."""
        raise NotImplementedError

    def groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def after_backward(self, step: int) -> None:
        if self.grad_clip:
            clip_each_([p for g in self.optimizer.param_groups for p in g["params"]], float(self.grad_clip))

    def after_step(self, step: int) -> None:
        pass

    # shared
    def build_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.groups(), lr=self.peak_lr, betas=tuple(self.m.betas))

    def set_lr_wd(self, step: int) -> None:
        lr = cosine_warmup_schedule(
            step, self.total_steps, self.peak_lr, float(self.m.min_lr), self.warmup_steps, 0.0
        )
        wd = cosine_schedule(step, self.total_steps, self.wd, self.wd_end)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
            g["weight_decay"] = wd if g["apply_wd"] else 0.0

    @torch.no_grad()
    def embed_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """sslab's evaluation view (``eval_view``) and the twin's encoder: the same features path as sslab's
        ``embed_uint8``, so ``sslab.runs.evaluate.evaluate_model`` evaluates both alike."""
        enc = self.encoder()
        was = enc.training
        enc.eval()
        try:
            d = self.cfg.data
            device = next(enc.parameters()).device
            x = eval_view(images.to(device), int(d.image_size), tuple(d.mean), tuple(d.std))
            return enc(x).float()
        finally:
            enc.train(was)


class DINOTwin(Twin):
    """DINO as lightly's example builds it: DINOTransform, DINOProjectionHead (student and a second head for
    the teacher, loaded with its weights), DINOLoss with an explicit teacher temperature, update_momentum
    with a cosine momentum, one backbone + head call per crop."""

    head_cls: type[nn.Module] = DINOProjectionHead

    def __init__(self, cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(cfg, total_steps, steps_per_epoch)
        m = self.m
        self.student = vit_wrapper(build_backbone(cfg))
        self.student_head = self.make_head()
        self.teacher = copy.deepcopy(self.student)
        self.teacher_head = self.make_head()
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        lutils.deactivate_requires_grad(self.teacher)
        lutils.deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=int(m.out_dim),
            warmup_teacher_temp=float(m.warmup_teacher_temp),
            teacher_temp=float(m.teacher_temp),
            student_temp=float(m.student_temp),
            center_momentum=float(m.center_momentum),
        )
        self.temp_warmup = int(float(m.teacher_temp_warmup_epochs) * steps_per_epoch)
        self.freeze_steps = float(m.freeze_last_layer_epochs) * steps_per_epoch

    def make_head(self) -> nn.Module:
        m = self.m
        return DINOProjectionHead(
            input_dim=self.student.vit.embed_dim,
            hidden_dim=int(m.hidden_dim),
            bottleneck_dim=int(m.bottleneck_dim),
            output_dim=int(m.out_dim),
            batch_norm=bool(m.use_bn_in_head),
            freeze_last_layer=1,  # "epoch" 0 = the freeze period, counted in steps by after_backward
            norm_last_layer=bool(m.norm_last_layer),
        )

    def transform(self) -> Callable[[Image.Image], list[torch.Tensor]]:
        return DINOTransform(**multicrop_kwargs(self.cfg))

    def groups(self) -> list[dict[str, Any]]:
        return param_groups(self.student, [self.student_head])

    def encoder(self) -> nn.Module:
        return self.teacher

    def teacher_temp(self, step: int) -> float:
        return linear_warmup_schedule(
            step, self.temp_warmup, float(self.m.warmup_teacher_temp), float(self.m.teacher_temp)
        )

    def momentum(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, float(self.m.momentum_teacher), 1.0)

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher(x)) for x in views[:2]]
        student_out = [self.student_head(self.student(x)) for x in views]
        return self.criterion(teacher_out, student_out, teacher_temp=self.teacher_temp(step))

    def after_backward(self, step: int) -> None:
        self.cancel_last_layer(step)
        super().after_backward(step)

    def cancel_last_layer(self, step: int) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=0 if step < self.freeze_steps else 1)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        lutils.update_momentum(self.student, self.teacher, m=m)
        lutils.update_momentum(self.student_head, self.teacher_head, m=m)


class IBOTTwin(DINOTwin):
    """iBOT from lightly's parts: IBOTTransform, lightly's masked ViT (mask token on the student's global
    crops), ``random_block_mask``, DINOLoss on the CLS tokens and IBOTPatchLoss on the masked patch tokens of
    the same view, one head shared by CLS and patches (sslab's default)."""

    def __init__(self, cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(cfg, total_steps, steps_per_epoch)
        m = self.m
        if m.get("separate_patch_head"):
            raise ValueError("the iBOT twin shares the head (separate_patch_head=false), as sslab's default")
        self.patch_criterion = IBOTPatchLoss(
            output_dim=int(m.out_dim),
            teacher_temp=float(m.teacher_patch_temp),
            student_temp=float(m.student_temp),
            center_momentum=float(m.center_momentum_patch),
        )
        warm = m.get("teacher_patch_temp_warmup_epochs")
        warm = m.teacher_temp_warmup_epochs if warm is None else warm
        self.patch_temp_warmup = int(float(warm) * steps_per_epoch)
        self.grid = int(cfg.data.image_size) // int(cfg.data.patch_size)

    def transform(self) -> Callable[[Image.Image], list[torch.Tensor]]:
        return IBOTTransform(**multicrop_kwargs(self.cfg))

    def block_masks(self, n: int, device: torch.device) -> torch.Tensor:
        mk = self.m.masking
        cells = self.grid * self.grid
        min_block = mk.get("min_block_patches")
        min_block = (self.grid // 3) ** 2 if min_block is None else int(min_block)  # iBOT's rule
        max_frac = mk.get("max_block_fraction")
        return lutils.random_block_mask(
            size=(n, self.grid, self.grid),
            batch_mask_ratio=float(mk.probability),
            min_image_mask_ratio=float(mk.ratio[0]),
            max_image_mask_ratio=float(mk.ratio[1]),
            min_num_masks_per_block=max(1, min_block),
            max_num_masks_per_block=None if max_frac is None else max(1, int(max_frac * cells)),
            min_block_aspect_ratio=float(mk.min_aspect),
            device=device,
        )

    def cls_pair_factor(self, n_local: int) -> float:
        return 1.0  # lightly's DINOLoss averages over (teacher, student) pairs, as iBOT does

    def extra_loss(self, student_global_cls: torch.Tensor) -> torch.Tensor | float:
        return 0.0

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        m = self.m
        b = views[0].shape[0]
        g = torch.cat(views[:2])
        masks = self.block_masks(2 * b, g.device)  # (2B, h, w)
        flat = masks.flatten(1)
        token_mask = torch.cat([flat.new_zeros(2 * b, self.student.vit.num_prefix_tokens), flat], dim=1)
        n_prefix = self.student.vit.num_prefix_tokens
        with torch.no_grad():
            t_tokens = self.teacher.encode(g)
            t_cls = self.teacher_head(t_tokens[:, 0])
            t_patch = self.teacher_head(t_tokens[:, n_prefix:][flat])
        s_tokens = self.student.encode(g, mask=token_mask)
        s_cls = self.student_head(s_tokens[:, 0])
        s_patch = self.student_head(s_tokens[:, n_prefix:][flat])
        s_local = [self.student_head(self.student(x)) for x in views[2:]]
        cls_loss = self.criterion(
            list(t_cls.chunk(2)), [*s_cls.chunk(2), *s_local], teacher_temp=self.teacher_temp(step)
        ) * self.cls_pair_factor(len(views) - 2)
        patch_temp = linear_warmup_schedule(
            step, self.patch_temp_warmup, float(m.warmup_teacher_patch_temp), float(m.teacher_patch_temp)
        )
        patch_loss = self.patch_criterion(t_patch, s_patch, mask=masks, teacher_temp=patch_temp)
        extra = self.extra_loss(s_tokens[:, 0])
        return float(m.cls_loss_weight) * cls_loss + float(m.patch_loss_weight) * patch_loss + extra


class DINOv2Twin(IBOTTwin):
    """DINOv2 from lightly's parts: the iBOT twin with DINOv2ProjectionHead (trainable weight-norm gain),
    KoLeoLoss on the student's CLS of each global crop, the teacher in eval mode, DINOTransform (lightly has
    no DINOv2 transform), layer-wise lr decay and the patch-embedding lr multiplier on the backbone."""

    def __init__(self, cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> None:
        if cfg.method.get("centering", "center") != "center":
            raise ValueError("the DINOv2 twin supports centering=center (lightly's DINOLoss)")
        super().__init__(cfg, total_steps, steps_per_epoch)
        self.koleo = KoLeoLoss()
        self.teacher.eval()

    def make_head(self) -> nn.Module:
        m = self.m
        return DINOv2ProjectionHead(
            input_dim=self.student.vit.embed_dim,
            hidden_dim=int(m.hidden_dim),
            bottleneck_dim=int(m.bottleneck_dim),
            output_dim=int(m.out_dim),
            batch_norm=bool(m.use_bn_in_head),
        )

    def transform(self) -> Callable[[Image.Image], list[torch.Tensor]]:
        return DINOTransform(**multicrop_kwargs(self.cfg))

    def train(self, mode: bool = True) -> DINOv2Twin:
        super().train(mode)
        self.teacher.eval()
        self.teacher_head.eval()
        return self

    def groups(self) -> list[dict[str, Any]]:
        return param_groups(
            self.student,
            [self.student_head],
            layer_decay=self.m.get("layer_decay"),
            patch_embed_lr_mult=float(self.m.get("patch_embed_lr_mult", 1.0)),
        )

    def cls_pair_factor(self, n_local: int) -> float:
        """DINOv2 divides the summed CLS terms by n_g (n_g - 1) + max(n_l n_g, 1), lightly by the pair count."""
        return (2 * (1 + n_local)) / (2 + max(2 * n_local, 1))

    def extra_loss(self, student_global_cls: torch.Tensor) -> torch.Tensor | float:
        w = float(self.m.koleo_weight)
        return w * sum(self.koleo(c.float()) for c in student_global_cls.chunk(2)) if w else 0.0

    def cancel_last_layer(self, step: int) -> None:
        if step < self.freeze_steps:  # DINOv2ProjectionHead has no cancel_last_layer_gradients
            for p in self.student_head.last_layer.parameters():
                p.grad = None


class MAETwin(Twin):
    """MAE as lightly's example builds it: MAETransform, lightly's masked ViT with its MAE initialisation,
    ``random_token_mask``, MAEDecoderTIMM, MSE on the masked patches against per-patch normalised pixels
    (``normalize_mean_var``, when the config's norm_pix_loss is on)."""

    probe_batchnorm = True

    def __init__(self, cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(cfg, total_steps, steps_per_epoch)
        from lightly.models.modules import MAEDecoderTIMM

        m = self.m
        self.backbone = vit_wrapper(build_backbone(cfg), mae_init=True)
        vit = self.backbone.vit
        self.patch_size = int(cfg.data.patch_size)
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            patch_size=self.patch_size,
            in_chans=3,
            embed_dim=vit.embed_dim,
            decoder_embed_dim=int(m.decoder_dim),
            decoder_depth=int(m.decoder_depth),
            decoder_num_heads=int(m.decoder_heads),
            mlp_ratio=float(m.decoder_mlp_ratio),
            num_prefix_tokens=vit.num_prefix_tokens,
        )
        if m.get("embed_pool", "cls") != "cls":
            raise ValueError("the MAE twin evaluates the CLS token (embed_pool=cls)")

    def transform(self) -> Callable[[Image.Image], list[torch.Tensor]]:
        d, v = self.cfg.data, self.m.views
        if float(v.scale[1]) != 1.0 or float(v.get("hflip_p", 0.5)) != 0.5:
            raise ValueError("lightly's MAETransform crops at scale (min, 1.0) and flips with p 0.5")
        return MAETransform(
            input_size=int(d.image_size),
            min_scale=float(self.m.views.scale[0]),
            normalize=normalize_cfg(self.cfg),
        )

    def groups(self) -> list[dict[str, Any]]:
        return param_groups(self.backbone, [self.decoder])

    def encoder(self) -> nn.Module:
        return self.backbone

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        images = views[0]
        b = images.shape[0]
        seq = self.backbone.sequence_length
        idx_keep, idx_mask = lutils.random_token_mask(
            size=(b, seq), mask_ratio=float(self.m.mask_ratio), device=images.device
        )
        encoded = self.backbone.encode(images, idx_keep=idx_keep)
        x = self.decoder.embed(encoded)
        tokens = lutils.repeat_token(self.decoder.mask_token, (b, seq))
        tokens = lutils.set_at_index(tokens, idx_keep, x.type_as(tokens))
        pred = self.decoder.predict(lutils.get_at_index(self.decoder.decode(tokens), idx_mask))
        n_prefix = self.backbone.vit.num_prefix_tokens
        target = lutils.get_at_index(lutils.patchify(images, self.patch_size), idx_mask - n_prefix)
        if self.m.get("norm_pix_loss", True):
            target = lutils.normalize_mean_var(target, dim=-1)
        return F.mse_loss(pred, target)


class VICRegTwin(Twin):
    """VICReg from lightly's parts: two VICRegViewTransforms (one per view, so the blur and solarisation
    probabilities can differ per view as in sslab's config) in a MultiViewTransform, VICRegProjectionHead,
    VICRegLoss; backbone and expander called once per view."""

    def __init__(self, cfg: DictConfig, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(cfg, total_steps, steps_per_epoch)
        m = self.m
        dims = list(m.projector_dims)
        if len(set(dims)) != 1 or len(dims) < 2:
            raise ValueError(f"VICRegProjectionHead has equal hidden and output sizes; got {dims}")
        self.backbone = vit_wrapper(build_backbone(cfg))
        self.projector = VICRegProjectionHead(
            input_dim=self.backbone.vit.embed_dim,
            hidden_dim=dims[0],
            output_dim=dims[-1],
            num_layers=len(dims),
        )
        self.criterion = VICRegLoss(
            lambda_param=float(m.sim_coeff), mu_param=float(m.std_coeff), nu_param=float(m.cov_coeff)
        )

    def transform(self) -> Callable[[Image.Image], list[torch.Tensor]]:
        v, d = self.m.views, self.cfg.data
        if v.get("crop", "resized") != "resized":
            raise ValueError("lightly's VICReg views use a random resized crop (views.crop=resized)")
        if float(v.scale[1]) != 1.0:
            raise ValueError("lightly's VICRegViewTransform crops at scale (min_scale, 1.0)")

        def view(i: int) -> VICRegViewTransform:
            return VICRegViewTransform(
                input_size=int(d.image_size),
                cj_prob=float(v.jitter_p),
                cj_strength=1.0,
                cj_bright=float(v.brightness),
                cj_contrast=float(v.contrast),
                cj_sat=float(v.saturation),
                cj_hue=float(v.hue),
                min_scale=float(v.scale[0]),
                random_gray_scale=float(v.grayscale_p),
                solarize_prob=float(v.solarize_p[min(i, len(v.solarize_p) - 1)]),
                gaussian_blur=float(v.blur_p[min(i, len(v.blur_p) - 1)]),
                sigmas=tuple(v.blur_sigma),
                hf_prob=float(v.flip_p),
                normalize=normalize_cfg(self.cfg),
            )

        return MultiViewTransform([view(0), view(1)])

    def groups(self) -> list[dict[str, Any]]:
        return param_groups(self.backbone, [self.projector])

    def encoder(self) -> nn.Module:
        return self.backbone

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z_a = self.projector(self.backbone(views[0]))
        z_b = self.projector(self.backbone(views[1]))
        return self.criterion(z_a, z_b)


TWINS: dict[str, type[Twin]] = {
    "dino": DINOTwin,
    "ibot": IBOTTwin,
    "dinov2": DINOv2Twin,
    "mae": MAETwin,
    "vicreg": VICRegTwin,
}


def train_twin(
    cfg: DictConfig,
    train_images: torch.Tensor,
    steps: int,
    budget_s: float,
    device: torch.device,
    seed: int,
) -> tuple[Twin, dict[str, Any]]:
    """Train the twin of ``cfg.method.name`` for ``steps`` steps or ``budget_s`` seconds, whichever ends
    first (the schedules span ``steps``, as Lightning's max_time leaves them). Returns the twin and
    {steps, train_time_s, images_per_s, stopped_by_time, loss_first, loss_last}; the time covers the
    training loop only (per-sample views in the DataLoader included, evaluation not)."""
    name = str(cfg.method.name)
    if name not in TWINS:
        raise ValueError(f"no lightly twin for method {name}; twins exist for {sorted(TWINS)}")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    batch = int(cfg.data.batch_size)
    steps_per_epoch = max(1, len(train_images) // batch)
    twin = TWINS[name](cfg, steps, steps_per_epoch).to(device)
    twin.build_optimizer()
    twin.train()
    workers = int(cfg.data.get("num_workers", 0))
    loader = DataLoader(
        PerSampleViews(train_images, twin.transform()),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        worker_init_fn=_seed_worker if workers else None,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    batches = endless(loader)
    losses: list[float] = []
    start = time.perf_counter()
    done, stopped_by_time = 0, False
    for step in range(steps):
        if time.perf_counter() - start >= budget_s:
            stopped_by_time = True
            break
        views = [v.to(device, non_blocking=True) for v in next(batches)]
        twin.set_lr_wd(step)
        loss = twin.loss(views, step)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"lightly twin {name}: loss is {loss.item()} at step {step}")
        twin.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        twin.after_backward(step)
        twin.optimizer.step()
        twin.after_step(step)
        losses.append(loss.item())
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    stats = {
        "steps": done,
        "train_time_s": round(elapsed, 2),
        "images_per_s": round(done * batch / elapsed, 2) if elapsed > 0 else None,
        "stopped_by_time": stopped_by_time,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    return twin, stats
