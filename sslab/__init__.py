"""sslab: self-supervised pretraining for vision on PyTorch Lightning + Hydra.

Python API (``sslab.api``): ``sslab.train(method="dino", data="fashion_mnist", **overrides)`` runs what
``python train.py`` runs; ``sslab.methods.DINO.from_config(backbone=my_module, data=datamodule)`` builds a
method for the user's own ``pl.Trainer().fit``.

Imports stay light (``train.py --help`` answers in a second): submodules load on first use. ``sslab.train`` is
both the training module (``from sslab.train import train``, as train.py and the tests use it) and the API
call: importing the submodule binds the module to this package's ``train`` attribute, so the module object is
made callable (``__call__`` = ``sslab.api.train``) instead of being shadowed by a function of the same name.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_LAZY = ("api", "backbones", "callbacks", "data", "methods", "evaluation", "modules", "augment")


class _CallableModule(types.ModuleType):
    """``sslab.train``: the module, callable as the API's ``train``."""

    def __call__(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        from sslab.api import train

        return train(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value.__class__ = _CallableModule  # the import system binds the submodule here
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name == "train" or name in _LAZY:
            return importlib.import_module(f"{__name__}.{name}")  # binds it through __setattr__
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
