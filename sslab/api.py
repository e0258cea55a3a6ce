"""The Python API: ``sslab.train(...)`` runs what ``python train.py ...`` runs, and
``SSLMethod.from_config(...)`` builds a method around any ``nn.Module`` for the user's own Lightning script.

Both compose the same Hydra config tree (``conf/`` beside the package) with the same override grammar, so a
keyword here means what the command-line setting means there, and the tested training path is the one that
runs; nothing of ``sslab.runs.training.train`` is re-implemented here.

Keyword overrides: a config group takes its option (``method="mae"``, ``trainer="debug"``,
``logger=["csv"]``); a dotted key goes in through ``**{"data.path": DIR}`` or with ``__`` for the dot
(``trainer__max_steps=2``); a dict is flattened (``trainer={"max_steps": 2}``); positional strings are Hydra
overrides as typed on the command line (``"trainer.max_steps=2"``).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sslab import hooks
from sslab.errors import SSLabError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("method", "backbone", "data", "trainer", "logger", "callbacks", "experiment", "pipeline")
_PLAIN = re.compile(r"^[\w./\-:@+~%$]+$")


def conf_dir() -> Path:
    """The config tree train.py composes (the repository's ``conf/``; an editable install keeps it there)."""
    if not (CONF_DIR / "config.yaml").is_file():
        raise SSLabError(
            f"no Hydra config tree at {CONF_DIR}; the Python API composes the repository's conf/ "
            "(install sslab from a checkout: pip install -e .)"
        )
    return CONF_DIR


def _value(v: Any) -> str:
    """A Python value in Hydra's override grammar (quoted where the grammar needs it)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        if _PLAIN.match(v):
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, Sequence):
        return "[" + ",".join(_value(x) for x in v) + "]"
    raise SSLabError(
        f"cannot pass {v!r} ({type(v).__name__}) as a config value; use str, number, bool or list"
    )


def to_overrides(*args: str, **kwargs: Any) -> list[str]:
    """Hydra overrides from positional strings and keyword settings (module docstring)."""
    out = list(args)

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                add(f"{key}.{k}", v)
        else:
            out.append(f"{key}={_value(value)}")

    for key, value in kwargs.items():
        add(key.replace("__", "."), value)
    return out


def compose_config(*args: str, **kwargs: Any) -> DictConfig:
    """The config ``python train.py <overrides>`` composes; Trainer options need no ``+`` (as in train.py)."""
    from hydra import compose, initialize_config_dir

    from sslab.cli import listed_keys, open_overrides, register_resolvers

    register_resolvers()
    root = conf_dir()
    overrides = to_overrides(*args, **kwargs)
    overrides = open_overrides(
        overrides, ["trainer"], listed_keys(str(root / "trainer" / "default.yaml"), "trainer")
    )
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        return compose("config", overrides=overrides)


def train(*args: str, **kwargs: Any) -> dict[str, Any]:
    """Run what ``python train.py`` runs, with the same overrides, in this process; returns the metrics
    (what ``metrics.json`` holds). The run directory is ``paths.output_dir/<date>/<time>`` as under train.py,
    or ``run_dir=...``. Errors a user can fix raise ``SSLabError`` with train.py's one-line message.

    >>> sslab.train(method="dino", data="fashion_mnist", trainer="debug", logger=["csv"])  # doctest: +SKIP
    """
    from sslab.errors import check_train_config

    cfg = compose_config(*args, **kwargs)
    if cfg.get("pipeline"):
        raise SSLabError(
            "sslab.train runs one training run; run multi-stage recipes as python train.py pipeline=NAME"
        )
    check_train_config(cfg)  # as train.py: a mistyped setting is refused before the heavy imports
    from sslab.runs.training import train as run_training  # lazily: torch and Lightning load only now

    if not cfg.get("run_dir"):  # train.py's Hydra run directory, outside Hydra
        stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
        cfg.run_dir = str(Path(cfg.paths.output_dir) / stamp)
    return run_training(cfg, overrides=to_overrides(*args, **kwargs))


def datamodule(data: str = "fashion_mnist", *args: str, **kwargs: Any):
    """The DataModule ``python train.py data=<data> <overrides>`` would train on (set up, ready for
    ``pl.Trainer.fit(model, datamodule=...)``); settings as in ``train`` (``data__batch_size=32``)."""
    from sslab.build import build_datamodule

    dm = build_datamodule(compose_config(*args, data=data, **kwargs))
    dm.setup()
    return dm


def _method_name(cls: type) -> str:
    """The ``conf/method/<name>.yaml`` whose ``_target_`` is ``cls``."""
    from hydra.utils import get_class

    for path in sorted((conf_dir() / "method").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target and get_class(target) is cls:
            return path.stem
    raise SSLabError(f"no conf/method/*.yaml builds {cls.__name__}; pass method=NAME")


def method_from_config(
    cls: type,
    method: str | None = None,
    backbone: Any = "vit_t6",
    data: Any = None,
    embed_dim: int | None = None,
    **overrides: Any,
):
    """``SSLMethod.from_config``: the method of ``conf/method/<method>.yaml`` (hyperparameters as train.py
    would set them) around ``backbone``: a backbone config name, a ``Backbone``, or any ``nn.Module`` that
    returns (B, D) features (wrapped in ``ExternalBackbone``). ``data``: the DataModule it will train on, a
    data config name, or a ``DataSpec``. Bare keyword overrides are method fields (``out_dim=256``); dotted
    ones (``"backbone.depth"`` / ``backbone__depth``) address any config key."""
    from hydra.utils import get_class
    from torch import nn

    from sslab.backbones import Backbone
    from sslab.backbones.external import ExternalBackbone
    from sslab.build import build_backbone, build_datamodule, data_spec
    from sslab.data import SSLDataModule
    from sslab.methods.base import DataSpec

    method = method or _method_name(cls)
    settings = {(k if "." in k or "__" in k else f"method.{k}"): v for k, v in overrides.items()}
    groups: dict[str, Any] = {"method": method}
    if isinstance(backbone, str):
        groups["backbone"] = backbone
    if isinstance(data, str):
        groups["data"] = data
    cfg = compose_config(**groups, **settings)
    dm = data if isinstance(data, SSLDataModule) else None
    if isinstance(data, DataSpec):
        spec = data
    else:
        if dm is None:
            dm = build_datamodule(cfg)
        dm.setup()
        spec = data_spec(dm)
    method_cfg: dict[str, Any] = OmegaConf.to_container(cfg.method, resolve=True)
    target = get_class(method_cfg.pop("_target_"))
    method_cfg.pop("name", None)
    if not issubclass(target, cls):
        raise SSLabError(
            f"method={method} builds {target.__name__}, not a {cls.__name__}; call {target.__name__}.from_config"
        )
    if isinstance(backbone, str):
        encoder = build_backbone(cfg)
    elif isinstance(backbone, Backbone):
        encoder = backbone
    elif isinstance(backbone, nn.Module):  # the views always give the backbone 3-channel images
        encoder = ExternalBackbone(backbone, embed_dim, image_size=spec.image_size, channels=3)
    else:
        raise SSLabError(f"backbone= takes a backbone name or an nn.Module, got {type(backbone).__name__}")
    if target.requires_masking and not encoder.supports_masking:
        raise SSLabError(
            f"method={method} masks patch tokens, which backbone {encoder.name} cannot do; use a ViT backbone "
            "name (backbone='vit_s') or a method without masking (dino, vicreg)"
        )
    if dm is not None:
        missing = [k for k in target.required_keys if k not in dm.provides]
        if missing:
            raise SSLabError(
                f"method={method} needs batch key(s) {missing}, which data={dm.name} does not provide"
            )
    model = target(backbone=encoder, data=spec, seed=int(cfg.seed), **method_cfg)
    if isinstance(backbone, str):  # eval.py and init_from can rebuild it from its checkpoint
        model.sslab_config = OmegaConf.to_container(cfg, resolve=True)
    return model


hooks.method_from_config = method_from_config  # SSLMethod.from_config (methods floor) calls it through hooks
