"""The training run behind ``python train.py``: build, fit, evaluate, report."""

from __future__ import annotations

import contextlib
import inspect
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
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import WandbLogger

from sslab import cluster
from sslab.build import build_datamodule, build_method
from sslab.callbacks.common import results_of
from sslab.callbacks.preemption import Preempted, Preemption
from sslab.checkpoint_io import WRITTEN, checkpoint_step, save_final_checkpoint
from sslab.cli import fit_workers, quiet_startup
from sslab.errors import SSLabError, check_train_config
from sslab.evaluation.features import extract, raw_pixels
from sslab.evaluation.knn import knn_accuracy
from sslab.precision import check_precision, compile_model
from sslab.progress_lines import Phase, format_duration, is_rank_zero, say
from sslab.report import print_json_line, print_table
from sslab.resume import check_resumable, find_resume_checkpoint, vet_checkpoint
from sslab.rundir import acquire_run_dir, release_run_dir, remove_stale_temporaries
from sslab.training_shell import NonFiniteLossError, last_checkpoint, make_trainer

quiet_startup()  # also when train() is called without train.py (pipelines, tests)

# A warning about our intended design: views are made in on_after_batch_transfer (the shell silences the
# resume warnings both training loops share)
warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer`.*")


def run_dir_of(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):  # a pipeline stage's own directory
        return Path(cfg.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def run_name(cfg: DictConfig) -> str:
    """The W&B run name: ``<method>-<backbone>-<data>``, e.g. ``dino-vit_t-fashion_mnist``."""
    return f"{cfg.method.name}-{cfg.backbone.name}-{cfg.data.name}"


def make_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """The configured loggers; a W&B logger without a name is named by ``run_name``."""
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        extra = {}
        if str(c.get("_target_", "")).endswith("make_wandb_logger") and not c.get("name"):
            extra["name"] = run_name(cfg)
        loggers.append(instantiate(c, save_dir=run_dir, **extra))
    return loggers


TRAINER_OPTIONS = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def check_trainer_keys(trainer_cfg: dict[str, Any]) -> None:
    """``trainer.X=...`` needs no ``+`` (train.py adds it), so a mistyped name is refused here, in one line."""
    unknown = sorted(set(trainer_cfg) - TRAINER_OPTIONS)
    if unknown:
        raise SSLabError(
            f"trainer.{unknown[0]} is not an option of pytorch_lightning.Trainer; check the spelling "
            "(e.g. trainer.max_steps, trainer.accumulate_grad_batches, trainer.gradient_clip_val)"
        )


class PhaseClock(pl.Callback):
    """Splits ``fit`` into training and the end-of-run evaluation: placed before the evaluation callbacks,
    its ``on_train_end`` runs before theirs (k-NN, linear probe, pictures), so it marks where training ended
    and prints the evaluation's start line. Evaluations at epoch ends during training count as training."""

    def __init__(self) -> None:
        self.train_end: float | None = None
        self.steps = 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = time.perf_counter()
        self.steps = trainer.global_step
        if trainer.is_global_zero:
            say(f"end-of-run evaluation at step {trainer.global_step}: {', '.join(eval_names(trainer))}")


def eval_names(trainer: pl.Trainer) -> list[str]:
    names = {"KNNEval": "k-NN", "OnlineLinearProbe": "linear probe", "ZeroShotEval": "zero-shot"}
    found = [names.get(type(c).__name__) for c in trainer.callbacks]
    return [n for n in found if n] or ["none"]


def build_trainer(cfg: DictConfig, run_dir: Path, clock: pl.Callback | None = None) -> pl.Trainer:
    loggers = make_loggers(cfg, run_dir)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    # the progress bar's end line, then the clock's evaluation line, then the evaluations (on_train_end order)
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    callbacks = [*bars, *([clock] if clock is not None else []), *(c for c in callbacks if c not in bars)]
    if not cfg.trainer.get(
        "enable_progress_bar", True
    ):  # trainer.enable_progress_bar=false wins over the bar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.append(Preemption(last_checkpoint(run_dir)))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_trainer_keys(trainer_cfg)
    trainer_kwargs: dict[str, Any] = cluster.adapt_trainer_kwargs(trainer_cfg)
    check_precision(trainer_kwargs.get("precision", "32-true"), trainer_kwargs.get("accelerator", "auto"))
    return make_trainer(
        run_dir,
        cfg.checkpoint.every_n_steps or None,
        cfg.checkpoint.save_top_k,
        callbacks,
        cluster.slurm_plugins(),
        logger=loggers or False,
        **trainer_kwargs,
    )


def backbone_label(backbone_cfg: DictConfig) -> str:
    """``vit_t`` or, when the depth is overridden (the CPU default), ``vit_t (6 blocks)``."""
    depth = backbone_cfg.get("depth")
    return f"{backbone_cfg.name} ({depth} blocks)" if depth else str(backbone_cfg.name)


def baseline_knn(cfg: DictConfig, dm, k: int, temperature: float) -> dict[str, float]:
    """k-NN top-1 of the same architecture at random init and of raw pixels, on the same splits."""
    torch.manual_seed(cfg.seed)
    random_model = build_method(cfg, dm, pretrained=False)  # random init even with backbone.weights
    bank_loader, test_loader = dm.eval_dataloaders()
    out = {}
    for name, embed in (("random init", random_model.embed_uint8), ("raw pixels", raw_pixels)):
        with Phase(f"baseline k-NN, {name}", len(bank_loader) + len(test_loader), "batches") as phase:
            bank, bank_y = extract(embed, phase.wrap(bank_loader))
            test, test_y = extract(embed, phase.wrap(test_loader))
            out[name.replace(" ", "_")] = knn_accuracy(bank, bank_y, test, test_y, k, temperature)
    return out


def uninstall_signal_handlers(trainer: pl.Trainer) -> None:
    for cb in trainer.callbacks:
        if isinstance(cb, Preemption):
            cb.uninstall()


def close_wandb(trainer: pl.Trainer, summary: dict[str, Any] | None = None) -> None:
    """Close W&B runs so the offline run file is complete on disk; ``summary`` goes into the run summary
    first (the dashboard's run table: baselines, train and evaluation time)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            if summary and trainer.is_global_zero:
                logger.experiment.summary.update(summary)
            logger.experiment.finish()


SUMMARY_KEYS = ("train_time_s", "eval_time_s", "global_step")


def step_limit(cfg: DictConfig, overrides: list[str]) -> str:
    """Make the limit the user typed the one that applies, and say which it is.

    ``trainer.max_epochs=N`` on the command line without ``trainer.max_steps`` means N epochs: the default
    ``max_steps`` (1000) would otherwise stop the run first, silently. Returns the line printed at start."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    trainer = cfg.trainer
    epochs_given = "trainer.max_epochs" in keys and trainer.get("max_epochs") not in (-1, None)
    if epochs_given and "trainer.max_steps" not in keys and trainer.get("max_steps", -1) != -1:
        with open_dict(trainer):
            trainer.max_steps = -1
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs", -1)
    if steps != -1 and epochs not in (-1, None):
        return f"training limit: {steps} steps or {epochs} epochs, whichever comes first"
    if steps != -1:
        return f"training limit: {steps} steps (trainer.max_steps)"
    return f"training limit: {epochs} epochs (trainer.max_epochs; trainer.max_steps=-1)"


def train(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """One training run. ``overrides``: the settings the user typed (default: the Hydra command line), which
    decide whether ``trainer.max_epochs`` or ``trainer.max_steps`` applies (``step_limit``)."""
    check_train_config(cfg)
    limit = step_limit(cfg, user_overrides() if overrides is None else overrides)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    newly_locked = acquire_run_dir(run_dir)  # a no-op when the Hydra callback already took it
    try:
        return _train(cfg, run_dir, limit)
    finally:
        if newly_locked:
            release_run_dir(run_dir)


def _train(cfg: DictConfig, run_dir: Path, limit: str = "") -> dict[str, Any]:
    if is_rank_zero():
        say(f"run directory: {run_dir}")
        if limit:
            say(limit)
    fit_workers(cfg)
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
        model.resume_step = checkpoint_step(Path(ckpt))  # where resume_schedules=extend starts stretching
        if is_rank_zero():
            say(f"resuming from {ckpt} (step {model.resume_step}, schedules: {cfg.resume_schedules})")
    if cfg.get("compile"):
        compile_model(model, cfg.trainer.get("accelerator", "auto"))
    clock = PhaseClock()
    trainer = build_trainer(cfg, run_dir, clock)
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
    fit_end = time.perf_counter()
    train_end = clock.train_end or fit_end  # where the end-of-run evaluation began
    elapsed = train_end - start
    if trainer.is_global_zero and clock.train_end is not None:
        say(f"end-of-run evaluation: done in {format_duration(fit_end - train_end)}")
    save_final_checkpoint(trainer, last_checkpoint(run_dir))
    in_sync = cluster.ranks_in_sync(model)

    metrics: dict[str, Any] = dict(results_of(trainer).metrics)
    metrics.update(
        {"train_time_s": round(elapsed, 1), "global_step": trainer.global_step, "run_dir": str(run_dir)}
    )
    metrics.update({"world_size": trainer.world_size, "ranks_in_sync": in_sync})
    if ckpt:
        metrics["resumed_from"] = str(ckpt)
    knn_cfg = (cfg.get("callbacks") or {}).get("knn")  # baselines for the k-NN this run reports
    evaluation_on = not cfg.get("skip_evaluation") and not getattr(dm, "eval_off_reason", None)
    if knn_cfg and cfg.final_eval.baselines and evaluation_on and trainer.is_global_zero:
        base = baseline_knn(cfg, dm, knn_cfg["k"], knn_cfg["temperature"])
        metrics.update({f"baseline/{k}_knn_top1": v for k, v in base.items()})
    eval_time = time.perf_counter() - train_end
    metrics["eval_time_s"] = round(eval_time, 1)
    summary = {k: v for k, v in metrics.items() if k.startswith("baseline/") or k in SUMMARY_KEYS}
    close_wandb(trainer, summary)
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
            f"{dm.name} test set ({n_test} images), step {trainer.global_step}",
            rows,
            ["k-NN top-1", "linear top-1"]
            + (["zero-shot top-1"] if "eval/zero_shot_top1" in metrics else []),
        )
        print(f"{trainer.global_step} steps in {elapsed:.0f} s; evaluation {eval_time:.0f} s")
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
