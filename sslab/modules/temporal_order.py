"""Temporal order verification head of TOV-VICReg (Goulão & Oliveira, "Pretraining the Vision Transformer
using self-supervised methods for vision based Deep Reinforcement Learning", 2022).

The backbone features of (o_t, o_{t-1}, o_{t+1}) - this reference order is the official code's - are put in one
of the 3! = 6 orders, concatenated (3D) and scored by a linear layer; BCE with logits against "this is the
reference order" (order 0, the identity). The official code draws the order uniformly, so 1/6 of the targets
are positive and the BCE is unweighted (its target is the complement, "shuffled", which is the same task with
the logit's sign flipped). ``sample_orders(..., balanced=True)`` instead puts half of the batch in the true
order and spreads the other half uniformly over the 5 wrong ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Row k lists which of (o_t, o_{t-1}, o_{t+1}) goes to slots 0, 1, 2; row 0 is the true (reference) order.
ORDERS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def sample_orders(batch: int, device: torch.device | str = "cpu", balanced: bool = False) -> torch.Tensor:
    """(B,) order indices in [0, 6): uniform (official), or half true / half uniform over the wrong ones."""
    if not balanced:
        return torch.randint(0, len(ORDERS), (batch,), device=device)
    wrong = torch.randint(1, len(ORDERS), (batch,), device=device)
    true = torch.rand(batch, device=device) < 0.5
    return torch.where(true, torch.zeros_like(wrong), wrong)


def order_targets(orders: torch.Tensor) -> torch.Tensor:
    """(B, 1) float targets: 1 where the order is the true one (index 0)."""
    return (orders == 0).float().unsqueeze(1)


def permute_features(feats: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """(B, 3, D) features in reference order -> (B, 3D) concatenated in each sample's order (one gather)."""
    b, _, d = feats.shape
    idx = ORDERS.to(feats.device)[orders]  # (B, 3)
    return torch.gather(feats, 1, idx.unsqueeze(-1).expand(b, 3, d)).reshape(b, 3 * d)


class TemporalOrderHead(nn.Module):
    """Linear(3D -> 1) on concatenated features, as in the official code."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * dim, 1)

    def forward(self, concatenated: torch.Tensor) -> torch.Tensor:
        return self.linear(concatenated)


def temporal_order_loss(
    head: nn.Module, feats: torch.Tensor, orders: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE of ``head`` on features (B, 3, D) permuted by ``orders``; also returns the accuracy (for logging)."""
    logits = head(permute_features(feats, orders)).float()
    targets = order_targets(orders)
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    with torch.no_grad():
        accuracy = ((logits > 0).float() == targets).float().mean()
    return loss, accuracy
