"""Evaluation: shot groups, per-class and Many/Medium/Few accuracy, post-hoc adjustments, reports.

The field's protocol (FIELD.md 1.4, METHOD.md B): top-1 on a class-balanced test set, plus the mean
per-class accuracy inside three groups defined by the *training* count of each class, with the OLTR /
classifier-balancing boundaries — Many: more than 100 training images, Few: fewer than 20, Medium:
everything in between (a class with exactly 100 or exactly 20 images is Medium).

The official DSCL code averages per *image* inside a group; on a balanced test set that equals the
mean of per-class accuracies used here, and the per-class mean is the right one when the test set is
not balanced.

Everything in this module is a function of arrays or tensors: no model, no data loader, no argv.
Report files are written atomically (temp file in the same folder, then ``os.replace``), so a crash
never leaves a half-written ``report.json``, ``report.md`` or plot behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "GROUPS",
    "shot_groups",
    "per_class_accuracy",
    "topk_correct",
    "confusion_matrix",
    "summarize",
    "logit_adjust",
    "tau_normalize",
    "class_means",
    "ncm_logits",
    "variant_row",
    "build_report",
    "report_rows",
    "write_report",
    "format_table",
]

#: Group names in display order (head to tail).
GROUPS: tuple[str, str, str] = ("many", "medium", "few")

#: Metrics of one table row (main method or post-hoc variant), percentages 0-100 or None.
_ROW_METRICS: tuple[str, ...] = ("top1", "top5", "top1_macro", "many", "medium", "few")

_DESIGN_KEYS: tuple[str, ...] = (
    "dataset", "method", "top1", "top5", "many", "medium", "few",
    "shot_classes", "per_class", "seed", "epochs", "wall_seconds",
)

# Plot colours per group (colour-blind safe Okabe-Ito: blue, orange, vermillion).
_GROUP_COLOURS: dict[str, str] = {"many": "#0072B2", "medium": "#E69F00", "few": "#D55E00"}
_GROUP_TITLES: dict[str, str] = {"many": "Many", "medium": "Medium", "few": "Few"}

ArrayLike = np.ndarray | torch.Tensor | Sequence[float] | Sequence[int]


# --------------------------------------------------------------------------------------------------
# Conversion and validation helpers
# --------------------------------------------------------------------------------------------------


def _as_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # bfloat16/float16 have no (or a lossy) numpy counterpart: widen before converting.
        if x.is_floating_point():
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to an array") from exc


def _as_labels(x: Any, name: str, num_classes: int | None = None) -> np.ndarray:
    """Return integer labels of shape (N,), checked against ``[0, num_classes)``."""
    arr = _as_numpy(x, name)
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
    arr = _as_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (C,), got shape {tuple(arr.shape)}")
    if arr.size and np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative, got min {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _as_logits(x: Any, name: str = "logits") -> np.ndarray:
    arr = _as_numpy(x, name)
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
    counts = torch.as_tensor(_as_numpy(train_counts, "train_counts"), dtype=torch.float64)
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
    tunes tau in [0, 1] on a validation split). The classifier's bias is dropped: the caller computes
    ``features @ tau_normalize(W).T`` with no bias term.

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
# Reports
# --------------------------------------------------------------------------------------------------


def _round(x: float | None, ndigits: int = 4) -> float | None:
    return None if x is None else round(float(x), ndigits)


def variant_row(method: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One table row ``{"method", "top1", "top5", "top1_macro", "many", "medium", "few"}``.

    Use it for post-hoc variants: ``variant_row("+ logit adjustment (τ=1)", summarize(...))``.
    """
    row: dict[str, Any] = {"method": str(method)}
    for key in _ROW_METRICS:
        value = summary.get(key)
        if value is not None and not isinstance(value, numbers.Real):
            raise ValueError(f"variant {method!r}: {key} must be a number or None, got {value!r}")
        row[key] = None if value is None or math.isnan(float(value)) else _round(float(value))
    return row


