"""Shared helpers: compose the real Hydra config with small, fast overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A few-second DINO run: 2-block ViT-Tiny, batch 16, tiny evaluation splits, CSV logging only.
TINY = [
    "data.source=embedded",
    "data.batch_size=16",
    "data.eval_bank_size=200",
    "data.eval_test_size=100",
    "++backbone.depth=2",
    "method.out_dim=256",
    "method.hidden_dim=64",
    "method.bottleneck_dim=32",
    "method.views.num_local=2",
    "logger=[csv]",
    "callbacks=[knn,linear_probe]",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "final_eval.baselines=false",
]


def make_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.output_dir={tmp_path}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides: make_cfg(tmp_path, *overrides)
