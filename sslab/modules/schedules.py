"""Per-step schedules as plain, picklable objects indexed by global step.

Closed-form values (no precomputed arrays) so that a resumed run reads exactly the value the
uninterrupted run would have used, and so the checkpoint can store the schedule itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from itertools import pairwise


def warmup_fraction(step: int, warmup: int, linspace: bool) -> float:
    """Share of the warm-up done at ``step`` < ``warmup``: step / (warmup - 1) for ``np.linspace`` (which
    ends on the target; a 1-step linspace holds only its start), else step / warmup."""
    if linspace:
        return step / (warmup - 1) if warmup > 1 else 0.0
    return step / warmup


def warmup_then_cosine(s: CosineSchedule, step: int, progress: float) -> float:
    """The value both cosines share: the linear warm-up before ``s.warmup_steps``, after it the half-cosine
    from ``s.base`` to ``s.final`` at ``progress`` in [0, 1] (which each schedule measures its own way)."""
    if step < s.warmup_steps:
        return s.warmup_start + (s.base - s.warmup_start) * warmup_fraction(step, s.warmup_steps, s.linspace)
    return s.final + 0.5 * (s.base - s.final) * (1.0 + math.cos(math.pi * progress))


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
        span = max(1, self.total_steps - self.warmup_steps)
        return warmup_then_cosine(self, step, min(1.0, (step - self.warmup_steps) / span))

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


@dataclass(frozen=True)
class ExtendedCosineSchedule(CosineSchedule):
    """A ``CosineSchedule`` whose end moved later when a run was resumed with ``resume_schedules=extend``.

    Both are value = final + (base - final) * (1 + cos(pi * p)) / 2 of a progress p in [0, 1] past the
    warm-up. ``CosineSchedule`` has p = (step - warmup) / (total - warmup). Extending at the resume step s to
    the new end T keeps p up to s and stretches the rest of the curve over the remaining steps:

        p(step) = p_s + (1 - p_s) * (step - s) / (T - s),   s <= step <= T,

    so the value at s is the old schedule's (the lr is continuous) and the final value is reached at T.
    ``knots`` hold (s, p_s) of each extension, so p is piecewise linear through (warmup, 0), the knots and
    (T, 1), and a run extended twice still gives every past step its old value. A schedule that had already
    ended at s (p_s = 1) stays at its final value.
    """

    knots: tuple[tuple[int, float], ...] = ()

    def progress(self, step: int) -> float:
        points = [(self.warmup_steps, 0.0), *self.knots, (self.total_steps, 1.0)]
        for (s0, p0), (s1, p1) in pairwise(points):
            if step <= s1:
                return p0 + (p1 - p0) * (step - s0) / max(1, s1 - s0)
        return 1.0

    def __call__(self, step: int) -> float:
        return warmup_then_cosine(self, step, min(1.0, max(0.0, self.progress(step))))


def extend_cosine(schedule: object, step: int, total_steps: int) -> object:
    """``schedule`` continued from ``step`` to a later end ``total_steps`` (see ``ExtendedCosineSchedule``).
    Inside the warm-up the cosine simply gets the new end; schedules that are not cosines, or whose end does
    not move later, are returned as they are."""
    if not isinstance(schedule, CosineSchedule):  # ExtendedCosineSchedule is one too
        return schedule
    if total_steps <= schedule.total_steps:
        return schedule
    if step <= schedule.warmup_steps:
        return replace(schedule, total_steps=total_steps)
    if not isinstance(schedule, ExtendedCosineSchedule):
        span = max(1, schedule.total_steps - schedule.warmup_steps)
        p_s, knots = min(1.0, (step - schedule.warmup_steps) / span), ()
    else:
        p_s, knots = min(1.0, schedule.progress(step)), schedule.knots
    kept = tuple(k for k in knots if k[0] < step)
    return ExtendedCosineSchedule(
        schedule.base,
        schedule.final,
        total_steps,
        schedule.warmup_steps,
        schedule.warmup_start,
        schedule.linspace,
        (*kept, (int(step), float(p_s))),
    )
