"""Report files of an evaluation: ``report.json``, ``report.md``, ``per_class.csv``,
``confusion.csv``, ``predictions.csv`` and ``plots/*.png``.

Files are written atomically (temp file in the same folder, then ``os.replace``), so a crash never
leaves a half-written report, CSV or plot behind. The numbers come from :mod:`dscl.metrics`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dscl.io import save_figure, write_csv, write_json, write_text
from dscl.metrics import GROUPS, accuracy_under_distributions, as_numpy, shot_group_bounds, shot_groups

#: Above this many classes ``confusion.csv`` lists the non-zero cells (true, predicted, count) instead
#: of the C x C matrix (iNaturalist 2018's 8,142 classes would make a 66-million-cell file).
DENSE_CONFUSION_MAX = 1000

#: Metrics of one table row (main method or post-hoc variant), percentages 0-100 or None.
_ROW_METRICS: tuple[str, ...] = ("top1", "top5", "top1_macro", "many", "medium", "few")

# Plot colours per group (colour-blind safe Okabe-Ito: blue, orange, vermillion).
_GROUP_COLOURS: dict[str, str] = {"many": "#0072B2", "medium": "#E69F00", "few": "#D55E00"}
_GROUP_TITLES: dict[str, str] = {"many": "Many", "medium": "Medium", "few": "Few"}


def _round(x: float | None, ndigits: int = 4) -> float | None:
    return None if x is None else round(float(x), ndigits)


def class_groups(train_counts: Sequence[int], many_threshold: int, few_threshold: int) -> list[str]:
    """Shot group (``many`` / ``medium`` / ``few``) of every class, in class order."""
    out = [""] * len(train_counts)
    for g, members in shot_groups(np.asarray(train_counts), many_threshold, few_threshold).items():
        for i in members:
            out[i] = g
    return out


def missing_classes_warning(report: Mapping[str, Any]) -> str | None:
    """One line naming the classes with no image in the evaluated split (left out of their group's
    mean, so "Few" may average 2 of 3 classes), or None when every class has images."""
    missing = report.get("missing_classes") or []
    if not missing:
        return None
    parts = []
    for g in GROUPS:
        names = [m["class"] for m in missing if m["group"] == g]
        if names:
            parts.append(f"{_GROUP_TITLES[g]} {', '.join(names)} (its mean is over "
                         f"{report['shot_classes_evaluated'][g]} of {report['shot_classes'][g]} classes)")
    return (f"warning: {len(missing)} class{'es have' if len(missing) > 1 else ' has'} no image in the "
            f"{report['split']} split and {'are' if len(missing) > 1 else 'is'} left out of the group means: "
            + "; ".join(parts))


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
    epochs: int | Mapping[str, int] | None,
    wall_seconds: float,
    split: str,
    selection: str,
    variants: Sequence[Mapping[str, Any]] | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the ``report.json`` object (DESIGN.md "report.json keys").

    Args:
        summary: output of :func:`summarize` for the main method.
        dataset, method: names shown in the report.
        seed: random seed of the run.
        epochs: training epochs (an int, or e.g. ``{"pretrain": 200, "classify": 40}``); None when
            unknown (an imported checkpoint).
        wall_seconds: wall-clock duration of the run.
        split: ``"test"`` or ``"val"`` — the split the numbers come from — or ``"data"``: new labelled
            data scored with the run (``dscl evaluate --run RUN DATA``).
        selection: one sentence on how the stage-2 epoch was chosen (e.g. "last epoch", or "best
            top-1 on the val split"), because selecting on the test set inflates results.
        variants: post-hoc rows (logit adjustment, τ-norm, NCM), each a mapping with ``method`` and the
            row metrics — e.g. from :func:`variant_row`.
        many_threshold, few_threshold: the shot-group boundaries the summary used.
        run_info: facts about how the run was made, merged in as top-level keys (JSON values), e.g.
            ``precision``, ``device``, ``torch_version``, ``global_batch``, ``world_size``, ``lr``,
            ``train_fingerprint`` (see :func:`dscl.evaluation.run_facts`).

    Returns:
        A JSON-serialisable dict with the DESIGN keys ``dataset, method, top1, top5, many, medium,
        few, shot_classes, per_class, seed, epochs, wall_seconds`` plus ``top1_macro``, ``split``,
        ``selection``, ``variants``, ``train_counts`` (C,), ``shot_classes_evaluated`` (classes per
        group with at least one image in the evaluated split: the group means average over these),
        ``missing_classes`` (``[{"class", "group"}]`` of the others), ``test_agnostic`` (accuracy under
        forward-long-tailed / uniform / backward-long-tailed test distributions,
        :func:`dscl.metrics.accuracy_under_distributions`) and the ``run_info`` keys.
        Percentages are rounded to 4 decimals; missing values are None.
    """
    if split not in ("test", "val", "data"):
        raise ValueError(f"split must be 'test', 'val' or 'data' (new labelled data), got {split!r}")
    missing = [k for k in ("top1", "top5", "top1_macro", *GROUPS, "shot_classes", "per_class")
               if k not in summary]
    if missing:
        raise ValueError(f"summary is missing {missing}; pass the dict returned by summarize()")
    epochs_out = ({str(k): int(v) for k, v in epochs.items()} if isinstance(epochs, Mapping)
                  else None if epochs is None else int(epochs))
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
        "per_class": [{"class": str(row["class"]), "train_count": int(row["train_count"]),
                       "test_count": int(row["test_count"]), "accuracy": _round(row["accuracy"])}
                      for row in summary["per_class"]],
        "seed": int(seed),
        "epochs": epochs_out,
        "wall_seconds": round(float(wall_seconds), 2),
        "top1_macro": main["top1_macro"],
        "split": split,
        "selection": str(selection),
        "variants": [variant_row(str(v["method"]), v) for v in (variants or [])],
    }
    report.update(_coverage(report["per_class"], many_threshold, few_threshold))
    # accuracy if the test set followed other label distributions (exact, from the per-class accuracies)
    report["test_agnostic"] = accuracy_under_distributions([r["accuracy"] for r in report["per_class"]],
                                                           [r["train_count"] for r in report["per_class"]])
    for key, value in (run_info or {}).items():
        if key in report:
            raise ValueError(f"run_info key {key!r} would replace the report's own {key!r}")
        report[key] = value
    return report


