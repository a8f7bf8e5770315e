"""Metrics: shot groups, per-class and Many/Medium/Few accuracy, post-hoc adjustments.

The field's protocol (FIELD.md 1.4, METHOD.md B): top-1 on a class-balanced test set, plus the mean
per-class accuracy inside three groups defined by the *training* count of each class, with the OLTR /
classifier-balancing boundaries — Many: more than 100 training images, Few: fewer than 20, Medium:
everything in between (a class with exactly 100 or exactly 20 images is Medium).

The official DSCL code averages per *image* inside a group; on a balanced test set that equals the
mean of per-class accuracies used here, and the per-class mean is the right one when the test set is
not balanced.

Everything in this module is a function of arrays or tensors: no model, no data loader, no argv.
Reports built from these numbers are :mod:`dscl.report`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "GROUPS",
    "shot_groups",
    "shot_group_bounds",
    "per_class_accuracy",
    "topk_correct",
    "confusion_matrix",
    "summarize",
    "logit_adjust",
    "tau_norm_logits",
    "tau_normalize",
    "class_means",
    "ncm_logits",
    "mean_or_none",
    "TEST_AGNOSTIC_FACTORS",
    "lt_test_priors",
    "accuracy_under_distributions",
]

#: Group names in display order (head to tail).
GROUPS: tuple[str, str, str] = ("many", "medium", "few")

ArrayLike = np.ndarray | torch.Tensor | Sequence[float] | Sequence[int]


# --------------------------------------------------------------------------------------------------
# Conversion and validation helpers
# --------------------------------------------------------------------------------------------------


def as_numpy(x: Any, name: str, *, keep_float64: bool = False) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to the CPU; float tensors become
    float32, float64 ones stay float64 with ``keep_float64``)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # bfloat16/float16 have no (or a lossy) numpy counterpart: widen before converting.
        if x.is_floating_point() and not (keep_float64 and x.dtype == torch.float64):
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to an array") from exc


def _as_labels(x: Any, name: str, num_classes: int | None = None) -> np.ndarray:
    """Return integer labels of shape (N,), checked against ``[0, num_classes)``."""
    arr = as_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(arr.shape)}")
    fractional = arr.size and not np.issubdtype(arr.dtype, np.integer) and np.any(np.mod(arr, 1) != 0)
    if fractional:
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if num_classes is not None and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return arr


def _as_counts(x: Any, name: str = "train_counts") -> np.ndarray:
    arr = as_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (C,), got shape {tuple(arr.shape)}")
    if arr.size and np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative, got min {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _as_logits(x: Any, name: str = "logits") -> np.ndarray:
    arr = as_numpy(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(arr.shape)}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(arr.shape)}")
    return arr


def _pct(x: float | None) -> float | None:
    """Fraction (0-1) -> percent (0-100); NaN/None -> None."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return 100.0 * float(x)


def mean_or_none(values: Any) -> float | None:
    """Mean of the entries that are neither NaN nor None, or None when there are none (never 0 for an
    empty group)."""
    arr = np.asarray([np.nan if v is None else v for v in values] if not isinstance(values, np.ndarray)
                     else values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else None


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def shot_groups(
    train_counts: ArrayLike, many_threshold: int = 100, few_threshold: int = 20
) -> dict[str, list[int]]:
    """Split classes into Many / Medium / Few shot groups by their training-set size.

    OLTR / classifier-balancing convention (FIELD.md 1.4): ``count > many_threshold`` is Many,
    ``count < few_threshold`` is Few, everything else (both thresholds included) is Medium.

    Args:
        train_counts: (C,) training images per class.
        many_threshold: a class needs strictly more images than this to be Many (default 100).
        few_threshold: a class with strictly fewer images than this is Few (default 20).

    Returns:
        ``{"many": [...], "medium": [...], "few": [...]}`` — ascending class indices; a group may be empty.
    """
    if few_threshold > many_threshold:
        raise ValueError(
            f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})"
        )
    counts = _as_counts(train_counts)
    many = counts > many_threshold
    few = counts < few_threshold
    medium = ~(many | few)
    return {
        "many": np.flatnonzero(many).tolist(),
        "medium": np.flatnonzero(medium).tolist(),
        "few": np.flatnonzero(few).tolist(),
    }


