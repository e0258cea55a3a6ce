"""Oracle tests for the components lightly does not have: each is checked against the formula written out by
hand, independently of our code, from the paper and the official file named in the test's docstring (read for
the facts; nothing is imported from those projects). Deterministic formulas are compared on shared tensors at
1e-5; the block-masking generator, which is random, is compared through statistics whose expected values
follow from its formula, with tolerances of four standard errors.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf
from scipy import linalg, ndimage

from sslab.build import build_backbone
from sslab.cutler.detector import droploss_keep
from sslab.cutler.droploss import droploss_classification, max_iou_to_gt
from sslab.cutler.maskcut import binary_affinity, foreground_side, maskcut, ncut_eigenvector
from sslab.methods.base import DataSpec
from sslab.modules.block_masking import BlockMasking, block_masks, mask_targets
from sslab.modules.clip_loss import LogitScale, clip_loss, symmetric_info_nce
from sslab.modules.dino_loss import sinkhorn_knopp
from sslab.modules.temporal_order import TemporalOrderHead, temporal_order_loss
from tests.conftest import CONF

TOL = 1e-5


# -- Sinkhorn-Knopp ---------------------------------------------------------------------------------------
def reference_sinkhorn(logits: np.ndarray, temperature: float, n_iter: int) -> np.ndarray:
    """facebookresearch/dinov2 ``dinov2/loss/dino_clstoken_loss.py`` (sinkhorn_knopp_teacher), one process:
    Q = exp(t / T)^T (K x B); Q /= sum(Q); n times: rows to 1/K (divide by the row sums, then by K), columns
    to 1/B (divide by the column sums, then by B); finally Q * B, returned as B x K."""
    q = np.exp(logits.astype(np.float64) / temperature).T
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


@pytest.mark.parametrize("n_iter", [1, 3, 10])
def test_sinkhorn_knopp_equals_the_dinov2_formula(n_iter):
    """DINOv2 (Oquab et al. 2024) / SwAV (Caron et al. 2020) Sinkhorn-Knopp teacher targets;
    reference: facebookresearch/dinov2 ``dinov2/loss/dino_clstoken_loss.py``, sinkhorn_knopp_teacher."""
    g = torch.Generator().manual_seed(0)
    logits = 0.5 * torch.randn(24, 40, generator=g)  # B = 24 samples, K = 40 prototypes
    ours = sinkhorn_knopp(logits, temperature=0.07, n_iter=n_iter)
    ref = reference_sinkhorn(logits.numpy(), 0.07, n_iter)
    assert np.allclose(ours.numpy(), ref, rtol=TOL, atol=1e-9)  # elementwise, relative
    assert np.allclose(ref.sum(axis=1), 1.0)  # the oracle's own invariant: one distribution per sample
    # negative control: one iteration fewer is a different matrix
    fewer = reference_sinkhorn(logits.numpy(), 0.07, n_iter - 1) if n_iter > 1 else logits.softmax(1).numpy()
    assert not np.allclose(ours.numpy(), fewer, rtol=1e-3, atol=1e-3 * ref.max())


# -- block masking ----------------------------------------------------------------------------------------
def reference_block_count(
    height: int,
    width: int,
    budget: float,
    rng: random.Random,
    min_area: float,
    max_block: float | None = None,
    min_aspect: float = 0.3,
) -> int:
    """Patches masked by one call of the BEiT-style generator as bytedance/ibot ``loader.py``
    (ImageFolderMask.__getitem__, pred_shape='block') and facebookresearch/dinov2 ``dinov2/data/masking.py``
    (MaskingGenerator) write it: while count < budget, up to 10 draws of area ~ U(min_area, remaining
    (capped at max_block)), aspect = exp(U(log a, -log a)), h = round(sqrt(area * aspect)),
    w = round(sqrt(area / aspect)), kept if h < H, w < W and it adds between 1 and remaining new patches; stop
    after 10 failed draws."""
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    mask = [[False] * width for _ in range(height)]
    count = 0
    while count < budget:
        remaining = budget - count
        if max_block is not None:
            remaining = min(remaining, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_area, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if h < height and w < width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
                new = sum(not mask[i][j] for i, j in cells)
                if 0 < new <= remaining:
                    for i, j in cells:
                        mask[i][j] = True
                    added = new
            if added:
                break
        if not added:
            break
        count += added
    return count


def test_ibot_block_masking_statistics_follow_the_formula():
    """iBOT (Zhou et al. 2022, Sec. 3 and App.; bytedance/ibot ``loader.py`` ImageFolderMask with
    pred_ratio [0, 0.3], pred_ratio_var [0, 0.2]): half of the crops masked, ratio r ~ U(0.1, 0.5), float
    budget r * H * W, never exceeded. Expected numbers from the formula: share masked = 0.5 (binomial SE
    sqrt(0.25 / B)); mean r over masked crops = 0.3 (SE 0.4 / sqrt(12 n)); per masked crop, the patches
    missing from the budget (a last block that does not fit) have the same mean as the reference generator
    run on the same budgets."""
    h = w = 14
    n = h * w
    g = torch.Generator().manual_seed(0)
    batch = 4000
    targets = mask_targets(batch, n, probability=0.5, ratio=(0.1, 0.5), generator=g)
    masked = targets > 0
    share = masked.float().mean().item()
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / batch)
    r = targets[masked] / n
    assert r.min() >= 0.1 and r.max() <= 0.5
    assert abs(r.mean().item() - 0.3) < 4 * 0.4 / math.sqrt(12 * len(r))
    assert not torch.equal(targets[masked], targets[masked].floor())  # the float budget (iBOT), not int()

    counts = block_masks(targets, h, w, generator=g).flatten(1).sum(1).double()
    assert (counts <= targets.double()).all() and (counts[~masked] == 0).all()
    rng = random.Random(0)
    min_area = (min(h, w) // 3) ** 2  # iBOT: low = (min(H, W) // 3) ** 2
    ref = torch.tensor(
        [reference_block_count(h, w, b, rng, min_area) for b in targets[masked].tolist()], dtype=torch.float64
    )
    short_ours, short_ref = targets[masked].double() - counts[masked], targets[masked].double() - ref
    se = math.sqrt((short_ours.var() + short_ref.var()).item() / len(ref))
    assert abs(short_ours.mean().item() - short_ref.mean().item()) < 4 * se
    assert abs(counts[masked].mean().item() - ref.mean().item()) < 4 * se


def test_dinov2_block_masking_statistics_follow_the_formula():
    """DINOv2 (facebookresearch/dinov2 ``dinov2/data/collate.py`` collate_data_and_cast and
    ``dinov2/data/masking.py``): exactly int(B * 0.5) crops masked, the i-th with r ~ U(stratum i of
    linspace(0.1, 0.5, n + 1)), budget int(N * r), blocks of at least 4 and at most N / 2 patches."""
    h = w = 16
    n = h * w
    batch = 64
    masking = BlockMasking(
        probability=0.5,
        ratio=(0.1, 0.5),
        min_block_patches=4,
        max_block_fraction=0.5,
        stratified=True,
        integer_budget=True,
    )
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(40):
        state = g.get_state()
        targets = mask_targets(batch, n, 0.5, (0.1, 0.5), stratified=True, generator=g, integer_budget=True)
        g.set_state(state)
        masks = masking(batch, h, w, generator=g)
        counts = masks.flatten(1).sum(1)
        assert int((targets > 0).sum()) == batch // 2  # exactly int(B * p) crops masked
        assert (counts <= targets).all() and (counts[targets == 0] == 0).all()
        edges = torch.linspace(0.1, 0.5, batch // 2 + 1)
        lower = (n * edges[:-1]).floor()
        upper = (n * edges[1:]).floor()
        budgets = targets[targets > 0].sort().values
        assert (budgets >= lower).all() and (budgets <= upper).all()  # one budget per stratum
        rows.append((targets, counts))
    targets = torch.cat([t for t, _ in rows]).double()
    counts = torch.cat([c for _, c in rows]).double()
    on = targets > 0
    rng = random.Random(1)
    ref = torch.tensor(
        [reference_block_count(h, w, b, rng, 4, max_block=0.5 * n) for b in targets[on].tolist()],
        dtype=torch.float64,
    )
    short_ours, short_ref = targets[on] - counts[on], targets[on] - ref
    se = math.sqrt((short_ours.var() + short_ref.var()).item() / len(ref))
    assert abs(short_ours.mean().item() - short_ref.mean().item()) < 4 * se + 1e-9


# -- DropLoss ---------------------------------------------------------------------------------------------
def reference_iou(a: list[float], b: list[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, 0 without overlap (CutLER ``cutler/structures/boxes.py``)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    if inter <= 0:
        return 0.0
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def reference_droploss(
    logits: list[list[float]],
    labels: list[int],
    regions: list[list[float]],
    image: list[int],
    gt: list[list[list[float]]],
    tau: float,
) -> tuple[list[float], list[float], float]:
    """CutLER (Wang et al. 2023, Eq. 1) as facebookresearch/CutLER ``cutler/modeling/roi_heads/roi_heads.py``
    (_forward_box) and ``fast_rcnn.py`` (losses) compute it: iou_max of each region with its own image's
    pseudo-boxes; weight = 1 - [iou_max <= tau]; loss = mean over all regions of weight * CE. If an image has
    no pseudo-box (no_gt_found) every weight is 1 (plain loss)."""
    iou = [
        max((reference_iou(r, g) for g in gt[i]), default=0.0) for r, i in zip(regions, image, strict=True)
    ]
    no_gt = any(len(g) == 0 for g in gt)
    weights = [1.0 if no_gt else 1.0 - float(v <= tau) for v in iou]
    ce = []
    for row, y in zip(logits, labels, strict=True):
        top = max(row)
        ce.append(top + math.log(sum(math.exp(v - top) for v in row)) - row[y])
    return iou, weights, sum(w * c for w, c in zip(weights, ce, strict=True)) / len(ce)


def random_boxes(n: int, g: torch.Generator, size: float = 64.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = 2 + torch.rand(n, 2, generator=g) * size * 0.4
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("empty_image", [False, True])
def test_droploss_equals_the_cutler_formula(empty_image):
    """DropLoss against facebookresearch/CutLER ``cutler/modeling/roi_heads/roi_heads.py`` (weights from the
    per-image max IoU, <= 0.01 dropped, the no-pseudo-box fallback) and ``fast_rcnn.py`` (weighted CE
    averaged over all regions)."""
    g = torch.Generator().manual_seed(3 + empty_image)
    gt = [random_boxes(3, g), random_boxes(1, g), random_boxes(0 if empty_image else 2, g)]
    image = torch.randint(0, 3, (60,), generator=g)
    regions = random_boxes(60, g)
    for i in range(0, 60, 3):  # some regions near a box of their image, some barely touching, some far
        own = gt[int(image[i])]
        if len(own):
            regions[i] = own[i % len(own)] + torch.randn(4, generator=g) * (1 + i % 7)
    regions[:, 2:] = torch.maximum(regions[:, 2:], regions[:, :2] + 0.5)
    logits = torch.randn(60, 2, generator=g)
    labels = torch.randint(0, 2, (60,), generator=g)

    iou, weights, loss = reference_droploss(
        logits.tolist(), labels.tolist(), regions.tolist(), image.tolist(), [b.tolist() for b in gt], 0.01
    )
    keep = droploss_keep(regions, image, gt, 0.01)
    assert keep.tolist() == [w == 1.0 for w in weights]
    assert droploss_classification(logits, labels, keep).item() == pytest.approx(loss, rel=TOL, abs=TOL)
    if not empty_image:
        assert torch.allclose(max_iou_to_gt(regions, image, gt), torch.tensor(iou), atol=TOL)
        assert 0 < sum(weights) < len(weights)  # the case discriminates: some regions dropped, some kept
    else:
        assert all(w == 1.0 for w in weights)


# -- MaskCut ----------------------------------------------------------------------------------------------
def reference_maskcut_round(feats: np.ndarray, h: int, w: int, tau: float, orient: np.ndarray):
    """One MaskCut round as facebookresearch/CutLER ``maskcut/maskcut.py`` (maskcut_forward) computes it:
    A = 1 where cos > tau else 1e-5, D = diag(row sums), (D - A) x = lambda D x (2nd smallest, scipy),
    bipartition x > mean, reverse if >= 3 corners in it else if argmax |x| is outside it, seed = argmax(+-x),
    the seed's connected component. ``orient`` fixes x's arbitrary sign (the rule depends on it)."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    a = f @ f.T > tau
    a = np.where(a, 1.0, 1e-5)
    d = np.diag(a.sum(axis=1))
    values, vectors = linalg.eigh(d - a, d)
    x = vectors[:, 1]
    if x @ orient < 0:
        x = -x
    part = x > x.sum() / len(x)
    grid = part.reshape(h, w)
    corners = int(grid[0, 0]) + int(grid[0, -1]) + int(grid[-1, 0]) + int(grid[-1, -1])
    reverse = corners >= 3 or not part[np.argmax(np.abs(x))]
    fg = ~part if reverse else part
    seed = int(np.argmax(-x if reverse else x))
    labels, _ = ndimage.label(fg.reshape(h, w))
    comp = labels == labels.reshape(-1)[seed]
    return values[1], x, fg, seed, comp


