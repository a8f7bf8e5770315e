"""Several methods x seeds on one preset -> ``compare.json`` and a mean ± std Markdown table.

Every method shares the preset's backbone, epochs, augmentation and stage-2 protocol; only the
stage-1 objective changes (METHOD.md E.2's ablation rows):

* ``ce``        cross-entropy end to end on the long-tailed data, then the same class-balanced
                classifier re-training as the others (so the comparison isolates the representation)
* ``scl``       the paper's SupCon baseline over the same queue, no PBSD
* ``dscl``      the decoupled loss, no PBSD
* ``scl+pbsd``  SupCon + PBSD
* ``dscl+pbsd`` the full method (PBSD weight from the preset, 1.5 if the preset has none)

Each run lives in ``OUT/runs/<method>-seed<seed>/``; a killed comparison continues where it stopped
(finished runs are reused, an unfinished stage 1 is resumed). With a launcher (:mod:`dscl.launch`) every
run is a job instead, and rerunning the same command collects them.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dscl.config import Config, apply_mapping, config_from_dict, flat_config, validate
from dscl.errors import DsclError
from dscl.io import read_json, write_json, write_text
from dscl.launch import (
    FAILED,
    FINISHED,
    JobSpec,
    LaunchError,
    LaunchOptions,
    RunStatus,
    format_states,
    live_jobs,
    run_one,  # noqa: F401  (dscl.compare.run_one: where it was first)
    run_spec,
)
from dscl.launch import launch as launch_jobs
from dscl.metrics import TEST_AGNOSTIC_FACTORS, shot_group_bounds

METHODS = ("ce", "scl", "dscl", "scl+pbsd", "dscl+pbsd")
METRICS = ("all", "many", "medium", "few")


class CompareError(DsclError, ValueError):
    """Bad methods / seeds, or an output folder holding a different comparison."""


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise CompareError(f"--methods {text!r}: unknown {bad or 'empty list'}; valid methods: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise CompareError(f"--methods {text!r} names a method twice")
    return methods


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise CompareError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds {text!r} must list at least one seed, each once")
    return seeds


def method_config(base: Config, method: str, seed: int) -> Config:
    """The preset's config with only the stage-1 objective (and the seed) changed."""
    cfg = copy.deepcopy(base)
    pbsd = base.loss.pbsd_weight if base.loss.pbsd_weight > 0 else 1.5
    loss, _, extra = method.partition("+")
    apply_mapping(cfg, {"loss": {"loss": loss, "pbsd_weight": pbsd if extra == "pbsd" else 0.0},
                        "optim": {"seed": seed}}, f"method {method}")
    validate(cfg)
    return cfg


