"""DINO self-distillation loss and center update (Caron et al., 2021, Eq. 3-4 and Sec. 3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslab.modules.distributed import all_reduce_sum, world_size


def dino_loss(
    student_logits: list[torch.Tensor],
    teacher_logits: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross-entropy H(P_t(x), P_s(x')) averaged over all (teacher view, student view) pairs with x != x'.

    ``student_logits[v]`` are (B, K) for every crop v; the first ``len(teacher_logits)`` crops are the
    global crops the teacher saw, in the same order, so pair (i, i) is the same view and is skipped.
    P_t = softmax((t - center) / teacher_temp) (centering + sharpening), P_s = softmax(s / student_temp).
    """
    log_p_s = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    p_t = [F.softmax((t.float() - center) / teacher_temp, dim=-1).detach() for t in teacher_logits]
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    n_pairs = 0
    for iq, q in enumerate(p_t):
        for v, log_p in enumerate(log_p_s):
            if v == iq:
                continue
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            n_pairs += 1
    if n_pairs == 0:
        raise ValueError("DINO loss needs at least one student crop that differs from the teacher's crops")
    return total / n_pairs


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m * c + (1 - m) * mean of the teacher outputs over the global batch (all ranks).

    ``teacher_logits`` is (N, K) for this rank; the sum is all-reduced and divided by N * world size.
    Returns the new center (the input is not modified).
    """
    batch_sum = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
    batch_mean = batch_sum / (teacher_logits.shape[0] * world_size())
    return center * momentum + batch_mean * (1.0 - momentum)