def test_maskcut_round_equals_the_generalised_eigenproblem_and_reference_rule():
    """MaskCut (Wang et al. 2023, Sec. 3.1; NCut of Shi & Malik 2000) on a tiny 5 x 6 patch grid: eigenvalue
    and eigenvector of (D - A) x = lambda D x against scipy's generalised solver at 1e-5, and the
    foreground / seed / component against facebookresearch/CutLER ``maskcut/maskcut.py``."""
    h, w = 5, 6
    g = np.random.default_rng(0)
    feats = np.zeros((h * w, 6))
    feats[:, 0] = 1.0
    obj = np.zeros((h, w), dtype=bool)
    obj[1:4, 2:5] = True
    feats[obj.reshape(-1)] = [0.2, 1.0, 0.0, 0.0, 0.0, 0.0]
    feats += 0.25 * g.standard_normal(feats.shape)
    keys = torch.from_numpy(feats)

    vec, value = ncut_eigenvector(binary_affinity(keys.unsqueeze(0), tau=0.15))
    ref_value, ref_x, ref_fg, ref_seed, ref_comp = reference_maskcut_round(feats, h, w, 0.15, vec[0].numpy())
    assert value[0].item() == pytest.approx(ref_value, rel=TOL, abs=1e-9)
    assert np.allclose(vec[0].numpy(), ref_x, atol=TOL)
    fg, seed = foreground_side(vec, h, w)
    assert np.array_equal(fg[0].numpy(), ref_fg) and seed.item() == ref_seed
    assert ref_comp.sum() > 0
    # the float32 batched run (as it runs in the pipeline): its solver picks its own sign, so the reference
    # rule is applied to the scipy vector oriented like it
    result = maskcut(keys.reshape(1, h, w, -1), n_masks=1, tau=0.15)
    run_x = result.vectors[0, 0].numpy()
    _, ref_x, _, _, ref_comp = reference_maskcut_round(feats, h, w, 0.15, run_x.astype(np.float64))
    assert np.allclose(run_x, ref_x, atol=TOL)
    assert np.array_equal(result.masks[0, 0].numpy(), ref_comp)


