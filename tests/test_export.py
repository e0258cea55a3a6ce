"""``python -m sslab.export``: the evaluation encoder as timm / torchvision / ONNX / TorchScript, each loaded back
by its own library (timm.create_model, torchvision.models, onnxruntime, torch.jit.load) and compared with the
method's ``embed`` on the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.export import export, metadata_path
from tests.conftest import CONF, ROOT, TINY, make_cfg


def save_checkpoint(model, cfg, path: Path) -> Path:
    """A checkpoint as train.py writes it: state dict, resolved config, the evaluation encoder's prefix."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "sslab_config": OmegaConf.to_container(cfg, resolve=True),
            "sslab_eval_backbone": model.eval_backbone_prefix(),
            "global_step": 0,
        },
        path,
    )
    return path


def tiny_checkpoint(tmp: Path, overrides: list[str]):
    """(method in eval mode, checkpoint path); a DINO teacher is moved off the student, as training leaves it,
    so that exporting the student by mistake would show."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.output_dir={tmp}"])
    torch.manual_seed(0)
    model = build_method(cfg, build_datamodule(cfg))
    if model.eval_backbone() is not model.backbone:
        with torch.no_grad():
            for p in model.eval_backbone().parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval(), save_checkpoint(model, cfg, tmp / "last.ckpt")


@pytest.fixture(scope="module")
def dino_vit(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("dino"), TINY)  # ViT-T, 2 blocks, 28 px, patch 7


@pytest.fixture(scope="module")
def dino_resnet(tmp_path_factory):
    overrides = [o for o in TINY if not o.startswith("++backbone")] + ["backbone=resnet18"]
    return tiny_checkpoint(tmp_path_factory.mktemp("resnet"), overrides)


def images(batch: int = 3, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_timm_export_loads_with_create_model_and_gives_embed(dino_vit, tmp_path):
    model, ckpt = dino_vit
    out = tmp_path / "encoder.pth"
    record = export(ckpt, "timm", out)
    meta = json.loads(metadata_path(out).read_text())
    assert meta["timm"]["kwargs"]["num_classes"] == 0 and meta["input"]["shape"] == ["batch", 3, 28, 28]
    loaded = timm.create_model(
        meta["timm"]["model_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out)),
        **meta["timm"]["kwargs"],
    ).eval()
    x = images()
    expected = model.embed(x)  # DINO: the teacher
    torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(model.backbone(x), expected, atol=1e-3)  # the student differs
    printed = eval(record["load"], {"timm": timm}).eval()  # the printed call, as typed
    torch.testing.assert_close(printed(x), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_timm_export_of_mean_pooled_mae(tmp_path):
    mim_tiny = [o for o in TINY if not o.startswith("method.")]
    model, ckpt = tiny_checkpoint(tmp_path, [*mim_tiny, "method=mae", "method.embed_pool=mean"])
    out = tmp_path / "mae.pth"
    meta = export(ckpt, "timm", out)
    assert meta["pool"] == "mean" and meta["timm"]["kwargs"]["global_pool"] == "avg"
    loaded = timm.create_model(
        meta["timm"]["model_name"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out)),
        **meta["timm"]["kwargs"],
    ).eval()
    x = images()
    torch.testing.assert_close(loaded(x), model.embed(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_onnx_export_runs_in_onnxruntime(dino_vit, tmp_path):
    import onnxruntime as ort  # test extra: installed by make test, never skipped

    model, ckpt = dino_vit
    out = tmp_path / "encoder.onnx"
    export(ckpt, "onnx", out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = images(batch)
        (features,) = session.run(["features"], {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(features), model.embed(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_torchscript_export_loads_with_jit_load(dino_vit, tmp_path):
    model, ckpt = dino_vit
    out = tmp_path / "encoder.pt"
    export(ckpt, "torchscript", out)
    loaded = torch.jit.load(str(out))
    x = images(4)
    torch.testing.assert_close(loaded(x), model.embed(x), atol=1e-6, rtol=0)


@torch.no_grad()
def test_torchvision_export_of_a_resnet(dino_resnet, tmp_path):
    model, ckpt = dino_resnet
    out = tmp_path / "resnet18.pth"
    record = export(ckpt, "torchvision", out)
    namespace = {"torch": torch, "torchvision": torchvision}
    exec("\n".join(record["torchvision"]["lines"]), namespace)  # the printed lines: 28 px -> CIFAR-style stem
    loaded = namespace["model"].eval()
    x = images()
    torch.testing.assert_close(loaded(x), model.embed(x), atol=1e-5, rtol=0)


def test_unsupported_combinations_are_one_line(dino_vit, dino_resnet, tmp_path):
    with pytest.raises(SSLabError, match=r"torchvision's vit_t layout is not supported.*timm.*onnx"):
        export(dino_vit[1], "torchvision", tmp_path / "x.pth")
    with pytest.raises(SSLabError, match=r"small-image stem.*format=torchvision"):
        export(dino_resnet[1], "timm", tmp_path / "x.pth")
    with pytest.raises(SSLabError, match="format=keras: choose one of"):
        export(dino_vit[1], "keras", tmp_path / "x.pth")


def test_command_line(dino_vit, tmp_path):
    _, ckpt = dino_vit
    out = tmp_path / "cli" / "encoder.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "sslab.export", f"ckpt={ckpt}", "format=torchscript", f"out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"load: torch.jit.load('{out}')(x)" in run.stdout
    assert out.is_file() and metadata_path(out).is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "sslab.export", f"ckpt={ckpt}", "format=timm"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: pass out=... (python -m sslab.export takes ckpt=... format=... out=... opset=17)"
    ]


def test_make_cfg_is_the_tiny_config(tmp_path):
    """The fixtures above use the shared TINY overrides: a 2-block ViT at 28 px / patch 7."""
    cfg = make_cfg(tmp_path)
    assert cfg.backbone.depth == 2 and cfg.data.image_size == 28 and cfg.backbone.weights is None
