"""One live run per run directory, and no debris from dead ones.

A run holds ``fcntl.flock`` on ``<run dir>/.sslab.lock`` while it lives. The kernel drops the lock when the
process ends in any way (kill -9 included), so a stale lock is simply taken over; no PID guessing. The lock is
taken by a Hydra callback before Hydra writes ``.hydra/`` or ``train.log`` into the directory, so a refused
second run changes nothing there; ``train()`` takes it again for pipeline stages and tests (a no-op when this
process already holds it).

``resume=auto`` continues the run it finds in that run's own directory (as a SLURM requeue does), so its
checkpoints, ``metrics.csv`` and W&B run go on where they stopped; the callback picks that directory before
Hydra creates a new one, and the lock guards it as any other.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from sslab.errors import SSLabError, fail
from sslab.progress_lines import is_rank_zero

log = logging.getLogger(__name__)
LOCK_NAME = ".sslab.lock"
_HELD: dict[str, int] = {}  # resolved run dir -> open lock file descriptor


def acquire_run_dir(run_dir: str | Path) -> bool:
    """Lock ``run_dir`` for this process; True when newly taken, False when this process already held it.
    Refuses (SSLabError) while another live process holds it."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD or not is_rank_zero():
        return False
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SSLabError(
            f"run directory {run_dir} is in use by a live run (pid {holder}); wait for it to finish, stop it, "
            "or choose another hydra.run.dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    return True


def release_run_dir(run_dir: str | Path) -> None:
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


class RunDirLock(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): create and lock the run directory before Hydra
    writes into it, with one line instead of a traceback when that is impossible."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import open_dict, read_write

        try:
            continued = continued_run(config)
        except SSLabError as e:
            fail(str(e), log_file=False)
        if continued is not None:  # resume=auto: back into the found run's directory
            ckpt, step = continued
            with read_write(config), open_dict(config):
                config.hydra.run.dir = str(ckpt.parents[1])
                config.resume = str(ckpt)
            print(
                f"resume=auto: continuing {ckpt.parents[1]} from step {step}, in that directory", flush=True
            )
        run_dir = Path(str(config.hydra.run.dir))
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            acquire_run_dir(run_dir)
        except SSLabError as e:
            fail(str(e), log_file=False)  # the directory is another run's: leave its log alone
        except OSError as e:
            fail(
                f"cannot create or lock run directory {run_dir}: {e.strerror}; point paths.output_dir "
                "(or hydra.run.dir) at a writable directory",
                log_file=False,
            )
        subdir = config.hydra.get("output_subdir")
        if subdir and (run_dir / subdir / "config.yaml").is_file():
            # a resume into the same directory: keep the first launch's .hydra/ files, record this one beside
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = f"{subdir}/launch-{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        """Sweep jobs (``-m``): each job directory is unique, lock it for the job's lifetime."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            try:
                acquire_run_dir(HydraConfig.get().runtime.output_dir)
            except SSLabError as e:
                fail(str(e), log_file=False)


def continued_run(config: Any) -> tuple[Path, int | None] | None:
    """For ``resume=auto`` (not a pipeline, no ``hydra.run.dir`` given): the newest ``checkpoints/last.ckpt``
    under ``paths.output_dir`` of the same method and backbone, and its step. The full check (parameter
    names, shapes, optimizer groups) follows in ``sslab.runs.training`` once the model is built."""
    if str(config.get("resume")) != "auto" or config.get("pipeline") or config.get("run_dir"):
        return None
    if any(o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in config.hydra.overrides.task):
        return None
    from sslab.resume import describe, find_resume_checkpoint

    wanted = {
        "method": {"name": config.method.get("name")},
        "backbone": {"name": config.backbone.get("name"), "depth": config.backbone.get("depth")},
    }
    steps: dict[Path, int | None] = {}

    def vet(path: Path) -> tuple[str, str | None]:
        from sslab.checkpoint_io import read_checkpoint

        ckpt = read_checkpoint(path, "resume", mmap=True)
        saved = ckpt.get("sslab_config") or {}
        steps[path] = ckpt.get("global_step")
        what = describe(saved, steps[path])
        saved_method = (saved.get("method") or {}).get("name")
        if saved_method != wanted["method"]["name"]:
            return what, f"method {saved_method}, not {wanted['method']['name']}"
        if describe(saved) != describe(wanted):
            return what, f"other architecture, this run asks for {describe(wanted)}"
        return what, None

    ckpt = find_resume_checkpoint("auto", config.paths.output_dir, vet=vet)
    return (ckpt, steps.get(ckpt)) if ckpt is not None else None


TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` files that a killed checkpoint write left behind (their PID is gone). The run
    directory is locked by now, so no live writer of this run can own them."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = TEMPORARY.match(path.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            try:
                path.unlink()
                removed.append(path)
            except OSError as e:  # read-only: leave it, the run will fail on its first write and say so
                log.warning("could not remove stale temporary %s: %s", path, e)
    if removed:
        log.info("removed %d stale checkpoint temporaries: %s", len(removed), [p.name for p in removed])
    return removed