# -- TOV-VICReg temporal order head -----------------------------------------------------------------------
# mgoulao/TOV-VICReg tov_vicreg/models/builder.py: the six arrangements, in its order
REFERENCE_COMBINATIONS = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]


def reference_temporal_loss(feats: torch.Tensor, labels: list[int], weight: torch.Tensor, bias: torch.Tensor):
    """builder.py's temporal term: the (o_t, o_{t-1}, o_{t+1}) features placed by combination k
    (slot j gets feature combination[k][j]), concatenated, Linear(3D -> 1), BCE with logits (mean) against
    "shuffled" = [k != 0]."""
    total = 0.0
    for b, k in enumerate(labels):
        x = torch.cat([feats[b, i] for i in REFERENCE_COMBINATIONS[k]]).double()
        logit = float((x @ weight.double() + bias.double()).detach())
        target = 0.0 if k == 0 else 1.0
        total += max(logit, 0.0) - logit * target + math.log1p(math.exp(-abs(logit)))
    return total / len(labels)


def test_temporal_order_loss_equals_the_tov_vicreg_builder():
    """TOV-VICReg (Goulao & Oliveira 2022) order verification vs mgoulao/TOV-VICReg
    ``tov_vicreg/models/builder.py``. The official target is "shuffled" (1 for the 5 wrong orders); ours is
    "true order", the complement, which is the same loss for the head with negated weights:
    BCE(l, y) = BCE(-l, 1 - y). The oracle gets the negated head."""
    torch.manual_seed(0)
    b, d = 48, 10
    feats = torch.randn(b, 3, d)
    orders = torch.arange(b) % 6
    head = TemporalOrderHead(d)
    loss, _ = temporal_order_loss(head, feats, orders)
    ref = reference_temporal_loss(
        feats, orders.tolist(), -head.linear.weight[0].detach(), -head.linear.bias[0]
    )
    assert loss.item() == pytest.approx(ref, rel=TOL)
    # negative control: the head without negation scores another loss (the targets are not symmetric)
    plain = reference_temporal_loss(
        feats, orders.tolist(), head.linear.weight[0].detach(), head.linear.bias[0]
    )
    assert abs(plain - ref) > 1e-3


