"""Run CutLER's class-agnostic detector: train it on pseudo-masks (resumable) and predict COCO results with it.

The pipeline's detector and self-training stages (``pipeline=cutler``, ``sslab.runs.cutler``) call these;
the model is ``sslab.cutler.detector_module``, the Trainer and its checkpoints are the training shell's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from sslab.callbacks.progress import progress_bar
from sslab.checkpoint_io import read_checkpoint, save_final_checkpoint
from sslab.cutler.coco_results import coco_results
from sslab.cutler.detector import IMAGENET_MEAN, IMAGENET_STD
from sslab.cutler.detector_data import CocoInstances, DetectionDataModule
from sslab.cutler.detector_module import ARCHITECTURE, DetectorModule
from sslab.devices import resolve_device
from sslab.errors import SSLabError
from sslab.init_from import load_eval_backbone_state
from sslab.progress_lines import Phase
from sslab.training_shell import last_checkpoint, make_trainer


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
    out_dir = Path(out_dir)
    last = last_checkpoint(out_dir)
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
        for key in ARCHITECTURE:  # the same architecture
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

    trainer = make_trainer(
        out_dir,
        checkpoint_every,
        0,  # periodic checkpoints are not kept: last.ckpt is the one a stopped round resumes from
        [*(callbacks or []), progress_bar(every_n_steps=max(1, log_every))],  # plain periodic lines off a TTY
        max_steps=max_steps,
        max_epochs=-1,
        accelerator=device,
        devices=1,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="norm",
        logger=CSVLogger(out_dir, name="csv"),  # csv/version_N per (re)start: a resume keeps earlier rows
        log_every_n_steps=log_every,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume and last.is_file() else None)
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
                results += coco_results(data.images[i]["id"], out, score_threshold)
            phase.advance(len(idx))
    return results
