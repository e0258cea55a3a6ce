"""The training run behind ``python train.py``: build, fit, evaluate, report."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import WandbLogger

from sslab import cluster
from sslab.build import build_datamodule, build_method
from sslab.callbacks.preemption import Preempted, Preemption
from sslab.checkpoint_io import (
    WRITTEN,
    AtomicCheckpointIO,
    FiniteCheckpoint,
    checkpoint_step,
    save_final_checkpoint,
)
from sslab.errors import SSLabError, check_train_config
from sslab.evaluation.features import extract, raw_pixels
from sslab.evaluation.knn import knn_accuracy
from sslab.methods.base import NonFiniteLossError
from sslab.precision import check_precision, compile_model
from sslab.report import print_json_line, print_table
from sslab.resume import check_resumable, find_resume_checkpoint, vet_checkpoint
from sslab.rundir import acquire_run_dir, is_rank_zero, release_run_dir, remove_stale_temporaries

# Warnings about our intended design (views made in on_after_batch_transfer), about library internals, and
# Lightning's "dataloader is not resumable" on a mid-epoch resume: our samplers are indexed by the global step,
# so a resumed run sees the same batches as an uninterrupted one (tests/test_resume.py checks it bit for bit).
for _message in (
    r".*overridden `on_after_batch_transfer`.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*ended before the epoch ended and your dataloader is not resumable.*",
):
    warnings.filterwarnings("ignore", message=_message)


def run_dir_of(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):  # a pipeline stage's own directory
        return Path(cfg.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    loggers = [instantiate(c, save_dir=run_dir) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get(
        "enable_progress_bar", True
    ):  # trainer.enable_progress_bar=false wins over the bar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(
        FiniteCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            save_last=True,
            every_n_train_steps=cfg.checkpoint.every_n_steps or None,
            save_top_k=cfg.checkpoint.save_top_k,
            save_on_train_epoch_end=True,
        )
    )
    callbacks.append(Preemption(run_dir / "checkpoints" / "last.ckpt"))
    trainer_kwargs: dict[str, Any] = cluster.adapt_trainer_kwargs(
        OmegaConf.to_container(cfg.trainer, resolve=True)
    )
    check_precision(trainer_kwargs.get("precision", "32-true"), trainer_kwargs.get("accelerator", "auto"))
    trainer_kwargs.setdefault("use_distributed_sampler", False)  # our DataModules shard the data per rank
    return pl.Trainer(
        **trainer_kwargs,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *cluster.slurm_plugins()],
        default_root_dir=str(run_dir),
    )


def backbone_label(backbone_cfg: DictConfig) -> str:
    """``vit_t`` or, when the depth is overridden (the CPU default), ``vit_t (6 blocks)``."""
    depth = backbone_cfg.get("depth")
    return f"{backbone_cfg.name} ({depth} blocks)" if depth else str(backbone_cfg.name)


def baseline_knn(cfg: DictConfig, dm, k: int, temperature: float) -> dict[str, float]:
    """k-NN top-1 of the same architecture at random init and of raw pixels, on the same splits."""
    torch.manual_seed(cfg.seed)
    random_model = build_method(cfg, dm)
    bank_loader, test_loader = dm.eval_dataloaders()
    out = {}
    bank, bank_y = extract(random_model.embed_uint8, bank_loader)
    test, test_y = extract(random_model.embed_uint8, test_loader)
    out["random_init"] = knn_accuracy(bank, bank_y, test, test_y, k, temperature)
    bank, bank_y = extract(raw_pixels, bank_loader)
    test, test_y = extract(raw_pixels, test_loader)
    out["raw_pixels"] = knn_accuracy(bank, bank_y, test, test_y, k, temperature)
    return out


def uninstall_signal_handlers(trainer: pl.Trainer) -> None:
    for cb in trainer.callbacks:
        if isinstance(cb, Preemption):
            cb.uninstall()


def close_wandb(trainer: pl.Trainer) -> None:
    """Close W&B runs so the offline run file is complete on disk."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def train(cfg: DictConfig) -> dict[str, Any]:
    check_train_config(cfg)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    newly_locked = acquire_run_dir(run_dir)  # a no-op when the Hydra callback already took it
    try:
        return _train(cfg, run_dir)
    finally:
        if newly_locked:
            release_run_dir(run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    remove_stale_temporaries(run_dir / "checkpoints")
    WRITTEN.clear()  # the NaN clean-up deletes only what this run wrote
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm)
    if cfg.get("init_from"):  # a resumed run's checkpoint then overwrites these weights with its own
        model.init_backbone_from(cfg.init_from)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model.sslab_config = resolved
    cluster.setup_rendezvous()
    own = cluster.own_checkpoint(run_dir)
    ckpt = own or find_resume_checkpoint(
        cfg.resume, cfg.paths.output_dir, run_dir, vet=lambda p: vet_checkpoint(p, model, resolved)
    )
    if ckpt:  # before compiling, which renames the parameters
        check_resumable(ckpt, model, resolved, "resume" if not own else "requeued job's own checkpoint")
    if cfg.get("compile"):
        compile_model(model, cfg.trainer.get("accelerator", "auto"))
    trainer = build_trainer(cfg, run_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    except Preempted as e:  # checkpoint written; a requeued SLURM job ends here and runs again
        with contextlib.suppress(Exception):  # SLURM's requeue may already have killed W&B's service
            close_wandb(trainer)
        if e.requeued:
            print(f"preempted: {e}", file=sys.stderr)
            raise SystemExit(0) from None
        raise
    except NonFiniteLossError as e:
        with contextlib.suppress(Exception):
            close_wandb(trainer)
        raise SSLabError(nan_recovery(str(e), trainer.global_step, run_dir, cfg, ckpt)) from None
    finally:  # whatever ended fit (NaN loss, a bad batch, a signal), the process gets its handlers back
        uninstall_signal_handlers(trainer)
    elapsed = time.perf_counter() - start
    save_final_checkpoint(trainer, run_dir / "checkpoints" / "last.ckpt")
    in_sync = cluster.ranks_in_sync(model)
    close_wandb(trainer)

    metrics: dict[str, Any] = dict(getattr(model, "eval_results", {}))
    metrics.update(
        {"train_time_s": round(elapsed, 1), "global_step": trainer.global_step, "run_dir": str(run_dir)}
    )
    metrics.update({"world_size": trainer.world_size, "ranks_in_sync": in_sync})
    if ckpt:
        metrics["resumed_from"] = str(ckpt)
    knn_cfg = (cfg.get("callbacks") or {}).get("knn") or {"k": 20, "temperature": 0.07}
    if cfg.final_eval.baselines and trainer.is_global_zero:
        base = baseline_knn(cfg, dm, knn_cfg["k"], knn_cfg["temperature"])
        metrics.update({f"baseline/{k}_knn_top1": v for k, v in base.items()})
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        rows = {
            f"{cfg.method.name} {backbone_label(cfg.backbone)} (trained)": {
                "k-NN top-1": metrics.get("eval/knn_top1"),
                "linear top-1": metrics.get("eval/linear_top1"),
                "zero-shot top-1": metrics.get("eval/zero_shot_top1"),
            }
        }
        if "baseline/random_init_knn_top1" in metrics:
            rows[f"{backbone_label(cfg.backbone)} (random init)"] = {
                "k-NN top-1": metrics["baseline/random_init_knn_top1"]
            }
            rows["raw pixels"] = {"k-NN top-1": metrics["baseline/raw_pixels_knn_top1"]}
        n_test = len(dm.test_set)
        print_table(
            f"{dm.name} test set ({n_test} images), {trainer.global_step} steps in {elapsed:.0f} s",
            rows,
            ["k-NN top-1", "linear top-1"]
            + (["zero-shot top-1"] if "eval/zero_shot_top1" in metrics else []),
        )
        print(f"run directory: {run_dir}")
        print_json_line(metrics)
    return metrics


def nan_recovery(error: str, step: int, run_dir: Path, cfg: DictConfig, resumed_from: Path | None) -> str:
    """The NaN message, made true: checkpoints this process wrote at ``step`` or later hold the weights that
    gave the non-finite loss and are deleted; the newest earlier one is named with a command that continues
    its weights under a lower learning rate (``resume_schedules=reset``: the new config's schedules)."""
    ckpt_dir = (run_dir / "checkpoints").resolve()
    for name, saved_step in list(WRITTEN.items()):
        path = Path(name).resolve()
        if saved_step is not None and saved_step >= step and path.parent == ckpt_dir and is_rank_zero():
            with contextlib.suppress(OSError):
                path.unlink()
    steps = {p: checkpoint_step(p) for p in sorted(ckpt_dir.glob("*.ckpt"))}
    if resumed_from is not None:
        steps[Path(resumed_from)] = checkpoint_step(Path(resumed_from))
    good = [p for p, s in steps.items() if s is not None and s < step]
    what = error.split(";")[0]
    lr = cfg.method.get("base_lr")
    if not good:
        return (
            f"{what}; the run stopped before applying it. No checkpoint from before step {step} exists, so there "
            f"is nothing to resume: start a new run with a lower method.base_lr (now {lr}) or set "
            "method.grad_clip (checkpoint.every_n_steps sets how often checkpoints are written)"
        )
    best = max(good, key=lambda p: (steps[p], p.name != "last.ckpt"))
    last = ckpt_dir / "last.ckpt"
    if (
        not last.exists() and best.resolve().parent == ckpt_dir and is_rank_zero()
    ):  # resume=auto and the README's advice find it there
        with contextlib.suppress(OSError):
            tmp = last.with_name(f".{last.name}.tmp-{os.getpid()}")
            shutil.copyfile(best, tmp)
            os.replace(tmp, last)
    others = [
        o for o in user_overrides() if o.split("=")[0] not in ("resume", "resume_schedules", "method.base_lr")
    ]
    args = [*others, f"resume={best}", "resume_schedules=reset", f"method.base_lr={lr / 10:g}"]
    command = " ".join(["python train.py", *(shlex.quote(a) for a in args)])
    return (
        f"{what}; the run stopped before applying it. The last checkpoint with finite weights and a finite loss "
        f"is kept: {best} (step {steps[best]}). Continue its weights with a lower learning rate and that rate's "
        f"schedule: {command} (base_lr was {lr}; lower it further or set method.grad_clip if the NaN returns)"
    )


def user_overrides() -> list[str]:
    """The command line's overrides (empty outside a Hydra run)."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]