def _coverage(per_class: Sequence[Mapping[str, Any]], many_threshold: int, few_threshold: int) -> dict[str, Any]:
    """``train_counts``, ``shot_classes_evaluated`` and ``missing_classes`` of a report's per-class rows."""
    counts = [int(r["train_count"]) for r in per_class]
    groups = class_groups(counts, many_threshold, few_threshold)
    evaluated = dict.fromkeys(GROUPS, 0)
    missing = []
    for row, g in zip(per_class, groups, strict=True):
        if row["test_count"] > 0:
            evaluated[g] += 1
        else:
            missing.append({"class": str(row["class"]), "group": g})
    return {"train_counts": counts, "shot_classes_evaluated": evaluated, "missing_classes": missing}


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Main method row, the variant rows, then the paper's published row when the report carries one
    (``expected``: the run used a preset with published numbers unchanged) — input for :func:`format_table`."""
    rows = [variant_row(report["method"], report), *report.get("variants", [])]
    expected = report.get("expected")
    if isinstance(expected, Mapping) and expected.get("top1") is not None:
        rows.append({"method": "paper (published, see source)", "top1": expected.get("top1"), "top5": None,
                     "top1_macro": None, **{g: expected.get(g) for g in GROUPS}})
    return rows


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
        ", ".join(f"{k} {v}" for k, v in epochs.items()) if isinstance(epochs, Mapping)
        else "unknown" if epochs is None else str(epochs)
    )
    lines = [
        f"# dscl report: {report['method']} on {report['dataset']}",
        "",
        f"- Dataset: {report['dataset']}",
        f"- Method: {report['method']}",
        f"- Split: {report['split']}" + (f" ({report['data_source']})" if report.get("data_source") else ""),
        f"- Selection: {report['selection']}",
        f"- Seed: {report['seed']}; epochs: {epochs_txt}; wall time: {report['wall_seconds']:.1f} s",
        *_facts_lines(report),
        *([f"- Published numbers for this preset: {report['expected'].get('source')}"]
          if isinstance(report.get("expected"), Mapping) else []),
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
        "Many / Medium / Few = mean per-class top-1 over classes with "
        f"{', '.join(shot_group_bounds(many_threshold, few_threshold).values())} training images; "
        "macro = mean per-class top-1 over all classes; — = no class in that group.",
        "",
        *([f"**{warning}**", ""] if (warning := missing_classes_warning(report)) else []),
        "## Shot groups",
        "",
        f"Classes per group: Many {sc['many']}, Medium {sc['medium']}, Few {sc['few']} "
        f"(total {sc['many'] + sc['medium'] + sc['few']}).",
        "",
    ]
    lines += _test_agnostic_lines(report)
    for p in plots:
        lines += [f"![{Path(p).stem.replace('_', ' ')}]({p})", ""]
    lines += [
        "## Per-class accuracy",
        "",
        "| Class | Group | Train images | Test images | Top-1 (%) |",
        "|---|---|---:|---:|---:|",
    ]
    groups = class_groups([r["train_count"] for r in report["per_class"]], many_threshold, few_threshold)
    for row, group in zip(report["per_class"], groups, strict=True):
        lines.append(f"| {row['class']} | {_GROUP_TITLES[group]} | {row['train_count']} | {row['test_count']} | "
                     f"{_fmt(row['accuracy'])} |")
    return "\n".join(lines) + "\n"


def _test_agnostic_lines(report: Mapping[str, Any]) -> list[str]:
    """The "other test distributions" section of report.md (nothing for a report without it)."""
    ta = report.get("test_agnostic")
    if not isinstance(ta, Mapping) or not ta:
        return []
    return [
        "## Under other test distributions",
        "",
        "Top-1 % if the test set followed another label distribution: forward-long-tailed with imbalance "
        "ρ (class priors ∝ ρ^(−r/(C−1)), r = the class's rank by training images, most first: the test set "
        "long-tailed like the training set), uniform, and backward-long-tailed (the order reversed). Computed "
        "exactly from the per-class accuracies above (Σ prior × class accuracy), not by resampling; classes "
        "without test images are left out.",
        "",
        "| " + " | ".join(ta) + " |",
        "|" + "---:|" * len(ta),
        "| " + " | ".join(_fmt(v) for v in ta.values()) + " |",
        "",
    ]


def _plot_test_agnostic(report: Mapping[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    ta = report["test_agnostic"]
    names = list(ta)
    values = [np.nan if v is None else v for v in ta.values()]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(len(names)), values, marker="o", color="#1f77b4", lw=2)
    ax.axvline(names.index("uniform") if "uniform" in names else 0, color="0.5", ls="--", lw=1)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=10)
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(f"Accuracy under other test distributions — {report['method']} on {report['dataset']}\n"
                 f"forward: long-tailed like training; backward: reversed (exact, from the per-class accuracy "
                 f"on the {report.get('split', 'test')} split)", fontsize=11)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def _facts_lines(report: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the run facts a report carries (absent keys are skipped)."""
    def fact(key: str) -> str:
        value = report.get(key)
        return "?" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    lines = []
    imported = report.get("imported")
    if isinstance(imported, Mapping):
        lines.append(f"- Imported from {imported.get('from')} ({imported.get('format')} format"
                     + (f", epoch {imported['file_epoch']} of its training" if imported.get("file_epoch") else "")
                     + "): how it was trained is not known to dscl")
    if report.get("precision") or report.get("device"):
        lines.append(f"- Stage 1: {fact('precision')} on {fact('device')}, torch {fact('torch_version')}; "
                     f"global batch {fact('global_batch')} over {fact('world_size')} process(es), lr {fact('lr')}")
    spec = report.get("backbone")
    if isinstance(spec, Mapping):
        from dscl.backbones import BackboneSpec  # the builders import torchvision: only for a report that needs it

        s = BackboneSpec.from_dict(spec)
        args = f" {dict(s.args)}" if s.args else ""
        lines.append(f"- Backbone: {s.qualified_name}{args}, pool {s.pool}; inputs: {s.describe_inputs()}")
    if report.get("train_fingerprint"):
        lines.append(f"- Training set: {sum(report.get('train_counts', []))} images, fingerprint "
                     f"`{report['train_fingerprint']}` (same fingerprint = same samples in the same order)")
    if report.get("data_root"):
        lines.append(f"- Data folder: {report['data_root']}")
    conv = report.get("conventions")
    if isinstance(conv, Mapping):
        lines.append(f"- Profile {report.get('profile', 'default')}: patch BatchNorm {conv.get('patch_bn')}, "
                     f"roi_align aligned={conv.get('roi_aligned')}, queue start {conv.get('queue_init')}, "
                     f"stage-2 protocol {conv.get('classifier_protocol')}"
                     + (" on standardised features" if conv.get("classifier_standardize") else ""))
    return lines


