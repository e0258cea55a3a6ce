"""User-facing failures: one exception type, config checks made before any model work, and the one line an entry
point prints (and appends to the run's log) instead of a traceback.

Kept free of torch and Lightning imports so that a mistyped setting is refused within a second.
"""

from __future__ import annotations

import errno
import logging
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class SSLabError(RuntimeError):
    """A user-facing error whose message says what went wrong and what to do about it."""


# -- config checks -------------------------------------------------------------------------------------
def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# key -> (test, what a valid value is); a key absent from the composed config is not checked
TRAIN_RULES: dict[str, tuple[Any, str]] = {
    "seed": (_whole, "a whole number"),
    "trainer.max_steps": (
        lambda v: _whole(v) and (v == -1 or v >= 1),
        "a whole number >= 1, or -1 (no limit)",
    ),
    "trainer.max_epochs": (
        lambda v: v is None or (_whole(v) and (v == -1 or v >= 1)),
        "a whole number >= 1, or -1 (no limit)",
    ),
    "trainer.accumulate_grad_batches": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "trainer.log_every_n_steps": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "trainer.num_nodes": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "data.batch_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "data.eval_batch_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "data.num_workers": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "data.image_size": (lambda v: _whole(v) and v >= 1, "a whole number of pixels >= 1"),
    "data.patch_size": (lambda v: _whole(v) and v >= 1, "a whole number of pixels >= 1"),
    "data.eval_bank_size": (
        lambda v: v is None or (_whole(v) and v >= 1),
        "a whole number >= 1, or null (all)",
    ),
    "data.eval_test_size": (
        lambda v: v is None or (_whole(v) and v >= 1),
        "a whole number >= 1, or null (all)",
    ),
    "backbone.depth": (lambda v: v is None or (_whole(v) and v >= 1), "a whole number of blocks >= 1"),
    "backbone.num_registers": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "method.base_lr": (lambda v: _number(v) and v > 0, "a number > 0, e.g. 1e-3"),
    "method.min_lr": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "method.warmup_epochs": (lambda v: _number(v) and v >= 0, "a number of epochs >= 0"),
    "method.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "method.grad_clip": (lambda v: v is None or (_number(v) and v > 0), "a number > 0, or null (off)"),
    "checkpoint.every_n_steps": (
        lambda v: v is None or (_whole(v) and v >= 0),
        "a whole number >= 0 (0: epochs)",
    ),
    "checkpoint.save_top_k": (lambda v: _whole(v) and v >= -1, "a whole number >= 0, or -1 (keep all)"),
    "resume_schedules": (lambda v: v in ("keep", "reset", "extend"), "keep, reset or extend"),
}

EVAL_RULES: dict[str, tuple[Any, str]] = {
    "knn.k": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "knn.temperature": (lambda v: _number(v) and v > 0, "a number > 0"),
    "linear.epochs": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "linear.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "linear.batch_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "finetune.epochs": (lambda v: _number(v) and v > 0, "a number of epochs > 0"),
    "finetune.batch_size": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "device": (
        lambda v: isinstance(v, str) and v.split(":")[0] in ("auto", "cpu", "cuda"),
        "auto, cpu or cuda",
    ),
}

MISSING_HINTS = {
    "data.path": "pass data.path=/path/to/images (a folder of images: class folders, or a flat folder / any tree)",
    "ckpt": "pass ckpt=PATH, a .ckpt written by train.py (e.g. outputs/<date>/<time>/checkpoints/last.ckpt)",
}


