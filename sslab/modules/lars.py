"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg, "Large Batch Training of Convolutional
Networks", arXiv 1708.03888, 2017), in the form the VICReg and Barlow Twins recipes train with.

Per parameter tensor w with gradient g, weight decay wd, trust coefficient eta, momentum m and lr:

    u  = g + wd * w                                  (wd = 0 in groups without weight decay)
    q  = eta * ||w|| / ||u||   (1 where ||w|| = 0 or ||u|| = 0; q = 1 in groups that are not adapted)
    mu = m * mu + q * u        (mu starts at 0)
    w  = w - lr * mu

This is facebookresearch/vicreg ``main_vicreg.py``'s ``LARS`` with ``exclude_bias_and_norm``: parameters
without weight decay (biases and norms) get neither decay nor adaptation. timm's ``Lars`` divides by
``||g|| + wd * ||w||`` (the paper's bound) instead of ``||g + wd * w||`` and couples adaptation to a non-zero
weight decay, so it would not reproduce the VICReg recipe; hence this small optimiser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor step is rescaled by the trust ratio ``eta * ||w|| / ||u||``.

    A parameter group with ``lars_adapt=False`` (the base class sets it for groups without weight decay,
    ``apply_wd=False``) takes plain SGD-with-momentum steps, as VICReg's ``lars_adaptation_filter``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or momentum < 0 or eta <= 0:
            raise ValueError(
                f"LARS needs lr, weight_decay, momentum >= 0 and eta > 0 (got {lr}, {weight_decay}, {momentum}, {eta})"
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "eta": eta,
            "lars_adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    one = torch.ones_like(w_norm)
                    q = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, one)
                    update = update.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss
