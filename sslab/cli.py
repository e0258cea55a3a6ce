"""What ``train.py`` and ``eval.py`` do before Hydra composes a config, kept free of torch and Lightning so that
``--help``, ``--cfg job --resolve`` and a mistyped setting answer in about a second.

- ``register_resolvers``: the config's ``${auto_precision:}`` resolver, so ``--cfg job --resolve`` works
  without importing ``sslab.build``; torch is imported only when the value is actually resolved.
- ``open_overrides``: ``data.eval_bank_size=100`` in eval.py and ``trainer.gradient_clip_val=1`` in train.py
  without Hydra's ``+`` for keys the config does not list (those settings belong to the checkpoint's data
  config and to Lightning's Trainer, so they cannot all be listed); unknown keys are refused later with one
  line (``check_trainer_keys``, ``sslab.runs.reopen``).
- ``fit_workers``: no more data-loader workers than CPU cores (torch warns about it, once per loader).
- ``slurm_unreachable``: a sweep sent to the SLURM launcher from a machine where no controller answers ends in
  one line instead of submitit's traceback.
- ``parse_overrides``: the ``key=value`` command line of the ``python -m`` tools (export, embed, data.convert).
- ``quiet_startup``: library start-up chatter that tells a user nothing (faiss' loader, Lightning's
  ``srun`` hint outside SLURM, the litlogger tip).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from sslab.errors import SSLabError
from sslab.progress_lines import say


def auto_precision() -> str:
    """bf16 autocast on GPUs that support it, full fp32 elsewhere."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)


OVERRIDE = re.compile(r"^(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*)$", re.DOTALL)


def open_overrides(argv: list[str], prefixes: Iterable[str], listed: Iterable[str] = ()) -> list[str]:
    """``data.x=1`` -> ``++data.x=1`` for every ``prefix.`` key not in ``listed`` (``++``: add or override).
    Arguments with ``+``/``~``, group choices (``data=stamps``) and flags are left as they are."""
    prefixes, listed = tuple(f"{p}." for p in prefixes), set(listed)
    out = []
    for arg in argv:
        m = OVERRIDE.match(arg)
        if m and m["key"].startswith(prefixes) and m["key"] not in listed:
            arg = f"++{arg}"
        out.append(arg)
    return out


def listed_keys(yaml_path: str, prefix: str) -> set[str]:
    """``prefix.key`` for each top-level key of a config file (the keys Hydra accepts without ``+``)."""
    try:
        node = OmegaConf.load(yaml_path)
    except OSError:
        return set()
    return {f"{prefix}.{k}" for k in node if k != "defaults"}


def fit_workers(cfg: DictConfig) -> None:
    """More loader workers than CPU cores only adds contention, and torch warns about it (twice: train and
    evaluation loaders); use the cores there are and say so once."""
    wanted = (cfg.get("data") or {}).get("num_workers")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(wanted, int) and wanted > cores:
        with open_dict(cfg.data):
            cfg.data.num_workers = cores
        say(f"data.num_workers={wanted} > {cores} CPU cores here: using {cores}")


QUIET_WARNINGS = (
    r".*The `srun` command is available on your system but is not used.*",  # Lightning, outside SLURM jobs
)


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_startup() -> None:
    """Silence start-up lines that tell a user nothing; call before the libraries are imported."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # ten INFO lines, three "ModuleNotFoundError"
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    tip = _DropTip()
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(tip)


PING_SECONDS = 10  # a controller answers scontrol ping within a second; none configured can hang far longer


def slurm_unreachable(argv: list[str]) -> str | None:
    """The one-line reason a ``hydra/launcher=slurm`` sweep cannot be submitted from here, or None: no
    ``sbatch`` on this machine, or ``scontrol ping`` finds no controller (what submitit's sbatch would
    otherwise report as a traceback: "Could not establish a configuration source")."""
    if not any(re.fullmatch(r"\+*hydra/launcher=slurm", a) for a in argv):
        return None
    if shutil.which("sbatch") is None:
        return (
            "hydra/launcher=slurm: sbatch is not installed on this machine; launch the sweep from a SLURM "
            "login node, or drop hydra/launcher=slurm to run the sweep here"
        )
    if shutil.which("scontrol") is None:
        return None  # nothing to ask; sbatch will say
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=PING_SECONDS)
        said = (ping.stderr or ping.stdout).strip().splitlines()
        if ping.returncode == 0 and "UP" in ping.stdout:
            return None
        answer = said[-1] if said else "no answer"
    except subprocess.TimeoutExpired:
        answer = f"no answer within {PING_SECONDS} s"
    return (
        f"hydra/launcher=slurm: SLURM is not reachable from this machine (scontrol ping: {answer}); launch "
        "from a node of the cluster or drop hydra/launcher=slurm"
    )


# -- the python -m tools' key=value command line (export, embed, data.convert) --------------------------------
def parse_overrides(name: str, defaults: dict[str, Any], argv: list[str]) -> DictConfig:
    """``key=value`` arguments in Hydra's override grammar (as ``eval.py`` takes them) over ``defaults``, without
    a Hydra run directory or log file; an unknown key or a missing required one is one line."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name=f"sslab_{name}", node=defaults)
    try:
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name=f"sslab_{name}", overrides=list(argv))
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SSLabError(f"{first} (python -m sslab.{name} takes {usage(defaults)})") from e
    missing = missing_keys(cfg)
    if missing:
        raise SSLabError(
            f"pass {' '.join(f'{k}=...' for k in missing)} (python -m sslab.{name} takes {usage(defaults)})"
        )
    return cfg


def missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Required keys (``???``) still unset, nested ones dotted."""
    out = []
    for key in cfg:
        if OmegaConf.is_missing(cfg, key):
            out.append(f"{prefix}{key}")
        elif isinstance(cfg[key], DictConfig):
            out += missing_keys(cfg[key], f"{prefix}{key}.")
    return out


def usage(defaults: dict[str, Any], prefix: str = "") -> str:
    parts = []
    for k, v in defaults.items():
        if isinstance(v, dict):
            parts.append(usage(v, f"{prefix}{k}."))
        else:
            parts.append(f"{prefix}{k}={'...' if v == '???' else v}")
    return " ".join(parts)
