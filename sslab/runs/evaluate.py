"""Offline evaluation of a checkpoint written by train.py (``python eval.py ckpt=PATH``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sslab.backbones.flexi import flexible_backbones, set_eval_patch_size
from sslab.devices import resolve_device
from sslab.errors import SSLabError
from sslab.evaluation.features import extract
from sslab.evaluation.finetune import finetune
from sslab.evaluation.knn import knn_accuracy
from sslab.evaluation.linear import linear_probe_accuracy
from sslab.evaluation.zero_shot import chance_level, has_text_tower, zero_shot_accuracy
from sslab.progress_lines import Phase, say, track
from sslab.report import print_json_line, print_table
from sslab.runs.reopen import reopen

EVALS = ("knn", "linear", "finetune", "zero_shot")
ALL = ("knn", "linear")  # eval=all (+ zero_shot for image-text methods); fine-tuning runs when named


def write_metrics(metrics: dict[str, Any], folder: str | Path | None = None) -> Path | None:
    """``metrics.json`` in eval.py's run directory (beside ``eval.log``); non-finite numbers become null."""
    if folder is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        folder = HydraConfig.get().runtime.output_dir
    path = Path(folder) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(metrics), indent=2, sort_keys=True))
    print(f"metrics: {path}", file=sys.stderr, flush=True)  # stdout ends with the JSON line
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def selected_evals(choice: str | list[str]) -> list[str]:
    names = list(ALL) if choice == "all" else ([choice] if isinstance(choice, str) else list(choice))
    unknown = [n for n in names if n not in EVALS]
    if unknown:
        raise SSLabError(
            f"eval={choice}: unknown evaluation {unknown}; choose knn, linear, finetune, zero_shot, all, atari_probe or discovery"
        )
    return names


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if cfg.eval == "atari_probe":  # RAM-state probes of one or more checkpoints (+ random init), one table
        from sslab.runs.atari_probe import evaluate_checkpoints

        return evaluate_checkpoints(cfg)
    if cfg.eval == "discovery":  # MaskCut vs ground-truth masks (+ random-init features), one table
        from sslab.runs.maskcut import evaluate_discovery

        return evaluate_discovery(cfg)
    if cfg.get("compare"):
        raise SSLabError("compare=[...] works with eval=atari_probe; evaluate other checkpoints one by one")
    evals = selected_evals(cfg.eval)
    model, run_cfg, ckpt, dm = reopen(cfg.ckpt, cfg.get("data"))
    device = resolve_device(cfg.device)
    say(f"evaluating {cfg.ckpt} (step {ckpt.get('global_step')}): {', '.join(evals)}")
    model.to(device)
    if cfg.eval == "all" and has_text_tower(model):
        evals.append("zero_shot")
    if "zero_shot" in evals and not has_text_tower(model):
        raise SSLabError(
            f"eval=zero_shot needs an image-text method (method=wsp); this checkpoint is {run_cfg.method.name}"
        )
    bank_loader, test_loader = dm.eval_dataloaders()
    metrics: dict[str, Any] = {"ckpt": str(cfg.ckpt), "global_step": ckpt.get("global_step")}
    sizes = eval_patch_sizes(cfg, model, dm.image_size)  # [None]: the patch size it was trained with
    name = f"{run_cfg.method.name} {run_cfg.backbone.name} @ step {metrics['global_step']}"
    rows: dict[str, dict[str, float | None]] = {}
    for size in sizes:
        if size is not None:
            set_eval_patch_size(model, size)
        found = evaluate_model(cfg, evals, model, dm, run_cfg, bank_loader, test_loader, device)
        suffix = f"_p{size}" if len(sizes) > 1 else ""
        metrics.update({f"{k}{suffix}": v for k, v in found.items() if k != "split_sizes"})
        row_name = name if size is None else f"{name}, patch {size}"
        rows[row_name] = {c: found.get(k) for k, c in COLUMNS.items()}
        n_bank, n_test = found["split_sizes"]
    if "zero_shot" in evals:
        metrics["eval/zero_shot_chance"] = chance_level(len(dm.class_names))
        rows[f"chance (1/{len(dm.class_names)})"] = {
            COLUMNS["eval/zero_shot_top1"]: metrics["eval/zero_shot_chance"]
        }
    if len(sizes) == 1 and sizes[0] is not None:
        metrics["patch_size"] = sizes[0]
    columns = [c for k, c in COLUMNS.items() if k.removeprefix("eval/").removesuffix("_top1") in evals]
    print_table(f"{dm.name}: bank {n_bank}, test {n_test}", rows, columns)
    print_json_line(metrics)
    return metrics


