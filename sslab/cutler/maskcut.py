"""MaskCut (Wang et al., 2023, "Cut and Learn for Unsupervised Object Detection and Instance Segmentation"),
batched over images on the device.

Per image, on the patch grid (h, w), N = h * w patches, for each of ``n_masks`` rounds:

1. features = the last ViT block's attention keys of the patch tokens (heads concatenated), L2-normalised;
   patches found in earlier rounds have their features zeroed ("painted out"), as the reference does;
2. binary affinity A_ij = 1 if cos(f_i, f_j) > tau else eps (eps = 1e-5 keeps the graph connected),
   D = diag(sum_j A_ij);
3. Normalized Cut (Shi & Malik, 2000) relaxed: the generalised eigenproblem (D - A) x = lambda D x, solved as
   the symmetric L_sym = I - D^-1/2 A D^-1/2 = U diag(lambda) U^T (``torch.linalg.eigh``, batched (B, N, N)),
   x = D^-1/2 u_2 (2nd smallest eigenvalue);
4. bipartition P = {x > mean(x)}; the reference's rule, in its order: if P holds ``corner_limit`` (3) or more
   of the grid's 4 corners (object-centric prior), the foreground is the complement of P; otherwise it is
   P when the seed argmax |x| lies in P, else the complement;
5. keep the 4-connected component of the foreground that contains the seed (argmax of x oriented towards
   the foreground), a batched flood fill;
6. rounds after the first drop a mask with IoU > 0.5 to an earlier kept mask or covering <= 1% of the
   patches; kept masks are made disjoint (earlier masks are subtracted), and empty ones are dropped.

Facts checked against facebookresearch/CutLER ``maskcut/maskcut.py`` (read for facts, code is ours). The
foreground rule is the reference's exactly, including its dependence on the eigenvector's sign: the corner
test looks only at the side x > mean, so when the seed lies on the other side and that side holds >= 3
corners, the reference still takes it (a sign-flipped eigenvector would give the other answer). Where we
differ, on purpose:
- the reference compares a new mask only with the previous round's mask and, when it drops one, repaints
  nothing, so the next round recomputes the same cut; we compare with every earlier kept mask and paint
  out every found component, so each round looks at new patches;
- the reference refines masks with a dense CRF at image resolution; we skip it: masks are upsampled from
  the patch grid with nearest interpolation (the reference's own pre-CRF upsampling).

``maskcut_numpy`` is the same algorithm one image at a time on the CPU with ``scipy.linalg.eigh(D - A, D)``
and ``scipy.ndimage.label``, as the reference runs it: the oracle in the tests and the baseline in
``bench/maskcut.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslab.errors import SSLabError

EPS = 1e-5  # affinity of dissimilar patches (the reference's eps)
CORNER_LIMIT = 3  # the reference reverses a foreground holding >= 3 of the 4 corners
DUPLICATE_IOU = 0.5  # a later mask with IoU above this to an earlier one is a duplicate
MIN_AREA = 0.01  # a later mask covering at most this share of the patches is dropped


@dataclass
class MaskCutResult:
    """``masks`` bool (B, n_masks, h, w) on the patch grid (dropped rounds are all False); ``keep`` bool
    (B, n_masks): the round produced a mask; ``eigenvalues`` (B, n_masks): each round's NCut value lambda_2;
    ``vectors`` (B, n_masks, h * w): each round's eigenvector x with the sign the foreground rule saw (the
    rule depends on it, as the reference's does; ``maskcut_numpy(orient=...)`` can replay it)."""

    masks: torch.Tensor
    keep: torch.Tensor
    eigenvalues: torch.Tensor
    vectors: torch.Tensor | None = None


# -- features -------------------------------------------------------------------------------------------
@torch.no_grad()
def patch_keys(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) attention keys of the patch tokens in the last block of a ViT backbone (all heads).

    A forward hook on the last block's ``attn.qkv`` keeps its output; the keys go through ``k_norm`` as in
    timm's ``Attention``. Prefix tokens (CLS, registers) are dropped."""
    vit = getattr(backbone, "vit", None)
    if vit is None or not hasattr(vit, "blocks") or not hasattr(vit.blocks[-1].attn, "qkv"):
        name = getattr(backbone, "name", type(backbone).__name__)
        raise SSLabError(f"MaskCut needs a ViT backbone (it cuts on attention keys); {name} has none")
    attn = vit.blocks[-1].attn
    captured: dict[str, torch.Tensor] = {}
    handle = attn.qkv.register_forward_hook(lambda _m, _i, out: captured.__setitem__("qkv", out))
    try:
        backbone.forward_tokens(x)
    finally:
        handle.remove()
    qkv = captured["qkv"]
    b, t, _ = qkv.shape
    k = qkv.reshape(b, t, 3, attn.num_heads, attn.head_dim)[:, :, 1].transpose(1, 2)  # (B, heads, T, hd)
    k = attn.k_norm(k).transpose(1, 2).reshape(b, t, -1)[:, backbone.num_prefix_tokens :]
    p = backbone.patch_size
    h, w = max(1, round(x.shape[-2] / p)), max(1, round(x.shape[-1] / p))
    if h * w != k.shape[1]:
        h = w = math.isqrt(k.shape[1])
    return k.reshape(b, h, w, -1)


