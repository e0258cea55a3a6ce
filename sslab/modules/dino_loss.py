"""The DINO family's losses, in one place (Caron et al. 2021; Zhou et al. 2022; Oquab et al. 2024).

One form for every distillation term: the teacher's outputs become target probabilities first
(``centered_targets``: DINO's centering and sharpening, or ``sinkhorn_knopp``: DINOv2's optional
equipartition), then the student is scored by cross-entropy against them:

- CLS (DINO Eq. 3-4, iBOT's L_[CLS]): H(P_t(u), P_s(v)) averaged over pairs of different views u != v
  (``cls_distillation_loss``; ``dino_loss`` is that with centred targets).
- Patches (iBOT Eq. 1-3, masked image modeling): for each global crop u, the student sees u with its masked
  patches replaced by a mask token, the teacher sees u intact, and L = -sum_i m_i P_t(u_i)^T log P_s(u^_i)
  over the masked tokens i. As in the official code, the sum is averaged over each image's masked tokens
  (1 / max(1, #masked)) and then over all images, unmasked ones included (they add 0)
  (``masked_patch_loss``).
- KoLeo (DINOv2; Sablayrolles et al., ICLR 2019) spreads the student's CLS features over the sphere.
Centers are EMAs of the teacher outputs over the global batch (``update_center``, ``update_patch_center``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sslab.errors import SSLabError
from sslab.modules.distributed import all_reduce_sum, is_distributed, world_size

# -- targets -------------------------------------------------------------------------------------------


def centered_targets(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((t - c) / T): DINO's centering and sharpening, in fp32."""
    return F.softmax((logits.float() - center) / temperature, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iter: int = 3) -> torch.Tensor:
    """(B, K) logits -> (B, K) targets whose rows sum to 1 and whose columns sum to about B_global / K.

    Sinkhorn-Knopp (SwAV, Caron et al. 2020; DINOv2 in place of centering): Q = exp(logits / T)^T
    (K prototypes x B samples) is scaled to sum 1, then for ``n_iter`` rounds each prototype row is scaled to
    total 1/K and each sample column to 1/B; finally Q * B has columns summing to 1 (one assignment
    distribution per sample) and rows summing to about B/K (equipartition over prototypes). Row sums, the
    total and the sample count B are all-reduced, so the prototypes are balanced over the global batch. B
    counts the rows actually passed (for iBOT patches: the masked tokens on all ranks).
    """
    scores = logits.float() / temperature
    # Subtracting one global constant leaves Q unchanged after the first normalisation but avoids exp overflow.
    top = scores.max() if scores.numel() else scores.new_full((), -float("inf"))
    if is_distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(scores - top).T  # (K, B)
    k = q.shape[0]
    b = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iter):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.T


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m * c + (1 - m) * mean of the teacher outputs over the global batch (all ranks).

    ``teacher_logits`` is (N, K) for this rank; the sum is all-reduced and divided by N * world size.
    Returns the new center (the input is not modified).
    """
    batch_sum = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
    batch_mean = batch_sum / (teacher_logits.shape[0] * world_size())
    return center * momentum + batch_mean * (1.0 - momentum)


@torch.no_grad()
def update_patch_center(
    center: torch.Tensor, teacher_patch_logits: torch.Tensor, momentum: float
) -> torch.Tensor:
    """iBOT's patch center: c <- m c + (1 - m) * mean over images (all ranks) of each image's mean over all
    its patch tokens. ``teacher_patch_logits`` is (B, N, K); returns the new (1, K) center."""
    return update_center(center, teacher_patch_logits.float().mean(dim=1), momentum)


# -- cross-entropies -----------------------------------------------------------------------------------


def cls_distillation_loss(
    student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """Mean over pairs (teacher crop q, student crop v), v != q, of the batch-mean cross-entropy
    H(P_t(q), softmax(s_v / student_temp)).

    ``teacher_probs[q]`` is (B, K) for global crop q; ``student_logits[v]`` is (B, K) for every crop v, the
    global crops first and in the teacher's order, so pair (q, q) is the same view and is skipped.
    """
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    n_pairs = 0
    log_p_s = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    for q, p_t in enumerate(teacher_probs):
        for v, log_p in enumerate(log_p_s):
            if v != q:
                total = total - (p_t.detach() * log_p).sum(-1).mean()
                n_pairs += 1
    if n_pairs == 0:
        raise ValueError("the CLS loss needs at least one student crop that differs from the teacher's crops")
    return total / n_pairs


def dino_loss(
    student_logits: list[torch.Tensor],
    teacher_logits: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """DINO's loss as the paper writes it, from teacher logits: ``cls_distillation_loss`` against
    P_t = softmax((t - center) / teacher_temp) (centering + sharpening)."""
    targets = [centered_targets(t, center, teacher_temp) for t in teacher_logits]
    return cls_distillation_loss(student_logits, targets, student_temp)


def masked_patch_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """iBOT's patch loss. ``masks`` is (B, N) or (B, h, w) bool. ``student_logits`` and ``teacher_probs``
    are either dense (B, N, K) or already restricted to the masked tokens, (M, K) in row-major mask order
    (``masked_token_index``), which lets the caller run the heads on masked tokens only. Passing that
    ``index`` (computed once, e.g. on the CPU) avoids a device sync for boolean indexing.
    """
    masks = masks.flatten(1)
    if index is None:
        index = masked_token_index(masks)
    if student_logits.dim() == 3:
        student_logits = student_logits.flatten(0, 1).index_select(0, index)
    if teacher_probs.dim() == 3:
        teacher_probs = teacher_probs.flatten(0, 1).index_select(0, index)
    ce = -(teacher_probs.detach() * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    per_image = masks.sum(dim=1, keepdim=True).clamp(min=1).float()
    weights = (1.0 / per_image).expand_as(masks).reshape(-1).index_select(0, index)
    return (ce * weights).sum() / masks.shape[0]


def masked_token_index(masks: torch.Tensor) -> torch.Tensor:
    """(M,) positions of the masked tokens in ``x.flatten(0, 1)`` for tokens x (B, N, ...), row-major:
    the order of ``x[masks]``."""
    return masks.flatten().nonzero().squeeze(1)


# -- KoLeo ---------------------------------------------------------------------------------------------

KOLEO_EPS = 1e-8


def koleo_loss(x: torch.Tensor, eps: float = KOLEO_EPS) -> torch.Tensor:
    """KoLeo of (B, D) features: -1/n * sum_i log(d_i + eps), d_i = min_{j != i} ||x_i - x_j|| on
    L2-normalised x, which pushes each feature away from its nearest neighbour. As in the official code, eps
    enters three times: in the normalisation, inside the distance (torch's PairwiseDistance computes
    ||x_i - x_j + eps||) and in the log. Computed in fp32 with autocast off (nearest-neighbour distances of
    close points lose all precision in bf16/fp16). B must be at least 2: one image has no neighbour."""
    if x.shape[0] < 2:
        raise SSLabError(
            f"the KoLeo loss needs at least 2 images per batch on each device (got {x.shape[0]}); "
            "raise data.batch_size or set method.koleo_weight=0"
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            sims = z @ z.T
            sims.fill_diagonal_(-float("inf"))  # never one's own neighbour
            nearest = sims.argmax(dim=1)  # max cosine = min distance on the sphere
        dist_ = (z - z[nearest] + eps).norm(p=2, dim=-1)
        return -torch.log(dist_ + eps).mean()
