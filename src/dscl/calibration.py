"""Calibration metrics: ECE / MCE, adaptive and classwise ECE, NLL, Brier, reliability bins, temperature scaling.

Networks trained on long-tailed data are more mis-calibrated and over-confident than ones trained on balanced
data (MiSLAS, Zhong et al. CVPR 2021), so besides top-1 and Many/Medium/Few accuracy the field reports how well
the predicted probabilities match the observed accuracies. Everything here is a pure function of arrays or
tensors (numpy or torch, any device); the computation is in float64 on the CPU.

Conventions shared by every function:

* ``probs`` is (N, C) class probabilities (rows sum to 1), ``logits`` (N, C) scores, ``targets`` (N,) integer
  labels in ``[0, C)``. Bad input raises ``ValueError`` (as :mod:`dscl.metrics` does) with what is wrong
  and how to fix it.
* The prediction is the argmax of a row (ties go to the lower class index, as in :mod:`dscl.metrics`) and
  the confidence is the row's maximum probability.
* Equal-width bins (the MiSLAS / Guo et al. 2017 convention): ``n_bins`` bins with edges ``k / n_bins``
  (k = 0 .. n_bins, each edge the float64 nearest to the fraction), right-closed:
  bin ``b`` holds ``edges[b] < x <= edges[b + 1]``, so ``(0, 1/15], (1/15, 2/15], ..., (14/15, 1]`` for 15 bins;
  a value of exactly 0 goes into the first bin, a value of exactly 1 into the last, and a value equal to an
  edge ``k / n_bins`` into the bin below that edge. (MiSLAS drops a confidence of exactly 0; torchmetrics
  uses left-closed bins ``[k/n, (k+1)/n)`` with an extra bin for exactly 1.0 and float32 confidences — the two
  agree except for confidences on an edge or within float32 rounding of one.)
* Calibration errors (ECE, MCE, adaptive / classwise ECE, over- / under-confidence) and the accuracies and
  confidences of reliability bins are in **percent** (0-100), like every accuracy in dscl; NLL (natural log)
  and the Brier score (0-2) are not percentages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from dscl.metrics import as_numpy

__all__ = [
    "NLL_EPS",
    "TEMPERATURE_BOUNDS",
    "bin_edges",
    "bin_index",
    "ece",
    "mce",
    "adaptive_ece",
    "classwise_ece",
    "classwise_ece_per_class",
    "nll",
    "nll_from_logits",
    "brier",
    "over_under_confidence",
    "reliability_bins",
    "per_class_summary",
    "calibration_report",
    "fit_temperature",
    "apply_temperature",
    "softmax",
]

#: Probability floor of :func:`nll` on probabilities: a true-class probability below it counts as this value,
#: so one sample adds at most ``-log(1e-12) ≈ 27.63`` nats (an exact 0 would make the mean infinite).
NLL_EPS: float = 1e-12

#: Search interval of :func:`fit_temperature` (the temperature, not its log).
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)

#: Tolerance of the row-sum check on ``probs`` (float32 softmax over thousands of classes drifts ~1e-5).
_SUM_ATOL = 1e-3

#: Elements per chunk of an (N, C) computation, so temporaries stay small for iNaturalist-sized C (8142).
_CHUNK = 4_000_000


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _as_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a numpy array, float64 tensors kept as float64 (a confidence of exactly 0.6 must not move
    across a bin edge), float16 / bfloat16 / float32 tensors as float32."""
    return as_numpy(x, name, keep_float64=True)


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1 (15 is the usual choice), got {n_bins!r}")
    return int(n_bins)


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """(N, C) float64 with N >= 1, C >= 1 and only finite entries."""
    arr = _as_array(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples): calibration needs at least one sample")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name} has NaN or infinite entries in {bad} row(s): calibration needs finite values")
    return arr