def test_tov_vicreg_step_equals_the_official_forward(monkeypatch):
    """The whole TOV-VICReg loss from conf/method/tov_vicreg.yaml vs mgoulao/TOV-VICReg
    ``tov_vicreg/models/builder.py`` forward: backbone per image, expander per view of o_t (BatchNorm
    statistics per view), 25 MSE + 25 (mean relu(1 - std_x) + mean relu(1 - std_y)) / 2 + off-diagonal
    covariance^2 / D of each view + 1.0 x temporal BCE, with the orders fixed on both sides."""
    tiny = ["backbone=vit_t", "++backbone.depth=1", "++backbone.embed_dim=32", "++backbone.num_heads=2"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["method=tov_vicreg", *tiny, "method.projector_dims=[64,64,32]"])
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    cls = get_class(method_cfg.pop("_target_"))
    method_cfg.pop("name")
    spec = DataSpec(cfg.data.image_size, cfg.data.local_crop_size, tuple(cfg.data.mean), tuple(cfg.data.std))
    method = cls(backbone=build_backbone(cfg), data=spec, **method_cfg)
    assert (method.sim_coeff, method.std_coeff, method.cov_coeff, method.temporal_coeff) == (25, 25, 1, 1)
    method.train()
    method.backbone.eval()  # deterministic ViT; the expander's BatchNorm stays in training mode

    g = torch.Generator().manual_seed(0)
    n = 12
    v1, v2, prev, nxt = (s + torch.randn(n, 3, 28, 28, generator=g) for s in (0.0, 1.0, -0.5, 0.5))
    orders = torch.arange(n) % 6
    monkeypatch.setattr("sslab.methods.tov_vicreg.sample_orders", lambda *a, **k: orders)
    out = method.step({"views": {"views": (v1, v2), "adjacent": (prev, nxt)}})

    with torch.no_grad():
        rx, ry, rz, rw = (method.backbone(v) for v in (v1, v2, prev, nxt))
        x, y = method.projector(rx).double(), method.projector(ry).double()
        dim = x.shape[1]
        invariance = ((x - y) ** 2).mean()
        x, y = x - x.mean(0), y - y.mean(0)
        variance = sum(torch.clamp(1 - torch.sqrt(v.var(0) + 1e-4), min=0).mean() / 2 for v in (x, y))
        off = ~torch.eye(dim, dtype=torch.bool)
        covariance = sum(((v.T @ v / (n - 1))[off] ** 2).sum() / dim for v in (x, y))
        temporal = reference_temporal_loss(
            torch.stack([rx, rz, rw], 1),
            orders.tolist(),
            -method.order_head.linear.weight[0],
            -method.order_head.linear.bias[0],
        )
        expected = 25 * invariance + 25 * variance + covariance + temporal
    assert out["logs"]["temporal"].item() == pytest.approx(temporal, rel=TOL)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=TOL)


