"""Train CutLER's class-agnostic detector on pseudo-masks (resumable), and predict COCO results with it.

Reference schedule (facebookresearch/CutLER, CutLER-ImageNet configs): round 0 with DropLoss (IoU 0.01),
copy-paste (scale 0.3-1.0), lr 0.01 for batch 16 decayed by 0.02 at half the run, weight decay 5e-5, gradient
norm clipped at 1.0, linear warm-up; self-training rounds start from the previous round's detector with
DropLoss off, copy-paste scale 0.5-1.0 and a constant lr 0.005. The reference optimiser is SGD on a ResNet;
AdamW (the ViTDet choice for ViTs) is the default here, SGD with momentum 0.9 an option.

    python -m sslab.cutler.train_detector train --images-root DIR --train-json pseudo.json --out RUN \
        [--init-from dino.ckpt] --max-steps 2000 --batch-size 16 --lr 1e-4 [--copy-paste]
    python -m sslab.cutler.train_detector predict --ckpt RUN/checkpoints/last.ckpt --images-root DIR \
        --json DIR/train.json --out preds.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pycocotools import mask as mask_utils
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from sslab import backbones
from sslab.callbacks.progress import progress_bar
from sslab.checkpoint_io import AtomicCheckpointIO, read_checkpoint, save_final_checkpoint
from sslab.cutler.detector import IMAGENET_MEAN, IMAGENET_STD, build_detector
from sslab.cutler.detector_data import (
    CocoInstances,
    DetectionDataModule,
    copy_paste,
    hflip,
    targets_from_masks,
)
from sslab.devices import resolve_device
from sslab.errors import SSLabError
from sslab.init_from import load_eval_backbone_state
from sslab.progress_lines import Phase

LAST = "last.ckpt"

# Our DataModule records where in the epoch a checkpoint was taken (DetectionDataModule.state_dict), so a
# mid-epoch resume is exact even though Lightning cannot see that the DataLoader itself resumes.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def lr_factor(step: int, warmup_steps: int, decay_step: int, gamma: float) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from 0.001, times ``gamma`` from ``decay_step`` on."""
    warm = 1.0 if step >= warmup_steps else 0.001 + (1 - 0.001) * step / warmup_steps
    return warm * (gamma if step >= decay_step else 1.0)


