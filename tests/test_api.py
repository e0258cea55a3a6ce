"""The Python API (issue 16, item 5): ``SSLMethod.from_config`` around any ``nn.Module`` in the user's own
Lightning script, ``sslab.train(...)`` = what train.py runs, and the README's example run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import sslab
from sslab.api import to_overrides
from sslab.backbones.external import ExternalBackbone
from sslab.errors import SSLabError
from sslab.methods import DINO, DataSpec, SSLMethod
from tests.conftest import ROOT, TINY

SPEC = DataSpec(
    image_size=28, local_crop_size=14, mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=10, channels=1
)


def small_cnn() -> nn.Module:
    """A user's encoder: images (B, 3, H, W) -> (B, 24) features."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def test_overrides_follow_hydra_grammar():
    assert to_overrides(
        "trainer.max_steps=2",
        method="dino",
        logger=["csv"],
        trainer={"max_epochs": 1},
        data__path="/tmp/my images",
        **{"final_eval.baselines": False, "init_from": None},
    ) == [
        "trainer.max_steps=2",
        "method=dino",
        "logger=[csv]",
        "trainer.max_epochs=1",
        "data.path='/tmp/my images'",
        "final_eval.baselines=false",
        "init_from=null",
    ]


def test_sslab_train_is_the_api_call_and_training_the_module():
    from sslab.runs.training import train  # the training function train.py and the tests import

    assert callable(sslab.train) and sslab.runs.training.train is train and sslab.train is not train


def test_adapter_infers_the_width_and_refuses_masking():
    backbone = ExternalBackbone(small_cnn(), image_size=28)
    assert backbone.embed_dim == 24 and backbone.training
    tokens = backbone.forward_tokens(torch.zeros(2, 3, 28, 28))
    assert tokens["cls"].shape == (2, 24) and tokens["patch"].shape == (2, 0, 24)
    assert ExternalBackbone(small_cnn(), embed_dim=24).embed_dim == 24
    with pytest.raises(SSLabError, match="cannot mask"):
        backbone.forward_tokens(torch.zeros(1, 3, 28, 28), mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(SSLabError, match=r"must return \(B, D\) features"):
        ExternalBackbone(nn.Conv2d(3, 4, 3), image_size=28)


def test_methods_that_mask_are_refused_in_one_line():
    for method in ("ibot", "dinov2", "mae"):
        with pytest.raises(
            SSLabError, match=f"method={method} masks patch tokens, which backbone Sequential"
        ):
            SSLMethod.from_config(method=method, backbone=small_cnn(), data=SPEC)
    with pytest.raises(SSLabError, match="not a DINO"):
        DINO.from_config(method="vicreg", backbone=small_cnn(), data=SPEC)


def test_from_config_trains_any_module_in_a_plain_lightning_trainer(tmp_path):
    dm = sslab.api.datamodule("fashion_mnist", data__source="embedded", data__batch_size=16)
    model = DINO.from_config(backbone=small_cnn(), data=dm, out_dim=128, hidden_dim=32, bottleneck_dim=16)
    assert isinstance(model, DINO) and model.backbone.embed_dim == 24 and model.base_lr == 1e-3  # dino.yaml
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert model.embed_uint8(torch.stack([dm.test_set[i]["image"] for i in range(3)])).shape == (3, 24)


@pytest.mark.slow
def test_sslab_train_runs_the_train_py_run(tmp_path):
    metrics = sslab.train(*TINY, "trainer.max_steps=2", paths={"output_dir": str(tmp_path)})
    run_dir = tmp_path / os.path.relpath(metrics["run_dir"], tmp_path)
    assert metrics["global_step"] == 2 and "eval/knn_top1" in metrics
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and run_dir.parent.parent == tmp_path
    with pytest.raises(SSLabError, match=r"trainer.max_steps=abc is not valid"):
        sslab.train(trainer__max_steps="abc")


def readme_python_example() -> str:
    """The README's ``python`` code block under "Python API"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    res = subprocess.run(
        [sys.executable, "-c", readme_python_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert list(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))  # sslab.train's run directory
