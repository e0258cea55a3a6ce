"""Per-step schedules as plain, picklable objects indexed by global step.

Closed-form values (no precomputed arrays) so that a resumed run reads exactly the value the
uninterrupted run would have used, and so the checkpoint can store the schedule itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``warmup_start`` to ``base`` then half-cosine from ``base`` to ``final``.

    The form of ``cosine_scheduler`` in DINO (Caron et al., 2021): for step i past warm-up,
    value = final + (base - final) * (1 + cos(pi * i / (total - warmup))) / 2.
    """

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (self.base - self.warmup_start) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LinearWarmupSchedule:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then constant at ``end``.

    DINO's teacher temperature (0.04 -> 0.07 over 30 epochs). The official code steps it once per
    epoch; we step it per iteration, which gives the same endpoints with a smoother path.
    """

    start: float
    end: float
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.warmup_steps

    def state_dict(self) -> dict:
        return asdict(self)
