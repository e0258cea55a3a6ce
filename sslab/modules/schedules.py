"""Per-step schedules as plain, picklable objects indexed by global step.

Closed-form values (no precomputed arrays) so that a resumed run reads exactly the value the
uninterrupted run would have used, and so the checkpoint can store the schedule itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def warmup_fraction(step: int, warmup: int, linspace: bool) -> float:
    """Share of the warm-up done at ``step`` < ``warmup``: step / (warmup - 1) for ``np.linspace`` (which
    ends on the target; a 1-step linspace holds only its start), else step / warmup."""
    if linspace:
        return step / (warmup - 1) if warmup > 1 else 0.0
    return step / warmup


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``warmup_start`` to ``base`` then half-cosine from ``base`` to ``final``.

    For step i past warm-up, value = final + (base - final) * (1 + cos(pi * i / (total - warmup))) / 2, the
    form of ``cosine_scheduler`` in DINO (Caron et al., 2021) and of MAE's ``adjust_learning_rate``. The two
    warm-ups differ:

    - ``linspace`` true: DINO ``utils.cosine_scheduler`` / DINOv2 ``CosineScheduler`` use
      ``np.linspace(start, base, warmup)``, which reaches ``base`` at the last warm-up step, warmup - 1;
    - ``linspace`` false: MAE ``util/lr_sched.py`` and VICReg use start + (base - start) * step / warmup, which
      reaches ``base`` one step later, at step warmup.
    """

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0
    linspace: bool = False

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * warmup_fraction(
                step, self.warmup_steps, self.linspace
            )
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LinearWarmupSchedule:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then constant at ``end``.

    The teacher temperature of DINO (0.04 -> 0.07 over 30 epochs). ``steps_per_value`` > 1 holds each value
    for that many steps: DINO and iBOT (``DINOLoss.teacher_temp_schedule``) index an
    ``np.linspace(start, end, warmup_epochs)`` by the epoch, so there ``steps_per_value`` = steps per epoch
    and ``linspace`` is true. DINOv2 (``CosineScheduler`` with base = final) steps the same linspace per
    iteration (``steps_per_value`` 1). ``linspace`` false is the plain step / warmup ramp.
    """

    start: float
    end: float
    warmup_steps: int
    steps_per_value: int = 1
    linspace: bool = False

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.end
        k, n = step // self.steps_per_value, self.warmup_steps // self.steps_per_value
        return self.start + (self.end - self.start) * warmup_fraction(k, n, self.linspace)

    def state_dict(self) -> dict:
        return asdict(self)
