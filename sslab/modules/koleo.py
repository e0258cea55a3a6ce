"""KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019), used by
DINOv2 (Oquab et al., 2024, Sec. 4) on the student CLS features of each global crop.

L_koleo = -1/n * sum_i log(d_i + eps), d_i = min_{j != i} ||x_i - x_j|| on L2-normalised x: it pushes each
feature away from its nearest neighbour, spreading the batch uniformly over the sphere. As in the official
code, eps = 1e-8 enters three times: in the normalisation, inside the distance (torch's PairwiseDistance
computes ||x_i - x_j + eps||) and in the log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslab.errors import SSLabError

EPS = 1e-8


def koleo_loss(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """KoLeo of (B, D) features, computed in fp32 with autocast off (nearest-neighbour distances of close
    points lose all precision in bf16/fp16). B must be at least 2: one image has no neighbour."""
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
        dist = (z - z[nearest] + eps).norm(p=2, dim=-1)
        return -torch.log(dist + eps).mean()