# -- CLIP loss --------------------------------------------------------------------------------------------
def reference_clip_loss(image: np.ndarray, text: np.ndarray, scale: float) -> float:
    """Radford et al. 2021 (CLIP), Figure 3: logits = I_e T_e^T * exp(t); loss = (CE over rows with
    labels arange(n) + CE over columns with labels arange(n)) / 2, features L2-normalised."""
    logits = scale * image.astype(np.float64) @ text.astype(np.float64).T
    n = len(logits)

    def row_ce(m: np.ndarray) -> float:
        return float(
            np.mean([np.log(np.exp(m[i] - m[i].max()).sum()) + m[i].max() - m[i, i] for i in range(n)])
        )

    return (row_ce(logits) + row_ce(logits.T)) / 2


def test_clip_loss_equals_the_symmetric_info_nce_of_radford_et_al():
    """sslab.modules.clip_loss vs the symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3), with the
    temperature initialised to 0.07 and the scale clipped at 100 (Sec. 2.5)."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(16, 24, generator=g), dim=1)
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(16, 24, generator=g), dim=1)
    scale_module = LogitScale()
    scale = scale_module()
    assert scale.item() == pytest.approx(1 / 0.07, rel=TOL)
    ref = reference_clip_loss(image.numpy(), text.numpy(), scale.item())
    assert symmetric_info_nce(image, text, scale).item() == pytest.approx(ref, rel=TOL)
    assert clip_loss(image, text, scale).item() == pytest.approx(ref, rel=TOL)
    # asymmetric pairs: the image->text and text->image halves differ, so dropping either one would fail
    one_side = reference_clip_loss(image.numpy(), text.numpy(), scale.item()) * 2 - float(
        np.mean(
            [
                np.log(np.exp(scale.item() * text[i].numpy() @ image.numpy().T).sum())
                - scale.item() * float(text[i] @ image[i])
                for i in range(16)
            ]
        )
    )
    assert abs(one_side - ref) > 1e-3
    with torch.no_grad():
        scale_module.logit_scale.fill_(10.0)
    assert scale_module().item() == pytest.approx(100.0, rel=TOL)  # clipped: never more than 100
