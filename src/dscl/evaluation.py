"""Evaluation of a classified run: top-1 / top-5, Many / Medium / Few, post-hoc variants, report files."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dscl import dist, trackers
from dscl.config import Config, method_name, preset_changes, preset_expected
from dscl.data import DataError, DatasetSplits, build_datasets
from dscl.data.inputs import LIST_SUFFIXES, Inputs, collect_inputs
from dscl.features import extract_features
from dscl.inference import Predictor, load_run
from dscl.metrics import confusion_matrix, summarize
from dscl.report import build_report, write_predictions, write_report
from dscl.run import CheckpointError, ClassifierRecord, RunDirError, Stage1Summary, load_run_config, stage1_summary
from dscl.runtime import num_workers, say


def evaluate(run_dir: str | Path, *, split: str = "test", cfg: Config | None = None, device: str = "auto",
             progress: bool = True, splits: DatasetSplits | None = None) -> dict[str, Any]:
    """Evaluate the stage-2 classifier (plus its post-hoc variants) and write the report files.

    ``split="test"`` writes into the run directory; ``split="val"`` into ``run_dir/val/``. ``splits``:
    the datasets of the run's ``data`` config if already built.
    Returns the report dictionary (on every rank).
    """
    dev = dist.init(device)
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    trackers.require_trackers(cfg)
    t0 = time.perf_counter()
    predictor = load_run(run_dir, cfg=cfg, device=dev)
    record = predictor.record
    splits = splits or build_datasets(cfg.data, seed=cfg.optim.seed)
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
    feats, labels = extract_features(predictor.backbone, dataset.with_transform(predictor.transform),
                                     batch_size=256, device=dev, workers=num_workers(cfg.data.num_workers),
                                     progress=progress, desc=f"{split} features")  # float32, as predict
    logits, summary, variants = score(predictor, feats, labels)
    stage1 = stage1_summary(run_dir)
    wall = stage1.wall_seconds + (record.wall_seconds if record else 0.0) + (time.perf_counter() - t0)
    method, epochs = imported_method(stage1, record) or (method_name(cfg), cfg.optim.epochs)
    report = build_report(summary, dataset=splits.name, method=method, seed=cfg.optim.seed,
                          epochs=epochs, wall_seconds=round(wall, 1), split=split,
                          selection=record.selection if record else "", variants=variants,
                          many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold,
                          run_info=run_facts(stage1, splits, cfg))
    if dist.is_main():
        target = run_dir if split == "test" else run_dir / "val"
        written = write_evaluation_files(target, report, logits, labels, splits.class_names,
                                         [dataset.path(i) for i in range(len(dataset))], cfg)
        plots = sorted(p for p in written if p.suffix == ".png")
        trackers.log_report(run_dir, report, plots, split=split)  # log.trackers
        warning = chance_warning(report["top1"], splits.num_classes)
        if warning:
            say(warning)
    dist.barrier()
    return report


def score(predictor: Predictor, feats: torch.Tensor, labels: torch.Tensor,
          ) -> tuple[torch.Tensor, dict[str, Any], list[dict[str, Any]]]:
    """The plain classifier's logits, its :func:`summarize` (groups from the run's training counts) and
    the post-hoc variant rows (logit adjustment, tau-norm, NCM where the run has class means)."""
    cfg = predictor.cfg
    logits = predictor.logits_from_features(feats)
    variants_logits = {
        f"+ logit adjustment (tau={cfg.classifier.logit_adjust_tau:g})":
            predictor.logits_from_features(feats, "logit-adjust"),
        f"+ tau-normalisation (tau={cfg.classifier.tau_norm:g})": predictor.logits_from_features(feats, "tau-norm"),
    }
    if predictor.class_means is not None:  # an imported classifier has none (no training features were seen)
        variants_logits["nearest class mean"] = predictor.logits_from_features(feats, "ncm")
    many, few = cfg.eval.many_threshold, cfg.eval.few_threshold
    summary = summarize(logits, labels, predictor.train_counts, class_names=predictor.class_names,
                        many_threshold=many, few_threshold=few)
    variants = []
    for name, lg in variants_logits.items():
        s = summarize(lg, labels, predictor.train_counts, many_threshold=many, few_threshold=few)
        variants.append({"method": name, **{k: s[k] for k in ("top1", "top5", "top1_macro", "many", "medium",
                                                                  "few")}})
    return logits, summary, variants


def labelled_data(data: str | Path, predictor: Predictor, data_root: str | Path | None = None) -> Inputs:
    """The labelled images of ``data`` for :func:`evaluate_data`: a folder with one sub-folder per class
    (named like the run's classes; images found recursively) or a labelled list (class names or indices,
    :func:`dscl.data.inputs.read_labelled_list`; BBN json). Every image must have a label.

    Raises:
        DataError: a folder of an unknown class (named), a folder without class folders, an unlabelled
            list entry, or no image at all.
    """
    from dscl.data.readers import read_folder_split

    path = Path(data)
    names = predictor.class_names
    if path.is_dir():
        folders = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        unknown = [d.name for d in folders if d.name not in names]
        if unknown:
            raise DataError(f"{path}: class folder(s) {', '.join(unknown[:10])} are not classes of the run "
                            f"{predictor.run_dir} ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); "
                            "rename them or leave them out")
        paths, labels, _ = read_folder_split(path, list(names))  # the run's class order
        inputs = Inputs(paths, list(labels))
        if not inputs.paths:
            raise DataError(f"{path} holds no image in class folders: give a folder with one sub-folder per class "
                            f"(named like the run's classes), or a labelled list")
        return inputs
    if not path.is_file():
        raise DataError(f"{path} does not exist: give a folder of class folders or a labelled list (.txt / .json)")
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise DataError(f"{path}: give a folder of class folders or a labelled list (.txt / .json), not one file")
    inputs = collect_inputs([path], num_classes=len(names), data_root=data_root, class_names=names)
    unlabelled = [p for p, y in zip(inputs.paths, inputs.labels, strict=True) if y is None]
    if unlabelled:
        raise DataError(f"{path}: {len(unlabelled)} entr(y/ies) have no label (first: {unlabelled[0]}); evaluation "
                        "needs 'path label' lines (a class name or index), or use dscl predict")
    if not inputs.paths:
        raise DataError(f"{path} lists no image")
    return inputs


def evaluate_data(run_dir: str | Path, data: str | Path, out: str | Path, *, data_root: str | Path | None = None,
                  device: str = "auto", progress: bool = True, overwrite: bool = False,
                  batch_size: int = 128, workers: int = 0, cfg: Config | None = None) -> dict[str, Any]:
    """Score a classified run on new labelled data (another test set, a moved or shifted dataset).

    ``data`` is a folder of class folders or a labelled list (:func:`labelled_data`); classes are matched
    by name. Writes report.json / report.md / per_class.csv / confusion.csv / predictions.csv / plots into
    ``out`` with Many / Medium / Few from the **run's** training counts; a run class with no image in
    ``data`` is reported as missing. An unreadable image stops the evaluation before anything is written.
    Returns the report.
    """
    from dscl.data.inputs import iter_files

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RunDirError(f"--out {out} exists and is not an empty folder; pass --overwrite or choose another")
    t0 = time.perf_counter()
    predictor = load_run(run_dir, cfg=cfg, device=device)
    predictor.require_classifier()
    inputs = labelled_data(data, predictor, data_root)
    for note in inputs.notes:
        say(f"note: {note}")
    feats, failed = [], []
    for batch in iter_files(predictor.transform, inputs.paths, batch_size=batch_size, workers=workers):
        failed += [(p, e) for p, e in zip(batch.paths, batch.errors, strict=True) if e is not None]
        if len(batch.images):
            feats.append(predictor.features_of(batch.images).cpu())
    if failed:
        shown = "; ".join(f"{p}: {e}" for p, e in failed[:5])
        raise DataError(f"{len(failed)} image(s) of {data} could not be read ({shown}"
                        f"{'; ...' if len(failed) > 5 else ''}); nothing was written")
    labels = torch.tensor([int(y) for y in inputs.labels if y is not None])
    logits, summary, variants = score(predictor, torch.cat(feats), labels)
    cfg = predictor.cfg
    stage1 = stage1_summary(run_dir)
    method, epochs = imported_method(stage1, predictor.record) or (method_name(cfg), cfg.optim.epochs)
    facts = run_facts(stage1, None, cfg)
    facts.update(data_source=str(Path(data).resolve()), data_notes=inputs.notes, run=str(run_dir.resolve()))
    report = build_report(summary, dataset=f"{Path(data).name} (new data)", method=method, seed=cfg.optim.seed,
                          epochs=epochs, wall_seconds=round(time.perf_counter() - t0, 1), split="data",
                          selection=predictor.record.selection if predictor.record else "", variants=variants,
                          many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold,
                          run_info=facts)
    write_evaluation_files(out, report, logits, labels, predictor.class_names, inputs.paths, cfg)
    warning = chance_warning(report["top1"], predictor.num_classes)
    if warning:
        say(warning + "".join(f"\n{n}" for n in inputs.notes))
    return report


def imported_method(stage1: Stage1Summary, classifier: ClassifierRecord | None) -> tuple[str, None] | None:
    """``(method, epochs)`` for a run whose weights came from ``dscl import``: the method names the
    source format (the config's method and epochs describe nothing that was trained), epochs unknown.
    None for a run dscl trained."""
    imported = stage1.facts.imported
    if not imported:
        return None
    if classifier is not None and classifier.imported:
        return f"imported {imported.get('format')} checkpoint", None
    return f"imported {imported.get('format')} backbone + dscl classifier", None


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


def run_facts(stage1: Stage1Summary, splits: DatasetSplits | None, cfg: Config) -> dict[str, Any]:
    """How the run was made, for ``report.json``.

    From stage 1's facts (:class:`~dscl.run.RunFacts`): ``precision`` (fp32 / bf16 / fp16), ``device``,
    ``torch_version``, ``global_batch``, ``world_size`` and ``lr`` (the effective learning rate, base_lr x batch / 256);
    None where a checkpoint written before these were recorded lacks them (the precision then comes
    from the config). From the data: ``train_fingerprint`` (:meth:`LTDataset.fingerprint` of the
    training split the classifier saw), ``data_root`` (the data folder used, when the dataset knows
    it), ``stage1_train_fingerprint`` when stage 1 saw a different training split, and ``expected``:
    the preset's published numbers (:func:`dscl.config.preset_expected`) when the run uses its preset
    unchanged (:func:`dscl.config.preset_changes` empty), else None (``splits`` None: data that is not
    the run's dataset, so no fingerprint, data folder or published numbers). ``profile`` and ``conventions``
    say where the run follows the official code and where it takes our deliberate differences
    (README "Deliberate differences").
    """
    fingerprint = splits.train.fingerprint() if splits is not None else None
    s1 = stage1.facts
    imported = s1.imported
    # an imported checkpoint's precision is unknown (the config's optim.amp did not train it)
    precision = s1.precision or (None if imported else {"none": "fp32"}.get(cfg.optim.amp, cfg.optim.amp))
    facts: dict[str, Any] = {"precision": precision, "device": s1.device, "torch_version": s1.torch_version,
                             "global_batch": s1.global_batch, "world_size": s1.world_size, "lr": s1.lr}
    if splits is not None:
        facts.update(train_fingerprint=fingerprint,
                     data_root=getattr(splits, "data_root", None) or cfg.data.data_root)
    if not imported:  # the config's conventions say how dscl trained it; an imported checkpoint's are unknown
        facts["profile"] = cfg.profile
        facts["conventions"] = {"patch_bn": cfg.model.patch_bn, "roi_aligned": cfg.model.roi_aligned,
                                "queue_init": cfg.model.queue_init, "classifier_protocol": cfg.classifier.protocol,
                                "classifier_standardize": cfg.classifier.standardize}
    if splits is not None and s1.train_fingerprint not in (None, fingerprint):
        facts["stage1_train_fingerprint"] = s1.train_fingerprint
    if imported:  # the source checkpoint, named (report.md says how it was trained is unknown)
        facts["imported"] = dict(imported)
    # the paper's numbers for this configuration, only when the run is the preset unchanged
    facts["expected"] = (preset_expected(cfg.preset) if not (preset_changes(cfg) or imported or splits is None)
                         else None)
    return facts


def write_evaluation_files(target: Path, report: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor,
                           class_names: Sequence[str], paths: Sequence[str | None], cfg: Config) -> list[Path]:
    """Every file of an evaluation into ``target``: report.json / .md, per_class.csv, confusion.csv,
    predictions.csv and plots (rank 0 only; each file atomic). Returns the paths written."""
    target.mkdir(parents=True, exist_ok=True)
    conf = confusion_matrix(logits.argmax(1), labels, len(class_names))
    written = write_report(target, report, confusion=conf, class_names=class_names,
                           many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold)
    return [*written, write_predictions(target / "predictions.csv", logits, labels, class_names, paths=paths)]
