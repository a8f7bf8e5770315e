"""Pure step -> value schedules (learning rate, momentum). No optimizer objects.

The stage-1 learning rate is updated every iteration with a fractional epoch e = step / steps_per_epoch
(METHOD.md A.8, G 18): with ``warmup_steps = 10 * steps_per_epoch`` and
``total_steps = 200 * steps_per_epoch``, :func:`warmup_cosine` gives lr = 0.1 * e / 10 for e < 10,
then 0.05 * (1 + cos(pi * (e - 10) / 190)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def warmup_cosine(
    step: float, total_steps: float, warmup_steps: float, base_value: float, final_value: float = 0.0
) -> float:
    """Linear warm-up from 0 to ``base_value``, then a half cosine down to ``final_value``.

    Args:
        step: current iteration (0-based; may be fractional).
        total_steps: iterations of the whole run; the value is ``final_value`` from here on.
        warmup_steps: iterations of linear warm-up (0 = none).
        base_value: peak value, reached at ``step == warmup_steps``.
        final_value: value at ``step == total_steps``.

    Returns:
        ``base * step / warmup_steps`` for ``step < warmup_steps`` (0 at step 0), else
        ``final + (base - final) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(
            "need 0 <= warmup_steps <= total_steps, "
            f"got warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    if step < warmup_steps:
        return base_value * step / warmup_steps
    span = total_steps - warmup_steps
    if span <= 0:
        return final_value
    progress = min(1.0, (step - warmup_steps) / span)
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))


def step_decay(epoch: float, base_value: float, milestones: Iterable[float], gamma: float = 0.1) -> float:
    """``base_value * gamma ** (number of milestones <= epoch)`` (stage 2: 10 -> 1 at 20 -> 0.1 at 30)."""
    return base_value * gamma ** sum(1 for m in milestones if epoch >= m)


def cosine_momentum(step: float, total_steps: float, base_m: float, final_m: float = 1.0) -> float:
    """EMA momentum rising from ``base_m`` to ``final_m`` along a half cosine (BYOL / MoCo v3).

    Optional: the paper and the official code use a constant m = 0.999 (METHOD.md A.3).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(1.0, max(0.0, step / total_steps))
    return final_m - (final_m - base_m) * 0.5 * (1.0 + math.cos(math.pi * progress))