def write_per_class_csv(path: Path, report: Mapping[str, Any], many_threshold: int = 100,
                        few_threshold: int = 20) -> Path:
    """``per_class.csv``: one row per class — index, name, shot group, training and evaluated-split
    image counts, top-1 accuracy in percent (empty for a class with no image in the split)."""
    rows = report["per_class"]
    groups = class_groups([int(r["train_count"]) for r in rows], many_threshold, few_threshold)
    return write_csv(path, ["class_index", "class", "group", "train_count", "test_count", "accuracy"], (
        [i, r["class"], g, r["train_count"], r["test_count"], "" if r["accuracy"] is None else r["accuracy"]]
        for i, (r, g) in enumerate(zip(rows, groups, strict=True))))


def write_confusion_csv(path: Path, confusion: np.ndarray, names: Sequence[str]) -> Path:
    """``confusion.csv``: counts, rows = true class, columns = predicted class, both named.

    Up to :data:`DENSE_CONFUSION_MAX` classes the full matrix (first column the true class's name);
    above, only the non-zero cells as ``true, predicted, count`` rows.
    """
    c = confusion.shape[0]
    if c <= DENSE_CONFUSION_MAX:
        return write_csv(path, ["true \\ predicted", *names],
                         ([names[i], *(int(v) for v in confusion[i])] for i in range(c)))
    true_idx, pred_idx = np.nonzero(confusion)
    return write_csv(path, ["true", "predicted", "count"],
                     ([names[int(i)], names[int(j)], int(confusion[i, j])]
                      for i, j in zip(true_idx, pred_idx, strict=True)))


