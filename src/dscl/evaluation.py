"""Evaluation of a classified run: top-1 / top-5, Many / Medium / Few, post-hoc variants, report files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dscl import dist
from dscl.checkpoint import CheckpointError, load_checkpoint
from dscl.config import Config, method_name, preset_changes, preset_expected
from dscl.data import DatasetSplits, LTDataset, build_datasets
from dscl.features import extract_features
from dscl.inference import Predictor, load_run
from dscl.metrics import confusion_matrix, summarize
from dscl.report import build_report, write_predictions, write_report
from dscl.rundir import RunDirError, load_run_config
from dscl.runtime import amp_dtype, num_workers, say


def evaluate(run_dir: str | Path, *, split: str = "test", cfg: Config | None = None, device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Evaluate the stage-2 classifier (plus its post-hoc variants) and write the report files.

    ``split="test"`` writes into the run directory; ``split="val"`` into ``run_dir/val/``.
    Returns the report dictionary (on every rank).
    """
    dev = dist.init(device)
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    t0 = time.perf_counter()
    predictor = load_run(run_dir, cfg=cfg, device=dev)
    state = predictor.info
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    check_run_matches_data(predictor, splits)
    if split == "val":
        if splits.val is None:
            raise RunDirError(
                f"dataset {splits.name} has no validation split; set data.val_fraction > 0 when training "
                f"to carve one, or evaluate --split test"
            )
        dataset = splits.val
    elif split == "test":
        dataset = splits.test
    else:
        raise ValueError(f"--split must be test or val, got {split!r}")
    predictor.backbone.to(memory_format=torch.channels_last)
    feats, labels = extract_features(predictor.backbone, dataset.with_transform(predictor.image_transform),
                                     batch_size=256, device=dev, workers=num_workers(cfg.data.num_workers),
                                     progress=progress, desc=f"{split} features", dtype=amp_dtype(cfg.optim.amp, dev))
    logits = predictor.logits_from_features(feats)
    variants_logits = {
        f"+ logit adjustment (tau={cfg.classifier.logit_adjust_tau:g})":
            predictor.logits_from_features(feats, "logit-adjust"),
        f"+ tau-normalisation (tau={cfg.classifier.tau_norm:g})": predictor.logits_from_features(feats, "tau-norm"),
    }
    if predictor.class_means is not None:  # an imported classifier has none (no training features were seen)
        variants_logits["nearest class mean"] = predictor.logits_from_features(feats, "ncm")
    many, few = cfg.eval.many_threshold, cfg.eval.few_threshold
    summary = summarize(logits, labels, splits.train_counts, class_names=splits.class_names,
                        many_threshold=many, few_threshold=few)
    variants = []
    for name, lg in variants_logits.items():
        s = summarize(lg, labels, splits.train_counts, many_threshold=many, few_threshold=few)
        variants.append({"method": name, **{k: s[k] for k in ("top1", "top5", "top1_macro", "many", "medium",
                                                                  "few")}})
    stage1 = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    wall = stage1.get("wall_seconds", 0.0) + state.get("wall_seconds", 0.0) + (time.perf_counter() - t0)
    report = build_report(summary, dataset=splits.name, method=method_name(cfg), seed=cfg.optim.seed,
                          epochs=cfg.optim.epochs, wall_seconds=round(wall, 1), split=split,
                          selection=state.get("selection", ""), variants=variants, many_threshold=many,
                          few_threshold=few, run_info=run_facts(stage1, splits, cfg))
    if dist.is_main():
        target = run_dir if split == "test" else run_dir / "val"
        write_evaluation_files(target, report, logits, labels, dataset, splits, cfg)
        warning = chance_warning(report["top1"], splits.num_classes)
        if warning:
            say(warning)
    dist.barrier()
    return report


