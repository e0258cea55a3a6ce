"""Export a run's evaluation encoder: ``python -m sslab.export ckpt=PATH format=timm|torchvision|onnx|torchscript
out=FILE``.

What is exported is the encoder that ``embed`` uses (the EMA teacher for DINO, iBOT and DINOv2), without
projection heads, decoders or text towers, as the module that maps normalised (B, 3, H, W) float images to
(B, D) features: the CLS token for ViTs (or the mean patch token where the method pools so, MAE's
``embed_pool=mean``), the global average for CNNs. ``OUT.json`` beside the file records how to rebuild and
feed it (model name and keyword arguments, image size, mean and std).

- ``timm``: a state dict for ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=OUT),
  num_classes=0, **kwargs)``; the exact call is printed.
- ``torchvision``: a state dict for ``torchvision.models.resnet18/50()`` (ResNets only: torchvision's ViT and
  ConvNeXt name their layers differently); the lines that adapt the model (no ``fc``, small-image stem) are
  printed.
- ``onnx``: ``torch.onnx.export`` (the TorchScript-based exporter: needs the ``onnx`` package, not onnxscript),
  dynamic batch axis.
- ``torchscript``: ``torch.jit.trace``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sslab.backbones.cnn import SMALL_INPUT, CNNBackbone
from sslab.backbones.registry import CNN, VIT
from sslab.backbones.vit import ViTBackbone
from sslab.cli import parse_overrides
from sslab.errors import SSLabError, fail, user_message
from sslab.runs.reopen import reopen

FORMATS = ("timm", "torchvision", "onnx", "torchscript")
DEFAULTS = {
    "ckpt": "???",  # a train.py checkpoint
    "format": "???",  # timm | torchvision | onnx | torchscript
    "out": "???",  # the file to write; OUT.json beside it says how to load and feed it
    "opset": 17,  # ONNX opset
}
# backbone config fields that are not timm model arguments (or are passed under another name)
NOT_TIMM_KWARGS = {"name", "img_size", "patch_size", "num_registers", "drop_path_rate", "in_chans", "flexi",
                   "flexi_patch_sizes", "weights", "channels_last"}  # fmt: skip
TORCHVISION_RESNETS = ("resnet18", "resnet50")


class FeatureEncoder(nn.Module):
    """Normalised (B, 3, H, W) float images -> (B, D) features, as the method's ``embed``."""

    def __init__(self, backbone: nn.Module, pool: str = "cls") -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise SSLabError(f"embed pool {pool!r}: choose cls or mean")
        self.backbone = backbone
        self.pool = pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_tokens(images)
        return out["cls"] if self.pool == "cls" else out["patch"].mean(1)


def load_encoder(ckpt: str | Path) -> tuple[FeatureEncoder, DictConfig]:
    """The checkpoint's evaluation encoder wrapped as ``FeatureEncoder`` (eval mode) and the run's config;
    the pooling is the method's (``method.embed_pool``, MAE/DiffMAE; CLS otherwise)."""
    backbone, run_cfg, _, _ = reopen(ckpt, encoder_only=True)
    pool = str(OmegaConf.select(run_cfg, "method.embed_pool", default="cls") or "cls")
    return FeatureEncoder(backbone, pool).eval(), run_cfg


def input_spec(run_cfg: DictConfig, backbone: nn.Module) -> dict[str, Any]:
    size = int(run_cfg.backbone.img_size)
    return {
        "shape": ["batch", 3, size, size],
        "dtype": "float32",
        "normalise": "x = (rgb in [0, 1] - mean) / std; grey images repeated to 3 channels",
        "mean": list(run_cfg.data.mean),
        "std": list(run_cfg.data.std),
        "embed_dim": int(backbone.embed_dim),
    }


# -- formats ---------------------------------------------------------------------------------------------------
def timm_export(encoder: FeatureEncoder, run_cfg: DictConfig, out: Path) -> dict[str, Any]:
    backbone, bcfg = encoder.backbone, OmegaConf.to_container(run_cfg.backbone, resolve=True)
    if isinstance(backbone, ViTBackbone):
        kwargs: dict[str, Any] = {
            "num_classes": 0,
            "img_size": int(bcfg["img_size"]),
            "patch_size": int(backbone.base_patch_size),
            "in_chans": int(bcfg.get("in_chans", 3)),
            "reg_tokens": int(bcfg.get("num_registers", 0)),
            "dynamic_img_size": True,
            **{k: v for k, v in bcfg.items() if k not in NOT_TIMM_KWARGS},
        }
        if encoder.pool == "mean":  # timm's "avg" with fc_norm=False: the mean patch token after the norm
            kwargs |= {"global_pool": "avg", "fc_norm": False}
        state = {k.removeprefix("vit."): v for k, v in backbone.state_dict().items() if k.startswith("vit.")}
        name = VIT[bcfg["name"]]
    elif isinstance(backbone, CNNBackbone):
        if int(bcfg["img_size"]) < SMALL_INPUT:
            raise SSLabError(
                f"this {bcfg['name']} has the small-image stem (images under {SMALL_INPUT} px), which timm's "
                "model cannot build; use format=torchvision (ResNets), onnx or torchscript"
            )
        kwargs = {"num_classes": 0, "in_chans": int(bcfg.get("in_chans", 3))}
        state = {k.removeprefix("net."): v for k, v in backbone.state_dict().items()}
        name = CNN[bcfg["name"]]
    else:
        raise SSLabError(f"format=timm takes sslab ViT or CNN backbones, not {type(backbone).__name__}")
    torch.save(state, out)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    call = f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}), {args})"
    return {"timm": {"model_name": name, "kwargs": kwargs}, "load": call}


