import math

import pytest

from iwm.config import OptimConfig
from iwm.training.schedules import Schedules, cosine, linear, warmup_cosine


def test_warmup_cosine_endpoints_and_warmup_values():
    args = dict(total_steps=100, warmup_steps=10, start=2e-4, peak=1e-3, final=1e-6)
    assert warmup_cosine(0, **args) == pytest.approx(2e-4)
    assert warmup_cosine(5, **args) == pytest.approx(6e-4)  # halfway through warmup
    assert warmup_cosine(10, **args) == pytest.approx(1e-3)
    assert warmup_cosine(55, **args) == pytest.approx((1e-3 + 1e-6) / 2)  # cosine midpoint
    assert warmup_cosine(100, **args) == pytest.approx(1e-6)
    # Past the end it stays at the final value instead of coming back up the cosine.
    assert warmup_cosine(150, **args) == pytest.approx(1e-6)


def test_warmup_cosine_monotone_up_then_down():
    vals = [warmup_cosine(s, 100, 10, 0.1, 1.0, 0.0) for s in range(101)]
    assert all(a < b for a, b in zip(vals[:10], vals[1:11], strict=True))
    assert all(a > b for a, b in zip(vals[10:100], vals[11:101], strict=True))


def test_warmup_cosine_without_warmup_and_with_overlong_warmup():
    assert warmup_cosine(0, 10, 0, 0.5, 1.0, 0.0) == pytest.approx(1.0)
    # Warmup longer than the run: finishes the warmup, then the final value.
    assert warmup_cosine(9, 10, 20, 0.0, 1.0, 0.1) == pytest.approx(0.45)
    assert warmup_cosine(20, 10, 20, 0.0, 1.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(21, 10, 20, 0.0, 1.0, 0.1) == pytest.approx(0.1)


def test_cosine_and_linear_both_directions():
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(5, 10, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(10, 10, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine(99, 10, 0.04, 0.4) == pytest.approx(0.4)
    assert linear(0, 4, 1.0, 0.0) == 1.0
    assert linear(1, 4, 1.0, 0.0) == pytest.approx(0.75)
    assert linear(4, 4, 1.0, 0.0) == 0.0
    assert linear(-3, 4, 1.0, 0.0) == 1.0
    assert linear(0, 0, 1.0, 0.0) == 0.0  # zero-length schedule: already at the end


def test_schedules_follow_the_ijepa_recipe():
    sched = Schedules(OptimConfig(), total_steps=1000, warmup_steps=100)
    assert sched.lr(0) == pytest.approx(2e-4)
    assert sched.lr(100) == pytest.approx(1e-3)
    assert sched.lr(1000) == pytest.approx(1e-6)
    assert sched.weight_decay(0) == pytest.approx(0.04)
    assert sched.weight_decay(1000) == pytest.approx(0.4)
    assert sched.ema_momentum(0) == pytest.approx(0.996)
    assert sched.ema_momentum(500) == pytest.approx(0.998)
    assert sched.ema_momentum(1000) == pytest.approx(1.0)
    wds = [sched.weight_decay(s) for s in range(0, 1001, 50)]
    emas = [sched.ema_momentum(s) for s in range(0, 1001, 50)]
    assert wds == sorted(wds) and emas == sorted(emas)


def test_schedule_values_do_not_depend_on_call_history():
    # What makes resume exact: a fresh object at step N agrees with one stepped to N.
    a = Schedules(OptimConfig(), total_steps=300, warmup_steps=30)
    seen = [a.lr(s) for s in range(300)]
    b = Schedules(OptimConfig(), total_steps=300, warmup_steps=30)
    assert b.lr(217) == seen[217]


def test_for_run_converts_epochs_to_steps():
    sched = Schedules.for_run(OptimConfig(warmup_epochs=1.5), epochs=2.5, steps_per_epoch=10)
    assert (sched.total_steps, sched.warmup_steps) == (25, 15)
    capped = Schedules.for_run(OptimConfig(warmup_epochs=40.0), epochs=1.0, steps_per_epoch=3)
    assert capped.warmup_steps == capped.total_steps == 3
    with pytest.raises(ValueError):
        Schedules(OptimConfig(), total_steps=0, warmup_steps=0)
    assert math.isfinite(capped.lr(3))
