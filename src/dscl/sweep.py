"""One hyperparameter over several values (the paper's Fig. 5), chosen on a validation split.

Every point trains the same method and is chosen on the dataset's own validation split (a list, a
folder, or the held-out split of a generated LT set, which costs no training data), or on a
class-stratified split carved from the training set (``--val-fraction``), keeps the last stage-2
epoch (``classifier.select=last``: on a small carved split the epoch choice itself is noise, and the
points should differ only in the swept value), and is evaluated on both the validation and the test set. The value is
*chosen* by the validation split's balanced accuracy (mean per-class top-1); the test numbers are
reported beside it and never used for choosing.

Runs live in ``OUT/runs/<key>=<value>-seed<seed>/``; rerunning the same command continues a
killed sweep (finished points are reused, an unfinished stage 1 is resumed), like ``dscl compare``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dscl.compare import FIELDS, CompareError, Pending, _report, aggregate, check_plan, method_config, run_specs
from dscl.config import Config, ConfigError, apply_mapping, parse_overrides, validate
from dscl.io import save_figure, write_json, write_text
from dscl.launch import (
    JobSpec,
    LaunchOptions,
    share_stage1,  # noqa: F401  (dscl.sweep.share_stage1: where it was first)
)

# short names for the paper's swept hyperparameters
ALIASES = {
    "alpha": "loss.alpha",
    "lambda": "loss.pbsd_weight",
    "patches": "views.num_patches",
    "patch_scale": "views.patch_scale",
    "patch_size": "views.patch_size",
    "queue": "model.queue_size",
    "temperature": "loss.temperature",
    "epochs": "optim.epochs",
}
# the validation split's numbers: the four of compare.json plus the balanced accuracy used for choosing
VAL_FIELDS = {**FIELDS, "balanced": "top1_macro"}
SELECT_BY = "balanced"


class SweepError(CompareError):
    """A --param that does not parse, or a sweep that cannot select on a validation split."""


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets: ``"[0.05,0.3],[0.1,0.6]"`` -> ``["[0.05,0.3]", "[0.1,0.6]"]``."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[("
        depth -= ch in "])"
        if depth < 0:
            raise SweepError(f"unbalanced brackets in the values {text!r}")
        if ch == "," and depth == 0:
            values.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        raise SweepError(f"unbalanced brackets in the values {text!r}")
    values.append(cur.strip())
    return values


def parse_param(text: str) -> tuple[str, list[str]]:
    """``"alpha=0.05,0.1"`` -> ``("loss.alpha", ["0.05", "0.1"])``; aliases or any ``section.key``."""
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name:
        raise SweepError(f"--param {text!r} must look like NAME=V1,V2,... (e.g. alpha=0.05,0.1,0.2)")
    key = ALIASES.get(name, name)
    if "." not in key:
        raise SweepError(
            f"--param {name!r} is neither a short name ({', '.join(ALIASES)}) nor a section.key such as loss.alpha"
        )
    values = split_values(rest)
    if any(not v for v in values) or len(values) < 2:
        raise SweepError(f"--param {text!r}: give at least two non-empty comma-separated values")
    if len(set(values)) != len(values):
        raise SweepError(f"--param {text!r} lists a value twice")
    return key, values


def point_config(base: Config, key: str, value: str, method: str, seed: int) -> Config:
    """The method's config for one seed, with ``key`` set to ``value`` last (so e.g. lambda=0 stays 0)."""
    cfg = method_config(base, method, seed)
    apply_mapping(cfg, parse_overrides([f"{key}={value}"]), f"--param {key}={value}")
    validate(cfg)
    return cfg


# Config sections that only stage 2 and evaluation read: points differing only there share stage 1.
STAGE2_SECTIONS = ("classifier", "eval")


def stage1_identity(cfg: Config) -> str:
    """Everything stage 1 depends on, as a canonical string (the config minus :data:`STAGE2_SECTIONS`)."""
    d = cfg.to_dict()
    for section in STAGE2_SECTIONS:
        d.pop(section, None)
    return json.dumps(d, sort_keys=True)


