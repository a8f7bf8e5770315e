"""Tests for dscl.calibration: every metric against a plain loop written from its definition, torchmetrics,
invariants (a model calibrated by construction, temperature scaling) and bad input."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from dscl.calibration import (
    adaptive_ece,
    apply_temperature,
    bin_edges,
    bin_index,
    brier,
    calibration_report,
    classwise_ece,
    classwise_ece_per_class,
    ece,
    fit_temperature,
    mce,
    nll,
    nll_from_logits,
    over_under_confidence,
    per_class_summary,
    reliability_bins,
    softmax,
)

SEEDS = (0, 1, 2, 3)
BINS = (15, 5, 7, 1)


# ------------------------------------------------------------------------ references: plain loops


def ref_bin(x: float, n_bins: int) -> int:
    """Right-closed bins (k/n, (k+1)/n]; 0 goes into the first bin."""
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        if (b == 0 and x == 0.0) or lo < x <= hi:
            return b
    raise AssertionError(f"{x} is in no bin")


def ref_top(probs: np.ndarray, targets: np.ndarray) -> list[tuple[float, float]]:
    """(confidence, correct) per sample; the first maximum is the prediction."""
    out = []
    for row, y in zip(probs.tolist(), targets.tolist(), strict=True):
        best = 0
        for j in range(1, len(row)):
            if row[j] > row[best]:
                best = j
        out.append((row[best], 1.0 if best == y else 0.0))
    return out


def ref_bins(pairs: list[tuple[float, float]], n_bins: int) -> list[list[tuple[float, float]]]:
    bins: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for value, hit in pairs:
        bins[ref_bin(value, n_bins)].append((value, hit))
    return bins


def ref_gaps(pairs, n_bins):
    """(weight, conf - acc) for each non-empty bin."""
    out = []
    for members in ref_bins(pairs, n_bins):
        if members:
            conf = sum(v for v, _ in members) / len(members)
            acc = sum(h for _, h in members) / len(members)
            out.append((len(members) / len(pairs), conf - acc))
    return out


def ref_ece(probs, targets, n_bins):
    return 100 * sum(w * abs(g) for w, g in ref_gaps(ref_top(probs, targets), n_bins))


def ref_mce(probs, targets, n_bins):
    return 100 * max(abs(g) for _, g in ref_gaps(ref_top(probs, targets), n_bins))


def ref_over_under(probs, targets, n_bins):
    gaps = ref_gaps(ref_top(probs, targets), n_bins)
    return 100 * sum(w * max(g, 0.0) for w, g in gaps), 100 * sum(w * max(-g, 0.0) for w, g in gaps)


def ref_adaptive(probs, targets, n_bins):
    pairs = ref_top(probs, targets)
    n = len(pairs)
    order = sorted(range(n), key=lambda i: (pairs[i][0], i))
    big, small = n // n_bins + 1, n // n_bins  # the first n % n_bins bins get one sample more
    total, start = 0.0, 0
    for b in range(n_bins):
        size = big if b < n % n_bins else small
        members = [pairs[i] for i in order[start : start + size]]
        start += size
        if members:
            conf = sum(v for v, _ in members) / size
            acc = sum(h for _, h in members) / size
            total += size / n * abs(conf - acc)
    assert start == n
    return 100 * total


def ref_classwise_per_class(probs, targets, n_bins):
    n, c = probs.shape
    out = []
    for k in range(c):
        pairs = [(float(probs[i, k]), 1.0 if targets[i] == k else 0.0) for i in range(n)]
        out.append(100 * sum(w * abs(g) for w, g in ref_gaps(pairs, n_bins)))
    return out


def ref_nll_probs(probs, targets, eps=1e-12):
    return -sum(math.log(max(float(probs[i, y]), eps)) for i, y in enumerate(targets.tolist())) / len(targets)


def ref_nll_logits(logits, targets):
    total = 0.0
    for row, y in zip(logits.tolist(), targets.tolist(), strict=True):
        m = max(row)
        total += m + math.log(sum(math.exp(v - m) for v in row)) - row[y]
    return total / len(targets)


def ref_brier(probs, targets):
    total = 0.0
    for row, y in zip(probs.tolist(), targets.tolist(), strict=True):
        total += sum((p - (1.0 if j == y else 0.0)) ** 2 for j, p in enumerate(row))
    return total / len(targets)


def ref_reliability(probs, targets, n_bins):
    out = []
    for b, members in enumerate(ref_bins(ref_top(probs, targets), n_bins)):
        k = len(members)
        out.append({
            "lower": 100 * b / n_bins, "upper": 100 * (b + 1) / n_bins, "count": k,
            "confidence": 100 * sum(v for v, _ in members) / k if k else None,
            "accuracy": 100 * sum(h for _, h in members) / k if k else None,
        })
    return out


# ------------------------------------------------------------------------ data


def mixed_data(seed: int, n_random: int = 50, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Random probability rows plus rows whose maximum is exactly a bin edge k/15 or k/5 (or 1.0), one-hot rows
    (probabilities exactly 0 and 1, for the classwise bins) and tied rows (argmax = first maximum)."""
    g = np.random.default_rng(seed)
    rows = list(g.dirichlet(np.full(c, 0.7), size=n_random))
    edges = sorted({k / 15 for k in range(4, 16)} | {k / 5 for k in range(2, 6)})  # all >= 1/c = 0.25
    for v in edges:
        row = np.full(c, (1.0 - v) / (c - 1))
        row[g.integers(c)] = v
        rows.append(row)
    for _ in range(3):
        rows.append(np.eye(c)[g.integers(c)])
    rows.append(np.array([0.5, 0.5] + [0.0] * (c - 2)))
    rows.append(np.full(c, 1.0 / c))
    probs = np.stack(rows)
    perm = g.permutation(len(probs))
    probs = probs[perm]
    # labels: mostly the argmax (so bins hold correct and wrong samples), otherwise random
    targets = np.where(g.random(len(probs)) < 0.6, probs.argmax(1), g.integers(0, c, len(probs)))
    return probs, targets


