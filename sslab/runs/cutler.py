"""CutLER's pipeline stages (Wang et al., "Cut and Learn for Unsupervised Object Detection and Instance
Segmentation", CVPR 2023): MaskCut pseudo-masks, detector rounds, and self-training labels.

Each stage reads the pipeline's data (``data=stamps``: images, train/test COCO JSON), writes into its own
directory and reports object discovery on the test split (``discovery/*``, %), so one table compares MaskCut
on random-init features, MaskCut on DINO features, and detector rounds 0, 1, 2. ``sslab.runs.pipeline``
lists them in its table of stage kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose

from sslab.build import build_datamodule
from sslab.callbacks.preemption import Preemption
from sslab.cutler.pseudo_masks import coco_source
from sslab.cutler.self_training import self_training_json
from sslab.cutler.train_detector import predict, train_detector
from sslab.evaluation.discovery import discovery_metrics
from sslab.init_from import as_train_checkpoint, is_train_checkpoint
from sslab.runs.maskcut import export_pseudo_masks


def pipeline_data(overrides: list[str]):
    """The pipeline's config and the data module every stage uses (the pipeline's overrides pick it)."""
    cfg = compose(config_name="config", overrides=overrides)
    dm = build_datamodule(cfg)
    dm.setup()
    return cfg, dm


def dino_checkpoint(ckpt: str, cfg: Any, stage_dir: Path) -> str:
    """``pipeline.dino_ckpt`` as the train.py checkpoint MaskCut and the detector read. CutLER starts from the
    official DINO weights, so an official file (``dino_vits8_pretrain.pth``, or the full checkpoint with its
    ``teacher``) is loaded into the pipeline's backbone and written once into this stage's directory."""
    if is_train_checkpoint(ckpt):
        return ckpt
    out = Path(stage_dir) / "dino_weights.ckpt"
    return str(as_train_checkpoint(ckpt, cfg, out, option="pipeline.dino_ckpt"))


def discovery_percent(gt_json: Path, predictions: list[dict] | Path) -> dict[str, float]:
    return {f"discovery/{k}": 100.0 * v for k, v in discovery_metrics(gt_json, predictions).items()}


def maskcut_stage(
    stage_dir: Path, overrides: list[str], params: dict[str, Any], ckpt: str, **_: str
) -> dict[str, Any]:
    """Pseudo-masks for the train split (``export_train``) and MaskCut alone scored on the test split;
    ``random_init: true`` gives the random-feature baseline (same architecture, no training)."""
    cfg, dm = pipeline_data(overrides)
    ckpt = dino_checkpoint(ckpt, cfg, stage_dir)
    opts = {
        "n_masks": int(params.get("n_masks", 3)),
        "tau": float(params.get("tau", 0.15)),
        "batch_size": int(params.get("batch_size", 64)),
        "random_init": bool(params.get("random_init", False)),
        "datamodule": dm,
    }
    test_json = export_pseudo_masks(ckpt, "test", stage_dir / "maskcut_test.json", **opts)
    outputs: dict[str, Any] = {"metrics": discovery_percent(coco_source(dm, "test")[0], test_json)}
    if params.get("export_train", True):
        outputs["json"] = str(export_pseudo_masks(ckpt, "train", stage_dir / "pseudo_masks.json", **opts))
    return outputs


def detector_stage(
    stage_dir: Path,
    overrides: list[str],
    params: dict[str, Any],
    train_json: str,
    init_from: str | None = None,
    init_detector: str | None = None,
) -> dict[str, Any]:
    """Train the class-agnostic detector on ``train_json`` (round 0 from the DINO encoder, later rounds from
    the previous detector), resuming from its own last.ckpt, then score it on the test split."""
    cfg, dm = pipeline_data(overrides)
    if init_from is not None:
        init_from = dino_checkpoint(init_from, cfg, stage_dir)
    _, root = coco_source(dm, "train")
    test_gt, _ = coco_source(dm, "test")
    options = {k: v for k, v in params.items() if k not in ("max_steps", "batch_size", "lr", "copy_paste")}
    preemption = Preemption(stage_dir / "checkpoints" / "last.ckpt")
    try:
        last = train_detector(
            root,
            Path(train_json),
            stage_dir,
            init_from=init_from,
            backbone_cfg=None,
            max_steps=int(params["max_steps"]),
            batch_size=int(params["batch_size"]),
            lr=float(params["lr"]),
            copy_paste=bool(params.get("copy_paste", False)),
            seed=int(cfg.seed),
            init_detector=init_detector,
            callbacks=[preemption],
            **options,
        )
    finally:
        preemption.uninstall()
    predictions = predict(last, root, test_gt)
    return {"ckpt": str(last), "metrics": discovery_percent(test_gt, predictions)}


def self_train_stage(
    stage_dir: Path, overrides: list[str], params: dict[str, Any], prev_json: str, ckpt: str
) -> dict[str, Any]:
    """The next round's labels: the detector's confident predictions on the train images, plus the previous
    pseudo-masks that none of them overlaps (``sslab.cutler.self_training``)."""
    _, dm = pipeline_data(overrides)
    _, root = coco_source(dm, "train")
    predictions = predict(Path(ckpt), root, Path(prev_json))
    out = self_training_json(
        prev_json, predictions, float(params["threshold"]), stage_dir / "pseudo_masks.json"
    )
    return {"json": str(out)}
