"""Numeric precision and ``torch.compile``: accept what the hardware runs, refuse the rest in one line.

- ``bf16-mixed`` (autocast to bfloat16): GPUs with bf16 (Ampere and newer) and CPUs (correct but slow on
  CPUs without AVX512-BF16/AMX).
- ``16-mixed`` (fp16 autocast with loss scaling): CUDA GPUs only. Lightning would silently switch it to bf16
  on a CPU; we refuse instead, so the run is what was asked for.
- ``compile=true``: TorchDynamo + Inductor. Inductor generates C++ on CPUs (it needs a C++ compiler) and
  Triton kernels on GPUs (it needs Triton).
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from torch import nn

from sslab.errors import SSLabError

PRECISIONS = (
    "32-true",
    "32",
    "64-true",
    "64",
    "bf16-mixed",
    "bf16-true",
    "bf16",
    "16-mixed",
    "16-true",
    "16",
)


def uses_cuda(accelerator: str) -> bool:
    return str(accelerator) in ("cuda", "gpu") or (str(accelerator) == "auto" and torch.cuda.is_available())


def check_precision(precision: str | int, accelerator: str) -> None:
    """Raise a one-line ``SSLabError`` when ``precision`` cannot run on ``accelerator``."""
    p = str(precision)
    if p not in PRECISIONS:
        raise SSLabError(
            f"trainer.precision={p} is unknown; use one of 32-true, bf16-mixed, 16-mixed, 64-true"
        )
    on_gpu = uses_cuda(accelerator)
    if p.startswith("16") and not on_gpu:
        raise SSLabError(
            f"trainer.precision={p} (fp16) needs a CUDA GPU; on a CPU use trainer.precision=bf16-mixed or 32-true"
        )
    if p.startswith("bf16") and on_gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise SSLabError(
            f"trainer.precision={p}: this GPU ({torch.cuda.get_device_name()}) has no bfloat16; "
            "use trainer.precision=16-mixed"
        )


def compile_unavailable_reason(accelerator: str) -> str | None:
    """Why ``torch.compile`` cannot run here, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} here"
    if uses_cuda(accelerator):
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile on a GPU needs Triton (pip install triton)"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return (
            f"torch.compile on a CPU needs a C++ compiler ({cxx} not found; apt-get install g++ or set CXX)"
        )
    return None


def compile_model(model: nn.Module, accelerator: str) -> list[str]:
    """Compile each transformer block (or each CNN backbone) in place with ``nn.Module.compile``, which keeps
    parameter names, so checkpoints load with and without compile. Blocks share one compiled graph, and
    every call path (``forward``, ``forward_tokens(mask=..., keep=...)``) goes through them. Returns the
    names of the compiled modules."""
    reason = compile_unavailable_reason(accelerator)
    if reason:
        raise SSLabError(f"compile=true: {reason}; or run with compile=false")
    names = []
    for name, module in model.named_modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList) and name.endswith("vit"):
            for i, block in enumerate(blocks):
                block.compile()
                names.append(f"{name}.blocks.{i}")
    if not names:  # CNNs: compile whole backbones (every attribute whose module has ``forward_tokens``)
        for name, module in model.named_children():
            if hasattr(module, "forward_tokens"):
                module.compile()
                names.append(name)
    if not names:
        raise SSLabError("compile=true found no backbone to compile in this method; run with compile=false")
    return names