def config_differences(configs: dict[str, Config]) -> dict[str, dict[str, Any]]:
    """Every ``section.key`` whose value differs between the named configs: ``{key: {name: value}}``.

    ``optim.seed`` is left out (it differs by design). A comparison is fair when this lists only the
    stage-1 objective (``loss.loss``, ``loss.pbsd_weight``); anything else is printed so that an
    unfair comparison cannot happen by accident.
    """
    flats = {name: flat_config(cfg) for name, cfg in configs.items()}
    keys = sorted(set().union(*flats.values())) if flats else []
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        if key in ("optim.seed", "preset"):
            continue
        values = {name: flat.get(key) for name, flat in flats.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out[key] = values
    return out


def format_differences(diff: dict[str, dict[str, Any]]) -> str:
    """The manifest as Markdown lines (one per differing key)."""
    if not diff:
        return "Every config key is the same for all methods (apart from the seed)."
    lines = ["Config keys that differ between the methods (everything else is identical):", ""]
    for key, values in diff.items():
        lines.append(f"- `{key}`: " + ", ".join(f"{name} = {value}" for name, value in values.items()))
    return "\n".join(lines)


def check_plan(out: Path, name: str, plan: dict[str, Any], what: str) -> None:
    """Record ``plan`` in ``out/name`` on the first call; refuse to continue a folder holding a different one."""
    from dscl.run import make_out_dir

    make_out_dir(out)  # a file in the way is one clear line (issue 28 item 14)
    plan_path = out / name
    if plan_path.is_file():
        saved = yaml.safe_load(plan_path.read_text()) or {}
        if isinstance(saved.get("config"), dict):
            # keys added to the config since the folder was written take their defaults
            saved["config"] = config_from_dict(saved["config"], str(plan_path)).to_dict()
        if _without_log(saved) != _without_log(plan):  # log.* (trackers) may change when continuing
            raise CompareError(
                f"{out} holds a {what} with a different configuration ({plan_path}); "
                f"use another --out, or delete {out} to start over"
            )
    else:
        write_text(plan_path, yaml.safe_dump(plan, sort_keys=False))


def _without_log(plan: dict[str, Any]) -> dict[str, Any]:
    config = plan.get("config")
    return {**plan, "config": {k: v for k, v in config.items() if k != "log"}} if isinstance(config, dict) else plan


# metric name in compare.json -> key in report.json ("a.b" = key b of the mapping under a)
FIELDS = {"all": "top1", "many": "many", "medium": "medium", "few": "few"}
#: the test-agnostic columns (report.json "test_agnostic"), in their report order
TEST_AGNOSTIC_FIELDS = {name: f"test_agnostic.{name}" for name in
                        [f"forward-{f}" for f in sorted(TEST_AGNOSTIC_FACTORS, reverse=True)] + ["uniform"]
                        + [f"backward-{f}" for f in sorted(TEST_AGNOSTIC_FACTORS)]}


#: the calibration metrics (report.json "calibration"): ECEs in percent, NLL in nats, Brier 0-2, the fitted
#: temperature and the ECE / NLL after temperature scaling (None for runs without a temperature)
CALIBRATION_FIELDS = {**{name: f"calibration.{name}" for name in ("ece", "adaptive_ece", "classwise_ece", "mce",
                                                                   "nll", "brier", "overconfidence",
                                                                   "underconfidence")},
                      **{f"ece_{g}": f"calibration.groups.{g}.ece" for g in ("many", "medium", "few")},
                      "temperature": "calibration.temperature.temperature",
                      "ece_temperature_scaled": "calibration.temperature.ece",
                      "nll_temperature_scaled": "calibration.temperature.nll"}


def _value(report: dict[str, Any], key: str) -> Any:
    """``report[key]``, or ``report[a][b]...`` for ``key = "a.b..."``; None where absent (an older report)."""
    value: Any = report
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def aggregate(reports: dict[str, list[dict[str, Any]]], fields: dict[str, str] | None = None,
              digits: int = 2) -> dict[str, dict[str, dict[str, Any]]]:
    """``{name: [report, ...]}`` -> ``{name: {metric: {"mean", "std", "runs"}}}`` over the reports.

    ``std`` is the sample standard deviation over the runs that have the metric, or None when fewer than
    two do: one seed says nothing about the spread (a 0.0 would read as "no seed noise"). Means and
    standard deviations are rounded to ``digits`` decimals."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method, runs in reports.items():
        out[method] = {}
        for metric, key in (fields or FIELDS).items():
            values = [_value(r, key) for r in runs]
            present = [v for v in values if v is not None]
            out[method][metric] = {
                "mean": round(statistics.fmean(present), digits) if present else None,
                "std": round(statistics.stdev(present), digits) if len(present) > 1 else None,
                "runs": values,
            }
    return out


def shot_thresholds(cfg: Config) -> dict[str, int]:
    """The shot-group boundaries the runs' reports use (``eval.many_threshold`` / ``eval.few_threshold``)."""
    return {"many_threshold": int(cfg.eval.many_threshold), "few_threshold": int(cfg.eval.few_threshold)}


def _shot_text(result: dict[str, Any]) -> str:
    """``"> 100 / 20–100 / < 20"`` from the result's thresholds (the config defaults for a result without them)."""
    thresholds = result.get("shot_thresholds") or shot_thresholds(Config())
    return " / ".join(shot_group_bounds(thresholds["many_threshold"], thresholds["few_threshold"]).values())


def _cell(m: dict[str, Any]) -> str:
    """``mean ± std``; the mean alone where fewer than two runs have the metric (compare.json files written
    before std became null for one run hold 0.0 there)."""
    if m["mean"] is None:
        return "—"
    spread = m["std"] is not None and sum(v is not None for v in m["runs"]) > 1
    return f"{m['mean']:.1f}" + (f" ± {m['std']:.1f}" if spread else "")


def format_markdown(result: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    over = "mean ± std over seeds" if len(result["seeds"]) > 1 else "one seed (the spread over seeds is unknown)"
    lines = [
        f"# {result['dataset']}: methods compared over seed{'s' if len(result['seeds']) > 1 else ''} {seeds}",
        "",
        f"Preset `{result['preset']}`; top-1 % on the test set, {over}; Many / Medium / Few = "
        f"mean per-class top-1 over classes with {_shot_text(result)} training images. Every method gets "
        "the same stage-2 class-balanced classifier. ECE: expected calibration error (%) of the plain "
        "classifier's top-1 confidence, 15 equal-width bins (MiSLAS's convention; lower is better); "
        "compare.json holds every calibration metric.",
        "",
        "| method | All | Many | Medium | Few | ECE |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    calibration = result.get("calibration") or {}  # absent from a compare.json written before issue 31
    for method, metrics in result["methods"].items():
        ece = (calibration.get(method) or {}).get("ece") or {"mean": None, "std": None, "runs": []}
        lines.append(f"| {method} | " + " | ".join(_cell(metrics[metric]) for metric in METRICS)
                     + f" | {_cell(ece)} |")
    if result.get("test_agnostic"):
        names = list(TEST_AGNOSTIC_FIELDS)
        lines += ["", "Top-1 % under other test label distributions (forward-long-tailed like training with "
                  "imbalance ρ, uniform, backward = reversed), exact from each run's per-class accuracies; "
                  f"{over}:", "",
                  "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for method, metrics in result["test_agnostic"].items():
            lines.append(f"| {method} | " + " | ".join(_cell(metrics[n]) for n in names) + " |")
    if "differences" in result:
        lines += ["", format_differences(result["differences"])]
    lines += ["", f"Command: `{result['command']}`", f"Wall time: {result['wall_seconds'] / 60:.1f} min", ""]
    return "\n".join(lines)


def run_specs(specs: Sequence[JobSpec], out: Path, launch: LaunchOptions | None, *, device: str,
              progress: bool) -> list[RunStatus] | None:
    """Run ``specs`` one after another in this process (``launch`` None) or as jobs (:func:`dscl.launch.launch`).
    Returns None when every run has finished, else the states of the runs (jobs queued, running or failed)."""
    if launch is not None:
        states = launch_jobs(specs, out, launch, device=device, progress=progress)
        return None if all(st.state == FINISHED for st in states) else states
    live = live_jobs(specs, out)
    if live:
        raise LaunchError(f"{out}: runs of it are jobs that are queued or running; collect them with the command that "
                          f"submitted them (its --launcher), or cancel the jobs first\n"
                          + format_states(live, out, "recorded"))
    for spec in specs:
        print(f"== {spec.name} -> {spec.run}", flush=True)
        run_spec(spec, device=device, progress=progress)
    return None


def _report(run: Path, split: str = "test") -> dict[str, Any]:
    path = run / "report.json" if split == "test" else run / split / "report.json"
    option = "" if split == "test" else f" --split {split}"
    return read_json(path, what=f"rerun `dscl evaluate --run {run}{option}`")


@dataclass
class Pending:
    """What a launched comparison or sweep returns while some runs have not finished: their states, and the
    table of the finished ones (Markdown; empty when none has finished)."""

    states: list[RunStatus]
    partial: str = ""

    @property
    def failed(self) -> bool:
        return any(st.state == FAILED for st in self.states)


def compare(base: Config, methods: Sequence[str], seeds: Sequence[int], out: str | Path, *,
            command: str, device: str = "auto", progress: bool = True,
            launch: LaunchOptions | None = None) -> dict[str, Any] | Pending:
    """Run every (method, seed) into ``out/runs`` and write ``compare.json`` / ``compare.md``.

    With ``launch`` each run is a job (:mod:`dscl.launch`); while some have not finished, nothing is written and
    a :class:`Pending` comes back (rerun the same command to collect)."""
    out = Path(out)
    check_plan(out, "compare-config.yaml", {"preset": base.preset, "config": base.to_dict()}, "comparison")
    differences = config_differences({m: method_config(base, m, seeds[0]) for m in methods})
    print(format_differences(differences), flush=True)
    runs = [(method, JobSpec(f"{method}-seed{seed}", out / "runs" / f"{method}-seed{seed}",
                             method_config(base, method, seed))) for seed in seeds for method in methods]
    specs = [spec for _, spec in runs]
    states = run_specs(specs, out, launch, device=device, progress=progress)
    reports: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    dataset = base.data.dataset
    for method, spec in runs:
        if spec.finished():
            report = _report(spec.run)
            reports[method].append(report)
            dataset = report["dataset"]
    done = sum(len(r) for r in reports.values())
    result = {
        "dataset": dataset,
        "preset": base.preset,
        "seeds": list(seeds),
        "shot_thresholds": shot_thresholds(base),
        "methods": aggregate(reports),
        "test_agnostic": aggregate(reports, TEST_AGNOSTIC_FIELDS),
        "calibration": aggregate(reports, CALIBRATION_FIELDS, digits=4),
        "differences": differences,
        "command": command,
        # compute time of all runs (reused runs count with their original time)
        "wall_seconds": round(sum(r["wall_seconds"] for runs in reports.values() for r in runs), 1),
    }
    if states is not None:
        partial = ""
        if done:
            partial = (f"Partial table: {done} of {len(specs)} runs finished (mean over the seeds finished so "
                       f"far; compare.json is written when all have):\n\n" + format_markdown(result))
        return Pending(states, partial)
    write_json(out / "compare.json", result)
    write_text(out / "compare.md", format_markdown(result))
    return result