def shot_group_bounds(many_threshold: int = 100, few_threshold: int = 20) -> dict[str, str]:
    """The rule of :func:`shot_groups` in words, per group: the training counts each group holds.

    ``{"many": "> 100", "medium": "20–100", "few": "< 20"}`` for the default thresholds (both bounds of
    Medium included); for texts such as "classes with > 100 / 20–100 / < 20 training images".
    """
    return {"many": f"> {many_threshold}", "medium": f"{few_threshold}–{many_threshold}", "few": f"< {few_threshold}"}


def per_class_accuracy(preds: ArrayLike, targets: ArrayLike, num_classes: int) -> np.ndarray:
    """Accuracy of each class as a fraction in [0, 1].

    Args:
        preds: (N,) predicted class indices.
        targets: (N,) true class indices.
        num_classes: C.

    Returns:
        (C,) float64; NaN for a class with no test sample (it has no accuracy, not 0%).
    """
    preds_a = _as_labels(preds, "preds", num_classes)
    targets_a = _as_labels(targets, "targets", num_classes)
    if preds_a.shape != targets_a.shape:
        raise ValueError(f"preds {preds_a.shape} and targets {targets_a.shape} must have the same shape")
    total = np.bincount(targets_a, minlength=num_classes)
    correct = np.bincount(targets_a[preds_a == targets_a], minlength=num_classes)
    acc = np.full(num_classes, np.nan, dtype=np.float64)
    seen = total > 0
    acc[seen] = correct[seen] / total[seen]
    return acc


