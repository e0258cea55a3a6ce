"""Find and vet the checkpoint that ``resume=auto`` or ``resume=PATH`` refers to.

A checkpoint is resumable into a run when it is the same method with the same parameter names and shapes and
the same optimizer parameter groups; anything else would fail deep inside Lightning's restore. ``resume=auto``
takes the newest *compatible* run, so a newer run of another method never hijacks it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sslab.errors import SSLabError

LAST = "last.ckpt"
MAX_AUTO_CANDIDATES = 20  # newest runs examined by resume=auto


def describe(config: dict[str, Any] | Any, step: int | None = None) -> str:
    """``dino vit_t (2 blocks)`` (+ `` at step N``) from a run config."""
    method = (config.get("method") or {}).get("name", "?")
    backbone = config.get("backbone") or {}
    label = str(backbone.get("name", "?"))
    if backbone.get("depth"):
        label += f" ({backbone['depth']} blocks)"
    return f"{method} {label}" + (f" at step {step}" if step is not None else "")


def incompatibility(ckpt: dict[str, Any], model: Any, config: dict[str, Any]) -> str | None:
    """Why ``ckpt`` cannot continue as ``model`` (built from ``config``), or None when it can."""
    saved = ckpt.get("sslab_config") or {}
    saved_method = (saved.get("method") or {}).get("name")
    wanted_method = (config.get("method") or {}).get("name")
    if saved_method != wanted_method:
        return f"method {saved_method}, not {wanted_method}"
    state = ckpt.get("state_dict") or {}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        first = missing[0] if missing else extra[0]
        return (
            f"other architecture ({len(missing)} parameters missing, {len(extra)} unexpected, e.g. {first})"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            return f"other architecture ({k} is {tuple(state[k].shape)}, this config needs {tuple(v.shape)})"
    saved_groups = [
        len(g["params"]) for g in (ckpt.get("optimizer_states") or [{}])[0].get("param_groups", [])
    ]
    groups = [len(g["params"]) for g in model.param_groups()]
    if saved_groups and saved_groups != groups:
        return (
            f"other optimizer parameter groups ({len(saved_groups)} vs {len(groups)}; "
            "method.layer_decay or weight-decay settings differ)"
        )
    return None


def vet_checkpoint(path: Path, model: Any, config: dict[str, Any]) -> tuple[str, str | None]:
    """(what the checkpoint is, why it does not fit or None). Unreadable files raise SSLabError."""
    from sslab.checkpoint_io import read_checkpoint

    ckpt = read_checkpoint(path, "resume", mmap=True)
    return describe(ckpt["sslab_config"], ckpt.get("global_step")), incompatibility(ckpt, model, config)


def check_resumable(path: Path, model: Any, config: dict[str, Any], option: str = "resume") -> None:
    """One line naming what the checkpoint is and what the config asks for, when they do not fit."""
    what, problem = vet_checkpoint(path, model, config)
    if problem:
        raise SSLabError(
            f"{option}={path} is a checkpoint of {what} ({problem}), but this run asks for {describe(config)}; "
            f"resume it with its own method and backbone settings, or start a new run from its encoder "
            f"with init_from={path}"
        )


def find_resume_checkpoint(
    resume: str | None,
    output_dir: str | Path,
    current_run: Path | None = None,
    vet: Callable[[Path], tuple[str, str | None]] | None = None,
) -> Path | None:
    """``auto``: the most recently written ``checkpoints/last.ckpt`` under ``output_dir`` (other than the current
    run's) that ``vet`` accepts; a path: that file, or ``<dir>/checkpoints/last.ckpt`` when given a run
    directory. ``vet(path) -> (description, problem or None)``; without it every candidate is accepted."""
    if resume in (None, "", "null", False):
        return None
    if str(resume) == "auto":
        candidates = [
            p
            for p in Path(output_dir).glob(f"**/checkpoints/{LAST}")
            if current_run is None or current_run.resolve() not in p.resolve().parents
        ]
        if not candidates:
            raise SSLabError(
                f"resume=auto found no checkpoints/{LAST} under {output_dir}; run once without resume first"
            )
        candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        if vet is None:
            return candidates[0]
        refused = []
        for path in candidates[:MAX_AUTO_CANDIDATES]:
            try:
                what, problem = vet(path)
            except SSLabError:
                what, problem = "checkpoint", "unreadable"
            if problem is None:
                return path
            refused.append(f"{path.parents[1]} ({what}: {problem})")
        raise SSLabError(
            f"resume=auto found no compatible run under {output_dir}; newest candidates: "
            + "; ".join(refused[:5])
            + ". Pass resume=PATH of a run with this method and backbone, or start without resume"
        )
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise SSLabError(
            f"resume={resume}: no checkpoint file at {path}; pass a .ckpt file or a run directory"
        )
    return path