def write_predictions(
    path: Path,
    logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    paths: Sequence[str | None] | None = None,
    k: int = 5,
) -> Path:
    """``predictions.csv``: one row per image of the evaluated split, in split order.

    Columns: ``index`` (position in the split), ``path`` (image file; empty for in-memory datasets),
    ``label`` / ``label_name``, ``prediction`` / ``prediction_name``, ``correct`` (0/1),
    ``confidence`` (softmax probability of the prediction) and ``top5`` (the k most likely class
    names, most likely first, separated by ``;``).

    Args:
        logits: (N, C) scores of the reported classifier.
        labels: (N,) true classes.
        class_names: C names.
        paths: N file paths (None entries or None for in-memory data).
        k: how many classes the ``top5`` column lists (fewer when C < k).
    """
    scores = torch.as_tensor(as_numpy(logits, "logits"), dtype=torch.float32)
    y = as_numpy(labels, "labels").astype(np.int64)
    if scores.ndim != 2 or scores.shape[0] != len(y):
        raise ValueError(f"logits must be (N, C) with N = {len(y)} labels, got {tuple(scores.shape)}")
    if scores.shape[1] != len(class_names):
        raise ValueError(f"{len(class_names)} class names for {scores.shape[1]} logit columns")
    if paths is not None and len(paths) != len(y):
        raise ValueError(f"{len(paths)} paths for {len(y)} images")
    probs = scores.softmax(1)
    conf, top = probs.topk(min(k, scores.shape[1]), dim=1)
    top_np, conf_np = top.numpy(), conf[:, 0].numpy()
    names = [str(n) for n in class_names]

    def rows() -> Any:
        for i in range(len(y)):
            pred = int(top_np[i, 0])
            yield [i, (paths[i] or "") if paths is not None else "", int(y[i]), names[y[i]], pred, names[pred],
                   int(pred == y[i]), f"{float(conf_np[i]):.4f}", ";".join(names[j] for j in top_np[i])]

    return write_csv(path, ["index", "path", "label", "label_name", "prediction", "prediction_name", "correct",
                            "confidence", "top5"], rows())


