"""Schedules: warm-up + cosine (METHOD.md A.8 / G 18), step decay, cosine momentum."""

from __future__ import annotations

import math

import pytest

from dscl.schedules import cosine_momentum, step_decay, warmup_cosine


def test_warmup_cosine_landmarks():
    total, warm, base = 1000, 100, 0.4
    assert warmup_cosine(0, total, warm, base) == 0.0
    assert warmup_cosine(50, total, warm, base) == pytest.approx(0.2)
    assert warmup_cosine(99, total, warm, base) == pytest.approx(0.4 * 99 / 100)
    assert warmup_cosine(100, total, warm, base) == pytest.approx(base)  # end of warm-up = peak
    assert warmup_cosine(550, total, warm, base) == pytest.approx(base / 2)  # mid-cosine
    assert warmup_cosine(1000, total, warm, base) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(1200, total, warm, base) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(550, total, warm, base, final_value=0.1) == pytest.approx(0.25)
    assert warmup_cosine(1000, total, warm, base, final_value=0.1) == pytest.approx(0.1)


def test_warmup_cosine_is_monotone_up_then_down():
    values = [warmup_cosine(s, 300, 30, 1.0) for s in range(301)]
    assert all(a < b for a, b in zip(values[:30], values[1:31], strict=True))
    assert all(a >= b for a, b in zip(values[30:-1], values[31:], strict=True))


def test_no_warmup_starts_at_base():
    assert warmup_cosine(0, 10, 0, 0.5) == pytest.approx(0.5)
    assert warmup_cosine(5, 10, 0, 0.5) == pytest.approx(0.25)


@pytest.mark.parametrize("steps_per_epoch", [452, 7])
def test_method_g18_numbers(steps_per_epoch):
    # lr(e) = 0.1 e / 10 for e < 10, else 0.05 (1 + cos(pi (e - 10) / 190)), E = 200, e = step / spe.
    spe = steps_per_epoch
    total, warm = 200 * spe, 10 * spe

    def lr(step):
        return warmup_cosine(step, total, warm, 0.1)

    assert lr(0) == 0.0
    assert lr(5 * spe) == pytest.approx(0.05)
    assert lr(1) == pytest.approx(0.1 * (1 / spe) / 10)
    assert lr(10 * spe) == pytest.approx(0.1)
    assert lr(105 * spe) == pytest.approx(0.05)
    assert lr(200 * spe) == pytest.approx(0.0, abs=1e-12)
    for e in (0.5, 3.25, 9.9, 10.0, 47.3, 150.0, 199.99):
        step = e * spe
        want = 0.1 * e / 10 if e < 10 else 0.05 * (1 + math.cos(math.pi * (e - 10) / 190))
        assert lr(step) == pytest.approx(want, rel=1e-9, abs=1e-15)
    if spe == 452:  # the official run: 90,400 iterations, warm-up 4,520 iterations
        assert total == 90_400 and warm == 4_520


def test_warmup_cosine_errors():
    with pytest.raises(ValueError):
        warmup_cosine(-1, 10, 2, 0.1)
    with pytest.raises(ValueError):
        warmup_cosine(0, 10, 20, 0.1)


def test_step_decay_stage2():
    values = [step_decay(e, 10.0, (20, 30)) for e in (0, 19, 19.9, 20, 29, 30, 39)]
    assert values == pytest.approx([10, 10, 10, 1, 1, 0.1, 0.1])
    assert step_decay(5, 1.0, [2, 4], gamma=0.5) == pytest.approx(0.25)
    assert step_decay(5, 1.0, []) == 1.0


def test_cosine_momentum():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(100, 100, 0.99, final_m=0.999) == pytest.approx(0.999)
    with pytest.raises(ValueError):
        cosine_momentum(0, 0, 0.99)
