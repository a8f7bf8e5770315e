"""``dscl ensemble``: average the softmax outputs of several finished runs and report the result.

Every run is loaded with :func:`dscl.inference.load_run` and sees the evaluated split through its own
input conversion (runs may differ in backbone or image size); the class probabilities are averaged
with equal weights and reported like a single run (``report.json`` / ``report.md`` / plots), with one
row per member run below the ensemble's so the gain is visible. Runs must share the dataset: the same
class names, the same training counts per class and the same evaluated images with the same labels.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dscl import dist
from dscl.config import method_name
from dscl.data import DatasetSplits, LTDataset, build_datasets
from dscl.errors import DsclError, UsageError
from dscl.evaluation import calibration_section, chance_warning, check_run_matches_data
from dscl.features import extract_features
from dscl.inference import ENSEMBLE_FILE, ENSEMBLE_TEMPERATURE_NOTE, Predictor, load_run
from dscl.io import atomic_write
from dscl.metrics import confusion_matrix, summarize
from dscl.report import build_report, variant_row, write_report
from dscl.run import RunDirError, prepare_run_dir
from dscl.runtime import num_workers, say


class EnsembleError(DsclError, ValueError):
    """Runs that cannot be ensembled (fewer than two, other datasets or classes)."""


def _split_of(splits: DatasetSplits, split: str, run: Path) -> LTDataset:
    if split == "test":
        return splits.test
    if split == "val":
        if splits.val is None:
            raise RunDirError(f"the dataset of {run} has no validation split; use --split test")
        return splits.val
    raise UsageError(f"--split must be test or val, got {split!r}")


def check_same_data(runs: Sequence[Path], all_splits: Sequence[DatasetSplits], split: str) -> None:
    """Refuse runs whose dataset, class list, training counts or evaluated images differ from the first's."""
    first, ref = runs[0], all_splits[0]
    ref_set = _split_of(ref, split, first)
    ref_fingerprint = ref_set.fingerprint()  # one hash of the reference split, not one per run
    for run, s in zip(runs[1:], all_splits[1:], strict=True):
        where = f"{run} and {first}"
        if s.name != ref.name:
            raise EnsembleError(f"{where} were trained on different datasets ({s.name} vs {ref.name})")
        if list(s.class_names) != list(ref.class_names):
            diff = class_list_difference(s.class_names, ref.class_names)
            raise EnsembleError(f"{where} have different class lists: {diff}; ensemble runs of one dataset")
        if list(s.train_counts) != list(ref.train_counts):
            raise EnsembleError(f"{where} were trained on different training sets (per-class counts differ: "
                                f"{sum(s.train_counts)} vs {sum(ref.train_counts)} images)")
        ds = _split_of(s, split, run)
        fingerprint = ds.fingerprint()
        if fingerprint != ref_fingerprint:
            raise EnsembleError(f"{where} have different {split} sets ({len(ds)} vs {len(ref_set)} images, "
                                f"fingerprints {fingerprint} vs {ref_fingerprint})")


def class_list_difference(a: Sequence[str], b: Sequence[str]) -> str:
    """Which classes differ between two class lists (or, for the same set, where the order differs)."""
    set_a, set_b = set(a), set(b)
    only_a, only_b = [c for c in a if c not in set_b], [c for c in b if c not in set_a]
    if only_a or only_b:
        def shown(names: list[str]) -> str:
            return ", ".join(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "") or "none"
        return f"only in the first: {shown(only_a)}; only in the second: {shown(only_b)}"
    k = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"the same {len(a)} classes in another order (class {k} is {a[k]!r} vs {b[k]!r})"