def build_report(
    summary: Mapping[str, Any],
    *,
    dataset: str,
    method: str,
    seed: int,
    epochs: int | Mapping[str, int],
    wall_seconds: float,
    split: str,
    selection: str,
    variants: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble the ``report.json`` object (DESIGN.md "report.json keys").

    Args:
        summary: output of :func:`summarize` for the main method.
        dataset, method: names shown in the report.
        seed: random seed of the run.
        epochs: training epochs (an int, or e.g. ``{"pretrain": 200, "classify": 40}``).
        wall_seconds: wall-clock duration of the run.
        split: ``"test"`` or ``"val"`` — the split the numbers come from.
        selection: one sentence on how the stage-2 epoch was chosen (e.g. "last epoch", or "best
            top-1 on the val split"), because selecting on the test set inflates results.
        variants: post-hoc rows (logit adjustment, τ-norm, NCM), each a mapping with ``method`` and the
            row metrics — e.g. from :func:`variant_row`.

    Returns:
        A JSON-serialisable dict with the DESIGN keys ``dataset, method, top1, top5, many, medium,
        few, shot_classes, per_class, seed, epochs, wall_seconds`` plus ``top1_macro``, ``split``,
        ``selection`` and ``variants``. Percentages are rounded to 4 decimals; missing values are None.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    missing = [k for k in ("top1", "top5", "top1_macro", *GROUPS, "shot_classes", "per_class")
               if k not in summary]
    if missing:
        raise ValueError(f"summary is missing {missing}; pass the dict returned by summarize()")
    if isinstance(epochs, Mapping):
        epochs_out: int | dict[str, int] = {str(k): int(v) for k, v in epochs.items()}
    else:
        epochs_out = int(epochs)
    main = variant_row(method, summary)
    report: dict[str, Any] = {
        "dataset": str(dataset),
        "method": str(method),
        "top1": main["top1"],
        "top5": main["top5"],
        "many": main["many"],
        "medium": main["medium"],
        "few": main["few"],
        "shot_classes": {g: int(summary["shot_classes"][g]) for g in GROUPS},
        "per_class": [
            {
                "class": str(row["class"]),
                "train_count": int(row["train_count"]),
                "test_count": int(row["test_count"]),
                "accuracy": _round(row["accuracy"]),
            }
            for row in summary["per_class"]
        ],
        "seed": int(seed),
        "epochs": epochs_out,
        "wall_seconds": round(float(wall_seconds), 2),
        "top1_macro": main["top1_macro"],
        "split": split,
        "selection": str(selection),
        "variants": [variant_row(str(v["method"]), v) for v in (variants or [])],
    }
    return report


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Main method row followed by the variant rows of a report (input for :func:`format_table`)."""
    return [variant_row(report["method"], report), *report.get("variants", [])]


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text aligned table ``Method | All | Many | Medium | Few`` (top-1 %, 1 decimal; — = n/a).

    Args:
        rows: mappings with ``method``, ``top1``, ``many``, ``medium``, ``few`` (e.g.
            :func:`report_rows`).
    """
    header = ["Method", "All", "Many", "Medium", "Few"]
    body = [[str(r["method"]), *(_fmt(r.get(k)) for k in ("top1", *GROUPS))] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True))
        return " | ".join([first, *rest])

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(b) for b in body)])