COLUMNS = {
    "eval/knn_top1": "k-NN top-1",
    "eval/linear_top1": "linear top-1",
    "eval/finetune_top1": "fine-tune top-1",
    "eval/zero_shot_top1": "zero-shot top-1",
}


def eval_patch_sizes(cfg: DictConfig, model: torch.nn.Module, image_size: int) -> list[int | None]:
    """``patch_sizes=[...]`` (one table row each) or ``backbone.patch_size=P``; [None] keeps the trained size."""
    sizes = list(cfg.get("patch_sizes") or [])
    single = (cfg.get("backbone") or {}).get("patch_size")
    if sizes and single is not None:
        raise SSLabError("give either backbone.patch_size=P or patch_sizes=[...], not both")
    sizes = sizes or ([single] if single is not None else [])
    if not sizes:
        return [None]
    bad = [p for p in sizes if int(p) < 1 or image_size % int(p)]
    if bad:
        divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
        raise SSLabError(
            f"patch size {bad} does not divide the {image_size} px images; choose from {divisors}"
        )
    if not flexible_backbones(model):
        raise SSLabError("backbone.patch_size / patch_sizes apply to ViT backbones; this checkpoint has none")
    return [int(p) for p in sizes]


def evaluate_model(
    cfg: DictConfig,
    evals: list[str],
    model: torch.nn.Module,
    dm: Any,
    run_cfg: DictConfig,
    bank_loader: Any,
    test_loader: Any,
    device: torch.device,
) -> dict[str, Any]:
    """The selected evaluations of ``model`` as it is now (one patch size):
    {"eval/...": top-1 in percent, "split_sizes": (bank, test)}."""
    metrics: dict[str, Any] = {}
    if "knn" in evals or "linear" in evals:
        with Phase("features (bank, test)", len(bank_loader) + len(test_loader), "batches") as phase:
            bank, bank_y = extract(model.embed_uint8, phase.wrap(bank_loader))
            test, test_y = extract(model.embed_uint8, phase.wrap(test_loader))
        metrics["split_sizes"] = (len(bank), len(test))
    else:
        metrics["split_sizes"] = (len(dm.bank_set), len(dm.test_set))
    if "knn" in evals:
        with Phase(f"k-NN (k={cfg.knn.k}) on {len(bank)} bank / {len(test)} test features"):
            metrics["eval/knn_top1"] = knn_accuracy(
                bank, bank_y, test, test_y, cfg.knn.k, cfg.knn.temperature
            )
    if "linear" in evals:
        linear_cfg = OmegaConf.to_container(cfg.linear)
        # null: the method decides (MAE's probe: BatchNorm without affine before the linear layer)
        if linear_cfg.get("batchnorm") is None:
            linear_cfg["batchnorm"] = model.probe_batchnorm
        with Phase(f"linear probe: {linear_cfg['epochs']} epochs on {len(bank)} features"):
            metrics["eval/linear_top1"] = linear_probe_accuracy(
                bank, bank_y, test, test_y, seed=int(run_cfg.seed), **linear_cfg
            )
    if "finetune" in evals:
        finetune_cfg = OmegaConf.to_container(cfg.finetune)
        if finetune_cfg.get("pool") is None:  # null: pool as the method's embed does (MAE: embed_pool)
            finetune_cfg["pool"] = model.embed_pool
        result = finetune(
            model.eval_backbone(),
            dm.bank_set,
            test_loader,
            num_classes=len(dm.class_names),
            image_size=dm.image_size,
            mean=dm.mean,
            std=dm.std,
            num_workers=dm.num_workers,
            seed=int(run_cfg.seed),
            device=device,
            **finetune_cfg,
        )
        metrics["eval/finetune_top1"] = result["top1"]
    if "zero_shot" in evals:
        with Phase(f"zero-shot: {len(dm.class_names)} class prompts"):
            metrics["eval/zero_shot_top1"] = zero_shot_accuracy(
                model, track(test_loader, "zero-shot test images"), dm.class_names, device
            )
    return metrics
