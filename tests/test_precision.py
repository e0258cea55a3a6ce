"""trainer.precision and compile=true: run where the hardware supports them, refuse in one line where not."""

from __future__ import annotations

from typing import ClassVar

import pytest
import pytorch_lightning as pl
import torch

from sslab.build import build_datamodule, build_method
from sslab.errors import SSLabError
from sslab.precision import check_precision, compile_model, compile_unavailable_reason
from sslab.runs.training import train


def test_precision_checks_on_this_cpu():
    for ok in ("32-true", "bf16-mixed", "64-true"):
        check_precision(ok, "cpu")
    with pytest.raises(SSLabError, match=r"precision=16-mixed \(fp16\) needs a CUDA GPU; on a CPU use"):
        check_precision("16-mixed", "cpu")
    with pytest.raises(SSLabError, match="precision=fp8 is unknown"):
        check_precision("fp8", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_checks_on_this_gpu():
    check_precision("16-mixed", "gpu")
    if torch.cuda.is_bf16_supported():
        check_precision("bf16-mixed", "gpu")
    else:
        with pytest.raises(SSLabError, match=r"has no bfloat16; use trainer\.precision=16-mixed"):
            check_precision("bf16-mixed", "gpu")


def test_train_refuses_fp16_on_cpu_before_training(tiny_cfg, tmp_path):
    with pytest.raises(SSLabError, match="needs a CUDA GPU"):
        train(tiny_cfg("trainer.accelerator=cpu", "trainer.precision=16-mixed"))
    assert not (tmp_path / "checkpoints").exists()


class BlockDtype(pl.Callback):
    """Records the dtype of the first block's qkv projection during training steps."""

    seen: ClassVar[list[torch.dtype]] = []

    def on_train_start(self, trainer, pl_module):
        linear = pl_module.backbone.vit.blocks[0].attn.qkv  # a matmul (residual adds stay float32)
        self.handle = linear.register_forward_hook(lambda m, i, o: BlockDtype.seen.append(o.dtype))

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()


@pytest.mark.slow
def test_bf16_mixed_trains_on_cpu_in_bfloat16(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "trainer.accelerator=cpu",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=3",
        "+callbacks.dtype={_target_: tests.test_precision.BlockDtype}",
    )
    BlockDtype.seen.clear()
    metrics = train(cfg)
    assert metrics["global_step"] == 3
    assert BlockDtype.seen and set(BlockDtype.seen) == {torch.bfloat16}  # autocast was on in every step
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert torch.isfinite(ckpt["state_dict"]["center"]).all()


def test_bf16_block_dtype_is_bfloat16(tiny_cfg):
    """Autocast as Lightning applies it for bf16-mixed on a CPU: the blocks compute in bfloat16."""
    cfg = tiny_cfg()
    dm = build_datamodule(cfg)
    model = build_method(cfg, dm).eval()
    x = torch.randn(2, 3, dm.image_size, dm.image_size)
    seen = []
    model.backbone.vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.backbone(x)
    assert seen == [torch.bfloat16]


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable_reason("cpu") is not None, reason="torch.compile cannot run here")
def test_compile_matches_eager_and_keeps_checkpoint_names(tiny_cfg):
    cfg = tiny_cfg()
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    model = build_method(cfg, dm)
    keys = list(model.state_dict())
    x = torch.randn(4, 3, dm.image_size, dm.image_size)
    eager = model.backbone(x)
    names = compile_model(model, "cpu")
    assert "backbone.vit.blocks.0" in names and "teacher_backbone.vit.blocks.1" in names
    assert list(model.state_dict()) == keys  # checkpoints load with and without compile
    compiled = model.backbone(x)
    assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()
    compiled.square().mean().backward()  # the backward graph compiles too
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad is not None


def test_compile_without_a_compiler_says_what_to_do(tiny_cfg, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")  # a machine without a C++ compiler
    cfg = tiny_cfg()
    model = build_method(cfg, build_datamodule(cfg))
    with pytest.raises(SSLabError, match=r"compile=true: torch.compile on a CPU needs a C\+\+ compiler"):
        compile_model(model, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_fsdp_on_cpu_says_to_use_ddp(tiny_cfg):
    with pytest.raises(SSLabError, match=r"trainer=fsdp shards over CUDA GPUs .* use trainer=ddp"):
        train(tiny_cfg("trainer=fsdp"))