def _plot_per_class(
    report: Mapping[str, Any], path: Path, many_threshold: int, few_threshold: int
) -> Path:
    from matplotlib.figure import Figure  # pyplot-free: no global backend, renders with Agg

    rows = report["per_class"]
    counts = np.array([max(r["train_count"], 1) for r in rows], dtype=float)  # log axis: 0 -> 1
    acc = np.array([np.nan if r["accuracy"] is None else r["accuracy"] for r in rows], dtype=float)
    raw = np.array([r["train_count"] for r in rows])
    group_of = np.array(class_groups(raw.tolist(), many_threshold, few_threshold))
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
        ", ".join(f"{_GROUP_TITLES[g]} {b}" for g, b in shot_group_bounds(many_threshold, few_threshold).items())
        + " training images (dotted: group mean)",
        fontsize=12,
    )
    ax.tick_params(labelsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=10, framealpha=0.9)
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def write_report(
    out_dir: str | os.PathLike[str],
    report: Mapping[str, Any],
    *,
    confusion: np.ndarray | torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> list[Path]:
    """Write ``report.json``, ``report.md``, ``per_class.csv``, ``confusion.csv`` (when ``confusion`` is
    given) and ``plots/*.png`` under ``out_dir``, each atomically.

    Args:
        out_dir: run directory (created if needed).
        report: output of :func:`build_report`.
        confusion: optional (C, C) counts from :func:`confusion_matrix`; plotted (row-normalised) when
            C <= 100.
        class_names: axis labels for the confusion matrix (default: the report's per-class names).
        many_threshold, few_threshold: the shot-group boundaries used for the report (for shading).

    Returns:
        The paths written: report.json, per_class.csv, confusion.csv, plots, report.md.
    """
    out = Path(out_dir)
    plots_dir = out / "plots"
    written: list[Path] = []
    written.append(write_json(out / "report.json", report, ensure_ascii=False, allow_nan=False))

    names = list(class_names) if class_names is not None else [str(r["class"]) for r in report["per_class"]]
    written.append(write_per_class_csv(out / "per_class.csv", report, many_threshold, few_threshold))
    plot_rel: list[str] = []
    if report["per_class"]:
        written.append(_plot_per_class(report, plots_dir / "per_class_accuracy.png",
                                       many_threshold, few_threshold))
        plot_rel.append("plots/per_class_accuracy.png")
    if confusion is not None:
        cm = as_numpy(confusion, "confusion")
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"confusion must be (C, C), got shape {tuple(cm.shape)}")
        if len(names) != cm.shape[0]:
            raise ValueError(f"class_names has {len(names)} names but confusion is {tuple(cm.shape)}")
        written.append(write_confusion_csv(out / "confusion.csv", cm, names))
        if cm.shape[0] <= 100:
            title = f"Confusion matrix (row-normalised) — {report['method']} on {report['dataset']}"
            written.append(_plot_confusion(cm, names, plots_dir / "confusion_matrix.png", title))
            plot_rel.append("plots/confusion_matrix.png")
    if report.get("test_agnostic") and any(v is not None for v in report["test_agnostic"].values()):
        written.append(_plot_test_agnostic(report, plots_dir / "test_agnostic.png"))
        plot_rel.append("plots/test_agnostic.png")

    md = _markdown(report, plot_rel, many_threshold, few_threshold)
    written.append(write_text(out / "report.md", md))
    return written