def calibrated_by_construction(n: int, c: int, seed: int, power: float = 1.0):
    """Max probability p ~ U(1/c, 1) on a random predicted class, the rest (1 - p) / (c - 1) each; the label is
    the predicted class with probability p ** power (power 1: calibrated, top-label and classwise)."""
    g = np.random.default_rng(seed)
    p = g.uniform(1.0 / c, 1.0, n)
    pred = g.integers(0, c, n)
    probs = np.repeat(((1.0 - p) / (c - 1))[:, None], c, axis=1)
    probs[np.arange(n), pred] = p
    correct = g.random(n) < p**power
    other = (pred + g.integers(1, c, n)) % c  # a uniformly drawn wrong class
    return probs, np.where(correct, pred, other)


def noise_bound(values: np.ndarray, probs_of_hit: np.ndarray, n_bins: int, sigmas: float = 4.0) -> float:
    """Bound on the binned |acc - conf| of a calibrated predictor from sampling noise alone, in percent.

    In bin b the gap is the mean of n_b independent centred Bernoulli variables with variances v_i (1 - v_i),
    so its standard deviation is sqrt(sum_i v_i (1 - v_i)) / n_b, and its weight is n_b / N: the ECE is at most
    sum_b (n_b / N) * sigmas * sd_b = sigmas / N * sum_b sqrt(sum_{i in b} v_i (1 - v_i)) unless some bin is
    off by more than `sigmas` standard deviations (expected value: about 0.8 / sigmas of this bound)."""
    idx = bin_index(values, n_bins)
    var = np.bincount(idx, weights=probs_of_hit * (1 - probs_of_hit), minlength=n_bins)
    return 100 * sigmas * float(np.sqrt(var).sum()) / len(values)


# ------------------------------------------------------------------------ binning


