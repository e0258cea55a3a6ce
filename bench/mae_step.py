"""MAE training-step throughput (images/s): sslab's MAE module against an MAE built from lightly's parts.

What runs on each side, for one batch of B uint8 Fashion-MNIST images (the embedded subset):

- **sslab**: the real ``MAE`` module, built from the Hydra config exactly as train.py builds it, stepped by
  hand without the Lightning Trainer: on-device kornia views (``model.views``: resized crop + flip),
  ``model.step`` (per-sample argsort masking, encoder on the visible patches, sin-cos decoder with mask
  tokens, normalised-pixel MSE on the masked patches), backward, AdamW.
- **lightly** (1.6.0): ``lightly.models.modules.MaskedVisionTransformerTIMM`` around a timm ViT of the same
  architecture holding the same weights, ``MAEDecoderTIMM`` with our decoder width, depth, heads and MLP
  ratio, ``lightly.models.utils.random_token_mask`` / ``set_at_index`` / ``get_at_index`` / ``patchify`` /
  ``normalize_mean_var`` as in lightly's MAE example, the same normalised-pixel MSE on the masked patches,
  AdamW; views from ``lightly.transforms.MAETransform`` (same crop size, min scale and normalisation), per
  sample, as a lightly DataLoader makes them.

Why the comparison is fair:

- same encoder architecture and weights (checked), decoder size, mask ratio, batch size, loss
  (normalised-pixel MSE on masked patches), optimizer (AdamW, lr 1e-4, betas (0.9, 0.95)), dtype (fp32) and
  thread count;
- our online-probe features are switched to ``visible`` (free) because lightly's MAE computes no probe
  features; the default ``full`` costs one extra no-grad encoder pass per step;
- lightly's per-sample views run with the torch thread count of a DataLoader worker (1, ``--worker-threads``);
  "model only" rows use precomputed views on both sides to separate the model from the input pipeline;
- every repetition runs all variants once, in rotating order, after untimed warm-up rounds, and the median
  over repetitions is reported, so load changes on the machine hit every side alike.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import timm
import torch
from _common import (
    CONF_DIR,
    add_common_args,
    add_profile_arg,
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

from sslab.build import build_datamodule, build_method

# the issue names MAEDecoderTIMM; lightly 1.6 warns that it is renamed (same module) in 1.7
warnings.filterwarnings("ignore", message=r".*MAEDecoderTIMM is deprecated.*")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per step (default 64, as data.batch_size)"
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra Hydra override for our config, e.g. backbone=vit_s or method.decoder_depth=8 (repeatable); "
        "lightly follows it",
    )
    add_profile_arg(p)
    add_common_args(p, warmup=2, reps=10, per_sample_baseline=True)
    return p.parse_args()


def compose_config(args: argparse.Namespace):
    overrides = [
        "data.source=embedded",
        f"data.batch_size={args.batch_size}",
        "method=mae",
        "method.probe_features=visible",
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


class SSLabSide:
    def __init__(self, cfg, dm, device: torch.device) -> None:
        self.model = build_method(cfg, dm).to(device).train()
        self.device = device
        self.opt = torch.optim.AdamW(self.model.param_groups(), lr=1e-4, betas=(0.9, 0.95))

    def make_views(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.views(images.to(self.device, non_blocking=True))

    def step(self, images: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        if views is None:
            views = self.make_views(images)
        out = self.model.step({"views": views})
        out["loss"].backward()
        self.opt.step()
        self.opt.zero_grad()
        return out["loss"]


class LightlySide:
    """MAE from lightly's building blocks, wired as in lightly's MAE example (normalised-pixel targets)."""

    def __init__(self, cfg, ours: nn.Module, device: torch.device, worker_threads: int) -> None:
        from lightly.models import utils
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
        from lightly.transforms import MAETransform

        m, d = cfg.method, cfg.data
        self.utils = utils
        src = ours.backbone.vit
        # the same timm architecture without dynamic_img_size (lightly's wrapper flattens patches itself)
        vit = timm.create_model(
            src.default_cfg["architecture"],
            pretrained=False,
            num_classes=0,
            img_size=d.image_size,
            patch_size=ours.patch_size,
            reg_tokens=ours.backbone.num_registers,
            depth=len(src.blocks),
        )
        self.backbone = MaskedVisionTransformerTIMM(vit=vit).to(device)
        self.backbone.vit.load_state_dict(src.state_dict())  # same weights as ours (lightly re-initialises)
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            patch_size=ours.patch_size,
            embed_dim=vit.embed_dim,
            decoder_embed_dim=m.decoder_dim,
            decoder_depth=m.decoder_depth,
            decoder_num_heads=m.decoder_heads,
            num_prefix_tokens=vit.num_prefix_tokens,
            mlp_ratio=m.decoder_mlp_ratio,
        ).to(device)
        self.sequence_length = self.backbone.sequence_length
        self.mask_ratio = m.mask_ratio
        self.patch_size = ours.patch_size
        self.transform = MAETransform(
            input_size=d.image_size,
            min_scale=m.views.scale[0],
            normalize={"mean": list(d.mean), "std": list(d.std)},
        )
        self.device = device
        self.worker_threads = worker_threads
        params = [*self.backbone.parameters(), *self.decoder.parameters()]
        self.opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))

    def make_views(self, images: torch.Tensor) -> torch.Tensor:
        """Per sample, uint8 array -> PIL RGB -> MAETransform; default collation; transfer to the device."""
        arrays = images.permute(0, 2, 3, 1).numpy()
        with torch_threads(self.worker_threads):
            pil = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in arrays]
            views = [self.transform(im)[0] for im in pil]
        return torch.stack(views).to(self.device, non_blocking=True)

    def step(self, images: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        u = self.utils
        if views is None:
            views = self.make_views(images)
        b = views.shape[0]
        idx_keep, idx_mask = u.random_token_mask(
            size=(b, self.sequence_length), mask_ratio=self.mask_ratio, device=views.device
        )
        encoded = self.backbone.encode(images=views, idx_keep=idx_keep)
        x = self.decoder.embed(encoded)
        tokens = u.repeat_token(self.decoder.mask_token, (b, self.sequence_length))
        tokens = u.set_at_index(tokens, idx_keep, x.type_as(tokens))
        pred = self.decoder.predict(u.get_at_index(self.decoder.decode(tokens), idx_mask))
        patches = u.patchify(views, self.patch_size)
        target = u.normalize_mean_var(u.get_at_index(patches, idx_mask - 1), dim=-1)
        loss = torch.nn.functional.mse_loss(pred, target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss


def main() -> None:
    args = parse_args()
    device = setup(args)
    torch.set_float32_matmul_precision("high")  # as train.py
    np.random.seed(args.seed)
    cfg = compose_config(args)
    dm = build_datamodule(cfg)
    dm.setup()
    b = args.batch_size
    if len(dm.train_set) < b:
        raise SystemExit(f"--batch-size {b} is larger than the training set ({len(dm.train_set)})")
    images = dm.train_set.images[:b].clone()  # uint8 (B, C, H, W) on the CPU, as the DataLoader yields it

    torch.manual_seed(args.seed)
    ours = SSLabSide(cfg, dm, device)
    theirs = LightlySide(cfg, ours.model, device, args.worker_threads)
    for (n, p), q in zip(
        ours.model.backbone.vit.state_dict().items(), theirs.backbone.vit.state_dict().values(), strict=True
    ):
        if not torch.equal(p.cpu(), q.cpu()):
            raise RuntimeError(f"encoders differ at {n}")
    n_ours = sum(p.numel() for p in ours.model.decoder.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.decoder.parameters() if p.requires_grad)

    fixed_views = ours.make_views(images)
    lightly_shape = tuple(theirs.make_views(images).shape)
    if lightly_shape != tuple(fixed_views.shape):
        raise RuntimeError(f"view shapes differ: ours {tuple(fixed_views.shape)}, lightly {lightly_shape}")

    variants = {
        "sslab, with views": lambda: ours.step(images),
        "lightly, with views": lambda: theirs.step(images),
        "sslab, model only": lambda: ours.step(images, fixed_views),
        "lightly, model only": lambda: theirs.step(images, fixed_views),
    }
    times = time_interleaved(variants, args.warmup, args.reps, device)
    sec = {k: median(v) for k, v in times.items()}
    ips = {k: b / s for k, s in sec.items()}

    vit = ours.model.backbone.vit
    backbone_desc = f"{cfg.backbone.name} ({len(vit.blocks)} blocks, {vit.embed_dim}-d)"
    m = cfg.method
    print(
        f"\nMAE training step, {backbone_desc}, patch {ours.model.patch_size}, {cfg.data.image_size} px, "
        f"batch {b}, mask ratio {m.mask_ratio}, decoder {m.decoder_dim}-d x {m.decoder_depth} blocks "
        f"({n_ours:,} trainable parameters; lightly's {n_theirs:,}), {args.device}, torch threads: "
        f"{args.threads} (lightly's per-sample transform: {args.worker_threads}), median of {args.reps} steps\n"
    )
    pairs = {"sslab, with views": "lightly, with views", "sslab, model only": "lightly, model only"}
    rows = []
    for name in variants:
        ratio = f"{sec[pairs[name]] / sec[name]:.2f}x" if name in pairs else ""
        rows.append([name, 1000 * sec[name], spread(times[name], 1000), ips[name], ratio])
    print_markdown_table(["variant", "ms / step", "min-max ms", "images / s", "sslab speed-up"], rows)
    speedup_views = sec["lightly, with views"] / sec["sslab, with views"]
    speedup_model = sec["lightly, model only"] / sec["sslab, model only"]
    print(f"\nsslab vs lightly: {speedup_views:.2f}x with views, {speedup_model:.2f}x model only\n")
    profile_model_only(variants, args.profile)
    import lightly

    print_json(
        {
            "bench": "mae_step",
            "batch_size": b,
            "backbone": backbone_desc,
            "decoder": f"{m.decoder_dim}x{m.decoder_depth}",
            "images_per_s_sslab_with_views": round(ips["sslab, with views"], 2),
            "images_per_s_lightly_with_views": round(ips["lightly, with views"], 2),
            "images_per_s_sslab_model_only": round(ips["sslab, model only"], 2),
            "images_per_s_lightly_model_only": round(ips["lightly, model only"], 2),
            "speedup_with_views": round(speedup_views, 3),
            "speedup_model_only": round(speedup_model, 3),
            "lightly": lightly.__version__,
            **environment(args),
        }
    )


if __name__ == "__main__":
    main()
