"""cosine_with_warmup: known values at warmup, peak, end and beyond; degenerate schedules."""

import math

import pytest

from dist_lm.optim import cosine_with_warmup


def lr(step: int, warmup: int = 10, cosine: int = 110) -> float:
    return cosine_with_warmup(step, max_lr=1e-3, min_lr=1e-4, warmup_steps=warmup, cosine_steps=cosine)


def test_known_values():
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(5e-4)
    assert lr(10) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the cosine
    assert lr(35) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr(110) == pytest.approx(1e-4)  # the floor exactly at cosine_steps
    assert lr(10_000) == 1e-4


def test_monotone_up_then_down():
    values = [lr(s) for s in range(130)]
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(a >= b for a, b in zip(values[10:-1], values[11:], strict=True))


def test_no_warmup_starts_at_the_peak():
    assert lr(0, warmup=0) == pytest.approx(1e-3)
    assert lr(110, warmup=0) == pytest.approx(1e-4)


def test_warmup_equal_to_cosine_steps_goes_straight_to_the_floor():
    assert lr(9, warmup=10, cosine=10) == pytest.approx(9e-4)
    assert lr(10, warmup=10, cosine=10) == 1e-4


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="warmup_steps=20"):
        lr(0, warmup=20, cosine=10)
    with pytest.raises(ValueError, match="step=-1"):
        lr(-1)
