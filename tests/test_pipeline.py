"""Pipelines: stages hand checkpoints over, and a killed pipeline resumes at the stage and step it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf, open_dict

from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.init_from import load_eval_backbone_state
from sslab.runs.pipeline import resolve_inputs, run_pipeline
from tests.conftest import CONF, ROOT, make_cfg

# Overrides every stage accepts, whatever its method (TINY's DINO head sizes would not fit MAE).
GENERIC = [
    "data.source=embedded",
    "data.batch_size=16",
    "data.eval_bank_size=200",
    "data.eval_test_size=100",
    "++backbone.depth=2",
    "logger=[csv]",
    "callbacks=[knn]",
    "trainer.enable_progress_bar=false",
    "final_eval.baselines=false",
]
TWO_STAGE = {
    "name": "two_stage",
    "report": ["eval/knn_top1"],
    "stages": [
        {"name": "first", "kind": "train", "params": {"overrides": ["method=mae"]}},
        {
            "name": "second",
            "kind": "train",
            "inputs": {"init_from": "first.ckpt"},
            "params": {"overrides": ["method=dino"]},
        },
    ],
}


def test_inputs_name_earlier_outputs():
    done = {"mae": {"ckpt": "/runs/mae/last.ckpt"}}
    assert resolve_inputs({"init_from": "mae.ckpt"}, done) == {"init_from": "/runs/mae/last.ckpt"}
    with pytest.raises(SSLabError, match="stage 'dino' has no output 'ckpt'"):
        resolve_inputs({"init_from": "dino.ckpt"}, done)


@pytest.mark.slow
def test_stages_hand_over_checkpoints(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        from hydra import compose

        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}"])
        with open_dict(cfg):
            cfg.pipeline = OmegaConf.create(
                {**TWO_STAGE, "overrides": [*GENERIC, "logger=[csv,wandb]", "trainer.max_steps=3"]}
            )
        done = run_pipeline(cfg, tmp_path / "pipe")

    first, second = Path(done["first"]["ckpt"]), Path(done["second"]["ckpt"])
    assert first == tmp_path / "pipe" / "first" / "checkpoints" / "last.ckpt" and first.is_file()
    assert json.loads((tmp_path / "pipe" / "second" / "stage.json").read_text())["ckpt"] == str(second)
    saved = torch.load(second, map_location="cpu", weights_only=False)
    assert saved["sslab_config"]["init_from"] == str(first)
    assert saved["sslab_config"]["method"]["name"] == "dino" and saved["global_step"] == 3
    wandb = saved["sslab_config"]["logger"]["wandb"]  # the dashboard groups a pipeline's stages
    assert wandb["group"] == str(tmp_path / "pipe") and wandb["job_type"] == "second"

    # What init_from did at the start of stage 2: student and teacher both equal MAE's encoder.
    dino_cfg = make_cfg(tmp_path, "method=dino")
    model = build_method(dino_cfg, build_datamodule(dino_cfg))
    model.init_backbone_from(str(first))
    _, mae_state = load_eval_backbone_state(first)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, mae_state[name]), name
        assert torch.equal(model.teacher_backbone.state_dict()[name], mae_state[name]), name


def test_init_from_refuses_another_architecture(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_steps=1")
    model = build_method(cfg, build_datamodule(cfg))
    ckpt = tmp_path / "m.ckpt"
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    torch.save({"sslab_config": {"backbone": {"name": "vit_t"}}, "state_dict": state}, ckpt)
    wider_cfg = make_cfg(tmp_path, "++backbone.depth=3")
    wider = build_method(wider_cfg, build_datamodule(wider_cfg))
    with pytest.raises(SSLabError, match="does not fit this one"):
        wider.init_backbone_from(str(ckpt))
    with pytest.raises(SSLabError, match="no such file"):
        wider.init_backbone_from(str(tmp_path / "nope.ckpt"))


@pytest.mark.slow
def test_killed_pipeline_resumes_at_its_stage_and_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    pipe = tmp_path / "pipe"
    args = [
        sys.executable,
        "train.py",
        "--config-dir",
        str(ROOT / "tests" / "conf"),
        "pipeline=two_stage",
        *GENERIC,
        "trainer.max_steps=40",
        "checkpoint.every_n_steps=2",
        f"paths.output_dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        [*args, f"hydra.run.dir={pipe}"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    second_ckpts = pipe / "second" / "checkpoints"
    deadline = time.time() + 240
    while not any(second_ckpts.glob("step*.ckpt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before stage 2 wrote a checkpoint"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "SIGTERM at step" in err, err
    assert f"continue with pipeline=two_stage resume={pipe}" in err.splitlines()[-1]  # not the stage's dir
    first_marker = pipe / "first" / "stage.json"
    first_written = first_marker.stat().st_mtime_ns
    assert not (pipe / "second" / "stage.json").exists()
    stopped_at = torch.load(second_ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 0 < stopped_at < 40

    rerun = subprocess.run([*args, f"resume={pipe}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "stage first already done, skipped" in rerun.stdout
    assert "is ignored" not in rerun.stderr  # the same overrides as the first launch
    assert first_marker.stat().st_mtime_ns == first_written
    second = json.loads((pipe / "second" / "stage.json").read_text())
    assert second["metrics"]["resumed_from"] == str(second_ckpts / "last.ckpt")
    assert second["metrics"]["global_step"] == 40


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step(tmp_path):
    # a periodic checkpoint at step 4 must not leave last.ckpt behind the run's final step 6
    from sslab.runs.training import train

    cfg = make_cfg(tmp_path, "trainer.max_steps=6", "checkpoint.every_n_steps=4", "callbacks=[]")
    metrics = train(cfg)
    last = Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6


@pytest.mark.slow
def test_cutler_pipeline_runs_every_stage_on_a_tiny_stamps_build(tmp_path):
    # the shipped pipeline config, with tiny budgets: DINO -> MaskCut (+ random baseline) -> detector
    # rounds 0..2 with self-training labels between them; every discovery stage reports its metrics
    pytest.importorskip("pycocotools")
    if not Path("/usr/share/tuxpaint/stamps").is_dir():
        pytest.skip("needs Debian's tuxpaint-stamps-default (make install-stamps)")
    spec = OmegaConf.load(CONF / "pipeline" / "cutler.yaml")
    for stage in spec.stages:
        if stage.kind == "detector":
            stage.params.max_steps, stage.params.batch_size = 2, 2
    data = ["data.num_train=12", "data.num_test=6", "data.gnome=false", f"data.root={tmp_path}/stamps"]
    common = [*data, "++backbone.depth=2", "data.batch_size=8", "logger=[csv]", "callbacks=[]"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        from hydra import compose

        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}"])
        with open_dict(cfg):
            cfg.pipeline = spec
            cfg.pipeline.overrides = [
                *spec.overrides,
                *common,
                "trainer.max_steps=2",
                "trainer.enable_progress_bar=false",
                "final_eval.baselines=false",
            ]
        done = run_pipeline(cfg, tmp_path / "pipe")

    assert list(done) == [
        "dino",
        "maskcut_random",
        "maskcut",
        "round0",
        "labels1",
        "round1",
        "labels2",
        "round2",
    ]
    for stage in ("maskcut_random", "maskcut", "round0", "round1", "round2"):
        metrics = done[stage]["metrics"]
        assert set(metrics) >= {"discovery/box_ap50", "discovery/mask_ap50", "discovery/corloc"}, stage
        assert all(0.0 <= v <= 100.0 for v in metrics.values()), (stage, metrics)
    assert "json" not in done["maskcut_random"]  # the baseline exports no training labels
    round1 = torch.load(done["round1"]["ckpt"], map_location="cpu", weights_only=False)
    assert round1["hyper_parameters"]["drop_iou"] is None  # self-training rounds use the plain loss
    labels = json.loads(Path(done["labels1"]["json"]).read_text())
    assert len(labels["images"]) == 12