def topk_correct(logits: ArrayLike, targets: ArrayLike, k: int) -> np.ndarray:
    """Whether each sample's true class is among its ``k`` highest logits.

    Ties are broken towards the lower class index, the same rule as ``argmax``, so ``k=1`` agrees
    exactly with ``argmax(logits) == targets`` (and constant logits are not counted as all-correct).

    Args:
        logits: (N, C) scores.
        targets: (N,) true class indices.
        k: clipped to ``[1, C]``, so top-5 with 3 classes is top-3 (always correct).

    Returns:
        (N,) bool.
    """
    scores = _as_logits(logits)
    n, c = scores.shape
    targets_a = _as_labels(targets, "targets", c)
    if targets_a.shape[0] != n:
        raise ValueError(f"logits has {n} rows but targets has {targets_a.shape[0]} entries")
    k = max(1, min(int(k), c))
    out = np.empty(n, dtype=bool)
    # Rank of the true class = #classes scoring higher + #equal-scoring classes with a lower index.
    # Chunked so an (N, C) boolean temporary stays small for iNaturalist-sized C (8142).
    chunk = max(1, 4_000_000 // c)
    cols = np.arange(c)
    for start in range(0, n, chunk):
        s = scores[start : start + chunk]
        t = targets_a[start : start + chunk]
        true_score = s[np.arange(s.shape[0]), t][:, None]
        rank = (s > true_score).sum(1) + ((s == true_score) & (cols[None, :] < t[:, None])).sum(1)
        out[start : start + chunk] = rank < k
    return out


def confusion_matrix(preds: ArrayLike, targets: ArrayLike, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs.

    Returns:
        (C, C) int64; entry ``[i, j]`` = number of test samples of true class i predicted as j
        (rows = true class, so a row sums to that class's test count).
    """
    preds_a = _as_labels(preds, "preds", num_classes)
    targets_a = _as_labels(targets, "targets", num_classes)
    if preds_a.shape != targets_a.shape:
        raise ValueError(f"preds {preds_a.shape} and targets {targets_a.shape} must have the same shape")
    flat = np.bincount(targets_a * num_classes + preds_a, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def summarize(
    logits: ArrayLike,
    targets: ArrayLike,
    train_counts: ArrayLike,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All accuracy numbers the field reports, from logits on an evaluation split.

    Args:
        logits: (N, C) scores (torch tensor or numpy array); the prediction is the argmax.
        targets: (N,) true class indices.
        train_counts: (C,) training images per class (defines the shot groups).
        many_threshold, few_threshold: shot-group boundaries, see :func:`shot_groups`.
        class_names: optional C display names; default the class index as a string.

    Returns:
        A dict with ``top1``, ``top5`` (sample-averaged, percent), ``top1_macro`` (mean per-class
        accuracy, percent), ``many``, ``medium``, ``few`` (mean per-class accuracy over the group's
        classes that have test samples, percent; None when there is no such class — never 0),
        ``shot_classes`` (``{"many": n, "medium": n, "few": n}`` classes per group by training count),
        ``per_class`` (list of ``{"class", "train_count", "test_count", "accuracy"}``, accuracy in
        percent or None for a class with no test sample).
    """
    scores = _as_logits(logits)
    n, c = scores.shape
    if n == 0:
        raise ValueError("logits: the evaluation split is empty (0 samples)")
    targets_a = _as_labels(targets, "targets", c)
    if targets_a.shape[0] != n:
        raise ValueError(f"logits has {n} rows but targets has {targets_a.shape[0]} entries")
    counts = _as_counts(train_counts)
    if counts.shape[0] != c:
        raise ValueError(f"train_counts has {counts.shape[0]} classes but logits has {c} columns")
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} names but logits has {c} columns")
    names = [str(x) for x in class_names] if class_names is not None else [str(i) for i in range(c)]

    preds = scores.argmax(axis=1)
    acc = per_class_accuracy(preds, targets_a, c)
    test_counts = np.bincount(targets_a, minlength=c)
    groups = shot_groups(counts, many_threshold, few_threshold)

    summary: dict[str, Any] = {
        "top1": 100.0 * float(np.mean(preds == targets_a)),
        "top5": 100.0 * float(np.mean(topk_correct(scores, targets_a, 5))),
        "top1_macro": _pct(mean_or_none(acc)),
    }
    for g in GROUPS:
        summary[g] = _pct(mean_or_none(acc[groups[g]]))
    summary["shot_classes"] = {g: len(groups[g]) for g in GROUPS}
    summary["per_class"] = [
        {
            "class": names[i],
            "train_count": int(counts[i]),
            "test_count": int(test_counts[i]),
            "accuracy": _pct(float(acc[i])),
        }
        for i in range(c)
    ]
    return summary


# --------------------------------------------------------------------------------------------------
# Post-hoc adjustments (torch, pure)
# --------------------------------------------------------------------------------------------------


def logit_adjust(logits: torch.Tensor, train_counts: ArrayLike, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021, Eq. 9): ``logits - tau * log(prior)``.

    ``prior = train_counts / sum(train_counts)``. Subtracting the log-prior removes the head bias a
    classifier learns from long-tailed training data; tau = 1 is the Bayes-optimal choice for the
    balanced error, values 0.5-2 are commonly tuned on a validation split.

    Args:
        logits: (N, C).
        train_counts: (C,) training images per class; every entry must be > 0.
        tau: strength (0 returns the logits unchanged).

    Returns:
        (N, C) adjusted logits, same dtype and device as ``logits``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    counts = torch.as_tensor(as_numpy(train_counts, "train_counts"), dtype=torch.float64)
    if counts.ndim != 1 or counts.shape[0] != logits.shape[1]:
        raise ValueError(
            f"train_counts must be (C,) = ({logits.shape[1]},), got shape {tuple(counts.shape)}"
        )
    if bool((counts <= 0).any()):
        raise ValueError("train_counts must be > 0 for every class (log prior of an empty class is -inf)")
    log_prior = torch.log(counts / counts.sum())
    return logits - (tau * log_prior).to(dtype=logits.dtype, device=logits.device)


def tau_normalize(weight: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """τ-normalised classifier weights (Kang et al., ICLR 2020): ``W_c / ||W_c||_2 ** tau`` per row.

    Long-tailed training makes head-class weight vectors longer; dividing by a power of the norm
    rebalances the decision boundaries (tau = 0: unchanged, tau = 1: all rows unit length; the paper
    tunes tau in [0, 1] on a validation split). :func:`tau_norm_logits` divides a classifier's rows
    and, with each row, its bias.

    Args:
        weight: (C, D) linear-classifier weight (one row per class).
        tau: exponent.

    Returns:
        (C, D) normalised weights.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (C, D), got shape {tuple(weight.shape)}")
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (C, 1); a zero row stays zero
    return weight / norms.pow(tau)


def tau_norm_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tau: float,
                    stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of a τ-normalised linear classifier, in the feature space it was trained in.

    Each class's pair ``(W_c, b_c)`` is divided by ``||W_c||_2 ** tau``: logit ``c`` is
    ``(W_c . x + b_c) / ||W_c|| ** tau``. ``tau = 0`` is exactly the plain classifier, and at ``tau = 1``
    scaling a class's row and bias by any s > 0 changes nothing (only its direction and offset count).
    Kang et al. (ICLR 2020) use a classifier without bias; keeping the full bias beside divided rows let
    the bias decide on classifiers trained on raw features (rows of norm 15-24: top-1 67 -> 36, issue 28).

    ``weight`` / ``bias`` are the saved layer, which takes raw features. When the classifier was trained
    on z-scored features (``classifier.standardize``: ``stats`` = the training features' mean and std,
    folded into the saved layer as ``W / s`` and ``b - (W / s) m``), the fold is undone first: the
    features are standardised and the trained ``(W, b)`` normalised. τ-normalising the folded weight
    instead would rescale per-dimension factors and leave the features uncentred (near chance, issue #21).

    Args:
        features: ``(N, D)`` raw pooled features.
        weight: ``(C, D)`` saved weight; bias: ``(C,)`` saved bias or None.
        tau: exponent of the row norms (0: plain classifier, 1: unit rows, Kang et al. tune it in [0, 1]).
        stats: ``(mean (D,), std (D,))`` of the standardisation, or None for a classifier on raw features.
    """
    if tau == 0:  # W / ||W||^0 = W: the plain classifier, computed as the plain classifier is
        return torch.nn.functional.linear(features, weight, bias)
    dtype = features.dtype
    if stats is not None:  # in float64: undoing the fold must not add float32 rounding of its own
        features, weight = features.double(), weight.double()
        bias = bias.double() if bias is not None else None
        mean, std = (t.to(features.device, torch.float64) for t in stats)
        trained_w = weight * std[None, :]  # W = (W / s) * s
        trained_b = bias + weight @ mean if bias is not None else None  # b = (b - (W / s) m) + (W / s) m
        features, weight, bias = (features - mean) / std, trained_w, trained_b
    logits = features @ weight.T  # (N, C): W_c . x
    if bias is not None:
        logits = logits + bias
    norms = weight.norm(dim=1)  # (C,)
    # a zero row has no direction to normalise: its pair stays as it is (not a bias blown up by 1 / 0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return (logits / norms.pow(tau)).to(dtype)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of L2-normalised features, re-normalised to unit length (NCM prototypes).

    Args:
        features: (N, D) features (normalised inside).
        labels: (N,) class indices in ``[0, num_classes)``.
        num_classes: C.

    Returns:
        (C, D) unit-length class means; a class with no sample gets a zero row (cosine 0 to
        everything, so it is never the unique nearest mean).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must be (N,) = ({features.shape[0]},), got shape {tuple(labels.shape)}"
        )
    labels = labels.to(device=features.device, dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    z = F.normalize(features.float(), dim=1)
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device)
    sums.index_add_(0, labels, z)  # sums[c] = sum_{i: y_i = c} z_i
    # The mean and the sum point the same way; re-normalising the sum is the normalised mean.
    return F.normalize(sums, dim=1)


def ncm_logits(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Nearest-class-mean scores: cosine similarity of each normalised feature to each class mean.

    Args:
        features: (N, D).
        means: (C, D) from :func:`class_means`.

    Returns:
        (N, C) cosine similarities in [-1, 1]; argmax is the nearest class mean.
    """
    if features.ndim != 2 or means.ndim != 2 or features.shape[1] != means.shape[1]:
        raise ValueError(
            f"features (N, D) and means (C, D) must share D, got {tuple(features.shape)} "
            f"and {tuple(means.shape)}"
        )
    z = F.normalize(features.float(), dim=1)
    m = F.normalize(means.float(), dim=1)
    return z @ m.T  # (N, D) x (D, C) -> (N, C)


# --------------------------------------------------------------------------------------------------
# Test-agnostic evaluation: accuracy under other test label distributions
# --------------------------------------------------------------------------------------------------

#: Imbalance factors of the forward- and backward-long-tailed test distributions reported.
TEST_AGNOSTIC_FACTORS: tuple[int, ...] = (50, 25, 10, 5, 2)


def lt_test_priors(train_counts: Sequence[int], factor: float, direction: str) -> np.ndarray:
    """Class priors of a long-tailed test distribution (the test-agnostic protocol of SADE, Zhang et al. 2022).

    Classes are ranked by their training images (most first; ties by class index): rank ``r`` of ``C``
    gets ``factor ** (-r / (C - 1))`` (``forward``: the test set is long-tailed like the training set),
    ``factor ** (-(C - 1 - r) / (C - 1))`` (``backward``: the order reversed), or 1 (``uniform``),
    normalised to sum 1. ``factor`` is the ratio of the largest to the smallest prior.
    """
    counts = np.asarray(train_counts, dtype=float)
    c = len(counts)
    if c == 0:
        raise ValueError("train_counts is empty")
    if direction not in ("forward", "backward", "uniform"):
        raise ValueError(f"direction must be forward, backward or uniform, got {direction!r}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    rank = np.empty(c)
    rank[np.lexsort((np.arange(c), -counts))] = np.arange(c)  # 0 = most training images
    if direction == "uniform" or c == 1:
        weights = np.ones(c)
    else:
        exponent = rank if direction == "forward" else (c - 1 - rank)
        weights = float(factor) ** (-exponent / (c - 1))
    return weights / weights.sum()


def accuracy_under_distributions(per_class_accuracy: Sequence[float | None], train_counts: Sequence[int],
                           factors: Sequence[float] = TEST_AGNOSTIC_FACTORS) -> dict[str, float | None]:
    """Accuracy (%) under forward-long-tailed, uniform and backward-long-tailed test distributions.

    Computed exactly from the per-class accuracies: ``sum_c p_c * acc_c`` with the priors of
    :func:`lt_test_priors` (the expected accuracy on a test set drawn from those priors, given
    each class's accuracy). Classes without test images (accuracy None) are left out and the priors of
    the others renormalised. Returns ``{"forward-50": ..., ..., "uniform": ..., ..., "backward-50": ...}``
    in that order (forward from the largest factor down, backward from the smallest up); all None when
    no class has an accuracy.
    """
    acc = np.array([np.nan if a is None else float(a) for a in per_class_accuracy])
    if len(acc) != len(train_counts):
        raise ValueError(f"{len(acc)} per-class accuracies but {len(train_counts)} train counts")
    known = ~np.isnan(acc)
    names = ([(f"forward-{f:g}", "forward", f) for f in sorted(factors, reverse=True)] + [("uniform", "uniform", 1.0)]
             + [(f"backward-{f:g}", "backward", f) for f in sorted(factors)])
    out: dict[str, float | None] = {}
    for name, direction, factor in names:
        if not known.any():
            out[name] = None
            continue
        p = lt_test_priors(train_counts, factor, direction)[known]
        out[name] = round(float((p / p.sum() * acc[known]).sum()), 4)
    return out
