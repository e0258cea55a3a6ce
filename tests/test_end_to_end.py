"""Real runs through the real entry points: train.py / eval.py as a user types them, W&B files read back."""

import json
import subprocess
import sys

import pytest
import torch

from sslab.errors import SSLabError
from sslab.runs.training import train
from tests.conftest import ROOT, TINY
from tests.wandb_file import config, finished, history

pytestmark = pytest.mark.slow


def run(script, *args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_train_then_eval_cli(tmp_path):
    out = tmp_path / "runs"
    r = run(
        "train.py",
        *TINY,
        "trainer.max_steps=3",
        "final_eval.baselines=true",
        f"paths.output_dir={out}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "random init" in r.stdout and "raw pixels" in r.stdout
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    run_dir = next(out.glob("*/*"))
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert 0 <= metrics["eval/knn_top1"] <= 100 and metrics["global_step"] == 3
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    for choice, keys in (
        ("knn", {"eval/knn_top1"}),
        ("linear", {"eval/linear_top1"}),
        ("all", {"eval/knn_top1", "eval/linear_top1"}),
    ):
        e = run("eval.py", f"ckpt={ckpt}", f"eval={choice}", "linear.epochs=5", cwd=tmp_path)
        assert e.returncode == 0, e.stderr[-3000:]
        result = json.loads(e.stdout.strip().splitlines()[-1])
        assert keys <= result.keys() and not ({"eval/knn_top1", "eval/linear_top1"} - keys) & result.keys()
        if (
            choice == "knn"
        ):  # offline k-NN on the same checkpoint and splits reproduces the end-of-training value
            assert result["eval/knn_top1"] == pytest.approx(metrics["eval/knn_top1"], abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["method=nope"], "Could not find 'method/nope'"),
        (["backbone=vit_q"], "Could not find 'backbone/vit_q'"),
        (["data=nope"], "Could not find 'data/nope'"),
        (["data=imagefolder", "data.path=/no/such/dir"], "error: data.path /no/such/dir is not a directory"),
        (
            ["backbone=resnet18", "+backbone.num_registers=4"],
            "error: resnet18 is a CNN and has no register tokens",
        ),
        (["backbone.patch_size=5"], "error: image size 28 is not a multiple of patch size 5"),
        (["resume=/no/such.ckpt"], "error: resume=/no/such.ckpt: no checkpoint file"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    r = run("train.py", *args, f"paths.output_dir={tmp_path}", "logger=[csv]", cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_eval_of_missing_checkpoint_is_clear(tmp_path):
    r = run("eval.py", "ckpt=/no/such.ckpt", cwd=tmp_path)
    assert r.returncode == 1 and "error: ckpt=/no/such.ckpt: no such file" in r.stderr


@pytest.mark.parametrize("backbone", ["resnet18", "convnext_t"])
def test_cnn_backbones_train(tiny_cfg, backbone):
    cfg = tiny_cfg(f"backbone={backbone}", "~backbone.depth", "trainer.max_steps=2", "data.batch_size=8")
    metrics = train(cfg)
    assert metrics["global_step"] == 2 and "eval/knn_top1" in metrics


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, tmp_path):
    # an absurd learning rate drives the weights to inf within a few steps; a checkpoint after every step
    cfg = tiny_cfg(
        "trainer.max_steps=50",
        "method.base_lr=1e38",
        "method.grad_clip=null",
        "checkpoint.every_n_steps=1",
        "checkpoint.save_top_k=-1",
    )
    with pytest.raises(SSLabError, match=r"loss is (nan|inf) at step \d+; the run stopped"):
        train(cfg)
    saved = sorted(tmp_path.glob("checkpoints/*.ckpt"))
    assert saved, "the steps before the NaN were checkpointed"
    for path in saved:
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


def test_wandb_offline_run_file_has_metrics_and_config(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg("logger=[csv,wandb]", "trainer.max_steps=4"))
    run_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = history(finished(run_files[0]))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(isinstance(v, float) for v in losses)
    knn = [r["eval/knn_top1"] for r in rows if "eval/knn_top1" in r]
    assert knn and knn[-1] == pytest.approx(metrics["eval/knn_top1"])
    cfg = config(run_files[0])
    assert cfg["method"]["name"] == "dino" and cfg["backbone"]["name"] == "vit_t"
    assert cfg["data"]["batch_size"] == 16