def test_bin_edges_and_index_are_right_closed():
    assert bin_edges(5).tolist() == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert bin_edges(15)[7] == 7 / 15
    x = [0.0, 1e-12, 0.2, 0.2 + 1e-12, 0.4, 0.6, 3 / 5, 0.8, 0.8 + 1e-9, 1.0]
    assert bin_index(x, 5).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 4]
    x15 = [0.0, 1 / 15, 1 / 15 + 1e-12, 2 / 15, 0.5, 14 / 15, 1.0]
    assert bin_index(x15, 15).tolist() == [0, 0, 1, 1, 7, 13, 14]
    # every exact edge k/n goes into the bin below it (the loop reference agrees)
    for n in (3, 7, 10, 15):
        edges = [k / n for k in range(1, n + 1)]
        assert bin_index(edges, n).tolist() == list(range(n))
        assert bin_index(edges, n).tolist() == [ref_bin(v, n) for v in edges]


def test_mixed_data_holds_the_edge_cases():
    """The loop comparisons below are only meaningful if the data has confidences on edges and of 1.0."""
    probs, _ = mixed_data(0)
    conf = probs.max(1)
    assert (conf == 1.0).sum() >= 4  # 3 one-hot rows + the edge 15/15 (and 5/5)
    assert np.isin(conf, [k / 15 for k in range(4, 15)]).sum() >= 11
    assert np.isin(conf, [0.4, 0.6, 0.8]).sum() >= 3
    assert (probs == 0).any()


# ------------------------------------------------------------------------ each metric against its loop


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_bins", BINS)
def test_top_label_metrics_match_loops(seed, n_bins):
    probs, targets = mixed_data(seed)
    assert ece(probs, targets, n_bins) == pytest.approx(ref_ece(probs, targets, n_bins), abs=1e-10)
    assert mce(probs, targets, n_bins) == pytest.approx(ref_mce(probs, targets, n_bins), abs=1e-10)
    assert adaptive_ece(probs, targets, n_bins) == pytest.approx(ref_adaptive(probs, targets, n_bins), abs=1e-10)
    over, under = ref_over_under(probs, targets, n_bins)
    got = over_under_confidence(probs, targets, n_bins)
    assert got["overconfidence"] == pytest.approx(over, abs=1e-10)
    assert got["underconfidence"] == pytest.approx(under, abs=1e-10)
    bins = reliability_bins(probs, targets, n_bins)
    ref = ref_reliability(probs, targets, n_bins)
    assert len(bins) == n_bins
    for b, r in zip(bins, ref, strict=True):
        assert b.keys() == r.keys()
        assert b["count"] == r["count"]
        for key in ("lower", "upper", "confidence", "accuracy"):
            assert (b[key] is None) == (r[key] is None)
            if r[key] is not None:
                assert b[key] == pytest.approx(r[key], abs=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_bins", BINS)
def test_classwise_and_scores_match_loops(seed, n_bins):
    probs, targets = mixed_data(seed)
    per_class = ref_classwise_per_class(probs, targets, n_bins)
    np.testing.assert_allclose(classwise_ece_per_class(probs, targets, n_bins), per_class, atol=1e-10)
    assert classwise_ece(probs, targets, n_bins) == pytest.approx(sum(per_class) / len(per_class), abs=1e-10)
    assert nll(probs, targets) == pytest.approx(ref_nll_probs(probs, targets), rel=1e-12)
    assert brier(probs, targets) == pytest.approx(ref_brier(probs, targets), abs=1e-12)


def test_classwise_bins_split_a_class_with_many_exact_zeros():
    """p_c = 0 exactly (one-hot rows) goes into the first bin together with small positive probabilities."""
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.95, 0.05], [0.6, 0.4]])
    targets = np.array([0, 1, 0, 1])
    # class 1, 15 bins: bin 0 = {0, 0, 0.05}: hits 1 of 3, mean p 0.05/3; bin 6 (0.4 in (6/15, 7/15]) = {0.4}: hit 1
    # class 0: bin 14 = {1, 1, 0.95}: hits 2 of 3, mean 2.95/3; bin 8 (0.6 in (8/15, 9/15]) = {0.6}: hit 0
    ce1 = 3 / 4 * abs(1 / 3 - 0.05 / 3) + 1 / 4 * abs(1 - 0.4)
    ce0 = 3 / 4 * abs(2 / 3 - 2.95 / 3) + 1 / 4 * abs(0 - 0.6)
    np.testing.assert_allclose(classwise_ece_per_class(probs, targets), [100 * ce0, 100 * ce1], atol=1e-12)
    assert classwise_ece(probs, targets) == pytest.approx(50 * (ce0 + ce1), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_nll_from_logits_matches_loop_and_cross_entropy(seed):
    g = np.random.default_rng(seed)
    logits = g.normal(0, 3, (40, 6))
    targets = g.integers(0, 6, 40)
    got = nll_from_logits(logits, targets)
    assert got == pytest.approx(ref_nll_logits(logits, targets), rel=1e-12)
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets))
    assert got == pytest.approx(float(ce), rel=1e-12)
    assert nll(softmax(logits), targets) == pytest.approx(got, rel=1e-10)


