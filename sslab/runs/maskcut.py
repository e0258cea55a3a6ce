"""MaskCut from a trained run: pseudo-masks of a split as COCO JSON (the pipeline's ``maskcut`` stage, and
``python -m sslab.runs.maskcut ckpt=RUN/checkpoints/last.ckpt out=maskcut.json [split=train n_masks=3 tau=0.15
batch_size=64 device=auto random_init=false data.root=...]``) and ``eval.py eval=discovery`` (MaskCut vs the
ground-truth masks). The encoder is the checkpoint's evaluation encoder (the teacher for DINO), reopened by
``sslab.runs.reopen``; the cuts are ``sslab.cutler.pseudo_masks``, the scores ``sslab.evaluation.discovery``.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sslab.build import build_datamodule
from sslab.cli import open_overrides, parse_overrides
from sslab.cutler.pseudo_masks import coco_source, maskcut_annotations, write_coco
from sslab.errors import SSLabError, fail, user_message
from sslab.evaluation.discovery import COLUMNS, discovery_metrics
from sslab.report import print_json_line, print_table
from sslab.runs.reopen import reopen


def prepared_datamodule(run_cfg: DictConfig) -> Any:
    """The run's data module (data overrides applied), its files prepared (a stamps build on first use)."""
    dm = build_datamodule(run_cfg)
    dm.prepare_data()
    return dm


def export_pseudo_masks(
    ckpt_path: str | Path,
    split: str = "train",
    out_json: str | Path | None = None,
    n_masks: int = 3,
    tau: float = 0.15,
    batch_size: int = 64,
    device: str = "auto",
    random_init: bool = False,
    data_overrides: dict | None = None,
    datamodule: Any = None,
) -> Path:
    """Run MaskCut over ``split`` with the checkpoint's evaluation encoder; write COCO JSON to ``out_json``
    (default: ``maskcut_{split}.json`` beside the checkpoint) and return its path."""
    backbone, run_cfg, _, _ = reopen(ckpt_path, data_overrides, encoder_only=True, random_init=random_init)
    dm = datamodule if datamodule is not None else prepared_datamodule(run_cfg)
    gt_path, root = coco_source(dm, split)
    images = json.loads(gt_path.read_text())["images"]
    annotations = maskcut_annotations(
        backbone, images, root, dm.image_size, list(dm.mean), list(dm.std), n_masks, tau, batch_size, device
    )
    out = Path(out_json) if out_json is not None else Path(ckpt_path).parent / f"maskcut_{split}.json"
    info = {
        "description": "MaskCut pseudo-masks (sslab)",
        "ckpt": str(ckpt_path),
        "split": split,
        "source": str(gt_path),
        "n_masks": n_masks,
        "tau": tau,
        "random_init": random_init,
    }
    return write_coco(out, images, annotations, info)


OPTIONS = ("split", "n_masks", "tau", "batch_size", "device", "random_init")  # export_pseudo_masks' defaults
DEFAULTS: dict[str, Any] = {
    "ckpt": None,  # a DINO-family checkpoint written by train.py (required)
    "out": None,  # the COCO JSON to write (default: maskcut_<split>.json beside the checkpoint)
    **{k: inspect.signature(export_pseudo_masks).parameters[k].default for k in OPTIONS},
    "data": {},  # data.<field>=... over the checkpoint's data config
}


def main(argv: list[str] | None = None) -> None:
    """``key=value`` arguments in Hydra's override grammar, as ``python -m sslab.export`` takes them."""
    try:
        args = open_overrides(sys.argv[1:] if argv is None else argv, ["data"])
        cfg = parse_overrides("runs.maskcut", DEFAULTS, args)
        if cfg.ckpt is None:
            raise SSLabError("pass ckpt=PATH (a DINO-family checkpoint written by train.py) [out=FILE.json]")
        out = export_pseudo_masks(
            cfg.ckpt,
            out_json=cfg.out,
            data_overrides=OmegaConf.to_container(cfg.data) or None,
            **{k: cfg[k] for k in OPTIONS},
        )
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise  # a bug: keep its traceback
        fail(message, log_file=False)
    n = len(json.loads(out.read_text())["annotations"])
    print(f"wrote {n} pseudo-masks to {out}")


# -- eval.py eval=discovery -----------------------------------------------------------------------------
def evaluate_discovery(cfg: DictConfig) -> dict[str, Any]:
    """MaskCut on the test split with the checkpoint's evaluation encoder, and (``discovery.random_init``)
    with the same architecture at random init, scored against the ground-truth masks in one table."""
    opts = cfg.discovery
    backbone, run_cfg, _, _ = reopen(cfg.ckpt, cfg.get("data"), encoder_only=True)
    dm = prepared_datamodule(run_cfg)
    gt_path, root = coco_source(dm, "test")
    images = json.loads(gt_path.read_text())["images"]
    arch = run_cfg.backbone.name
    encoders = [("maskcut", f"MaskCut, {run_cfg.method.name} {arch}", backbone)]
    if opts.random_init:
        random = reopen(cfg.ckpt, cfg.get("data"), encoder_only=True, random_init=True).model
        encoders.append(("maskcut_random", f"MaskCut, random-init {arch}", random))
    metrics: dict[str, Any] = {"ckpt": str(cfg.ckpt), "split": "test", "images": len(images)}
    rows: dict[str, dict[str, float | None]] = {}
    for tag, name, encoder in encoders:
        anns = maskcut_annotations(
            encoder,
            images,
            root,
            dm.image_size,
            list(dm.mean),
            list(dm.std),
            n_masks=int(opts.n_masks),
            tau=float(opts.tau),
            batch_size=int(opts.batch_size),
            device=cfg.device,
        )
        found = discovery_metrics(gt_path, anns)
        metrics.update({f"eval/discovery_{tag}_{k}": 100.0 * v for k, v in found.items()})
        rows[name] = {COLUMNS[k]: 100.0 * v for k, v in found.items()}
    print_table(
        f"{dm.name} test: {len(images)} images, object discovery (class-agnostic, %)",
        rows,
        list(COLUMNS.values()),
    )
    print_json_line(metrics)
    return metrics


if __name__ == "__main__":
    main()
