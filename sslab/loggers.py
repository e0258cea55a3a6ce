"""Loggers: W&B offline unless the user is logged in (or sets WANDB_MODE), CSV always."""

from __future__ import annotations

import csv
import netrc
import os
import re
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; ``online`` when an API key is configured; else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def hydra_run_fields() -> dict[str, Any]:
    """W&B fields from the Hydra job: ``job_type`` = the method, ``tags`` = the command-line overrides, and in
    a sweep (``-m``) ``group`` = the sweep directory, so a sweep's runs are grouped in the dashboard."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    fields: dict[str, Any] = {"tags": [t[:64] for t in hc.overrides.task]}  # W&B caps tags at 64 characters
    if hc.runtime.choices.get("method"):
        fields["job_type"] = hc.runtime.choices["method"]
    if hc.mode == RunMode.MULTIRUN:
        fields["group"] = str(hc.sweep.dir)[-128:]  # W&B caps groups at 128 characters
    return fields


RUN_FOLDER = re.compile(r"^(?:offline-)?run-(?P<time>\d{8}_\d{6})-(?P<id>[a-z0-9]+)$")


def existing_run_id(save_dir: str | Path) -> str | None:
    """The W&B run id of the newest run already in ``save_dir/wandb`` (``offline-run-<time>-<id>``), so a
    run continued in its own directory (``resume=auto``, a SLURM requeue) continues the same W&B run."""
    folder = Path(save_dir) / "wandb"
    if not folder.is_dir():
        return None
    found = sorted((m["time"], m["id"]) for p in folder.iterdir() if (m := RUN_FOLDER.match(p.name)))
    return found[-1][1] if found else None


def make_wandb_logger(
    save_dir: str | Path,
    project: str = "sslab",
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    run_id: str | None = None,
) -> WandbLogger:
    """Explicit ``group``/``job_type``/``tags`` win over the ones taken from the Hydra job. Without
    ``run_id``, a run directory that already holds a W&B run continues that run (``existing_run_id``)."""
    mode = wandb_mode()
    os.environ.setdefault("WANDB_MODE", mode)
    auto = hydra_run_fields()
    run_id = run_id or existing_run_id(save_dir)
    logger = WandbLogger(
        project=project,
        name=name,
        group=group or auto.get("group"),
        job_type=job_type or auto.get("job_type"),
        tags=list(tags or auto.get("tags", [])),
        save_dir=str(save_dir),
        offline=mode == "offline",
        id=run_id,
        resume="allow" if run_id else None,
    )
    # Lightning passes anonymous=None, which wandb >= 0.19 answers with "The anonymous setting has no effect"
    logger._wandb_init.pop("anonymous", None)
    return logger


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a run resumed into its own directory (by
    hand or by a SLURM requeue) must keep the rows from before the interruption, so this one appends."""

    def _check_log_dir_exists(self) -> None:  # Lightning's version deletes metrics.csv
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """New columns: rewrite the old rows under the wider header into a temporary file, then rename."""
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume into the same run directory."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def make_csv_logger(save_dir: str | Path, name: str = "csv") -> CSVLogger:
    return AppendingCSVLogger(save_dir=str(save_dir), name=name, version="")