# -- the steps, batched ---------------------------------------------------------------------------------
def binary_affinity(feats: torch.Tensor, tau: float, eps: float = EPS) -> torch.Tensor:
    """(B, N, C) features -> (B, N, N) affinity: 1 where the cosine similarity exceeds ``tau``, else eps."""
    f = F.normalize(feats, dim=-1)
    sim = f @ f.transpose(-2, -1)
    return torch.where(sim > tau, torch.ones_like(sim), torch.full_like(sim, eps))


def ncut_eigenvector(affinity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second smallest generalised eigenpair of (D - A) x = lambda D x, batched: (B, N) x and (B,) lambda.

    Solved as L_sym = I - D^-1/2 A D^-1/2 (same eigenvalues; x = D^-1/2 u), so one symmetric
    ``torch.linalg.eigh`` over the batch does it on the device."""
    d_inv_sqrt = affinity.sum(-1).rsqrt()
    n = affinity.shape[-1]
    lap = torch.eye(n, dtype=affinity.dtype, device=affinity.device) - (
        d_inv_sqrt.unsqueeze(-1) * affinity * d_inv_sqrt.unsqueeze(-2)
    )
    values, vectors = torch.linalg.eigh(lap)
    return vectors[..., 1] * d_inv_sqrt, values[..., 1]


def corner_indices(h: int, w: int) -> list[int]:
    """Flat indices of the 4 corners of an (h, w) grid: top-left, top-right, bottom-left, bottom-right."""
    return [0, w - 1, (h - 1) * w, h * w - 1]


def foreground_side(
    vec: torch.Tensor, h: int, w: int, corner_limit: int = CORNER_LIMIT
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) eigenvectors -> foreground (B, N) bool and seed (B,) index, by the reference's rule
    (CutLER ``maskcut/maskcut.py``, ``maskcut_forward``): P = {x > mean}; reverse when P holds
    ``corner_limit`` or more corners, else when argmax |x| is not in P; the foreground is ~P if reversed,
    else P; the seed is argmax(-x) if reversed, else argmax(x). Depends on the sign of x, as the reference."""
    part = vec > vec.mean(-1, keepdim=True)
    corners = part[:, corner_indices(h, w)].sum(-1)
    seed_in_part = part.gather(1, vec.abs().argmax(-1, keepdim=True)).squeeze(1)
    reverse = (corners >= corner_limit) | ~seed_in_part
    foreground = torch.where(reverse.unsqueeze(1), ~part, part)
    seed = torch.where(reverse, (-vec).argmax(-1), vec.argmax(-1))
    return foreground, seed


def seed_component(foreground: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool foreground, (B,) flat seed -> the seed's 4-connected component, by a batched flood
    fill (grow by one patch in the 4 directions inside the foreground until nothing changes)."""
    b, h, w = foreground.shape
    comp = torch.zeros_like(foreground)
    comp.view(b, -1)[torch.arange(b, device=seed.device), seed] = True
    comp &= foreground
    for _ in range(h * w):
        grown = comp.clone()
        grown[:, 1:] |= comp[:, :-1]
        grown[:, :-1] |= comp[:, 1:]
        grown[:, :, 1:] |= comp[:, :, :-1]
        grown[:, :, :-1] |= comp[:, :, 1:]
        grown &= foreground
        if torch.equal(grown, comp):
            break
        comp = grown
    return comp


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks over the last dimension (broadcast); 0 where both are empty."""
    inter = (a & b).sum(-1)
    union = (a | b).sum(-1)
    return inter / union.clamp_min(1)


def filter_round(
    comp: torch.Tensor,
    earlier: torch.Tensor,
    duplicate_iou: float = DUPLICATE_IOU,
    min_area: float = MIN_AREA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A later round's (B, N) component against the (B, i, N) masks kept before it (all False where a round
    was dropped) -> (mask (B, N) without the patches earlier masks claimed, keep (B,)). Dropped: a duplicate
    (IoU > ``duplicate_iou`` with an earlier mask), a mask covering <= ``min_area`` of the patches, or one
    left empty once earlier masks are subtracted."""
    duplicate = (mask_iou(earlier, comp.unsqueeze(1)) > duplicate_iou).any(1)
    small = comp.sum(-1) <= min_area * comp.shape[-1]
    out = comp & ~earlier.any(1)
    return out, out.any(-1) & ~duplicate & ~small


@torch.no_grad()
def maskcut(
    keys: torch.Tensor,
    n_masks: int = 3,
    tau: float = 0.15,
    eps: float = EPS,
    corner_limit: int = CORNER_LIMIT,
    duplicate_iou: float = DUPLICATE_IOU,
    min_area: float = MIN_AREA,
    dtype: torch.dtype = torch.float32,
) -> MaskCutResult:
    """MaskCut on (B, h, w, C) patch features (see the module docstring), all images at once."""
    if keys.dim() != 4:
        raise SSLabError(f"maskcut takes (B, h, w, C) patch features, got shape {tuple(keys.shape)}")
    b, h, w, c = keys.shape
    feats = keys.reshape(b, h * w, c).to(dtype)
    painted = torch.zeros(b, h * w, dtype=torch.bool, device=keys.device)
    kept, masks, keep, values, vectors = [], [], [], [], []  # kept: each round's whole component where kept
    for i in range(n_masks):
        affinity = binary_affinity(feats.masked_fill(painted.unsqueeze(-1), 0.0), tau, eps)
        vec, value = ncut_eigenvector(affinity)
        foreground, seed = foreground_side(vec, h, w, corner_limit)
        comp = seed_component(foreground.view(b, h, w), seed).view(b, h * w)
        if i == 0:
            out, ok = comp, comp.any(-1)
        else:
            out, ok = filter_round(comp, torch.stack(kept, 1), duplicate_iou, min_area)
        painted |= comp
        kept.append(comp & ok.unsqueeze(-1))
        masks.append(out & ok.unsqueeze(-1))
        keep.append(ok)
        values.append(value)
        vectors.append(vec)
    return MaskCutResult(
        masks=torch.stack(masks, 1).view(b, n_masks, h, w),
        keep=torch.stack(keep, 1),
        eigenvalues=torch.stack(values, 1).float(),
        vectors=torch.stack(vectors, 1).float(),
    )


def upsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) bool patch-grid masks -> (..., H, W) bool, nearest (no CRF; see the module docstring)."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    up = F.interpolate(flat, size=size, mode="nearest")
    return up.reshape(*lead, *size) > 0.5


# -- the per-image CPU version (the reference's way) ----------------------------------------------------
def maskcut_numpy(
    keys: np.ndarray,
    n_masks: int = 3,
    tau: float = 0.15,
    eps: float = EPS,
    corner_limit: int = CORNER_LIMIT,
    duplicate_iou: float = DUPLICATE_IOU,
    min_area: float = MIN_AREA,
    orient: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's (h, w, C) features -> (masks bool (n_masks, h, w), keep bool (n_masks,)) with
    ``scipy.linalg.eigh(D - A, D)`` (generalised, float64) and ``scipy.ndimage.label`` per round.

    The foreground rule depends on the eigenvector's arbitrary sign (as the reference's); ``orient``
    (n_masks, h * w), e.g. ``MaskCutResult.vectors`` of another solver, flips round i's vector to point the
    same way as ``orient[i]``, so two solvers can be compared on the same decision."""
    from scipy import linalg, ndimage

    h, w, c = keys.shape
    feats = keys.reshape(h * w, c).astype(np.float64)
    painted = np.zeros(h * w, dtype=bool)
    kept, masks, keep = [], [], []
    for i in range(n_masks):
        f = np.where(painted[:, None], 0.0, feats)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        affinity = np.where(f @ f.T > tau, 1.0, eps)
        degree = np.diag(affinity.sum(1))
        _, vectors = linalg.eigh(degree - affinity, degree, subset_by_index=[1, 2])  # as the reference
        vec = vectors[:, 0]
        if orient is not None and float(vec @ np.asarray(orient[i], dtype=np.float64)) < 0:
            vec = -vec
        part = vec > vec.mean()
        reverse = part[corner_indices(h, w)].sum() >= corner_limit or not part[np.argmax(np.abs(vec))]
        foreground = ~part if reverse else part
        seed = int(np.argmax(-vec if reverse else vec))
        labels, _ = ndimage.label(foreground.reshape(h, w))  # 4-connectivity (the default cross)
        label = labels.reshape(-1)[seed]
        comp = (labels.reshape(-1) == label) & (label > 0)
        ok = bool(comp.any())
        out = comp
        if i > 0:
            for prev in kept:
                union = (prev | comp).sum()
                if union and (prev & comp).sum() / union > duplicate_iou:
                    ok = False
            if comp.sum() <= min_area * h * w:
                ok = False
            out = comp & ~np.any(kept, axis=0)
            ok = ok and bool(out.any())
        painted |= comp
        kept.append(comp & ok)
        masks.append(out & ok)
        keep.append(ok)
    return np.stack(masks).reshape(n_masks, h, w), np.array(keep)
