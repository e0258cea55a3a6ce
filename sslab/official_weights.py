"""Official checkpoint files (DINO, DINOv2, MAE, timm) loaded into sslab's backbones.

Each reference names and places the same ViT tensors a little differently, and ours wraps timm under
``vit.`` with register tokens inside timm's position table (cls, registers, patches). What differs:

- **DINO** (``dino_vits16_pretrain.pth``): a flat state dict in timm's names (``cls_token``, ``pos_embed``
  with a cls entry, ``blocks.N.attn.qkv``, ``norm``). The full training checkpoint keeps the teacher under
  ``teacher`` with ``backbone.`` / ``head.`` prefixes; its head is dropped here (``dino_head_state`` maps it
  to ``sslab.modules.heads.DINOHead`` where a head is wanted).
- **DINOv2** (torch hub ``*_pretrain.pth``): ``register_tokens`` (timm: ``reg_token``) that have no entry in
  ``pos_embed`` (registers go in after the position embedding is added), a ``mask_token`` of shape (1, D)
  (ours: (1, 1, 1, D)), LayerScale as ``blocks.N.ls1.gamma`` / ``ls2.gamma`` (timm's ``LayerScale`` has the
  same parameter name, so the backbone needs ``init_values`` set to have it), blocks in chunks
  (``blocks.C.N.``) in training checkpoints, and a 37 x 37 grid (518 px at patch 14).
- **MAE** (``mae_pretrain_vit_*.pth``): the encoder in timm's names under ``model``, beside the decoder
  (``decoder_*``) and the decoder's ``mask_token``, both dropped.
- **timm**: its own names; a classifier ``head`` is dropped; ``pos_embed`` holds cls + registers + patches,
  or only patches (``no_embed_class`` models such as timm's DINOv2 ports).

Position embeddings are resized to the configured grid (bicubic on the patch part, prefix entries kept;
register entries that the file lacks are zero, which is what "no position embedding" means in our layout).
Keys are compared with the backbone's own: missing and unexpected ones are listed in one warning line, a
structural mismatch (shapes, LayerScale, registers) or a file with nothing that fits is an ``SSLabError``.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslab.errors import SSLabError

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers around the saved module
HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")
CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2 BlockChunk: blocks.<chunk>.<global index>.
LAYER_SCALE = re.compile(r"\.ls\d\.gamma$")
BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")


# -- reading --------------------------------------------------------------------------------------------------
def read_weights_file(path: str | Path, option: str = "init_from") -> dict[str, Any]:
    """A checkpoint file as a dict on the CPU. Official files load with ``weights_only=True`` where they hold
    only tensors; files that also pickle Python objects (DINO's full checkpoint stores its argparse ``args``;
    train.py's ``.ckpt`` its config) are unpickled in full, which runs code from the file: it is the user's own
    file, named on the command line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SSLabError(f"{option}={path}: no such file; pass a train.py .ckpt or an official weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif path.suffix == ".ckpt":  # train.py's own checkpoints (and Lightning's) pickle their config
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                log.info("%s=%s holds Python objects besides tensors; unpickling it in full", option, path)
                obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SSLabError(f"{option}={path} could not be read ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise SSLabError(f"{option}={path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return dict(obj)


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for prefix in WRAPPER_PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_dinov2(state: Mapping[str, torch.Tensor]) -> bool:
    """DINOv2's own ViT: registers named ``register_tokens`` or a (1, D) mask token (timm has neither)."""
    mask = state.get("mask_token")
    return "register_tokens" in state or (mask is not None and mask.ndim == 2)


def split_checkpoint(obj: Mapping[str, Any]) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(layout, encoder tensors in the reference's names, tensors dropped on purpose) of an official file.

    Layouts: ``dino_full`` / ``dinov2_train`` (``teacher`` key), ``mae`` (``model`` key), ``dinov2`` (hub),
    ``dino`` (flat, timm names) and ``timm`` (flat, with timm-only keys such as ``reg_token`` or ``head``)."""
    if isinstance(obj.get("teacher"), Mapping):
        teacher = _strip_wrappers(_tensors(obj["teacher"]))
        encoder = {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}
        dropped = {k: v for k, v in teacher.items() if not k.startswith("backbone.")}
        return ("dinov2_train" if _is_dinov2(encoder) else "dino_full"), encoder, dropped
    if isinstance(obj.get("model"), Mapping):
        state = _strip_wrappers(_tensors(obj["model"]))
        # MAE's mask_token is the decoder's input token (decoder width), not an encoder parameter
        is_decoder = lambda k: k.startswith("decoder_") or k == "mask_token"  # noqa: E731
        encoder = {k: v for k, v in state.items() if not is_decoder(k)}
        return "mae", encoder, {k: v for k, v in state.items() if is_decoder(k)}
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    state = _strip_wrappers(_tensors(state))
    if _is_dinov2(state):
        return "dinov2", state, {}
    timm_only = any(k == "reg_token" or k.startswith(("head.", "fc_norm.")) for k in state)
    return ("timm" if timm_only else "dino"), state, {}


# -- position embeddings ----------------------------------------------------------------------------------
def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def resize_grid(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, M*M, D) position embeddings of a square grid -> (1, h*w, D), bicubic (as DINO, DINOv2 and timm
    interpolate); returned as is when the grid already matches."""
    m = _square_side(patch_pos.shape[1])
    if m is None:
        raise SSLabError(f"pos_embed has {patch_pos.shape[1]} patch entries, not a square grid")
    if (m, m) == tuple(grid):
        return patch_pos
    d = patch_pos.shape[-1]
    x = patch_pos.float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(patch_pos.dtype)


def adapt_pos_embed(
    pos: torch.Tensor, layout: str, state: Mapping[str, torch.Tensor], vit: nn.Module
) -> tuple[torch.Tensor, str]:
    """The file's ``pos_embed`` in the layout of ``vit`` (a timm VisionTransformer): prefix entries for cls
    and registers (zero where the file has none), then the patch grid resized to ``vit``'s. Returns the table
    and a few words on what was done."""
    n_cls = 1 if "cls_token" in state else 0
    reg = state.get("reg_token", state.get("register_tokens"))
    n_reg = 0 if reg is None else reg.shape[1]
    # which leading entries of the file's table belong to cls / registers, tried in order
    candidates = [(n_cls, 0), (0, 0)] if layout.startswith("dinov2") else [(n_cls, n_reg), (n_cls, 0), (0, 0)]
    total = pos.shape[1]
    for cls_pos, reg_pos in candidates:
        if _square_side(total - cls_pos - reg_pos):
            break
    else:
        raise SSLabError(f"pos_embed with {total} entries is not prefix tokens + a square patch grid")
    prefix = cls_pos + reg_pos
    grid = tuple(vit.patch_embed.grid_size)
    patches = resize_grid(pos[:, prefix:], grid)
    d = pos.shape[-1]
    parts = []
    if not getattr(vit, "no_embed_class", False):
        if vit.cls_token is not None:
            parts.append(pos[:, :1] if cls_pos else pos.new_zeros(1, 1, d))
        n_reg_own = int(getattr(vit, "num_reg_tokens", 0))
        if n_reg_own:
            same = reg_pos == n_reg_own
            parts.append(pos[:, cls_pos:prefix] if same else pos.new_zeros(1, n_reg_own, d))
    elif cls_pos:
        raise SSLabError(
            "this backbone keeps no position entry for the cls token (no_embed_class); not supported"
        )
    m = _square_side(total - prefix)
    what = f"pos_embed {m}x{m} -> {grid[0]}x{grid[1]}" + (" (bicubic)" if (m, m) != grid else "")
    return torch.cat([*parts, patches], dim=1), what


# -- mapping onto our backbones ------------------------------------------------------------------------------
def vit_names(encoder: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference names -> ours (relative to ``ViTBackbone``); ``pos_embed`` still in the file's layout."""
    out: dict[str, torch.Tensor] = {}
    for k, v in encoder.items():
        k = CHUNKED_BLOCK.sub(r"blocks.\1.", k)
        if k == "register_tokens":
            k = "reg_token"
        if k == "mask_token":  # DINOv2's (1, D) token for masked patches; ours is (1, 1, 1, D)
            out["mask_token"] = v.reshape(1, 1, 1, -1)
            continue
        out[f"vit.{k}"] = v
    return out


def _group(keys: list[str], limit: int = 8) -> str:
    """Keys in one short phrase, block indices folded: ``vit.blocks.{2-11}.* (12 each)``,
    ``vit.blocks.{0-1}.{ls1.gamma,ls2.gamma}``."""
    plain: list[str] = []
    tails: dict[tuple[str, str], set[int]] = {}  # (text before the index, text after) -> block indices
    for k in keys:
        m = BLOCK_INDEX.search(k)
        if m is None:
            plain.append(k)
            continue
        tails.setdefault((k[: m.start()], k[m.end() :]), set()).add(int(m.group(1)))
    by_blocks: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for (head, tail), idx in tails.items():
        by_blocks.setdefault((head, tuple(sorted(idx))), []).append(tail)
    parts = list(plain)
    for (head, idx), names in by_blocks.items():
        contiguous = idx == tuple(range(idx[0], idx[-1] + 1))
        blocks = (
            str(idx[0]) if len(idx) == 1 else f"{idx[0]}-{idx[-1]}" if contiguous else ",".join(map(str, idx))
        )
        what = f"* ({len(names)} each)" if len(names) > 3 else "{" + ",".join(sorted(names)) + "}"
        parts.append(f"{head}blocks.{{{blocks}}}.{what}")
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def load_official_weights(
    backbone: nn.Module, obj: Mapping[str, Any], source: str | Path, option: str = "init_from"
) -> dict[str, Any]:
    """Load an official checkpoint (already read, see ``read_weights_file``) into ``backbone`` (a ViT or
    CNN backbone of ``sslab.backbones``). Returns what happened: layout, loaded / dropped / unexpected /
    missing keys."""
    from sslab.backbones.cnn import CNNBackbone
    from sslab.backbones.vit import ViTBackbone

    layout, encoder, dropped = split_checkpoint(obj)
    where = f"{option}={source} ({layout} layout)"
    notes: list[str] = []
    if isinstance(backbone, ViTBackbone):
        mapped = vit_names(encoder)
        dropped.update({k[4:]: v for k, v in list(mapped.items()) if k.startswith("vit.head.")})
        mapped = {k: v for k, v in mapped.items() if not k.startswith("vit.head.")}
        if "vit.pos_embed" in mapped and backbone.vit.pos_embed is not None:
            try:
                mapped["vit.pos_embed"], what = adapt_pos_embed(
                    mapped["vit.pos_embed"], layout, encoder, backbone.vit
                )
            except SSLabError as e:
                raise SSLabError(f"{where}: {e}") from e
            notes.append(what)
        own_keys_only = {"mask_token"}  # ours (iBOT/DINOv2 masking); most files have no counterpart
    elif isinstance(backbone, CNNBackbone):
        layout = "timm/torchvision CNN" if layout in ("dino", "timm") else layout
        mapped = {f"net.{k}": v for k, v in encoder.items()}
        classifier = [k for k in mapped if k.startswith(("net.fc.", "net.head.fc."))]
        dropped.update({k[4:]: mapped.pop(k) for k in classifier})
        own_keys_only = set()
    else:
        raise SSLabError(f"{option}={source}: official weights load into sslab ViT or CNN backbones only")

    own = backbone.state_dict()
    patch = "vit.patch_embed.proj.weight"
    if patch in mapped and patch in own and mapped[patch].shape[1] != own[patch].shape[1] == 1:
        # a grey-scale backbone: summing the RGB kernels gives the same output on a grey image repeated 3x
        mapped[patch] = mapped[patch].sum(dim=1, keepdim=True)
        notes.append(
            f"patch kernel summed over its {encoder['patch_embed.proj.weight'].shape[1]} input channels"
        )
    unexpected = sorted(k for k in mapped if k not in own)
    mismatched = [k for k in mapped if k in own and mapped[k].shape != own[k].shape]
    missing = sorted(k for k in own if k not in mapped and k not in own_keys_only)
    name = getattr(backbone, "name", type(backbone).__name__)
    where = f"{option}={source} ({layout} layout)"  # the CNN branch renames the layout
    if any(LAYER_SCALE.search(k) for k in unexpected):
        raise SSLabError(
            f"{where}: its blocks have LayerScale (ls1.gamma, ls2.gamma), backbone={name} has none; "
            "add ++backbone.init_values=1.0 (DINOv2's value; the file sets the gammas)"
        )
    if "vit.reg_token" in mapped and ("vit.reg_token" in unexpected or "vit.reg_token" in mismatched):
        raise SSLabError(
            f"{where}: it has {mapped['vit.reg_token'].shape[1]} register tokens; "
            f"set backbone.num_registers={mapped['vit.reg_token'].shape[1]}"
        )
    if mismatched:
        shapes = ", ".join(f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3])
        raise SSLabError(
            f"{where} does not fit backbone={name}: {shapes}; choose the backbone, patch size "
            "(backbone.patch_size / data.patch_size) and width of the file's model"
        )
    loadable = {k: v for k, v in mapped.items() if k in own}
    if not loadable:
        raise SSLabError(
            f"{where}: none of its {len(encoder)} tensors fits backbone={name} "
            f"(e.g. {', '.join(list(encoder)[:3])}); pass a DINO, DINOv2, MAE or timm checkpoint of this model"
        )
    backbone.load_state_dict(loadable, strict=False)
    if dropped:
        tops: dict[str, int] = {}
        for k in dropped:
            top = k.split(".")[0]
            tops[top] = tops.get(top, 0) + 1
        what = ", ".join(f"{t}.* ({n})" if n > 1 else t for t, n in tops.items())
        notes.append(f"dropped {len(dropped)} head/decoder tensors: {what}")
    log.info("%s: loaded %d tensors into backbone=%s; %s", where, len(loadable), name, "; ".join(notes))
    if unexpected or missing:
        log.warning(
            "%s: %s%s%s",
            where,
            f"not in backbone={name}, ignored: {_group(unexpected)}" if unexpected else "",
            "; " if unexpected and missing else "",
            f"not in the file, left at init: {_group(missing)}" if missing else "",
        )
    return {
        "layout": layout,
        "loaded": sorted(loadable),
        "dropped": sorted(dropped),
        "unexpected": unexpected,
        "missing": missing,
        "notes": notes,
    }


# -- the DINO head -------------------------------------------------------------------------------------------
def dino_head_state(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The projection head of an official DINO (``head.``) or DINOv2 (``dino_head.``) training checkpoint,
    in the names of ``sslab.modules.heads.DINOHead``. The reference uses ``nn.utils.weight_norm``, which keeps
    the last layer as ``weight_g`` / ``weight_v``; ours uses the parametrization API, whose names are
    ``parametrizations.weight.original0`` (g) and ``original1`` (v)."""
    teacher = obj.get("teacher")
    if not isinstance(teacher, Mapping):
        raise SSLabError(
            "no 'teacher' in this checkpoint; only DINO/DINOv2 training checkpoints carry a head"
        )
    state = _strip_wrappers(_tensors(teacher))
    prefix = next((p for p in ("head.", "dino_head.") if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise SSLabError("the checkpoint's teacher has no head.* or dino_head.* tensors")
    renames = {
        "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
        "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
    }
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            k = k[len(prefix) :]
            out[renames.get(k, k)] = v
    return out


def load_dino_head(head: nn.Module, obj: Mapping[str, Any]) -> None:
    """Load ``dino_head_state(obj)`` into a ``DINOHead``; every key must match (a head is small and its
    layout, e.g. BatchNorm in the MLP, must agree with the file's)."""
    state = dino_head_state(obj)
    own = head.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or mismatched:
        raise SSLabError(
            f"the checkpoint's DINO head does not fit: unexpected {unexpected[:3]}, missing {missing[:3]}, "
            f"shape mismatch {mismatched[:3]}; match method.out_dim / hidden_dim / bottleneck_dim / use_bn_in_head"
        )
    head.load_state_dict(state)