class DetectorModule(pl.LightningModule):
    """The Mask R-CNN, its augmentations (flip, optional copy-paste) and its optimiser, as one module.

    Every random draw of step s (flip, copy-paste, torchvision's RPN/ROI samplers) comes from a seed fixed by
    (seed, s), so a run resumed from a checkpoint trains exactly as one that never stopped.
    """

    def __init__(
        self,
        backbone_cfg: dict[str, Any],
        image_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        lr: float = 1e-4,
        optimizer: str = "adamw",
        weight_decay: float = 0.05,
        max_steps: int = 1000,
        warmup_steps: int | None = None,
        lr_decay_at: float = 0.5,
        lr_gamma: float = 0.02,
        copy_paste: bool = False,
        copy_paste_ratio: tuple[float, float] = (0.3, 1.0),
        flip: bool = True,
        drop_iou: float | None = 0.01,
        fpn_channels: int = 64,
        rois_per_image: int = 64,
        mask_pool: int = 7,
        patch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise SSLabError(f"detector optimizer={optimizer!r}; choose adamw or sgd")
        self.save_hyperparameters()
        self.model = build_detector(
            backbones.build(**backbone_cfg),
            image_size,
            mean=mean,
            std=std,
            fpn_channels=fpn_channels,
            rois_per_image=rois_per_image,
            mask_pool=mask_pool,
            patch_size=patch_size,
            drop_iou=-1.0 if drop_iou is None else drop_iou,  # None: plain loss (IoU >= 0 > -1 keeps all)
        )

    def step_seed(self, step: int) -> int:
        return (self.hparams.seed * 1_000_003 + step * 1009) % (2**63 - 1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        torch.manual_seed(self.step_seed(self.global_step))
        hp = self.hparams
        images, masks, valid = batch["image"], batch["masks"], batch["valid"]
        if hp.flip:
            images, masks = hflip(images, masks, torch.rand(len(images), device=images.device) < 0.5)
        if hp.copy_paste:
            images, masks, valid = copy_paste(images, masks, valid, *hp.copy_paste_ratio)
        targets = targets_from_masks(masks, valid)
        losses = self.model(list(images.float().div(255)), targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss.detach()).item():
            raise SSLabError(
                f"detector loss is {loss.item()} at step {self.global_step}; lower the learning rate"
            )
        self.log("train/loss", loss, prog_bar=True)
        for k, v in losses.items():
            self.log(f"train/{k}", v)
        self.log("train/droploss_kept", self.model.roi_heads.last_kept_fraction)
        self.log("train/instances", valid.sum(1).float().mean())
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and norms
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        warmup = hp.warmup_steps if hp.warmup_steps is not None else min(1000, max(hp.max_steps // 10, 1))
        decay_step = int(hp.lr_decay_at * hp.max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, warmup, decay_step, hp.lr_gamma)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data_stats(ckpt: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the encoder was pretrained with (the checkpoint's data config), else ImageNet's."""
    data = (ckpt.get("sslab_config") or {}).get("data") or {}
    if "mean" in data and "std" in data:
        return tuple(float(x) for x in data["mean"]), tuple(float(x) for x in data["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def train_detector(
    images_root: Path,
    train_json: Path,
    out_dir: Path,
    init_from: str | None,
    backbone_cfg: dict | None,
    max_steps: int,
    batch_size: int,
    lr: float,
    copy_paste: bool,
    seed: int,
    resume: bool = True,
    *,
    init_detector: str | None = None,
    checkpoint_every: int = 100,
    device: str = "auto",
    log_every: int = 10,
    callbacks: list[pl.Callback] | None = None,
    **options: Any,
) -> Path:
    """Train the detector on ``train_json`` and return ``out_dir/checkpoints/last.ckpt``.

    ``init_from``: a train.py checkpoint whose evaluation encoder (DINO's teacher) initialises the ViT;
    ``backbone_cfg``: the backbone when there is no checkpoint (random init, the baseline), else None or the
    same config. ``init_detector``: a previous round's last.ckpt whose whole detector initialises this one
    (self-training; fresh optimiser). With ``resume`` an existing last.ckpt in ``out_dir`` is continued.
    ``callbacks``: extra Lightning callbacks (e.g. ``sslab.callbacks.preemption.Preemption(last)``).
    ``options`` go to ``DetectorModule`` (optimizer, weight_decay, drop_iou, lr_gamma, copy_paste_ratio, ...).
    """
    out_dir, ckpt_dir = Path(out_dir), Path(out_dir) / "checkpoints"
    last = ckpt_dir / LAST
    dm = DetectionDataModule(images_root, train_json, batch_size, seed)
    image_size = max(dm.dataset.height, dm.dataset.width)
    if dm.dataset.height != dm.dataset.width:
        raise SSLabError(
            f"{train_json}: images are {dm.dataset.height}x{dm.dataset.width}; use square images"
        )
    pl.seed_everything(seed, verbose=False)

    state = None
    if init_detector is not None:
        if init_from is not None or backbone_cfg is not None:
            raise SSLabError("init_detector carries its own backbone; drop init_from and backbone_cfg")
        if not Path(init_detector).is_file():
            raise SSLabError(
                f"init_detector={init_detector}: no such file; pass the previous round's last.ckpt"
            )
        prev = torch.load(init_detector, map_location="cpu", weights_only=False)
        hp = prev["hyper_parameters"]
        backbone_cfg, options = hp["backbone_cfg"], {"mean": hp["mean"], "std": hp["std"], **options}
        for key in ("fpn_channels", "patch_size", "mask_pool", "rois_per_image"):  # the same architecture
            options.setdefault(key, hp.get(key))
    elif init_from is not None:
        source = read_checkpoint(init_from, "init_from")
        source_cfg, state = load_eval_backbone_state(init_from, source)
        if backbone_cfg is not None and dict(backbone_cfg) != source_cfg:
            raise SSLabError(
                f"backbone_cfg {backbone_cfg} differs from init_from's {source_cfg}; pass backbone_cfg=None"
            )
        backbone_cfg = source_cfg
        mean, std = _data_stats(source)
        options = {"mean": mean, "std": std, **options}
    elif backbone_cfg is None:
        raise SSLabError("the detector needs init_from (a DINO checkpoint) or backbone_cfg (random init)")

    module = DetectorModule(
        dict(backbone_cfg),
        image_size,
        lr=lr,
        max_steps=max_steps,
        copy_paste=copy_paste,
        seed=seed,
        **options,
    )
    if init_detector is not None:
        module.load_state_dict(prev["state_dict"])
    elif state is not None:
        module.model.backbone.vit.load_state_dict(state)

    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator=device,
        devices=1,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="norm",
        logger=CSVLogger(out_dir, name="csv"),  # csv/version_N per (re)start: a resume keeps earlier rows
        log_every_n_steps=log_every,
        callbacks=[
            *(callbacks or []),
            progress_bar(every_n_steps=max(1, log_every)),  # plain periodic lines off a TTY
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step{step:06d}",
                auto_insert_metric_name=False,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=checkpoint_every,
            ),
        ],
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        default_root_dir=str(out_dir),
        use_distributed_sampler=False,
    )
    ckpt_path = str(last) if resume and last.is_file() else None
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    save_final_checkpoint(trainer, last)  # the final weights, when max_steps is not a checkpoint step
    return last


def load_detector(ckpt: str | Path, device: str = "auto") -> DetectorModule:
    path = Path(ckpt)
    if not path.is_file():
        raise SSLabError(f"{path}: no detector checkpoint; pass train_detector's last.ckpt")
    return DetectorModule.load_from_checkpoint(path, map_location="cpu").to(resolve_device(device)).eval()


@torch.inference_mode()
def predict(
    ckpt: Path,
    images_root: Path,
    coco_json_for_images: Path,
    score_threshold: float = 0.0,
    device: str = "auto",
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """COCO results for every image of ``coco_json_for_images``: {image_id, category_id: 1, bbox (xywh),
    score, segmentation (RLE, str counts)} for detections scoring >= ``score_threshold``; masks are the
    mask head's probabilities at 0.5."""
    module = load_detector(ckpt, device)
    data = CocoInstances(images_root, coco_json_for_images, skip_empty=False)
    results: list[dict[str, Any]] = []
    with Phase("detector predictions", len(data), "images") as phase:
        for start in range(0, len(data), batch_size):
            idx = range(start, min(start + batch_size, len(data)))
            images = torch.stack([data.read_image(i) for i in idx]).to(module.device)
            outputs = module.model(list(images.float().div(255)))
            for i, out in zip(idx, outputs, strict=True):
                results += _coco_results(data.images[i]["id"], out, score_threshold)
            phase.advance(len(idx))
    return results


def _coco_results(image_id: int, out: dict[str, torch.Tensor], score_threshold: float) -> list[dict]:
    keep = out["scores"] >= score_threshold
    if not keep.any():
        return []
    boxes = out["boxes"][keep].cpu()
    scores = out["scores"][keep].cpu().tolist()
    masks = (out["masks"][keep, 0] >= 0.5).cpu().numpy().astype(np.uint8)  # (N, H, W)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    return [
        {
            "image_id": image_id,
            "category_id": 1,
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
        }
        for box, score, rle in zip(xywh, scores, rles, strict=True)
    ]


# -- command line --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sslab.cutler.train_detector", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the detector on a COCO json of pseudo-masks")
    t.add_argument("--images-root", type=Path, required=True)
    t.add_argument("--train-json", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--init-from", help="train.py checkpoint whose encoder initialises the backbone")
    t.add_argument("--init-detector", help="previous round's last.ckpt (self-training)")
    t.add_argument("--backbone", help='backbone config as JSON, e.g. \'{"name": "vit_t", "img_size": 64}\'')
    t.add_argument("--max-steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--copy-paste", action="store_true")
    t.add_argument(
        "--no-droploss", action="store_true", help="plain loss (the reference's self-training rounds)"
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--no-resume", action="store_true")
    p = sub.add_parser("predict", help="write COCO results of a detector checkpoint")
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--images-root", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True, help="COCO json listing the images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--score-threshold", type=float, default=0.0)
    s = sub.add_parser("self-train-json", help="next round's annotations: confident predictions + old masks")
    s.add_argument("--prev-json", type=Path, required=True)
    s.add_argument("--predictions", type=Path, required=True)
    s.add_argument("--threshold", type=float, default=0.7)
    s.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            last = train_detector(
                args.images_root,
                args.train_json,
                args.out,
                args.init_from,
                json.loads(args.backbone) if args.backbone else None,
                args.max_steps,
                args.batch_size,
                args.lr,
                args.copy_paste,
                args.seed,
                resume=not args.no_resume,
                init_detector=args.init_detector,
                checkpoint_every=args.checkpoint_every,
                **({"drop_iou": None} if args.no_droploss else {}),
            )
            print(last)
        elif args.command == "predict":
            preds = predict(args.ckpt, args.images_root, args.json, args.score_threshold)
            args.out.write_text(json.dumps(preds))
            print(f"{len(preds)} detections -> {args.out}")
        else:
            from sslab.cutler.self_training import self_training_json

            print(self_training_json(args.prev_json, args.predictions, args.threshold, args.out))
    except SSLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