def _dir_name(key: str, value: str, seed: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", value.strip("[]() ")).strip("_") or "value"
    return f"{key}={safe}-seed{seed}"


def _numeric(values: Sequence[str]) -> list[float] | None:
    try:
        nums = [float(v) for v in values]
    except ValueError:
        return None
    return nums if all(math.isfinite(n) for n in nums) else None


def _validation_plan(base: Config, val_fraction: float | None) -> tuple[float, str]:
    """(fraction to carve, words for the report). The dataset's own validation split (a list, a folder
    or the held-out split of a generated LT set) is used unless ``--val-fraction`` asks for carving;
    with neither, 10% of each class is carved."""
    from dscl.data import build_datasets

    if val_fraction is not None:
        if val_fraction <= 0 or val_fraction >= 1:
            raise SweepError(f"--val-fraction must be in (0, 1), got {val_fraction}; omit it to use the "
                             "dataset's own validation split")
        val_fraction = float(val_fraction)
    elif base.data.val_fraction > 0:
        val_fraction = base.data.val_fraction
    if val_fraction is not None:
        return val_fraction, f"{val_fraction:g} of each training class carved out of the training set"
    splits = build_datasets(base.data, seed=base.optim.seed)  # reads lists / arrays only, opens no image
    if splits.val is not None:
        return 0.0, f"{splits.val_description()} ({len(splits.val)} images)"
    return 0.1, "0.1 of each training class carved out of the training set (the dataset has no validation split)"


def sweep(base: Config, key: str, values: Sequence[str], *, method: str, seeds: Sequence[int], out: str | Path,
          val_fraction: float | None, command: str, device: str = "auto", progress: bool = True,
          launch: LaunchOptions | None = None) -> dict[str, Any] | Pending:
    """Train ``method`` at every value and seed; write ``sweep.json``, ``sweep.md`` and ``sweep.png`` to ``out``.

    Args:
        base: the preset's config (with any overrides).
        key: ``section.key`` to vary (see :func:`parse_param`).
        values: the values as the command line spells them.
        method: one of :data:`dscl.compare.METHODS`.
        seeds: training seeds; each point is the mean over them.
        out: the sweep folder (created; a folder holding a different sweep is refused).
        val_fraction: fraction of each class carved for choosing; None = the dataset's own validation
            split (list, folder, or the held-out split of fmnist-lt / cifar*-lt), else the base
            config's ``data.val_fraction``, else 0.1.
        command: the command line, recorded in the results.
        launch: run every point as a job (:mod:`dscl.launch`); None: one after another in this process.

    Returns:
        The ``sweep.json`` dictionary, or a :class:`~dscl.compare.Pending` while launched points have not
        finished (nothing is written then; rerun the same command to collect).
    """
    base = copy.deepcopy(base)
    values = list(values)
    fraction, val_words = _validation_plan(base, val_fraction)
    # the split chooses the swept value only; every point's stage 2 keeps its last epoch, so the
    # points differ only in the swept value (not in a noisy epoch choice)
    mapping: dict[str, Any] = {"data": {"val_fraction": fraction}, "classifier": {"select": "last"}}
    if fraction > 0:
        mapping["data"]["val_per_class"] = 0  # carving was asked for: no held-out split beside it
    apply_mapping(base, mapping, "sweep")
    validate(base)
    configs = {}
    for value in values:  # every point must be a valid config before anything trains
        try:
            configs[value] = {s: point_config(base, key, value, method, s) for s in seeds}
        except ConfigError as exc:
            raise SweepError(f"--param {key}={value}: {exc}") from exc
    out = Path(out)
    check_plan(out, "sweep-config.yaml", {"preset": base.preset, "key": key, "values": list(values),
                                          "method": method, "config": base.to_dict()}, "sweep")
    dataset = base.data.dataset
    shared = all(len({stage1_identity(configs[v][s]) for v in values}) == 1 for s in seeds)
    if shared:
        print(f"{key} does not change stage 1: each seed trains stage 1 once and every value reuses it",
              flush=True)
    specs: list[JobSpec] = []
    for seed in seeds:
        first = _dir_name(key, values[0], seed)
        for value in values:
            name = _dir_name(key, value, seed)
            specs.append(JobSpec(name, out / "runs" / name, configs[value][seed], val=True,
                                 share_from=first if shared and name != first else None))
    states = run_specs(specs, out, launch, device=device, progress=progress)
    if states is not None:
        return Pending(states)
    val_reports: dict[str, list[dict[str, Any]]] = {v: [] for v in values}
    test_reports: dict[str, list[dict[str, Any]]] = {v: [] for v in values}
    for spec, value in zip(specs, [v for _ in seeds for v in values], strict=True):
        test_reports[value].append(_report(spec.run))
        val_reports[value].append(_report(spec.run, "val"))
        dataset = test_reports[value][-1]["dataset"]
    val = aggregate(val_reports, VAL_FIELDS)
    test = aggregate(test_reports)
    points: list[dict[str, Any]] = [{"value": v, "val": val[v], "test": test[v]} for v in values]
    scored = [(p["val"][SELECT_BY]["mean"], i) for i, p in enumerate(points) if p["val"][SELECT_BY]["mean"] is not None]
    # ties go to the first value listed
    chosen = values[max(scored, key=lambda t: (t[0], -t[1]))[1]] if scored else None
    result = {
        "dataset": dataset,
        "preset": base.preset,
        "param": key,
        "values": list(values),
        "method": method,
        "seeds": list(seeds),
        "val_fraction": fraction,
        "validation": val_words,
        "selection": f"the value with the highest mean validation {SELECT_BY} accuracy (mean per-class top-1 on "
                     f"{val_words}); test numbers are never used",
        "chosen": chosen,
        "stage1_shared": shared,
        "points": points,
        "command": command,
        "wall_seconds": round(sum(r["wall_seconds"] for runs in test_reports.values() for r in runs), 1),
    }
    write_json(out / "sweep.json", result)
    write_text(out / "sweep.md", format_markdown(result))
    plot_sweep(result, out / "sweep.png")
    return result


def _cell(m: dict[str, Any]) -> str:
    if m["mean"] is None:
        return "—"
    # std is None where fewer than two seeds have the metric (dscl.compare.aggregate)
    return f"{m['mean']:.1f}" + (f" ± {m['std']:.1f}" if len(m["runs"]) > 1 and m["std"] is not None else "")


def format_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# {result['dataset']}: {result['method']} over {result['param']}",
        "",
        f"Preset `{result['preset']}`, seeds {', '.join(map(str, result['seeds']))}; top-1 %. "
        f"Validation = {result.get('validation', str(result['val_fraction']) + ' of each training class')} "
        "(chosen by its balanced accuracy = mean per-class top-1); test = the untouched test set, reported "
        "beside, never used for choosing. Many / Medium / Few as in the run reports.",
        "",
        "| value | val balanced | val Many | val Medium | val Few | test All | test Many | test Medium | test Few |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        mark = " **(chosen)**" if p["value"] == result["chosen"] else ""
        cells = [_cell(p["val"][m]) for m in ("balanced", "many", "medium", "few")]
        cells += [_cell(p["test"][m]) for m in ("all", "many", "medium", "few")]
        lines.append(f"| {p['value']}{mark} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{result['command']}`", f"Wall time: {result['wall_seconds'] / 60:.1f} min", ""]
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """Two panels (validation, test): All / Many / Medium / Few against the value, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = result["values"]
    nums = _numeric(values)
    xs = nums if nums is not None else list(range(len(values)))
    log_x = nums is not None and min(nums) > 0 and max(nums) / min(nums) >= 10
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = {"all": ("All", "k", "o"), "balanced": ("All (balanced)", "k", "o"), "many": ("Many", "tab:blue", "s"),
              "medium": ("Medium", "tab:orange", "^"), "few": ("Few", "tab:red", "v")}
    for ax, split, first in ((axes[0], "val", "balanced"), (axes[1], "test", "all")):
        for metric in (first, "many", "medium", "few"):
            label, colour, marker = styles[metric]
            ys = [p[split][metric]["mean"] for p in result["points"]]
            err = [p[split][metric]["std"] for p in result["points"]]  # None: one seed has it, no error bar
            err = [float("nan") if e is None else e for e in err]
            pts = [(x, y, e) for x, y, e in zip(xs, ys, err, strict=True) if y is not None]
            if not pts:
                continue
            px, py, pe = zip(*pts, strict=True)
            ax.errorbar(px, py, yerr=pe if len(result["seeds"]) > 1 else None, label=label, color=colour,
                        marker=marker, lw=2 if metric == first else 1.2, capsize=3)
        if result["chosen"] is not None:
            ax.axvline(xs[values.index(result["chosen"])], color="grey", ls="--", lw=1, label="chosen (val)")
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(values, rotation=30 if nums is None else 0)
        ax.set_xlabel(result["param"])
        ax.grid(alpha=0.3)
        name = "validation split (used for choosing)" if split == "val" else "test set (reported, not used)"
        ax.set_title(name)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_ylabel("top-1 accuracy (%)")
    fig.suptitle(f"{result['dataset']}: {result['method']} vs {result['param']} (seeds {result['seeds']})")
    fig.tight_layout()
    return save_figure(fig, path, close=True)