def torchvision_export(encoder: FeatureEncoder, run_cfg: DictConfig, out: Path) -> dict[str, Any]:
    backbone, bcfg = encoder.backbone, OmegaConf.to_container(run_cfg.backbone, resolve=True)
    if not isinstance(backbone, CNNBackbone) or bcfg["name"] not in TORCHVISION_RESNETS:
        raise SSLabError(
            f"format=torchvision covers ResNets; torchvision's {bcfg['name']} layout is not supported "
            "(its layers are named differently): use format=timm or format=onnx"
        )
    torch.save({k.removeprefix("net."): v for k, v in backbone.state_dict().items()}, out)
    conv1 = backbone.net.conv1
    lines = [f"model = torchvision.models.{bcfg['name']}()"]
    if int(bcfg["img_size"]) < SMALL_INPUT or conv1.in_channels != 3:  # sslab's small-image stem, see cnn.py
        k, s, p = conv1.kernel_size[0], conv1.stride[0], conv1.padding[0]
        lines.append(
            f"model.conv1 = torch.nn.Conv2d({conv1.in_channels}, {conv1.out_channels}, {k}, {s}, {p}, bias=False)"
        )
    if isinstance(backbone.net.maxpool, nn.Identity):
        lines.append("model.maxpool = torch.nn.Identity()")
    lines += ["model.fc = torch.nn.Identity()  # features, not ImageNet logits",
              f"model.load_state_dict(torch.load({str(out)!r}))"]  # fmt: skip
    return {"torchvision": {"model": bcfg["name"], "lines": lines}, "load": "; ".join(lines)}


def example_input(run_cfg: DictConfig, batch: int = 2) -> torch.Tensor:
    size = int(run_cfg.backbone.img_size)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def onnx_export(encoder: FeatureEncoder, run_cfg: DictConfig, out: Path, opset: int) -> dict[str, Any]:
    with warnings.catch_warnings():  # the tracer's notes on Python branches and the exporter's deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder,
            (example_input(run_cfg),),
            str(out),
            dynamo=False,
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=int(opset),
        )
    call = f"onnxruntime.InferenceSession({str(out)!r}).run(['features'], {{'images': x}})[0]"
    return {"onnx": {"input": "images", "output": "features", "opset": int(opset)}, "load": call}


def torchscript_export(encoder: FeatureEncoder, run_cfg: DictConfig, out: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(encoder, (example_input(run_cfg),))
    traced.save(str(out))
    return {"torchscript": {}, "load": f"torch.jit.load({str(out)!r})(x)"}


def export(ckpt: str | Path, fmt: str, out: str | Path, opset: int = 17) -> dict[str, Any]:
    """Write the encoder of ``ckpt`` to ``out`` in ``fmt`` and ``OUT.json`` beside it; returns that record."""
    if fmt not in FORMATS:
        raise SSLabError(f"format={fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:  # torch's exporter writes through it
        raise SSLabError(
            "format=onnx needs the onnx package: pip install onnx==1.23.2 (in sslab's dev extra)"
        )
    encoder, run_cfg = load_encoder(ckpt)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "timm":
            record = timm_export(encoder, run_cfg, out)
        elif fmt == "torchvision":
            record = torchvision_export(encoder, run_cfg, out)
        elif fmt == "onnx":
            record = onnx_export(encoder, run_cfg, out, opset)
        else:
            record = torchscript_export(encoder, run_cfg, out)
    record = {
        "format": fmt,
        "file": str(out),
        "ckpt": str(ckpt),
        "method": OmegaConf.select(run_cfg, "method.name"),
        "backbone": run_cfg.backbone.name,
        "pool": encoder.pool,
        "input": input_spec(run_cfg, encoder.backbone),
        **record,
    }
    metadata_path(out).write_text(json.dumps(record, indent=2) + "\n")
    return record


def metadata_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_overrides("export", DEFAULTS, sys.argv[1:] if argv is None else argv)
        record = export(cfg.ckpt, str(cfg.format), cfg.out, int(cfg.opset))
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise  # a bug: keep its traceback
        fail(message, log_file=False)
    print(
        f"wrote {record['format']} {record['file']} ({record['backbone']} {record['input']['embed_dim']}-d "
        f"features of {record['input']['shape']} images) and {metadata_path(record['file'])}"
    )
    print(f"load: {record['load']}")


if __name__ == "__main__":
    main()