def _markdown(
    report: Mapping[str, Any], plots: Sequence[str], many_threshold: int, few_threshold: int
) -> str:
    epochs = report["epochs"]
    epochs_txt = (
        ", ".join(f"{k} {v}" for k, v in epochs.items()) if isinstance(epochs, Mapping) else str(epochs)
    )
    lines = [
        f"# dscl report: {report['method']} on {report['dataset']}",
        "",
        f"- Dataset: {report['dataset']}",
        f"- Method: {report['method']}",
        f"- Split: {report['split']}",
        f"- Selection: {report['selection']}",
        f"- Seed: {report['seed']}; epochs: {epochs_txt}; wall time: {report['wall_seconds']:.1f} s",
        "",
        "## Accuracy (%)",
        "",
        "| Method | All (top-1) | Many | Medium | Few | Top-5 | macro |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report_rows(report):
        cells = [_fmt(r.get(k)) for k in ("top1", *GROUPS, "top5", "top1_macro")]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    sc = report["shot_classes"]
    lines += [
        "",
        "Many / Medium / Few = mean per-class top-1 over classes with > "
        f"{many_threshold}, {few_threshold}–{many_threshold}, < {few_threshold} training images; "
        "macro = mean per-class top-1 over all classes; — = no class in that group.",
        "",
        "## Shot groups",
        "",
        f"Classes per group: Many {sc['many']}, Medium {sc['medium']}, Few {sc['few']} "
        f"(total {sc['many'] + sc['medium'] + sc['few']}).",
        "",
    ]
    for p in plots:
        lines += [f"![{Path(p).stem.replace('_', ' ')}]({p})", ""]
    lines += [
        "## Per-class accuracy",
        "",
        "| Class | Group | Train images | Test images | Top-1 (%) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report["per_class"]:
        n = row["train_count"]
        group = "Many" if n > many_threshold else "Few" if n < few_threshold else "Medium"
        lines.append(
            f"| {row['class']} | {group} | {n} | {row['test_count']} | {_fmt(row['accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` through a temp file in the same folder, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _save_figure(fig: Any, path: Path) -> Path:
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def _plot_per_class(
    report: Mapping[str, Any], path: Path, many_threshold: int, few_threshold: int
) -> Path:
    from matplotlib.figure import Figure  # pyplot-free: no global backend, renders with Agg

    rows = report["per_class"]
    counts = np.array([max(r["train_count"], 1) for r in rows], dtype=float)  # log axis: 0 -> 1
    acc = np.array([np.nan if r["accuracy"] is None else r["accuracy"] for r in rows], dtype=float)
    raw = np.array([r["train_count"] for r in rows])
    group_of = np.where(raw > many_threshold, "many", np.where(raw < few_threshold, "few", "medium"))
    x_lo = min(counts.min(), few_threshold) / 1.6
    x_hi = max(counts.max(), many_threshold) * 1.6

    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    spans = {"few": (x_lo, few_threshold), "medium": (few_threshold, many_threshold),
             "many": (many_threshold, x_hi)}
    for g, (a, b) in spans.items():
        ax.axvspan(a, b, color=_GROUP_COLOURS[g], alpha=0.08, lw=0)
        ax.text((a * b) ** 0.5, 103, _GROUP_TITLES[g], ha="center", va="bottom", fontsize=12,
                color=_GROUP_COLOURS[g], fontweight="bold")
    for t in (few_threshold, many_threshold):
        ax.axvline(t, color="0.35", ls="--", lw=1.2)
    for g in GROUPS:
        sel = (group_of == g) & ~np.isnan(acc)
        mean = report.get(g)
        label = f"{_GROUP_TITLES[g]}: {int(sel.sum())} classes, mean {_fmt(mean)}%"
        ax.scatter(counts[sel], acc[sel], s=46, color=_GROUP_COLOURS[g], edgecolor="black", lw=0.5,
                   zorder=3, label=label)
        if mean is not None:
            a, b = spans[g]
            ax.hlines(mean, a, b, color=_GROUP_COLOURS[g], lw=2, ls=":", zorder=2)
    if len(rows) <= 20:
        for xi, yi, r in zip(counts, acc, rows, strict=True):
            if not np.isnan(yi):
                ax.annotate(str(r["class"]), (xi, yi), xytext=(4, 4), textcoords="offset points",
                            fontsize=9, color="0.2",
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "alpha": 0.6, "lw": 0})
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(-3, 110)
    ax.set_xlabel("Training images per class (log scale)", fontsize=12)
    ax.set_ylabel(f"Top-1 accuracy on {report.get('split', 'test')} split (%)", fontsize=12)
    ax.set_title(
        f"Per-class accuracy vs training-set size — {report['method']} on {report['dataset']}\n"
        f"Many > {many_threshold}, Medium {few_threshold}–{many_threshold}, Few < {few_threshold} "
        "training images (dotted: group mean)",
        fontsize=12,
    )
    ax.tick_params(labelsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=10, framealpha=0.9)
    return _save_figure(fig, path)


def _plot_confusion(
    confusion: np.ndarray, names: Sequence[str], path: Path, title: str
) -> Path:
    from matplotlib.figure import Figure

    c = confusion.shape[0]
    totals = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=float), where=totals > 0)
    side = float(np.clip(4 + 0.35 * c, 6, 10))  # inches; larger only shrinks the text
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, shrink=0.85)
    cbar.set_label("Fraction of the true class's test images", fontsize=11)
    if c <= 30:
        ticks = np.arange(c)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=10 if c <= 15 else 8)
        ax.set_yticklabels(names, fontsize=10 if c <= 15 else 8)
    else:
        ax.tick_params(labelsize=10)
    if c <= 12:
        for i in range(c):
            for j in range(c):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=9,
                            color="white" if norm[i, j] > 0.5 else "black")
    suffix = "" if c <= 30 else " (index)"
    ax.set_xlabel(f"Predicted class{suffix}", fontsize=12)
    ax.set_ylabel(f"True class{suffix}", fontsize=12)
    ax.set_title(title, fontsize=12)
    return _save_figure(fig, path)


def write_report(
    out_dir: str | os.PathLike[str],
    report: Mapping[str, Any],
    *,
    confusion: np.ndarray | torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` under ``out_dir``, each atomically.

    Args:
        out_dir: run directory (created if needed).
        report: output of :func:`build_report`.
        confusion: optional (C, C) counts from :func:`confusion_matrix`; plotted (row-normalised) when
            C <= 100.
        class_names: axis labels for the confusion matrix (default: the report's per-class names).
        many_threshold, few_threshold: the shot-group boundaries used for the report (for shading).

    Returns:
        The paths written: report.json, plots, report.md.
    """
    out = Path(out_dir)
    plots_dir = out / "plots"
    written: list[Path] = []
    data = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    written.append(_atomic_write(out / "report.json", lambda f: f.write(data.encode("utf-8"))))

    names = list(class_names) if class_names is not None else [str(r["class"]) for r in report["per_class"]]
    plot_rel: list[str] = []
    if report["per_class"]:
        written.append(_plot_per_class(report, plots_dir / "per_class_accuracy.png",
                                       many_threshold, few_threshold))
        plot_rel.append("plots/per_class_accuracy.png")
    if confusion is not None:
        cm = _as_numpy(confusion, "confusion")
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"confusion must be (C, C), got shape {tuple(cm.shape)}")
        if cm.shape[0] <= 100:
            if len(names) != cm.shape[0]:
                raise ValueError(f"class_names has {len(names)} names but confusion is {tuple(cm.shape)}")
            title = f"Confusion matrix (row-normalised) — {report['method']} on {report['dataset']}"
            written.append(_plot_confusion(cm, names, plots_dir / "confusion_matrix.png", title))
            plot_rel.append("plots/confusion_matrix.png")

    md = _markdown(report, plot_rel, many_threshold, few_threshold)
    written.append(_atomic_write(out / "report.md", lambda f: f.write(md.encode("utf-8"))))
    return written
