"""conf/method mirrors the code: a yaml that inherits another holds only what differs from it, every yaml
builds with its class's required arguments, and the k-NN settings have one home (conf/knn/default.yaml)."""

from __future__ import annotations

import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from tests.conftest import CONF

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


def composed(*overrides: str, config: str = "config"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", METHODS)
def test_an_inheriting_method_yaml_holds_only_what_differs(name):
    own = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
    parents = [d for d in own.pop("defaults", []) if d != "_self_"]
    if not parents:
        return
    (parent,) = parents
    inherited = flat(OmegaConf.to_container(composed(f"method={parent}").method))
    same = [k for k, v in flat(own).items() if k != "name" and k in inherited and inherited[k] == v]
    assert not same, f"conf/method/{name}.yaml repeats {same} of conf/method/{parent}.yaml"


@pytest.mark.parametrize("name", METHODS)
def test_every_required_argument_comes_from_the_yaml(name):
    """The yaml is the one source of a method's defaults: what it sets has no default in the code."""
    cfg = OmegaConf.to_container(composed(f"method={name}").method)
    cls = get_class(cfg["_target_"])
    required = {
        p.name
        for c in cls.__mro__
        if "__init__" in vars(c)
        for p in inspect.signature(c.__init__).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert required <= set(cfg), sorted(required - set(cfg))


def test_knn_settings_have_one_home():
    home = OmegaConf.load(CONF / "knn" / "default.yaml")
    train = composed().callbacks.knn
    evaluate = composed("ckpt=x", config="eval").knn
    assert (train.k, train.temperature) == (evaluate.k, evaluate.temperature) == (home.k, home.temperature)