def _as_probs(x: Any, name: str = "probs") -> np.ndarray:
    """(N, C) float64 probabilities: entries in [0, 1] and rows summing to 1 (within ``_SUM_ATOL``)."""
    p = _as_matrix(x, name)
    lo, hi = float(p.min()), float(p.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values in [{lo:.6g}, {hi:.6g}]: pass softmax(logits) "
            "(dscl.calibration.softmax), or logits to nll_from_logits / calibration_report"
        )
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > _SUM_ATOL
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"{name}: {int(off.sum())} row(s) do not sum to 1 (row {i} sums to {sums[i]:.6g}): pass softmax(logits) "
            "over the class dimension (dim 1), not logits or unnormalised scores"
        )
    if lo < 0.0 or hi > 1.0:
        p = np.clip(p, 0.0, 1.0)
    return p


def _as_targets(x: Any, n: int, c: int, name: str = "targets", rows_of: str = "probs") -> np.ndarray:
    """(N,) int64 labels in [0, C), checked against the N rows of ``rows_of``."""
    t = _as_array(x, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,) class indices, got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{rows_of} has {n} rows but {name} has {t.shape[0]} entries: give one label per row")
    if t.dtype == np.bool_ or not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    if not np.issubdtype(t.dtype, np.integer) and (not np.isfinite(t).all() or np.any(np.mod(t, 1) != 0)):
        raise ValueError(f"{name} must hold integer class indices, got non-integer values (dtype {t.dtype})")
    t = t.astype(np.int64, copy=False)
    if t.size:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= c:
            raise ValueError(
                f"{name} must lie in [0, {c}) for {c} classes, got values in [{lo}, {hi}]: "
                "labels must be 0-based class indices matching the columns"
            )
    return t


