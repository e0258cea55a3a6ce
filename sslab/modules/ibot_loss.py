"""iBOT losses (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022, Eq. 1-3).

- CLS: DINO's cross-entropy H(P_t(u), P_s(v)) over pairs of different views u != v.
- Patches (masked image modeling): for each global crop u, the student sees u with its masked patches
  replaced by a mask token, the teacher sees u intact, and L = -sum_i m_i P_t(u_i)^T log P_s(u^_i) over the
  masked tokens i. As in the official code, the sum is averaged over each image's masked tokens
  (1 / max(1, #masked)) and then over all images, unmasked ones included (they add 0).

Teacher targets are passed in as probabilities, so centering + sharpening (``centered_targets``) and
DINOv2's Sinkhorn-Knopp (``sslab.modules.sinkhorn``) plug into the same losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslab.modules.dino_loss import update_center


def centered_targets(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((t - c) / T): DINO's centering and sharpening, in fp32."""
    return F.softmax((logits.float() - center) / temperature, dim=-1)


def cls_distillation_loss(
    student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """Mean over pairs (teacher crop q, student crop v), v != q, of the batch-mean cross-entropy.

    ``teacher_probs[q]`` is (B, K) for global crop q; ``student_logits[v]`` is (B, K) for every crop v, the
    global crops first and in the teacher's order.
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


@torch.no_grad()
def update_patch_center(
    center: torch.Tensor, teacher_patch_logits: torch.Tensor, momentum: float
) -> torch.Tensor:
    """iBOT's patch center: c <- m c + (1 - m) * mean over images (all ranks) of each image's mean over all
    its patch tokens. ``teacher_patch_logits`` is (B, N, K); returns the new (1, K) center."""
    return update_center(center, teacher_patch_logits.float().mean(dim=1), momentum)