def check_run_matches_data(predictor: Predictor, splits: DatasetSplits) -> None:
    """Refuse to evaluate a classifier on a dataset whose classes or training counts are not the run's."""
    where = predictor.source
    if predictor.class_names != list(splits.class_names):
        raise CheckpointError(
            f"{where} was trained on {predictor.num_classes} classes ({', '.join(predictor.class_names[:5])}...) "
            f"but the dataset now has {splits.num_classes} ({', '.join(splits.class_names[:5])}...); "
            "evaluate on the data the run was trained on"
        )
    if predictor.train_counts != list(splits.train_counts):
        raise CheckpointError(
            f"{where} was trained with other per-class training counts than the dataset has now "
            f"({sum(predictor.train_counts)} vs {sum(splits.train_counts)} images); the data changed since "
            "the run was trained"
        )


def chance_warning(top1: float | None, num_classes: int) -> str | None:
    """A loud warning when top-1 (percent) is within 1.5x of chance (100 / C): the usual symptom of
    weights that did not load (wrong key prefixes, another architecture, a head for other classes)."""
    chance = 100.0 / max(num_classes, 1)
    if top1 is None or num_classes < 2 or top1 > 1.5 * chance:
        return None
    bar = "!" * 78
    return (f"{bar}\nWARNING: top-1 {top1:.1f}% is within 1.5x of chance ({chance:.1f}% for {num_classes} classes).\n"
            "This is what wrongly loaded weights look like (an import with the wrong format or architecture, a\n"
            "classifier trained on other classes) or a model that has not learned. Check `dscl import`'s\n"
            f"list of missing / unexpected keys and the run's config.\n{bar}")


def run_facts(stage1: dict[str, Any], splits: DatasetSplits, cfg: Config) -> dict[str, Any]:
    """How the run was made, for ``report.json``.

    From stage 1's ``last.pt``: ``precision`` (fp32 / bf16 / fp16), ``device``, ``torch_version``,
    ``global_batch``, ``world_size`` and ``lr`` (the effective learning rate, base_lr x batch / 256);
    None where a checkpoint written before these were recorded lacks them (the precision then comes
    from the config). From the data: ``train_fingerprint`` (:meth:`LTDataset.fingerprint` of the
    training split the classifier saw), ``data_root`` (the data folder used, when the dataset knows
    it), ``stage1_train_fingerprint`` when stage 1 saw a different training split, and ``expected``:
    the preset's published numbers (:func:`dscl.config.preset_expected`) when the run uses its preset
    unchanged (:func:`dscl.config.preset_changes` empty), else None.
    """
    fingerprint = splits.train.fingerprint()
    facts: dict[str, Any] = {
        "precision": stage1.get("precision", {"none": "fp32"}.get(cfg.optim.amp, cfg.optim.amp)),
        "device": stage1.get("device"),
        "torch_version": stage1.get("torch_version"),
        "global_batch": stage1.get("global_batch"),
        "world_size": stage1.get("world_size"),
        "lr": stage1.get("lr"),
        "train_fingerprint": fingerprint,
        "data_root": getattr(splits, "data_root", None) or cfg.data.data_root,
    }
    if stage1.get("train_fingerprint") not in (None, fingerprint):
        facts["stage1_train_fingerprint"] = stage1["train_fingerprint"]
    # the paper's numbers for this configuration, only when the run is the preset unchanged
    facts["expected"] = preset_expected(cfg.preset) if not preset_changes(cfg) else None
    return facts


def write_evaluation_files(target: Path, report: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor,
                           dataset: LTDataset, splits: DatasetSplits, cfg: Config) -> None:
    """Every file of an evaluation into ``target``: report.json / .md, per_class.csv, confusion.csv,
    predictions.csv and plots (rank 0 only; each file atomic)."""
    target.mkdir(parents=True, exist_ok=True)
    conf = confusion_matrix(logits.argmax(1), labels, splits.num_classes)
    write_report(target, report, confusion=conf, class_names=splits.class_names,
                 many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold)
    write_predictions(target / "predictions.csv", logits, labels, splits.class_names,
                      paths=[dataset.path(i) for i in range(len(dataset))])
