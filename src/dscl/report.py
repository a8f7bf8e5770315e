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

from dscl.calibration import per_class_summary
from dscl.io import save_figure, write_csv, write_json, write_text
from dscl.metrics import GROUPS, accuracy_under_distributions, as_numpy, shot_group_bounds, shot_groups

#: Above this many classes ``confusion.csv`` lists the non-zero cells (true, predicted, count) instead
#: of the C x C matrix (iNaturalist 2018's 8,142 classes would make a 66-million-cell file).
DENSE_CONFUSION_MAX = 1000

#: Metrics of one table row (main method or post-hoc variant), percentages 0-100 or None.
_ROW_METRICS: tuple[str, ...] = ("top1", "top5", "top1_macro", "many", "medium", "few")

#: Long-tail summary of a row's per-class top-1 (:func:`dscl.calibration.per_class_summary`), percent or None.
LONG_TAIL_METRICS: tuple[str, ...] = ("worst_class", "harmonic_mean", "geometric_mean")

#: Equal-width bins of every calibration number in a report: MiSLAS's (and Guo et al. 2017's) 15.
CALIBRATION_BINS = 15

#: The scalar calibration metrics of a row (keys of :func:`dscl.calibration.calibration_report`), table order.
CALIBRATION_SCALARS: tuple[str, ...] = ("ece", "adaptive_ece", "classwise_ece", "mce", "nll", "brier",
                                        "overconfidence", "underconfidence")

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


def long_tail_summary(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"worst_class", "harmonic_mean", "geometric_mean"}`` of a row's per-class top-1 (percent, 4 decimals):
    from ``summary["per_class"]`` (:func:`summarize` output, a report) through
    :func:`dscl.calibration.per_class_summary` (classes without images left out; a class at 0 % makes both
    means 0), else the values the mapping already holds (a row made before), else None."""
    per_class = summary.get("per_class")
    if isinstance(per_class, Sequence) and per_class:
        lt = per_class_summary([r.get("accuracy") for r in per_class])
        return {"worst_class": _round(lt["worst"]), "harmonic_mean": _round(lt["harmonic_mean"]),
                "geometric_mean": _round(lt["geometric_mean"])}
    return {k: (_round(summary[k]) if isinstance(summary.get(k), numbers.Real) else None) for k in LONG_TAIL_METRICS}


def calibration_scalars(calibration: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The scalar part of a ``calibration`` object (:func:`dscl.evaluation.calibration_section`) for a table row:
    ``n_samples``, :data:`CALIBRATION_SCALARS` and ``groups`` (per Many / Medium / Few: ``n_samples``,
    ``n_classes`` and the same scalars, or None), without reliability bins or temperature; None for None."""
    if not isinstance(calibration, Mapping):
        return None

    def scalars(entry: Mapping[str, Any]) -> dict[str, Any]:
        return {k: entry.get(k) for k in ("n_samples", "n_classes", *CALIBRATION_SCALARS) if k in entry}

    groups = calibration.get("groups") or {}
    return {**scalars(calibration),
            "groups": {g: scalars(e) if isinstance(e, Mapping) else None for g, e in groups.items()}}


