"""DINO training-step throughput (images/s): sslab's DINO module against a DINO built from lightly's parts.

What runs on each side, for one batch of B uint8 Fashion-MNIST images (the embedded subset):

- **sslab**: the real ``DINO`` module, built from the Hydra config exactly as train.py builds it, stepped by
  hand without the Lightning Trainer: on-device kornia multi-crop views (``model.views``), ``model.step``
  (teacher on the global crops, student on all crops, loss, centre update), backward, per-tensor gradient
  clipping, AdamW, EMA update of teacher backbone and head.
- **lightly**: the same timm backbone (built by the same sslab function, so identical architecture and
  initial weights), ``lightly.models.modules.DINOProjectionHead`` with our head sizes,
  ``lightly.loss.DINOLoss``, ``lightly.models.utils.update_momentum`` for the EMA, views from
  ``lightly.transforms.DINOTransform`` with the same crop sizes, crop counts, scales, blur/solarisation
  probabilities and normalisation. The training loop follows lightly's DINO example: one backbone + head
  call per crop.

Why the comparison is fair:

- same backbone, head sizes, number and sizes of crops, batch size, optimizer (AdamW over the same
  parameters, lr 1e-4), EMA momentum, teacher temperature, dtype (fp32) and thread count;
- both sides clip gradients with the same per-tensor function (lightly has no clipping helper), and
  neither freezes the head's last layer (the steady state after the first epoch);
- both sides start from the same uint8 batch on the CPU and include moving it to the device. lightly's
  views are made per sample in PIL/torchvision, which is what a lightly user's DataLoader does; here that
  loop runs in the main process, as with ``num_workers=0`` (the default of our Fashion-MNIST config), but
  with the torch thread count of a DataLoader worker (1, ``--worker-threads``), which on 28 px images is
  much faster than more threads. Worker processes would overlap that work with the model on a machine with
  spare cores, so the table also gives the step time with views precomputed (model only) for both sides.
  Our view pipeline runs inside the step on the training device and cannot be moved off it, so "with
  views" is our real step;
- every repetition runs all variants once, in rotating order, after untimed warm-up rounds, and the
  median over repetitions is reported, so load changes on the machine hit every side alike.

One more model-only variant, "lightly, crops batched", concatenates the crops of one resolution before the
backbone (as sslab does), to separate the effect of the loop design from that of the library code.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import numpy as np
import torch
from _common import (
    CONF_DIR,
    add_common_args,
    add_profile_arg,
    compile_seconds,
    environment,
    median,
    print_json,
    print_markdown_table,
    profile_model_only,
    setup,
    spread,
    time_interleaved,
    torch_threads,
)
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from sslab.build import build_backbone, build_datamodule, build_method
from sslab.methods.base import clip_per_tensor_
from sslab.modules.ema import ema_update_
from sslab.precision import compile_model

warnings.filterwarnings("ignore", message=r".*weight_norm.*")  # lightly's head uses the old weight_norm


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per step (default 32, to keep the run near 2 min on 2 CPU cores; training uses data.batch_size)",
    )
    p.add_argument("--num-local", type=int, default=None, help="local crops (default: the method config's)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra Hydra override for our config, e.g. backbone=vit_s (repeatable); lightly follows it",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time sslab under compile=true (torch.compile of each ViT block); compile time reported apart",
    )
    add_profile_arg(p)
    add_common_args(p, warmup=1, reps=5, per_sample_baseline=True)
    return p.parse_args()


def compose_config(args: argparse.Namespace):
    overrides = [
        "data.source=embedded",
        f"data.batch_size={args.batch_size}",
        "method.momentum_teacher=0.996",  # the official DINO momentum, the value both sides update with
        *args.override,
    ]
    if args.num_local is not None:
        overrides.append(f"method.views.num_local={args.num_local}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


class SSLabSide:
    def __init__(self, cfg, dm, device: torch.device) -> None:
        model = build_method(cfg, dm).to(device)
        model.train()
        model.setup_schedules(total_steps=1000, steps_per_epoch=100)  # EMA momentum 0.996 (overrides)
        self.model = model
        self.device = device
        self.grad_clip = float(cfg.method.grad_clip)
        self.momentum = model.schedules["momentum"](0)
        self.opt = torch.optim.AdamW(model.param_groups(), lr=1e-4)

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.views(images.to(self.device, non_blocking=True))

    def step(self, images: torch.Tensor, views: list[torch.Tensor] | None = None) -> torch.Tensor:
        model = self.model
        x = images.to(self.device, non_blocking=True)
        if views is None:
            views = model.views(x)
        out = model.step({"image": x, "views": views})
        out["loss"].backward()
        clip_per_tensor_(model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad()
        ema_update_(model.teacher_backbone, model.backbone, self.momentum)
        ema_update_(model.teacher_head, model.head, self.momentum)
        return out["loss"]


class LightlySide:
    """DINO from lightly's building blocks, wired as in lightly's DINO example."""

    def __init__(
        self,
        cfg,
        backbone: nn.Module,
        device: torch.device,
        momentum: float,
        teacher_temp: float,
        worker_threads: int,
    ):
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.transforms import DINOTransform

        m, d, v = cfg.method, cfg.data, cfg.method.views
        self.update_momentum = update_momentum
        self.student_backbone = backbone.to(device).train()
        head_kwargs = dict(
            input_dim=backbone.embed_dim,
            hidden_dim=m.hidden_dim,
            bottleneck_dim=m.bottleneck_dim,
            output_dim=m.out_dim,
            norm_last_layer=m.norm_last_layer,
            batch_norm=bool(m.get("use_bn_in_head", False)),
        )
        self.student_head = DINOProjectionHead(**head_kwargs).to(device)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        # a head with torch's old weight_norm cannot be deep-copied: build a second one, as lightly's example
        # does, and start it from the student's weights
        self.teacher_head = DINOProjectionHead(**head_kwargs).to(device)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=m.out_dim,
            warmup_teacher_temp=m.warmup_teacher_temp,
            teacher_temp=m.teacher_temp,
            student_temp=m.student_temp,
            center_momentum=m.center_momentum,
        ).to(device)
        # lightly's blur sigmas are absolute pixels; ours are 0.1-2.0 px at 224 px, scaled to the crop size
        scale = d.image_size / 224.0
        self.transform = DINOTransform(
            global_crop_size=d.image_size,
            global_crop_scale=tuple(v.global_scale),
            local_crop_size=d.local_crop_size,
            local_crop_scale=tuple(v.local_scale),
            n_local_views=v.num_local,
            gaussian_blur=(v.global_blur_p[0], v.global_blur_p[1], v.local_blur_p),
            sigmas=(0.1 * scale, 2.0 * scale),
            solarization_prob=v.global_solarize_p[1],
            normalize={"mean": list(d.mean), "std": list(d.std)},
        )
        self.n_global = v.num_global
        self.device = device
        self.worker_threads = worker_threads
        self.grad_clip = float(m.grad_clip)
        self.momentum = momentum
        self.teacher_temp = teacher_temp
        params = [*self.student_backbone.parameters(), *self.student_head.parameters()]
        self.opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """What a lightly DataLoader does: per sample, uint8 array -> PIL RGB -> DINOTransform; then
        default collation (one stacked tensor per view) and the transfer to the device. Runs with the torch
        thread count of a DataLoader worker (1 unless --worker-threads says otherwise)."""
        arrays = images.permute(0, 2, 3, 1).numpy()
        with torch_threads(self.worker_threads):
            pil = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in arrays]
            per_sample = [self.transform(im) for im in pil]
        return [torch.stack(v).to(self.device, non_blocking=True) for v in zip(*per_sample, strict=True)]

    def forward_per_view(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        teacher_out = [self.teacher_head(self.teacher_backbone(x)) for x in views[: self.n_global]]
        student_out = [self.student_head(self.student_backbone(x)) for x in views]
        return teacher_out, student_out

    def forward_batched(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            t = self.teacher_head(self.teacher_backbone(torch.cat(views[: self.n_global])))
        sizes = sorted({x.shape[-1] for x in views}, reverse=True)
        feats = [self.student_backbone(torch.cat([x for x in views if x.shape[-1] == s])) for s in sizes]
        return list(t.chunk(self.n_global)), list(self.student_head(torch.cat(feats)).chunk(len(views)))

    def step(self, images: torch.Tensor, views: list[torch.Tensor] | None = None, batched: bool = False):
        if views is None:
            views = self.make_views(images)
        teacher_out, student_out = (self.forward_batched if batched else self.forward_per_view)(views)
        loss = self.criterion(teacher_out, student_out, teacher_temp=self.teacher_temp)
        loss.backward()
        clip_per_tensor_(
            [*self.student_backbone.parameters(), *self.student_head.parameters()], self.grad_clip
        )
        self.opt.step()
        self.opt.zero_grad()
        self.update_momentum(self.student_backbone, self.teacher_backbone, m=self.momentum)
        self.update_momentum(self.student_head, self.teacher_head, m=self.momentum)
        return loss


def compiled_side(
    cfg, dm, device: torch.device, images: torch.Tensor, views: list[torch.Tensor], seed: int
) -> tuple[SSLabSide, float]:
    """sslab's side again, with the blocks compiled as ``compile=true`` does, and the seconds its compilation
    took."""
    torch.manual_seed(seed)
    side = SSLabSide(cfg, dm, device)
    compile_model(side.model, "gpu" if device.type == "cuda" else "cpu")
    return side, compile_seconds(lambda: side.step(images, views), device)


def main() -> None:
    args = parse_args()
    device = setup(args)
    torch.set_float32_matmul_precision("high")  # as train.py
    np.random.seed(args.seed)  # lightly's blur and solarisation draw from numpy
    cfg = compose_config(args)
    dm = build_datamodule(cfg)
    dm.setup()
    b = args.batch_size
    if len(dm.train_set) < b:
        raise SystemExit(f"--batch-size {b} is larger than the training set ({len(dm.train_set)})")
    images = dm.train_set.images[:b].clone()  # uint8 (B, C, H, W) on the CPU, as the DataLoader yields it

    torch.manual_seed(args.seed)
    ours = SSLabSide(cfg, dm, device)
    torch.manual_seed(args.seed)
    theirs = LightlySide(
        cfg,
        build_backbone(cfg),
        device,
        momentum=ours.momentum,
        teacher_temp=ours.model.schedules["teacher_temp"](0),
        worker_threads=args.worker_threads,
    )
    # the same backbone weights on both sides (same function, same seed); checked, not assumed
    for (n, p), q in zip(
        ours.model.backbone.state_dict().items(), theirs.student_backbone.state_dict().values(), strict=True
    ):
        if not torch.equal(p, q):
            raise RuntimeError(f"backbones differ at {n}")

    images_dev = images.to(device)
    fixed_views = ours.make_views(images)
    lightly_shapes = [tuple(v.shape) for v in theirs.make_views(images)]
    if lightly_shapes != [tuple(v.shape) for v in fixed_views]:
        raise RuntimeError(
            f"view shapes differ: ours {[tuple(v.shape) for v in fixed_views]}, lightly {lightly_shapes}"
        )

    compiled, compile_s = None, 0.0
    if args.compile:
        compiled, compile_s = compiled_side(cfg, dm, device, images, fixed_views, args.seed)
    variants = {
        "sslab, with views": lambda: ours.step(images),
        "lightly, with views": lambda: theirs.step(images),
        "sslab, model only": lambda: ours.step(images_dev, fixed_views),
        "lightly, model only": lambda: theirs.step(images, fixed_views),
        "lightly, model only, crops batched": lambda: theirs.step(images, fixed_views, batched=True),
    }
    if compiled is not None:
        variants["sslab compile=true, with views"] = lambda: compiled.step(images)
        variants["sslab compile=true, model only"] = lambda: compiled.step(images_dev, fixed_views)
    times = time_interleaved(variants, args.warmup, args.reps, device)
    sec = {k: median(v) for k, v in times.items()}
    ips = {k: b / s for k, s in sec.items()}

    n_views = len(fixed_views)
    n_global = cfg.method.views.num_global
    crop_desc = f"{n_global} x {cfg.data.image_size} px"
    if n_views > n_global:
        crop_desc += f" + {n_views - n_global} x {cfg.data.local_crop_size} px"
    vit = getattr(ours.model.backbone, "vit", None)
    backbone_desc = cfg.backbone.name + (f" ({len(vit.blocks)} blocks)" if vit is not None else "")
    print(
        f"\nDINO training step, {backbone_desc}, batch {b}, crops {crop_desc}, head {cfg.method.hidden_dim}/"
        f"{cfg.method.bottleneck_dim}/{cfg.method.out_dim}, {args.device}, torch threads: {args.threads} "
        f"(lightly's per-sample transform: {args.worker_threads}), median of {args.reps} steps\n"
    )
    pairs = {
        "sslab, with views": "lightly, with views",
        "sslab, model only": "lightly, model only",
    }
    rows = []
    for name in variants:
        ratio = ""
        if name in pairs:
            ratio = f"{sec[pairs[name]] / sec[name]:.2f}x"
        rows.append([name, 1000 * sec[name], spread(times[name], 1000), ips[name], ratio])
    print_markdown_table(["variant", "ms / step", "min-max ms", "images / s", "sslab speed-up"], rows)
    speedup_views = sec["lightly, with views"] / sec["sslab, with views"]
    speedup_model = sec["lightly, model only"] / sec["sslab, model only"]
    speedup_batched = sec["lightly, model only, crops batched"] / sec["sslab, model only"]
    print(
        f"\nsslab vs lightly: {speedup_views:.2f}x with views, {speedup_model:.2f}x model only "
        f"({speedup_batched:.2f}x against lightly with crops batched)\n"
    )
    compile_json = {}
    if compiled is not None:
        gain_views = sec["sslab, with views"] / sec["sslab compile=true, with views"]
        gain_model = sec["sslab, model only"] / sec["sslab compile=true, model only"]
        print(
            f"compile=true against sslab eager: {gain_views:.2f}x with views, {gain_model:.2f}x model only; "
            f"compile time {compile_s:.1f} s (the first two steps minus two steady ones)\n"
        )
        compile_json = {
            "speedup_compile_with_views": round(gain_views, 3),
            "speedup_compile_model_only": round(gain_model, 3),
            "compile_s": round(compile_s, 1),
        }
    profile_model_only(variants, args.profile)
    import lightly

    print_json(
        {
            "bench": "dino_step",
            "batch_size": b,
            "backbone": backbone_desc,
            "num_crops": n_views,
            "images_per_s_sslab_with_views": round(ips["sslab, with views"], 2),
            "images_per_s_lightly_with_views": round(ips["lightly, with views"], 2),
            "images_per_s_sslab_model_only": round(ips["sslab, model only"], 2),
            "images_per_s_lightly_model_only": round(ips["lightly, model only"], 2),
            "images_per_s_lightly_model_only_batched": round(ips["lightly, model only, crops batched"], 2),
            "speedup_with_views": round(speedup_views, 3),
            "speedup_model_only": round(speedup_model, 3),
            "speedup_model_only_vs_batched": round(speedup_batched, 3),
            **compile_json,
            "lightly": lightly.__version__,
            **environment(args),
        }
    )


if __name__ == "__main__":
    main()
