"""Exact resume: N steps in one run == N/2 steps, a checkpoint, and a resume to N."""

import csv

import pytest
import torch

from sslab.runs.training import train

pytestmark = pytest.mark.slow


def losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = ("train/loss", "train/lr", "train/wd", "train/momentum", "train/teacher_temp")
    return {int(r["step"]): tuple(float(r[k]) for k in keys) for r in rows if r.get("train/loss")}


def test_resume_is_exact(tmp_path, tiny_cfg):
    common = [
        "trainer.max_steps=8",
        "trainer.max_epochs=-1",
        "checkpoint.every_n_steps=4",
        "checkpoint.save_top_k=-1",
    ]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train(tiny_cfg(*common, f"paths.output_dir={full_dir}"))
    half = full_dir / "checkpoints" / "step000004.ckpt"
    assert half.is_file()
    train(tiny_cfg(*common, f"paths.output_dir={resumed_dir}", f"resume={half}"))

    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert torch.count_nonzero(a["state_dict"]["center"]) > 0  # the DINO center was compared, and it moved
    assert a["sslab_schedules"] == b["sslab_schedules"]
    # losses and schedule values of steps 5..8 (logged at steps 4..7) are identical
    la, lb = losses(full_dir), losses(resumed_dir)
    assert sorted(lb) == [4, 5, 6, 7]
    for step in lb:
        assert la[step] == lb[step], step
    # the optimizer state continued too
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_same_step_gives_same_views_and_other_steps_differ(tiny_cfg):
    from sslab.build import build_datamodule, build_method

    cfg = tiny_cfg()
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm)
    images = torch.stack([dm.train_set[i]["image"] for i in range(4)])
    views = []
    for step in (3, 3, 4):
        torch.manual_seed(model.step_seed(step))
        views.append(model.views(images))
    assert all(torch.equal(x, y) for x, y in zip(views[0], views[1], strict=True))
    assert not torch.equal(views[0][0], views[2][0])
