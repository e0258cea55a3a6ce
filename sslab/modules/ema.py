"""Exponential moving average of parameters (the momentum teacher of BYOL/DINO)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every floating parameter.

    Parameters are matched by name so a teacher that lacks student-only parts (e.g. a mask token) is fine.
    """
    student_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        s = student_params[name]
        t_list.append(t.data)
        s_list.append(s.data)
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
