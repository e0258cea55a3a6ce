"""Learning, shown: one short real run per method family on Fashion-MNIST lowers its loss and beats the same
encoder at random init on k-NN.

The recipe is made for the test, not the default run: a 2-block ViT-Tiny (patch 7) instead of 6 blocks, so
that a few hundred steps fit in about a minute each on 2 CPU cores, the embedded 10k training set, and a
class-balanced 2000 / 1000 evaluation split. Each family keeps its own config otherwise (loss, heads,
schedules, views). Measured with these settings (seed 0, one thread, the machine shared with other jobs),
k-NN trained vs random init: DINO 400 steps 62.80 vs 58.10, VICReg 200 steps 68.80 vs 58.10, MAE 400 steps
69.50 vs 62.00 (64.30 at the paper's base_lr 1.5e-4, which the config now replaces by 1.5e-3 for short
runs). The random-init row is the method's own encoder untrained (MAE's xavier / sin-cos initialisation
scores higher than timm's).
"""

import csv
from statistics import mean

import pytest
from hydra import compose, initialize_config_dir

from sslab.runs.training import train
from tests.conftest import CONF

pytestmark = pytest.mark.slow

COMMON = [
    "data.source=embedded",
    "data.eval_bank_size=2000",
    "data.eval_test_size=1000",
    "++backbone.depth=2",
    "logger=[csv]",
    "callbacks=[knn]",
    "final_eval.baselines=true",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=10",
]
FAMILIES = {
    "dino": ["method=dino", "trainer.max_steps=400"],
    "vicreg": ["method=vicreg", "trainer.max_steps=200"],
    "mae": ["method=mae", "trainer.max_steps=400"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_short_run_lowers_its_loss_and_beats_random_init(tmp_path, family):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*COMMON, *FAMILIES[family], f"paths.output_dir={tmp_path}"])
    metrics = train(cfg)
    run_dir = metrics["run_dir"]
    with open(f"{run_dir}/csv/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) >= 20
    assert mean(losses[-5:]) < mean(losses[:5])
    if family == "dino":  # cross-entropy = teacher entropy + KL(teacher || student): the KL part falls too
        kl = [float(r["train/loss"]) - float(r["train/teacher_entropy"]) for r in rows]
        assert mean(kl[-5:]) < mean(kl[:5])
    assert metrics["eval/knn_top1"] > metrics["baseline/random_init_knn_top1"], metrics
