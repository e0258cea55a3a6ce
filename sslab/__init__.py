"""sslab: self-supervised pretraining for vision on PyTorch Lightning + Hydra.

Python API (``sslab.api``): ``sslab.train(method="dino", data="fashion_mnist", **overrides)`` runs what
``python train.py`` runs; ``sslab.methods.DINO.from_config(backbone=my_module, data=datamodule)`` builds a
method for the user's own ``pl.Trainer().fit``. The run itself lives in ``sslab.runs.training`` (the name
differs from the entry point ``train.py`` and from this function).

Imports stay light (``train.py --help`` answers in a second): subpackages load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from sslab import api as api  # light (omegaconf); hands method_from_config down to SSLMethod (sslab.hooks)

__version__ = "0.1.0"

_LAZY = ("api", "backbones", "callbacks", "data", "methods", "evaluation", "modules", "augment", "runs")


def train(*args: str, **overrides: Any) -> dict[str, Any]:
    """``python train.py`` from Python: see ``sslab.api.train``."""
    from sslab.api import train as run

    return run(*args, **overrides)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