def _missing(node: Any, prefix: str = "") -> list[str]:
    """Keys left at ``???``, found without resolving interpolations (some resolvers need torch)."""
    if isinstance(node, dict):
        return [m for k, v in node.items() for m in _missing(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [m for i, v in enumerate(node) for m in _missing(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def _check(cfg: DictConfig, rules: dict[str, tuple[Any, str]]) -> None:
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    for key in _missing(raw):
        hint = MISSING_HINTS.get(key, f"pass {key}=VALUE")
        raise SSLabError(f"{key} is not set; {hint}")
    for key, (valid, expected) in rules.items():
        try:
            value = OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=True)
        except (MissingMandatoryValue, OmegaConfBaseException) as e:
            raise SSLabError(
                f"{key} cannot be read ({e.__class__.__name__}: {e}); fix that setting"
            ) from None
        if isinstance(value, str) and value == "<absent>":
            continue
        if not valid(value):
            raise SSLabError(f"{key}={value} is not valid: expected {expected}; fix the override {key}=...")


def _cuda_available() -> bool:
    import torch  # only for data.decode=gpu: every other check stays free of the torch import

    return torch.cuda.is_available()


def check_train_config(cfg: DictConfig) -> None:
    """Refuse settings that would otherwise fail deep inside Lightning or the model with a traceback."""
    _check(cfg, TRAIN_RULES)
    trainer = cfg.get("trainer") or {}
    if trainer.get("max_steps", -1) == -1 and trainer.get("max_epochs", -1) in (-1, None):
        raise SSLabError(
            "trainer.max_steps=-1 and trainer.max_epochs=-1 would train forever (the lr schedule needs an end); "
            "set one of them"
        )
    if cfg.get("resume_schedules") in ("reset", "extend") and not cfg.get("resume"):
        raise SSLabError(
            f"resume_schedules={cfg.resume_schedules} applies to a resumed run; pass resume=CKPT as well"
        )
    resume = cfg.get("resume")
    if resume and str(resume) != "auto" and not Path(str(resume)).expanduser().exists():
        raise SSLabError(
            f"resume={resume}: no checkpoint file at {resume}; pass a .ckpt file, a run directory or auto"
        )
    if OmegaConf.select(cfg, "data.decode", default="cpu") == "gpu" and not _cuda_available():
        raise SSLabError(
            "data.decode=gpu decodes JPEGs on a CUDA GPU (nvjpeg) and this machine has none; "
            "use data.decode=cpu (the DataLoader workers decode)"
        )
    init_from = cfg.get("init_from")
    if init_from and not Path(str(init_from)).expanduser().is_file():
        raise SSLabError(
            f"init_from={init_from}: no such file; pass a .ckpt written by train.py or an official "
            "DINO / DINOv2 / MAE / timm weights file"
        )


def check_eval_config(cfg: DictConfig) -> None:
    """eval.py's settings, checked before a checkpoint is read."""
    _check(cfg, EVAL_RULES)
    if not Path(str(cfg.ckpt)).expanduser().is_file():
        raise SSLabError(
            f"ckpt={cfg.ckpt}: no such file; pass a .ckpt written by train.py (runs keep them in checkpoints/)"
        )


# -- reporting -----------------------------------------------------------------------------------------
FAULTS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
}


def os_fault(e: BaseException | None) -> OSError | None:
    """The first OSError in an exception chain that a user fixes on the machine (read-only, full disk)."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError) and e.errno in FAULTS:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def user_message(e: BaseException) -> str | None:
    """The one line for an exception a user can act on; None for a bug (which keeps its traceback)."""
    cause: BaseException | None = e
    while cause is not None:  # e.g. Hydra's InstantiationException around a DataModule's SSLabError
        if isinstance(cause, SSLabError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    fault = os_fault(e)
    if fault is not None:
        where = fault.filename or "a file"
        return (
            f"cannot write {where}: {FAULTS[fault.errno]}; free space or make it writable, or point "
            "paths.output_dir (hydra.run.dir) at another disk, then resume=auto"
        )
    return None


def fail(message: str, log_file: bool = True) -> NoReturn:
    """Print ``error: message`` on stderr, append it to the run's log file (Hydra's ``train.log``), exit 1."""
    line = f"error: {message}"
    print(line, file=sys.stderr, flush=True)
    if log_file:
        logging.raiseExceptions = False  # a handler that cannot write must not print a traceback of its own
        record = logging.LogRecord("sslab", logging.ERROR, __file__, 0, line, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                try:
                    handler.emit(record)
                    handler.flush()
                except Exception:  # a read-only or full disk: stderr already has the line
                    pass
    sys.exit(1)