def test_nll_extremes():
    # logits far apart: stable from logits (no overflow, no floor), floored from probabilities
    logits = np.array([[1000.0, -1000.0], [1000.0, -1000.0]])
    assert nll_from_logits(logits, [0, 1]) == pytest.approx(1000.0, rel=1e-12)  # (0 + 2000) / 2
    probs = softmax(logits)
    assert probs[0, 1] == 0.0
    assert nll(probs, [0, 1]) == pytest.approx(-math.log(1e-12) / 2, rel=1e-12)
    assert nll(probs, [0, 1], eps=1e-6) == pytest.approx(-math.log(1e-6) / 2, rel=1e-12)
    assert nll(np.array([[0.25, 0.75]]), [1]) == pytest.approx(-math.log(0.75))


def test_brier_known_values():
    assert brier(np.eye(3), [0, 1, 2]) == 0.0
    assert brier(np.eye(3), [1, 2, 0]) == pytest.approx(2.0)
    assert brier(np.full((4, 5), 0.2), [0, 1, 2, 3]) == pytest.approx(1 - 1 / 5)
    assert brier(np.array([[0.7, 0.2, 0.1]]), [1]) == pytest.approx(0.7**2 + 0.8**2 + 0.1**2)


def test_ece_by_hand():
    # 5 bins; confidences 0.6 (edge: bin (0.4, 0.6]), 0.55 (same bin), 1.0 (last bin), 0.9 (last bin)
    probs = np.array([[0.6, 0.4], [0.55, 0.45], [1.0, 0.0], [0.1, 0.9]])
    targets = np.array([0, 1, 0, 1])
    # bin 2: conf (0.6 + 0.55) / 2 = 0.575, acc 1/2; bin 4: conf 0.95, acc 1
    assert ece(probs, targets, 5) == pytest.approx(100 * (0.5 * 0.075 + 0.5 * 0.05))
    assert mce(probs, targets, 5) == pytest.approx(7.5)
    assert over_under_confidence(probs, targets, 5) == pytest.approx({"overconfidence": 3.75, "underconfidence": 2.5})
    counts = [b["count"] for b in reliability_bins(probs, targets, 5)]
    assert counts == [0, 0, 2, 0, 2]


# ------------------------------------------------------------------------ torchmetrics