def _inputs(probs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_probs(probs)
    t = _as_targets(targets, p.shape[0], p.shape[1])
    return p, t


def _conf_correct(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 confidence (max probability) and whether the argmax is the label (float 0/1)."""
    pred = p.argmax(axis=1)  # first maximum: ties go to the lower class index
    conf = p[np.arange(p.shape[0]), pred]
    return conf, (pred == t).astype(np.float64)


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


# --------------------------------------------------------------------------------------------------
# Binning
# --------------------------------------------------------------------------------------------------


def bin_edges(n_bins: int = 15) -> np.ndarray:
    """The ``n_bins + 1`` edges of the equal-width bins: ``k / n_bins`` for k = 0 .. n_bins (float64).

    Each edge is the float64 nearest to the fraction (computed as a division, not by accumulating a step),
    so a confidence written as ``0.6`` or ``3 / 5`` is exactly on the edge ``3 / 5`` of 5 bins.
    """
    n = _check_n_bins(n_bins)
    return np.arange(n + 1, dtype=np.float64) / n


def bin_index(values: Any, n_bins: int = 15) -> np.ndarray:
    """Equal-width bin of each value in [0, 1]: bin ``b`` holds ``edges[b] < x <= edges[b + 1]``.

    Right-closed bins ``(0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]``; exactly 0 goes into bin 0, exactly 1 into
    bin ``n - 1``, a value equal to an edge ``k / n`` into bin ``k - 1``. A value below 0 goes into the first
    bin, one above 1 into the last.

    Returns:
        int64 array of the shape of ``values``, entries in ``[0, n_bins)``.
    """
    edges = bin_edges(n_bins)
    x = np.asarray(_as_array(values, "values"), dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("values must be finite probabilities in [0, 1], got NaN or infinity")
    idx = np.searchsorted(edges, x, side="left") - 1  # edges[i-1] < x <= edges[i]  ->  i - 1
    return np.clip(idx, 0, len(edges) - 2).astype(np.int64, copy=False)


def _bin_sums(values: np.ndarray, hits: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of ``values``: sample count, sum of values, sum of hits (each (n_bins,) float64)."""
    idx = bin_index(values, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_v = np.bincount(idx, weights=values, minlength=n_bins)
    sum_h = np.bincount(idx, weights=hits, minlength=n_bins)
    return count, sum_v, sum_h


def _signed_gaps(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: weight ``|B_b| / N``, gap ``conf(B_b) - acc(B_b)`` (0 where empty), non-empty mask."""
    count, sum_c, sum_a = _bin_sums(conf, correct, n_bins)
    full = count > 0
    gap = np.zeros(n_bins, dtype=np.float64)
    gap[full] = (sum_c[full] - sum_a[full]) / count[full]
    return count / conf.shape[0], gap, full


# --------------------------------------------------------------------------------------------------
# Top-label calibration errors
# --------------------------------------------------------------------------------------------------


def _ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    w, gap, _ = _signed_gaps(conf, correct, n_bins)
    return float(np.sum(w * np.abs(gap)))


def _mce(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    _, gap, full = _signed_gaps(conf, correct, n_bins)
    return float(np.max(np.abs(gap[full])))


def _adaptive_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for part in np.array_split(order, n_bins):
        if part.size:
            total += part.size * abs(float(conf[part].mean()) - float(correct[part].mean()))
    return total / conf.shape[0]


def _over_under(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, float]:
    w, gap, _ = _signed_gaps(conf, correct, n_bins)
    return float(np.sum(w * np.maximum(gap, 0.0))), float(np.sum(w * np.maximum(-gap, 0.0)))


def ece(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction, equal-width bins (Guo et al. 2017; MiSLAS), percent.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` where ``B_b`` are the samples whose confidence (max
    probability) falls into bin ``b`` (see :func:`bin_index`: right-closed bins of width ``1 / n_bins``),
    ``acc`` the fraction of them whose argmax is the label and ``conf`` their mean confidence.

    Args:
        probs: (N, C) probabilities (numpy or torch); rows must sum to 1.
        targets: (N,) class indices in ``[0, C)``.
        n_bins: number of bins (15 as in MiSLAS).

    Returns:
        ECE in percent (0-100).
    """
    n_bins = _check_n_bins(n_bins)
    conf, correct = _conf_correct(*_inputs(probs, targets))
    return 100.0 * _ece(conf, correct, n_bins)


def mce(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """Maximum calibration error: ``max_b |acc(B_b) - conf(B_b)|`` over the non-empty equal-width bins, percent.

    Same bins as :func:`ece`; an empty bin has no gap and is left out (not counted as 0 — the same value,
    since gaps are non-negative and at least one bin is non-empty).

    Returns:
        MCE in percent (0-100).
    """
    n_bins = _check_n_bins(n_bins)
    conf, correct = _conf_correct(*_inputs(probs, targets))
    return 100.0 * _mce(conf, correct, n_bins)


def adaptive_ece(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """Adaptive (equal-mass) ECE of the top-1 prediction (Nguyen & O'Connor 2015; Nixon et al. 2019), percent.

    Split rule: the samples are sorted by confidence (stable sort, so equal confidences keep their input
    order) and the sorted order is cut with ``numpy.array_split(order, n_bins)``: the first ``N % n_bins``
    bins hold ``ceil(N / n_bins)`` samples and the rest ``floor(N / n_bins)``; when ``n_bins > N`` the
    trailing bins are empty and contribute nothing. Samples with equal confidence may land in different
    bins. The error is the same weighted gap as :func:`ece`: ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``.
    With ``n_bins = N`` each bin is one sample and the value is ``mean_i |1[correct_i] - conf_i|``.

    Returns:
        Adaptive ECE in percent (0-100).
    """
    n_bins = _check_n_bins(n_bins)
    conf, correct = _conf_correct(*_inputs(probs, targets))
    return 100.0 * _adaptive_ece(conf, correct, n_bins)


def over_under_confidence(probs: Any, targets: Any, n_bins: int = 15) -> dict[str, float]:
    """The ECE split into its over- and under-confident parts (equal-width bins of :func:`ece`), percent.

    ``overconfidence = sum_b |B_b| / N * max(conf(B_b) - acc(B_b), 0)`` and
    ``underconfidence = sum_b |B_b| / N * max(acc(B_b) - conf(B_b), 0)``; their sum is the ECE.

    Returns:
        ``{"overconfidence": float, "underconfidence": float}`` in percent.
    """
    n_bins = _check_n_bins(n_bins)
    conf, correct = _conf_correct(*_inputs(probs, targets))
    over, under = _over_under(conf, correct, n_bins)
    return {"overconfidence": 100.0 * over, "underconfidence": 100.0 * under}


def _reliability(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> list[dict[str, Any]]:
    count, sum_c, sum_a = _bin_sums(conf, correct, n_bins)
    edges = bin_edges(n_bins)
    out: list[dict[str, Any]] = []
    for b in range(n_bins):
        n_b = int(count[b])
        out.append({
            "lower": 100.0 * float(edges[b]),
            "upper": 100.0 * float(edges[b + 1]),
            "count": n_b,
            "confidence": 100.0 * float(sum_c[b]) / n_b if n_b else None,
            "accuracy": 100.0 * float(sum_a[b]) / n_b if n_b else None,
        })
    return out


def reliability_bins(probs: Any, targets: Any, n_bins: int = 15) -> list[dict[str, Any]]:
    """What a reliability diagram with bin counts needs: one entry per equal-width bin of :func:`ece`.

    Returns:
        ``n_bins`` dicts in bin order, ``{"lower", "upper", "count", "confidence", "accuracy"}``: the bin's
        edges (percent: bin ``b`` holds confidences in ``(lower, upper]``, the first one also 0), its number of
        samples (int), the mean confidence and the top-1 accuracy of those samples (percent). An empty bin
        has ``count`` 0 and ``confidence`` / ``accuracy`` None (not 0 or NaN, so the list is JSON-ready).
        ``sum_b count_b / N * |accuracy_b - confidence_b|`` over the non-empty bins is :func:`ece`.
    """
    n_bins = _check_n_bins(n_bins)
    conf, correct = _conf_correct(*_inputs(probs, targets))
    return _reliability(conf, correct, n_bins)


# --------------------------------------------------------------------------------------------------
# Classwise ECE
# --------------------------------------------------------------------------------------------------


def _classwise_per_class(p: np.ndarray, t: np.ndarray, n_bins: int) -> np.ndarray:
    """(C,) classwise calibration error of each class, as a fraction (see :func:`classwise_ece_per_class`)."""
    n, c = p.shape
    edges = bin_edges(n_bins)
    out = np.empty(c, dtype=np.float64)
    width = max(1, _CHUNK // max(n, 1))
    for start in range(0, c, width):
        stop = min(c, start + width)
        k = stop - start
        block = p[:, start:stop]  # (N, k)
        idx = np.clip(np.searchsorted(edges, block, side="left") - 1, 0, n_bins - 1)
        flat = (idx + (np.arange(k) * n_bins)[None, :]).ravel()  # (class, bin) -> class * n_bins + bin
        hits = (t[:, None] == np.arange(start, stop)[None, :]).astype(np.float64).ravel()
        sum_p = np.bincount(flat, weights=block.ravel(), minlength=k * n_bins).reshape(k, n_bins)
        sum_y = np.bincount(flat, weights=hits, minlength=k * n_bins).reshape(k, n_bins)
        # sum_b |B_b| / N * |mean_y - mean_p| = sum_b |sum_y - sum_p| / N  (an empty bin adds 0)
        out[start:stop] = np.abs(sum_y - sum_p).sum(axis=1) / n
    return out


def classwise_ece_per_class(probs: Any, targets: Any, n_bins: int = 15) -> np.ndarray:
    """Classwise calibration error of every class, percent (the terms :func:`classwise_ece` averages).

    For class ``c``, over **all** N samples: bin the predicted probability ``p_c`` into the equal-width bins
    of :func:`bin_index` (here a probability of exactly 0 is common and goes into the first bin) and compare
    each bin's mean ``p_c`` with the fraction of its samples whose label is ``c``:
    ``CE_c = sum_b |B_cb| / N * |mean_{i in B_cb} 1[y_i = c] - mean_{i in B_cb} p_ic|``.

    Returns:
        (C,) float64, percent; defined for a class with no sample too (then every indicator is 0).
    """
    n_bins = _check_n_bins(n_bins)
    p, t = _inputs(probs, targets)
    return 100.0 * _classwise_per_class(p, t, n_bins)


def classwise_ece(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019; the "static calibration error" of Nixon et al. 2019), percent.

    ``classwise-ECE = (1 / C) sum_c sum_b |B_cb| / N * |acc_c(B_cb) - conf_c(B_cb)|``: for every class ``c``
    the samples are binned by their predicted probability ``p_c`` (equal-width bins of :func:`bin_index`, over
    all N samples, whatever the prediction), ``acc_c`` is the fraction of a bin's samples whose label is
    ``c`` and ``conf_c`` its mean ``p_c``; the per-class errors (:func:`classwise_ece_per_class`) are averaged
    with equal weight per class.

    Returns:
        Classwise ECE in percent (0-100).
    """
    return float(np.mean(classwise_ece_per_class(probs, targets, n_bins)))


# --------------------------------------------------------------------------------------------------
# Proper scoring rules
# --------------------------------------------------------------------------------------------------


def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax of (N, C) logits in float64 (max-subtracted, so large logits do not overflow).

    Returns:
        (N, C) float64 numpy array of probabilities.
    """
    z = _as_matrix(logits, "logits")
    p = np.array(z, dtype=np.float64, copy=True)
    rows = max(1, _CHUNK // p.shape[1])
    for s in range(0, p.shape[0], rows):  # in place, chunk by chunk: no (N, C) temporary besides the output
        blk = p[s : s + rows]
        blk -= blk.max(axis=1, keepdims=True)
        np.exp(blk, out=blk)
        blk /= blk.sum(axis=1, keepdims=True)
    return p


def _nll_probs(p: np.ndarray, t: np.ndarray, eps: float) -> float:
    true_p = p[np.arange(p.shape[0]), t]
    return float(-np.mean(np.log(np.maximum(true_p, eps))))


def nll(probs: Any, targets: Any, eps: float = NLL_EPS) -> float:
    """Mean negative log-likelihood of the true class from probabilities (natural log, not percent).

    ``-mean_i log(max(p_{i, y_i}, eps))``: a true-class probability below ``eps`` (default
    :data:`NLL_EPS` = 1e-12) counts as ``eps``, so a sample adds at most ``-log(eps)`` (27.63 nats) instead of
    infinity. From logits prefer :func:`nll_from_logits`, which needs no floor.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (the floor of the true-class probability), got {eps}")
    p, t = _inputs(probs, targets)
    return _nll_probs(p, t, eps)


def _nll_logits(zc: np.ndarray, gap: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL of ``softmax(z / T)`` from centred logits ``zc = z - max_c z`` and ``gap = max_c z - z_y``:
    ``logsumexp(z / T) - z_y / T = log sum_c exp(zc / T) + gap / T``; the sum is >= 1 (its largest term is
    ``exp(0)``), so nothing overflows or underflows into log(0). Chunked over rows."""
    n, c = zc.shape
    rows = max(1, _CHUNK // c)
    total = 0.0
    for s in range(0, n, rows):
        total += float(np.log(np.exp(zc[s : s + rows] / temperature).sum(axis=1)).sum())
    return (total + float(gap.sum()) / temperature) / n


def _logits_targets(logits: Any, targets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred float64 logits ``z - max_c z`` (N, C), the margins ``max_c z - z_y`` (N,) and the labels (N,)."""
    z = _as_matrix(logits, "logits")
    t = _as_targets(targets, z.shape[0], z.shape[1], rows_of="logits")
    zc = z - z.max(axis=1, keepdims=True)
    return zc, -zc[np.arange(z.shape[0]), t], t


def nll_from_logits(logits: Any, targets: Any) -> float:
    """Mean negative log-likelihood of the true class from logits (natural log, not percent).

    ``mean_i [logsumexp_c z_ic - z_{i, y_i}]`` = cross-entropy of ``log_softmax``, in float64 with the row
    maximum subtracted first; stable for any finite logits (no probability is formed, so no floor is needed).
    """
    zc, gap, _ = _logits_targets(logits, targets)
    return _nll_logits(zc, gap)


def _brier(p: np.ndarray, t: np.ndarray) -> float:
    # sum_c (p_c - 1[c = y])^2 = sum_c p_c^2 - 2 p_y + 1; einsum forms no (N, C) temporary
    sq = np.einsum("ij,ij->i", p, p)
    true_p = p[np.arange(p.shape[0]), t]
    return float(np.mean(np.maximum(sq - 2.0 * true_p + 1.0, 0.0)))


def brier(probs: Any, targets: Any) -> float:
    """Multiclass Brier score (Brier 1950): ``mean_i sum_c (p_ic - 1[y_i = c])^2``, in [0, 2], not percent.

    0 for a one-hot correct prediction, 2 for a one-hot wrong one, ``1 - 1/C`` for uniform probabilities.
    """
    p, t = _inputs(probs, targets)
    return _brier(p, t)


# --------------------------------------------------------------------------------------------------
# Per-class accuracy summaries
# --------------------------------------------------------------------------------------------------


def per_class_summary(per_class_accuracy: Any) -> dict[str, Any]:
    """Worst-class accuracy, harmonic mean and geometric mean of per-class accuracies (percent in, percent out).

    Entries that are None or NaN (classes without test images, as :func:`dscl.metrics.summarize` reports
    them) are left out. A class with accuracy 0 makes the harmonic and the geometric mean exactly 0 (their
    limits; ``1 / 0`` and ``log 0`` are not evaluated).

    Args:
        per_class_accuracy: (C,) accuracies in percent, each in [0, 100] or None / NaN.

    Returns:
        ``{"worst", "harmonic_mean", "geometric_mean", "n_classes"}``: percent values (all None when no class
        has an accuracy) and the number of classes that entered them.
    """
    if isinstance(per_class_accuracy, (np.ndarray, torch.Tensor)):
        arr = _as_array(per_class_accuracy, "per_class_accuracy")
        if arr.ndim != 1:
            raise ValueError(f"per_class_accuracy must be 1-D (C,), got shape {tuple(arr.shape)}")
        values = arr.astype(np.float64)
    else:
        if not isinstance(per_class_accuracy, Iterable):
            raise ValueError(f"per_class_accuracy must be a sequence of percentages, got {type(per_class_accuracy)}")
        try:
            values = np.array([np.nan if v is None else float(v) for v in per_class_accuracy], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"per_class_accuracy must hold numbers (percent) or None: {exc}") from exc
    acc = values[~np.isnan(values)]
    if acc.size and (float(acc.min()) < 0.0 or float(acc.max()) > 100.0):
        raise ValueError(
            f"per_class_accuracy must be percentages in [0, 100], got values in [{acc.min():.6g}, {acc.max():.6g}]"
            " (multiply fractions by 100)"
        )
    if not acc.size:
        return {"worst": None, "harmonic_mean": None, "geometric_mean": None, "n_classes": 0}
    if float(acc.min()) == 0.0:
        harmonic = geometric = 0.0
    else:
        harmonic = float(acc.size / np.sum(1.0 / acc))
        geometric = float(np.exp(np.mean(np.log(acc))))
    return {"worst": float(acc.min()), "harmonic_mean": harmonic, "geometric_mean": geometric,
            "n_classes": int(acc.size)}


# --------------------------------------------------------------------------------------------------
# Everything in one report
# --------------------------------------------------------------------------------------------------


def _scalar_metrics(p: np.ndarray, t: np.ndarray, n_bins: int, nll_value: float) -> dict[str, Any]:
    conf, correct = _conf_correct(p, t)
    over, under = _over_under(conf, correct, n_bins)
    return {
        "n_samples": int(p.shape[0]),
        "ece": _r(100.0 * _ece(conf, correct, n_bins), 4),
        "mce": _r(100.0 * _mce(conf, correct, n_bins), 4),
        "adaptive_ece": _r(100.0 * _adaptive_ece(conf, correct, n_bins), 4),
        "nll": _r(nll_value, 6),
        "brier": _r(_brier(p, t), 6),
        "overconfidence": _r(100.0 * over, 4),
        "underconfidence": _r(100.0 * under, 4),
    }


def _group_classes(name: str, ids: Any, c: int) -> np.ndarray:
    arr = np.asarray(_as_array(ids, f"groups[{name!r}]"))
    if arr.ndim != 1:
        raise ValueError(f"groups[{name!r}] must be a 1-D list of class ids, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"groups[{name!r}] must hold integer class ids, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"groups[{name!r}] holds class ids in [{lo}, {hi}] but the logits have {c} classes [0, {c})")
    return np.unique(arr.astype(np.int64))


def calibration_report(
    logits: Any, targets: Any, groups: Mapping[str, Any] | None = None, n_bins: int = 15
) -> dict[str, Any]:
    """Every calibration number of this module for one evaluation split, as a JSON-ready dict.

    Probabilities are ``softmax(logits)`` in float64; NLL comes from the logits (:func:`nll_from_logits`).

    Args:
        logits: (N, C) scores (numpy or torch).
        targets: (N,) class indices in ``[0, C)``.
        groups: optional ``{name: class ids}``, e.g. :func:`dscl.metrics.shot_groups` output
            (``{"many": [...], "medium": [...], "few": [...]}``); any names are accepted.
        n_bins: equal-width / equal-mass bins (15, as in MiSLAS).

    Returns:
        ``{"n_samples", "ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "overconfidence",
        "underconfidence", "n_bins", "bins", "groups"}``:

        * ``ece``, ``mce``, ``adaptive_ece``, ``classwise_ece``, ``overconfidence``, ``underconfidence``: percent,
          rounded to 4 decimals; ``nll`` (nats) and ``brier`` (0-2) rounded to 6 decimals.
        * ``bins``: :func:`reliability_bins` of all samples, its float fields rounded to 4 decimals.
        * ``groups``: ``{}`` when ``groups`` is None, else per name either None (a group with no class) or a
          dict with ``n_samples``, ``n_classes`` and the scalar metrics above. The sample metrics (``ece``,
          ``mce``, ``adaptive_ece``, ``nll``, ``brier``, ``overconfidence``, ``underconfidence``) are computed
          on the samples whose **true** class is in the group, with the same bins (weights ``|B_b| / n_group``);
          they are None when no test sample has a class of the group. ``classwise_ece`` of a group is the
          mean of :func:`classwise_ece_per_class` (computed over **all** samples) over the group's classes.
          Class ids are de-duplicated; a class may be in several groups.
    """
    n_bins = _check_n_bins(n_bins)
    zc, gap, t = _logits_targets(logits, targets)
    p = softmax(zc)
    n, c = p.shape
    per_class = _classwise_per_class(p, t, n_bins)
    scalars = _scalar_metrics(p, t, n_bins, _nll_logits(zc, gap))
    scalars["classwise_ece"] = _r(100.0 * float(per_class.mean()), 4)
    keys = ("n_samples", "ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "overconfidence",
            "underconfidence")
    report: dict[str, Any] = {k: scalars[k] for k in keys}
    report["n_bins"] = n_bins
    conf, correct = _conf_correct(p, t)
    report["bins"] = [{k: (_r(v, 4) if isinstance(v, float) else v) for k, v in b.items()}
                      for b in _reliability(conf, correct, n_bins)]
    report["groups"] = {}
    if groups is None:
        return report
    if not isinstance(groups, Mapping):
        raise ValueError(f"groups must map a group name to class ids (e.g. shot_groups(...)), got {type(groups)}")
    for name, ids in groups.items():
        classes = _group_classes(str(name), ids, c)
        if classes.size == 0:
            report["groups"][name] = None
            continue
        mask = np.isin(t, classes)
        if mask.any():
            rows = np.flatnonzero(mask)
            entry = _scalar_metrics(p[rows], t[rows], n_bins, _nll_logits(zc[rows], gap[rows]))
        else:
            entry = dict.fromkeys(keys, None)
            entry["n_samples"] = 0
        entry["classwise_ece"] = _r(100.0 * float(per_class[classes].mean()), 4)
        entry["n_classes"] = int(classes.size)
        report["groups"][name] = {k: entry[k] for k in ("n_samples", "n_classes", *keys[1:])}
    return report


# --------------------------------------------------------------------------------------------------
# Temperature scaling (Guo et al. 2017)
# --------------------------------------------------------------------------------------------------


def fit_temperature(
    logits: Any, targets: Any, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, tol: float = 1e-6
) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` on the given data.

    Fit it on a **validation** split (held-out training data) and apply it to the test logits with
    :func:`apply_temperature`; fitting on the test split itself reports an optimistic, invalid calibration.

    Method: golden-section search over ``u = log T`` in ``[log bounds[0], log bounds[1]]`` (default
    ``[log 0.05, log 20]``) until the bracket is shorter than ``tol``, returning ``exp`` of its midpoint;
    deterministic (no random start, no gradient). The NLL is convex in ``1 / T`` (a log-sum-exp of an affine
    function minus a linear term), hence unimodal in ``log T``, so the search finds the global minimum in the
    interval; when the minimum lies outside the interval (e.g. perfectly separated training logits, where
    the NLL keeps falling as T -> 0) the result is the nearest bound. The NLL is evaluated in float64.

    Args:
        logits: (N, C) validation logits (numpy or torch), N >= 1.
        targets: (N,) validation labels.
        bounds: ``(T_min, T_max)``, 0 < T_min < T_max.
        tol: length of the final bracket in ``log T`` (1e-6: T to about 1e-6 relative).

    Returns:
        T as a Python float.
    """
    lo_t, hi_t = (float(b) for b in bounds)
    if not (0.0 < lo_t < hi_t and math.isfinite(hi_t)):
        raise ValueError(f"bounds must be (T_min, T_max) with 0 < T_min < T_max < inf, got {bounds}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    zc, gap, _ = _logits_targets(logits, targets)

    def f(u: float) -> float:
        return _nll_logits(zc, gap, math.exp(u))

    a, b = math.log(lo_t), math.log(hi_t)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = b - inv_phi * (b - a), a + inv_phi * (b - a)
    f1, f2 = f(x1), f(x2)
    while b - a > tol:
        if f1 <= f2:  # the minimum is in [a, x2]
            b, x2, f2 = x2, x1, f1
            x1 = b - inv_phi * (b - a)
            f1 = f(x1)
        else:  # the minimum is in [x1, b]
            a, x1, f1 = x1, x2, f2
            x2 = a + inv_phi * (b - a)
            f2 = f(x2)
    return float(math.exp((a + b) / 2.0))


def apply_temperature(logits: Any, temperature: float) -> Any:
    """``logits / T``: a torch tensor stays a tensor (same dtype and device), anything else becomes a numpy array
    (floating dtypes kept, others as float64). The argmax, hence the accuracy, is unchanged for any T > 0."""
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0 (see fit_temperature), got {temperature}")
    if isinstance(logits, torch.Tensor):
        if not logits.is_floating_point():
            logits = logits.double()
        return logits / t
    arr = _as_array(logits, "logits")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr / t
