"""Offline evaluation of a checkpoint written by train.py (``python eval.py ckpt=PATH``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.evaluation.features import extract
from sslab.evaluation.knn import knn_accuracy
from sslab.evaluation.linear import linear_probe_accuracy
from sslab.report import print_json_line, print_table

EVALS = ("knn", "linear")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SSLabError(
            f"ckpt={path}: no such file; pass a .ckpt written by train.py (runs keep them in checkpoints/)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SSLabError(
            f"ckpt={path} could not be read ({type(e).__name__}); is it a complete train.py checkpoint?"
        ) from e
    if "sslab_config" not in ckpt:
        raise SSLabError(
            f"ckpt={path} has no sslab_config; only checkpoints written by sslab's train.py can be evaluated"
        )
    return ckpt


def selected_evals(choice: str | list[str]) -> list[str]:
    names = list(EVALS) if choice == "all" else ([choice] if isinstance(choice, str) else list(choice))
    unknown = [n for n in names if n not in EVALS]
    if unknown:
        raise SSLabError(f"eval={choice}: unknown evaluation {unknown}; choose knn, linear or all")
    return names


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    evals = selected_evals(cfg.eval)
    ckpt = load_checkpoint(cfg.ckpt)
    run_cfg = OmegaConf.create(ckpt["sslab_config"])
    run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.get("data") or {})
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    dm = build_datamodule(run_cfg)
    model = build_method(run_cfg, dm)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device)
    bank_loader, test_loader = dm.eval_dataloaders()
    bank, bank_y = extract(model.embed_uint8, bank_loader)
    test, test_y = extract(model.embed_uint8, test_loader)
    metrics: dict[str, Any] = {"ckpt": str(cfg.ckpt), "global_step": ckpt.get("global_step")}
    if "knn" in evals:
        metrics["eval/knn_top1"] = knn_accuracy(bank, bank_y, test, test_y, cfg.knn.k, cfg.knn.temperature)
    if "linear" in evals:
        metrics["eval/linear_top1"] = linear_probe_accuracy(
            bank, bank_y, test, test_y, seed=int(run_cfg.seed), **OmegaConf.to_container(cfg.linear)
        )
    columns = [c for c, e in (("k-NN top-1", "knn"), ("linear top-1", "linear")) if e in evals]
    row = {"k-NN top-1": metrics.get("eval/knn_top1"), "linear top-1": metrics.get("eval/linear_top1")}
    name = f"{run_cfg.method.name} {run_cfg.backbone.name} @ step {metrics['global_step']}"
    print_table(f"{dm.name}: bank {len(bank)}, test {len(test)}", {name: row}, columns)
    print_json_line(metrics)
    return metrics