@pytest.mark.parametrize("seed", range(6))
def test_ece_and_mce_agree_with_torchmetrics(seed):
    """torchmetrics bins with torch.bucketize(right=True): left-closed [k/n, (k+1)/n) plus an extra bin for
    exactly 1.0, and casts confidences to float32. Our bins are right-closed, so the two differ only for a
    confidence exactly on an edge (or within float32 rounding of one): the data here is continuous (softmax of
    Gaussian logits, never exactly on an edge nor 1.0) and the tolerance covers float32 confidences."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = np.random.default_rng(seed)
    n, c = int(g.integers(200, 2000)), int(g.integers(2, 20))
    probs = softmax(g.normal(0, g.uniform(0.5, 4), (n, c)))
    targets = g.integers(0, c, n)
    tp, tt = torch.from_numpy(probs), torch.from_numpy(targets)
    for n_bins in (15, 10):
        ref_l1 = float(tm.multiclass_calibration_error(tp, tt, num_classes=c, n_bins=n_bins, norm="l1"))
        ref_max = float(tm.multiclass_calibration_error(tp, tt, num_classes=c, n_bins=n_bins, norm="max"))
        assert ece(probs, targets, n_bins) / 100 == pytest.approx(ref_l1, abs=1e-5)
        assert mce(probs, targets, n_bins) / 100 == pytest.approx(ref_max, abs=1e-5)


# ------------------------------------------------------------------------ invariants


def test_calibrated_by_construction_has_ece_near_zero():
    n, c = 200_000, 10
    probs, targets = calibrated_by_construction(n, c, seed=0)
    conf = probs.max(1)
    bound = noise_bound(conf, conf, 15)  # ~1.5 %; the expected ECE of a calibrated predictor is ~0.3 %
    assert bound < 2.0
    got = ece(probs, targets)
    assert got < bound
    assert adaptive_ece(probs, targets) < bound  # equal-mass bins: same sampling-noise scale
    # classwise: class k's bins hold p_k against 1[y = k], also calibrated by construction
    bounds = [noise_bound(probs[:, k], probs[:, k], 15) for k in range(c)]
    assert classwise_ece(probs, targets) < float(np.mean(bounds))
    # the same confidences with labels correct with probability p^2 (over-confident): far above the bound
    probs2, targets2 = calibrated_by_construction(n, c, seed=0, power=2.0)
    bad = over_under_confidence(probs2, targets2)
    assert ece(probs2, targets2) > 10 * bound
    assert bad["overconfidence"] > 10 * bound and bad["underconfidence"] == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_over_plus_under_is_ece(seed):
    g = np.random.default_rng(seed)
    # low-confidence rows that are mostly right (under-confident) and high-confidence rows with random labels
    # (over-confident), so both parts are non-zero
    logits = np.concatenate([g.normal(0, 0.3, (250, 7)), g.normal(0, 4, (250, 7))])
    targets = np.concatenate([logits[:250].argmax(1), g.integers(0, 7, 250)])
    probs = softmax(logits)
    for n_bins in (15, 5):
        parts = over_under_confidence(probs, targets, n_bins)
        assert parts["overconfidence"] > 0 and parts["underconfidence"] > 0  # both signs present
        assert parts["overconfidence"] + parts["underconfidence"] == pytest.approx(ece(probs, targets, n_bins),
                                                                                     abs=1e-12)
        bins = reliability_bins(probs, targets, n_bins)
        assert sum(b["count"] for b in bins) == 500
        from_bins = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
        assert from_bins == pytest.approx(ece(probs, targets, n_bins), abs=1e-10)


def test_one_bin_and_one_sample_per_bin():
    g = np.random.default_rng(5)
    probs = softmax(g.normal(0, 2, (37, 5)))
    targets = g.integers(0, 5, 37)
    conf, correct = probs.max(1), (probs.argmax(1) == targets)
    overall = 100 * abs(correct.mean() - conf.mean())
    assert ece(probs, targets, 1) == pytest.approx(overall, abs=1e-12)
    assert adaptive_ece(probs, targets, 1) == pytest.approx(overall, abs=1e-12)
    assert mce(probs, targets, 1) == pytest.approx(overall, abs=1e-12)
    per_sample = 100 * np.mean(np.abs(correct - conf))
    assert adaptive_ece(probs, targets, 37) == pytest.approx(per_sample, abs=1e-12)
    assert adaptive_ece(probs, targets, 100) == pytest.approx(per_sample, abs=1e-12)  # more bins than samples


def test_adaptive_bins_keep_tied_confidences_in_input_order():
    # three samples of confidence 0.5, correct, correct, wrong; 2 bins of sizes 2 and 1 (array_split):
    # the stable sort keeps the input order -> {0, 1} (acc 1, gap 0.5), {2} (acc 0, gap 0.5) -> 50 %
    # (reversing the tie order would give {2, 1} (gap 0), {0} (gap 0.5) -> 16.7 %)
    probs = np.tile([0.5, 0.3, 0.2], (3, 1))
    assert adaptive_ece(probs, [0, 0, 1], 2) == pytest.approx(50.0)
    assert adaptive_ece(probs, [0, 0, 1], 2) == pytest.approx(ref_adaptive(probs, np.array([0, 0, 1]), 2))
    assert adaptive_ece(probs, [1, 0, 0], 2) == pytest.approx(100 * (2 / 3 * 0 + 1 / 3 * 0.5))


def test_temperature_changes_ece_not_accuracy():
    g = np.random.default_rng(1)
    logits = g.normal(0, 3, (2000, 10))
    targets = np.where(g.random(2000) < 0.5, logits.argmax(1), g.integers(0, 10, 2000))
    base = ece(softmax(logits), targets)
    for t in (0.5, 2.0, 4.0):
        scaled = apply_temperature(logits, t)
        assert (scaled.argmax(1) == logits.argmax(1)).all()
        assert abs(ece(softmax(scaled), targets) - base) > 1.0
    tensor = torch.from_numpy(logits).float()
    out = apply_temperature(tensor, 2.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, tensor / 2.0)


def sample_labels(logits: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    probs = softmax(logits / temperature)
    u = np.random.default_rng(seed).random((len(probs), 1))
    return np.minimum((probs.cumsum(1) < u).sum(1), probs.shape[1] - 1)


@pytest.mark.parametrize("t_true", [2.5, 0.6])
def test_fit_temperature_recovers_known_temperature(t_true):
    g = np.random.default_rng(11)
    logits = g.normal(0, 2.0, (20_000, 10))
    targets = sample_labels(logits, t_true, seed=12)
    t_fit = fit_temperature(logits, targets)
    assert t_fit == pytest.approx(t_true, rel=0.03)
    # it is the minimum: moving 1 % either way raises the NLL
    at = nll_from_logits(logits / t_fit, targets)
    assert at < nll_from_logits(logits / (t_fit * 1.01), targets)
    assert at < nll_from_logits(logits / (t_fit / 1.01), targets)
    # the same from a torch tensor; deterministic
    assert fit_temperature(torch.from_numpy(logits), torch.from_numpy(targets)) == t_fit
    # the scaled logits are better calibrated than the raw ones
    assert ece(softmax(apply_temperature(logits, t_fit)), targets) < ece(softmax(logits), targets)


def test_fit_temperature_stops_at_the_bounds():
    # perfectly separated: the NLL keeps falling as T -> 0, so the lower bound is returned
    # (margin 1: the NLL log(1 + 3 exp(-1 / T)) is still above 0 in float64 at T = 0.05)
    logits = np.eye(4)[[0, 1, 2, 3, 0]] * 1.0
    assert fit_temperature(logits, [0, 1, 2, 3, 0]) == pytest.approx(0.05, rel=1e-5)
    # the label is always the lowest logit: the NLL falls towards log C as T -> inf, the upper bound is returned
    logits = np.random.default_rng(0).normal(size=(300, 5))
    assert fit_temperature(logits, logits.argmin(1), bounds=(0.1, 5.0)) == pytest.approx(5.0, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_temperature_matches_a_grid_search(seed):
    g = np.random.default_rng(seed)
    logits = g.normal(0, 3, (400, 6))
    targets = np.where(g.random(400) < 0.5, logits.argmax(1), g.integers(0, 6, 400))
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 3001))  # spacing 0.2 % in T
    scaled = logits[None] / grid[:, None, None]  # (G, N, C), the NLL of every grid point at once
    m = scaled.max(2, keepdims=True)
    nlls = (np.log(np.exp(scaled - m).sum(2)) + m[..., 0] - scaled[:, np.arange(400), targets]).mean(1)
    best = grid[int(np.argmin(nlls))]
    assert 0.1 < best < 10  # an interior minimum
    assert fit_temperature(logits, targets) == pytest.approx(best, rel=0.003)


# ------------------------------------------------------------------------ per-class summary


def test_per_class_summary_known_vector():
    s = per_class_summary([100, 50, 25])
    assert s["worst"] == 25.0
    assert s["harmonic_mean"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 25))  # 42.857...
    assert s["harmonic_mean"] == pytest.approx(42.857142857142854)
    assert s["geometric_mean"] == pytest.approx(50.0)
    assert s["n_classes"] == 3


def test_per_class_summary_matches_statistics_and_skips_missing():
    g = np.random.default_rng(3)
    acc = g.uniform(1, 100, 30)
    with_missing = [None, *acc.tolist(), float("nan")]
    s = per_class_summary(with_missing)
    assert s["n_classes"] == 30
    assert s["worst"] == pytest.approx(min(acc))
    assert s["harmonic_mean"] == pytest.approx(statistics.harmonic_mean(acc.tolist()), rel=1e-12)
    assert s["geometric_mean"] == pytest.approx(statistics.geometric_mean(acc.tolist()), rel=1e-12)
    assert per_class_summary(np.array([np.nan, *acc])) == s
    assert per_class_summary(torch.tensor(acc)) == pytest.approx(s)


def test_per_class_summary_zero_and_empty():
    s = per_class_summary([80.0, 0.0, None, 60.0])
    assert s == {"worst": 0.0, "harmonic_mean": 0.0, "geometric_mean": 0.0, "n_classes": 3}
    assert per_class_summary([None, float("nan")]) == {
        "worst": None, "harmonic_mean": None, "geometric_mean": None, "n_classes": 0}
    assert per_class_summary([])["worst"] is None


# ------------------------------------------------------------------------ report


def test_calibration_report_matches_the_functions():
    g = np.random.default_rng(4)
    n, c = 600, 8
    logits = g.normal(0, 2.5, (n, c))
    targets = np.where(g.random(n) < 0.6, logits.argmax(1), g.integers(0, c, n))
    targets[targets == 7] = 6  # class 7 has no test sample
    groups = {"many": [0, 1, 2], "medium": np.array([3, 4, 3]), "few": torch.tensor([5, 6]), "empty": [],
              "unseen": [7]}
    r = calibration_report(torch.from_numpy(logits).float(), torch.from_numpy(targets), groups, n_bins=10)
    assert list(r) == ["n_samples", "ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "overconfidence",
                       "underconfidence", "n_bins", "bins", "groups"]
    json.dumps(r, allow_nan=False)  # JSON-ready: no NaN, no numpy scalars

    p = softmax(torch.from_numpy(logits).float())  # the report reads the float32 logits given
    z32 = torch.from_numpy(logits).float().double().numpy()
    assert r["n_samples"] == n and r["n_bins"] == 10
    assert r["ece"] == round(ece(p, targets, 10), 4)
    assert r["mce"] == round(mce(p, targets, 10), 4)
    assert r["adaptive_ece"] == round(adaptive_ece(p, targets, 10), 4)
    assert r["classwise_ece"] == round(classwise_ece(p, targets, 10), 4)
    assert r["nll"] == round(nll_from_logits(z32, targets), 6)
    assert r["brier"] == round(brier(p, targets), 6)
    ou = over_under_confidence(p, targets, 10)
    assert r["overconfidence"] == round(ou["overconfidence"], 4)
    assert r["underconfidence"] == round(ou["underconfidence"], 4)
    assert [b["count"] for b in r["bins"]] == [b["count"] for b in reliability_bins(p, targets, 10)]

    per_class = classwise_ece_per_class(p, targets, 10)
    for name, ids in (("many", [0, 1, 2]), ("medium", [3, 4]), ("few", [5, 6])):
        grp = r["groups"][name]
        rows = np.isin(targets, ids)
        assert grp["n_samples"] == int(rows.sum()) and grp["n_classes"] == len(ids)
        assert grp["ece"] == round(ece(p[rows], targets[rows], 10), 4)
        assert grp["mce"] == round(mce(p[rows], targets[rows], 10), 4)
        assert grp["adaptive_ece"] == round(adaptive_ece(p[rows], targets[rows], 10), 4)
        assert grp["nll"] == round(nll_from_logits(z32[rows], targets[rows]), 6)
        assert grp["brier"] == round(brier(p[rows], targets[rows]), 6)
        assert grp["classwise_ece"] == round(float(per_class[ids].mean()), 4)
    assert r["groups"]["empty"] is None
    unseen = r["groups"]["unseen"]
    assert unseen["n_samples"] == 0 and unseen["ece"] is None and unseen["nll"] is None
    assert unseen["classwise_ece"] == round(float(per_class[7]), 4)
    assert calibration_report(logits, targets)["groups"] == {}


def test_torch_float64_input_is_not_rounded_to_float32():
    # a confidence of exactly 0.6 is on the edge of 5 bins; float32(0.6) > 0.6 would move it up a bin
    probs = np.array([[0.6, 0.4], [0.9, 0.1]])
    targets = np.array([0, 0])
    want = ref_ece(probs, targets, 5)
    assert ece(torch.from_numpy(probs), torch.from_numpy(targets), 5) == pytest.approx(want, abs=1e-12)
    assert ece(probs.tolist(), targets.tolist(), 5) == pytest.approx(want, abs=1e-12)
    assert [b["count"] for b in reliability_bins(torch.from_numpy(probs), targets, 5)] == [0, 0, 1, 0, 1]


# ------------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    probs = np.array([[0.7, 0.3], [0.2, 0.8]])
    with pytest.raises(ValueError, match="2 rows but targets has 3 entries"):
        ece(probs, [0, 1, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\).*\[0, 2\]"):
        ece(probs, [0, 2])
    with pytest.raises(ValueError, match="must lie in"):
        brier(probs, [-1, 0])
    with pytest.raises(ValueError, match="integer class indices"):
        nll(probs, [0.5, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        ece(probs, [[0], [1]])
    with pytest.raises(ValueError, match="do not sum to 1.*softmax"):
        ece(np.array([[0.5, 0.3], [0.1, 0.2]]), [0, 1])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        ece(np.array([[1.5, -0.5]]), [0])
    with pytest.raises(ValueError, match="2-D"):
        ece(np.array([0.5, 0.5]), [0])
    with pytest.raises(ValueError, match="empty"):
        ece(np.zeros((0, 3)), [])
    with pytest.raises(ValueError, match="NaN"):
        mce(np.array([[np.nan, 0.5]]), [0])
    with pytest.raises(ValueError, match="n_bins"):
        ece(probs, [0, 1], n_bins=0)
    with pytest.raises(ValueError, match="n_bins"):
        adaptive_ece(probs, [0, 1], n_bins=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        nll(probs, [0, 1], eps=0.0)
    with pytest.raises(ValueError, match="logits has 2 rows but targets has 1"):
        nll_from_logits(probs, [0])
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(probs, [0, 1], bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="temperature must be"):
        apply_temperature(probs, 0.0)
    with pytest.raises(ValueError, match=r"groups\['few'\] holds class ids in \[1, 5\]"):
        calibration_report(probs, [0, 1], {"few": [1, 5]})
    with pytest.raises(ValueError, match="integer class ids"):
        calibration_report(probs, [0, 1], {"few": [0.5]})
    with pytest.raises(ValueError, match=r"percentages in \[0, 100\].*multiply"):
        per_class_summary([0.5, 1.2, 120.0])
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        per_class_summary([-1.0, 50.0])
    with pytest.raises(ValueError, match="finite"):
        bin_index([0.5, float("nan")], 15)
