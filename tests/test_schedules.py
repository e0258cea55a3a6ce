import math

import pytest

from sslab.modules.schedules import CosineSchedule, LinearWarmupSchedule


def test_cosine_schedule_matches_hand_values():
    # warm-up 0 -> 1 over 4 steps, then cosine 1 -> 0.1 over the remaining 8 steps
    s = CosineSchedule(base=1.0, final=0.1, total_steps=12, warmup_steps=4, warmup_start=0.0)
    assert [s(i) for i in range(4)] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert s(4) == pytest.approx(1.0)
    # halfway through the cosine part: final + (base - final) / 2
    assert s(8) == pytest.approx(0.55)
    # i = 2 of 8: 0.1 + 0.45 * (1 + cos(pi/4))
    assert s(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert s(12) == pytest.approx(0.1)
    assert s(100) == pytest.approx(0.1)  # clamped past the end


def test_dino_teacher_momentum_and_weight_decay_endpoints():
    momentum = CosineSchedule(0.996, 1.0, total_steps=1000)
    wd = CosineSchedule(0.04, 0.4, total_steps=1000)
    assert momentum(0) == pytest.approx(0.996)
    assert momentum(500) == pytest.approx(0.998)
    assert momentum(1000) == pytest.approx(1.0)
    assert wd(0) == pytest.approx(0.04) and wd(500) == pytest.approx(0.22) and wd(1000) == pytest.approx(0.4)


def test_teacher_temperature_warmup_is_linear_then_constant():
    t = LinearWarmupSchedule(0.04, 0.07, warmup_steps=30)
    assert t(0) == pytest.approx(0.04)
    assert t(15) == pytest.approx(0.055)
    assert t(30) == pytest.approx(0.07)
    assert t(10_000) == pytest.approx(0.07)
    assert LinearWarmupSchedule(0.04, 0.07, 0)(0) == pytest.approx(0.07)


def test_schedule_state_round_trips():
    s = CosineSchedule(1.0, 0.0, 10, 2, 0.1)
    assert CosineSchedule(**s.state_dict()) == s