def _probabilities(p: Predictor, dataset: LTDataset, dev: torch.device, progress: bool,
                   desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    p.backbone.to(memory_format=torch.channels_last)
    feats, labels = extract_features(p.backbone, dataset.with_transform(p.transform), batch_size=256,
                                     device=dev, workers=num_workers(p.cfg.data.num_workers), progress=progress,
                                     desc=desc)  # float32, as predict and evaluate
    return torch.softmax(p.logits_from_features(feats), dim=1), labels


def ensemble(runs: Sequence[str | Path], out: str | Path, *, split: str = "test", device: str = "auto",
             progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Average the class probabilities of ``runs`` on their common evaluation split; write the report.

    Args:
        runs: two or more classified run directories of the same dataset.
        out: folder for ``report.json`` (with ``members``) / ``report.md`` / ``plots`` (refused when it
            exists and is not empty, unless ``overwrite``).
        split: ``test`` or ``val``.
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show progress bars.
        overwrite: replace the dscl files of an existing ``out``.

    Returns:
        The report dict (``method`` names the ensemble, ``variants`` holds one row per member,
        ``members`` the run directories).

    Raises:
        EnsembleError: fewer than two runs, or runs of different datasets / class lists.
        RunDirError: a run without a classifier, or an unusable ``out``.
    """
    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise EnsembleError(f"--runs needs at least two runs to ensemble, got {len(paths)}")
    if len({p.resolve() for p in paths}) != len(paths):
        raise EnsembleError("--runs lists the same run twice; give each run once")
    out = prepare_run_dir(out, resume=False, overwrite=overwrite, check_only=True, resumable=False)
    dev = dist.init(device)
    t0 = time.perf_counter()
    predictors = [load_run(p, device=dev) for p in paths]
    all_splits = [build_datasets(p.cfg.data, seed=p.cfg.optim.seed) for p in predictors]
    for p, s in zip(predictors, all_splits, strict=True):
        check_run_matches_data(p, s)
    check_same_data(paths, all_splits, split)
    ref, cfg = all_splits[0], predictors[0].cfg
    many, few = cfg.eval.many_threshold, cfg.eval.few_threshold
    total: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    members: list[dict[str, Any]] = []
    for k, (p, s) in enumerate(zip(predictors, all_splits, strict=True)):
        probs, y = _probabilities(p, _split_of(s, split, p.run_dir), dev, progress,
                                  f"run {k + 1}/{len(paths)}: {split} features")
        total = probs if total is None else total + probs
        labels = y
        member = summarize(probs, y, ref.train_counts, many_threshold=many, few_threshold=few)
        member["calibration"] = calibration_section(torch.log(probs.clamp_min(1e-30)), y, ref.train_counts,
                                                    many_threshold=many, few_threshold=few)
        method = method_name(p.cfg)
        members.append({"run": str(p.run_dir), "method": method,
                        "row": variant_row(f"member {k + 1}: {p.run_dir.name} ({method})", member)})
        p.backbone.cpu()  # one model on the device at a time
    assert total is not None and labels is not None
    probs = total / len(paths)
    summary = summarize(probs, labels, ref.train_counts, class_names=ref.class_names, many_threshold=many,
                        few_threshold=few)
    # log of the averaged probabilities: its softmax is the ensemble's probabilities (as EnsemblePredictor.logits)
    summary["calibration"] = calibration_section(
        torch.log(probs.clamp_min(1e-30)), labels, ref.train_counts, many_threshold=many, few_threshold=few,
        note=ENSEMBLE_TEMPERATURE_NOTE)
    names = ", ".join(m["run"] for m in members)
    report = build_report(
        summary, dataset=ref.name, method=f"ensemble of {len(paths)} runs", seed=cfg.optim.seed,
        epochs=cfg.optim.epochs, wall_seconds=round(time.perf_counter() - t0, 1), split=split,
        selection=f"equal-weight average of the softmax outputs of {names}; each run's own stage-2 selection",
        variants=[m["row"] for m in members], many_threshold=many, few_threshold=few,
    )
    report["members"] = [{"run": m["run"], "method": m["method"], "top1": m["row"]["top1"]} for m in members]
    prepare_run_dir(out, resume=False, overwrite=overwrite, resumable=False)
    if dist.is_main():
        conf = confusion_matrix(probs.argmax(1), labels, ref.num_classes)
        write_report(out, report, confusion=conf, class_names=ref.class_names, many_threshold=many,
                     few_threshold=few)
        # the member runs, so that `dscl predict --run OUT` (dscl.inference.load_model) uses the ensemble
        spec = json.dumps({"format": "dscl-ensemble", "members": [str(p.resolve()) for p in paths],
                           "weights": "equal softmax average", "split": split}, indent=2) + "\n"
        atomic_write(out / ENSEMBLE_FILE, lambda f: f.write(spec.encode("utf-8")))
        warning = chance_warning(report["top1"], ref.num_classes)
        if warning:
            say(warning)
    dist.barrier()
    return report
