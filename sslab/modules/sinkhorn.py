"""Sinkhorn-Knopp teacher targets (SwAV, Caron et al. 2020; used by DINOv2, Oquab et al. 2024, Sec. 4, in
place of centering).

Q = exp(logits / T)^T (K prototypes x B samples) is scaled to sum 1, then for ``n_iter`` rounds each
prototype row is scaled to total 1/K and each sample column to 1/B; finally Q * B has columns summing to 1
(one assignment distribution per sample) and rows summing to about B/K (equipartition over prototypes).
Row sums, the total and the sample count B are all-reduced, so the prototypes are balanced over the global
batch. B counts the rows actually passed (for iBOT patches: the masked tokens on all ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sslab.modules.distributed import all_reduce_sum, is_distributed


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iter: int = 3) -> torch.Tensor:
    """(B, K) logits -> (B, K) targets whose rows sum to 1 and whose columns sum to about B_global / K."""
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
