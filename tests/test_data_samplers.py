"""ClassBalancedSampler: uniform over classes, uniform within a class, epochs, DDP shares."""

from __future__ import annotations

import numpy as np
import pytest

from dscl.data import ClassBalancedSampler, long_tailed_counts

COUNTS = long_tailed_counts(10, 1000, 100, "exp")  # 1000 ... 10: a strongly long-tailed label list
TARGETS = np.repeat(np.arange(10), COUNTS)
np.random.default_rng(0).shuffle(TARGETS)


def _chi2_classes(indices, targets, num_classes):
    observed = np.bincount(targets[np.asarray(indices)], minlength=num_classes)
    expected = len(indices) / num_classes
    return float(((observed - expected) ** 2 / expected).sum())


def test_classes_are_drawn_uniformly():
    sampler = ClassBalancedSampler(TARGETS, num_samples=20000, seed=0)
    draws = list(sampler)
    assert len(draws) == len(sampler) == 20000
    # 9 degrees of freedom: P(chi2 > 27.9) = 0.001; instance sampling on this list gives ~10^5
    assert _chi2_classes(draws, TARGETS, 10) < 27.9
    assert _chi2_classes(np.random.default_rng(0).integers(0, len(TARGETS), 20000), TARGETS, 10) > 1000


def test_images_within_a_class_are_uniform():
    sampler = ClassBalancedSampler(TARGETS, num_samples=20000, seed=1)
    draws = np.asarray(list(sampler))
    tail = np.flatnonzero(TARGETS == 9)  # 10 images, ~2000 draws
    hits = np.array([(draws == i).sum() for i in tail])
    assert hits.sum() > 1700 and ((hits - hits.mean()) ** 2 / hits.mean()).sum() < 27.9
    assert set(draws.tolist()) <= set(range(len(TARGETS)))


def test_epochs_are_deterministic_and_different():
    a, b = ClassBalancedSampler(TARGETS, seed=3), ClassBalancedSampler(TARGETS, seed=3)
    assert len(a) == len(TARGETS)
    first = list(a)
    assert first == list(b) == list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    assert list(ClassBalancedSampler(TARGETS, seed=4)) != first


def test_empty_classes_are_skipped():
    sampler = ClassBalancedSampler([0, 0, 0, 2, 2, 5], num_samples=3000, seed=0)
    classes = np.asarray([0, 0, 0, 2, 2, 5])[list(sampler)]
    assert set(classes.tolist()) == {0, 2, 5}
    assert all(abs((classes == c).mean() - 1 / 3) < 0.05 for c in (0, 2, 5))


@pytest.mark.parametrize(("total", "world"), [(100, 3), (101, 2), (24, 4)])
def test_ddp_shares_are_disjoint_and_cover_the_epoch(total, world):
    ranks = [ClassBalancedSampler(TARGETS, num_samples=total, seed=5, rank=r, world_size=world) for r in range(world)]
    for s in ranks:
        s.set_epoch(2)
    per_rank = -(-total // world)
    shares = [list(s) for s in ranks]
    assert all(len(s) == per_rank == len(share) for s, share in zip(ranks, shares, strict=True))
    draws = ranks[0].epoch_draws()
    assert len(draws) == per_rank * world
    for r, share in enumerate(shares):  # rank r owns draw positions r, r + world, ...: disjoint and covering
        assert share == draws[r::world].tolist()
    interleaved = [shares[k % world][k // world] for k in range(per_rank * world)]
    assert interleaved == draws.tolist()
    if total % world == 0:  # same draws as a single process
        single = ClassBalancedSampler(TARGETS, num_samples=total, seed=5)
        single.set_epoch(2)
        assert list(single) == draws.tolist()


def test_bad_arguments():
    with pytest.raises(ValueError):
        ClassBalancedSampler([])
    with pytest.raises(ValueError):
        ClassBalancedSampler([0, 1], rank=2, world_size=2)
    with pytest.raises(ValueError):
        ClassBalancedSampler([0, -1])