def variant_row(method: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One table row ``{"method", "top1", "top5", "top1_macro", "many", "medium", "few", "worst_class",
    "harmonic_mean", "geometric_mean", "calibration"}``: the accuracies, the long-tail summary
    (:func:`long_tail_summary`) and :func:`calibration_scalars` of ``summary["calibration"]`` (None without).

    Use it for post-hoc variants: ``variant_row("+ logit adjustment (τ=1)", summarize(...))``.
    """
    row: dict[str, Any] = {"method": str(method)}
    for key in _ROW_METRICS:
        value = summary.get(key)
        if value is not None and not isinstance(value, numbers.Real):
            raise ValueError(f"variant {method!r}: {key} must be a number or None, got {value!r}")
        row[key] = None if value is None or math.isnan(float(value)) else _round(float(value))
    row.update(long_tail_summary(summary))
    row["calibration"] = calibration_scalars(summary.get("calibration"))
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

    ``summary["calibration"]`` (:func:`dscl.evaluation.calibration_section` of the main method's logits) becomes
    ``calibration``; without it ``calibration`` is None (no logits, no calibration).

    Returns:
        A JSON-serialisable dict with the DESIGN keys ``dataset, method, top1, top5, many, medium,
        few, shot_classes, per_class, seed, epochs, wall_seconds`` plus ``top1_macro``, ``split``,
        ``selection``, ``variants``, ``train_counts`` (C,), ``shot_classes_evaluated`` (classes per
        group with at least one image in the evaluated split: the group means average over these),
        ``missing_classes`` (``[{"class", "group"}]`` of the others), ``test_agnostic`` (accuracy under
        forward-long-tailed / uniform / backward-long-tailed test distributions,
        :func:`dscl.metrics.accuracy_under_distributions`), ``worst_class`` / ``harmonic_mean`` /
        ``geometric_mean`` (:func:`long_tail_summary`), ``calibration`` and the ``run_info`` keys.
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
        **{k: main[k] for k in LONG_TAIL_METRICS},
        "calibration": dict(summary["calibration"]) if isinstance(summary.get("calibration"), Mapping) else None,
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
    lines += _long_tail_lines(report)
    lines += _calibration_lines(report)
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


def _long_tail_lines(report: Mapping[str, Any]) -> list[str]:
    """The "long-tail summary" section of report.md: worst-class, harmonic and geometric mean accuracy per row."""
    rows = [r for r in report_rows(report) if any(r.get(k) is not None for k in LONG_TAIL_METRICS)]
    if not rows:
        return []
    lines = ["## Long-tail summary (%)", "",
             "Of the per-class top-1 accuracies: the worst class, and their harmonic and geometric means (both "
             "punish a class left behind more than the arithmetic mean, macro, does; a class at 0 % makes them 0). "
             "Classes without images in the split are left out.", "",
             "| Method | Worst class | Harmonic mean | Geometric mean |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | " + " | ".join(_fmt(r.get(k)) for k in LONG_TAIL_METRICS) + " |" for r in rows]
    return [*lines, ""]


def _cal_cells(cal: Mapping[str, Any]) -> list[str]:
    """ECE, adaptive, classwise, NLL, Brier, over / under, ECE Many / Medium / Few of one row."""
    def num(key: str, digits: int, entry: Mapping[str, Any] | None = cal) -> str:
        value = entry.get(key) if isinstance(entry, Mapping) else None
        return "—" if value is None else f"{value:.{digits}f}"

    groups = cal.get("groups") or {}
    return [num("ece", 2), num("adaptive_ece", 2), num("classwise_ece", 3), num("nll", 4), num("brier", 4),
            num("overconfidence", 2), num("underconfidence", 2), *(num("ece", 2, groups.get(g)) for g in GROUPS)]


def _calibration_lines(report: Mapping[str, Any]) -> list[str]:
    """The "calibration" section of report.md: one row per classifier (plain, after temperature scaling, the
    post-hoc rows), the conventions, and how the temperature was fitted or why there is none."""
    cal = report.get("calibration")
    if not isinstance(cal, Mapping):
        return []
    rows: list[tuple[str, Mapping[str, Any]]] = [(str(report["method"]), cal)]
    temp = cal.get("temperature")
    if isinstance(temp, Mapping):
        rows.append((str(temp.get("method")), temp))
    rows += [(str(v["method"]), v["calibration"]) for v in report.get("variants", [])
             if isinstance(v.get("calibration"), Mapping)]
    lines = [
        "## Calibration",
        "",
        "| Method | ECE | adaptive ECE | classwise ECE | NLL | Brier | over-conf. | under-conf. | ECE Many | "
        "ECE Medium | ECE Few |",
        "|---|" + "---:|" * 10,
    ]
    lines += [f"| {name} | " + " | ".join(_cal_cells(c)) + " |" for name, c in rows]
    lines += [
        "",
        f"ECE: expected calibration error of the top-1 prediction over {cal.get('n_bins', CALIBRATION_BINS)} "
        "equal-width bins of the confidence (the maximum softmax probability; right-closed bins), MiSLAS's "
        "convention (Zhong et al. 2021; Guo et al. 2017); over- / under-confidence split it into the bins where "
        "confidence exceeds / falls short of accuracy; adaptive ECE uses equal-mass bins; classwise ECE bins "
        "every class's probability and averages over classes (Kull et al. 2019); ECE Many / Medium / Few is over "
        "the images whose true class is in the group. ECEs in percent (0-100), NLL in nats, Brier score 0-2; "
        "lower is better for all.",
        "",
    ]
    note = cal.get("temperature_note")
    if note:
        lead = "Temperature scaling (same top-1, only the confidences change)" if isinstance(temp, Mapping) else \
            "No temperature-scaled row"
        lines += [f"{lead}: {note}.", ""]
    return lines


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
        augmentation = conv.get("augmentation")
        if isinstance(augmentation, Mapping):  # reports before issue #32 have none
            lines.append(f"- Augmentation policy: stage 1 {augmentation.get('views')}; stage 2 "
                         f"{augmentation.get('classifier')}")
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
    ``confidence`` (softmax probability of the prediction, computed in float64 and written with 8 decimals,
    so the report's ECE can be recomputed from this file and ``correct``) and ``top5`` (the k most likely
    class names, most likely first, separated by ``;``).

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
    probs = scores.double().softmax(1)  # float64, as dscl.calibration computes the report's ECE
    conf, top = probs.topk(min(k, scores.shape[1]), dim=1)
    top_np, conf_np = top.numpy(), conf[:, 0].numpy()
    names = [str(n) for n in class_names]

    def rows() -> Any:
        for i in range(len(y)):
            pred = int(top_np[i, 0])
            yield [i, (paths[i] or "") if paths is not None else "", int(y[i]), names[y[i]], pred, names[pred],
                   int(pred == y[i]), f"{float(conf_np[i]):.8f}", ";".join(names[j] for j in top_np[i])]

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


def _bin_arrays(bins: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, ...]:
    """Lower / upper edges, counts, mean confidences and accuracies (NaN where empty) of reliability bins."""
    lower = np.array([b["lower"] for b in bins], dtype=float)
    upper = np.array([b["upper"] for b in bins], dtype=float)
    count = np.array([b["count"] for b in bins], dtype=float)
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins], dtype=float)
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins], dtype=float)
    return lower, upper, count, conf, acc


def _plot_reliability(report: Mapping[str, Any], path: Path) -> Path:
    """Reliability diagram: per equal-width confidence bin, the top-1 accuracy (bars) against the diagonal of
    perfect calibration, the bin's mean confidence (dots) and below, the number of images per bin; one column
    for the plain classifier and one after temperature scaling when the report has it."""
    from matplotlib.figure import Figure

    cal = report["calibration"]
    panels: list[tuple[str, Mapping[str, Any]]] = [(str(report["method"]), cal)]
    if isinstance(cal.get("temperature"), Mapping):
        panels.append((str(cal["temperature"]["method"]), cal["temperature"]))
    fig = Figure(figsize=(6.2 * len(panels), 7.5), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1.2])
    for j, (name, entry) in enumerate(panels):
        lower, upper, count, conf, acc = _bin_arrays(entry["bins"])
        width, centre = upper - lower, (lower + upper) / 2
        ax = fig.add_subplot(grid[0, j])
        ax.bar(centre, np.nan_to_num(acc), width=width, color="#0072B2", edgecolor="black", lw=0.6, alpha=0.85,
               label="accuracy of the bin")
        gap_lo, gap_hi = np.fmin(acc, conf), np.fmax(acc, conf)
        ax.bar(centre, np.nan_to_num(gap_hi - gap_lo), bottom=np.nan_to_num(gap_lo), width=width,
               facecolor=(0.835, 0.369, 0.0, 0.18), edgecolor="#D55E00", hatch="//", lw=0.8,
               label="gap to the mean confidence")
        ax.plot([0, 100], [0, 100], ls="--", color="0.3", lw=1.2, label="perfect calibration")
        ax.plot(conf, acc, "o", color="black", ms=4, label="(mean confidence, accuracy)")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_ylabel("Top-1 accuracy (%)", fontsize=11)
        ax.set_title(f"{name}\nECE {entry['ece']:.2f}%, MCE {entry['mce']:.2f}%, NLL {entry['nll']:.3f}",
                     fontsize=11)
        ax.legend(loc="upper left", fontsize=9, framealpha=0.9)
        ax.grid(True, alpha=0.3)
        counts_ax = fig.add_subplot(grid[1, j], sharex=ax)
        counts_ax.bar(centre, count, width=width, color="0.55", edgecolor="black", lw=0.5)
        counts_ax.set_yscale("symlog", linthresh=1)
        counts_ax.set_xlabel("Confidence: maximum softmax probability (%)", fontsize=11)
        counts_ax.set_ylabel("Images", fontsize=11)
        counts_ax.grid(True, alpha=0.3)
    fig.suptitle(f"Reliability diagram — {report['dataset']}, {report.get('split', 'test')} split "
                 f"({len(cal['bins'])} equal-width bins)", fontsize=12)
    return save_figure(fig, path)


def _plot_confidence_hist(report: Mapping[str, Any], path: Path) -> Path:
    """Confidence histograms per Many / Medium / Few group (images whose true class is in the group): per
    equal-width bin the correctly and wrongly classified images stacked, the group's mean confidence and its
    accuracy as vertical lines, and the counts after temperature scaling as an outline when the report has it."""
    from matplotlib.figure import Figure

    cal = report["calibration"]
    temp = cal.get("temperature") if isinstance(cal.get("temperature"), Mapping) else None
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, len(GROUPS), sharex=True)
    for ax, g in zip(axes, GROUPS, strict=True):
        entry = (cal.get("groups") or {}).get(g)
        ax.set_title(f"{_GROUP_TITLES[g]}", fontsize=12, color=_GROUP_COLOURS[g], fontweight="bold")
        ax.set_xlim(0, 100)
        ax.set_xlabel("Confidence (%)", fontsize=11)
        ax.grid(True, alpha=0.3)
        if not isinstance(entry, Mapping) or not entry.get("bins"):
            ax.text(50, 0.5, "no image of this group", ha="center", va="center", transform=ax.get_xaxis_transform())
            continue
        lower, upper, count, conf, acc = _bin_arrays(entry["bins"])
        centre, width = (lower + upper) / 2, upper - lower
        right = count * np.nan_to_num(acc) / 100.0
        ax.bar(centre, right, width=width, color=_GROUP_COLOURS[g], edgecolor="black", lw=0.5, label="correct")
        ax.bar(centre, count - right, bottom=right, width=width, color="0.8", edgecolor="black", lw=0.5,
               label="wrong")
        mean_conf = float(np.nansum(count * np.nan_to_num(conf)) / max(count.sum(), 1.0))
        mean_acc = float(right.sum() / max(count.sum(), 1.0) * 100.0)
        ax.axvline(mean_conf, color="black", ls="--", lw=1.5, label=f"mean confidence {mean_conf:.1f}%")
        ax.axvline(mean_acc, color="#009E73", ls="-", lw=1.5, label=f"accuracy {mean_acc:.1f}%")
        top = float(count.max())
        t_entry = (temp.get("groups") or {}).get(g) if temp is not None else None
        if temp is not None and isinstance(t_entry, Mapping) and t_entry.get("bins"):
            t_lower, t_upper, t_count, _, _ = _bin_arrays(t_entry["bins"])
            ax.stairs(t_count, np.append(t_lower, t_upper[-1]), color="#CC79A7", lw=2,
                      label=f"after temperature scaling (T={temp['temperature']:.3g}): ECE {t_entry['ece']:.2f}%")
            top = max(top, float(t_count.max()))
        ax.set_ylim(0, top * 1.45 + 1)  # room for the legend above the bars
        ax.set_ylabel("Images", fontsize=11)
        ax.legend(loc="best", fontsize=9, framealpha=0.9,
                  title=f"{entry['n_samples']} images, ECE {entry['ece']:.2f}%", title_fontsize=9)
    fig.suptitle(f"Confidence (maximum softmax probability) by shot group — {report['method']} on "
                 f"{report['dataset']}, {report.get('split', 'test')} split", fontsize=12)
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
        The paths written: report.json, per_class.csv, confusion.csv, plots (``reliability.png`` and
        ``confidence_hist.png`` when the report has a ``calibration``), report.md.
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

    if isinstance(report.get("calibration"), Mapping) and report["calibration"].get("bins"):
        written.append(_plot_reliability(report, plots_dir / "reliability.png"))
        written.append(_plot_confidence_hist(report, plots_dir / "confidence_hist.png"))
        plot_rel += ["plots/reliability.png", "plots/confidence_hist.png"]

    md = _markdown(report, plot_rel, many_threshold, few_threshold)
    written.append(write_text(out / "report.md", md))
    return written
