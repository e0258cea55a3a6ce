"""TOV-VICReg (Goulão & Oliveira, 2022): VICReg on two views of o_t plus temporal order verification on
(o_t, o_{t-1}, o_{t+1}) (``sslab.modules.temporal_order``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslab.augment.temporal_views import TemporalViews
from sslab.modules.temporal_order import TemporalOrderHead, sample_orders, temporal_order_loss

from .vicreg import VICReg


class TOVVICReg(VICReg):
    """loss = VICReg(view 1 of o_t, view 2 of o_t) + ``temporal_coeff`` x BCE(order head).

    The order head sees the backbone features (not the expander's) of view 1 of o_t and of the two neighbours,
    in one of 6 orders drawn per sample (``balanced_orders``: see ``sample_orders``). The four images go
    through the backbone in one call unless it has BatchNorm and ``bn_stats`` is "per_view" (then one call
    each, as the official builder.py); the expander sees the two views of o_t one call each (``expand``).
    """

    required_keys = ("frames",)
    view_key = "frames"

    def __init__(self, *args, temporal_coeff: float, balanced_orders: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order_head = TemporalOrderHead(self.backbone.embed_dim)
        self.temporal_coeff = temporal_coeff
        self.balanced_orders = balanced_orders

    def make_views(self) -> nn.Module:
        return TemporalViews(self.data.image_size, self.data.mean, self.data.std, **self.view_cfg)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector, self.order_head]

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        views = batch["views"]
        (v1, v2), (prev, nxt) = views["views"], views["adjacent"]
        h1, h2, h_prev, h_next = self.encode(v1, v2, prev, nxt)
        vic, terms = self.vicreg(h1, h2)
        orders = sample_orders(h1.shape[0], h1.device, self.balanced_orders)
        temporal, accuracy = temporal_order_loss(
            self.order_head, torch.stack([h1, h_prev, h_next], 1), orders
        )
        loss = vic + self.temporal_coeff * temporal
        logs = {**terms, "temporal": temporal, "order_accuracy": accuracy}
        return {"loss": loss, "features": h1, "logs": logs}
