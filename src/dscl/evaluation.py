"""Evaluation of a classified run: top-1 / top-5, Many / Medium / Few, post-hoc variants, report files."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dscl import dist, trackers
from dscl.backbones import BackboneSpec
from dscl.calibration import apply_temperature, calibration_report, reliability_bins, softmax
from dscl.config import Config, method_name, preset_changes, preset_expected
from dscl.data import DataError, DatasetSplits, build_datasets
from dscl.data.inputs import LIST_SUFFIXES, Inputs, collect_inputs
from dscl.data.policies import describe as describe_policy
from dscl.errors import UsageError
from dscl.features import extract_features
from dscl.inference import EnsemblePredictor, Predictor, is_ensemble, load_ensemble, load_run
from dscl.metrics import GROUPS, confusion_matrix, shot_groups, summarize
from dscl.report import CALIBRATION_BINS, build_report, variant_row, write_predictions, write_report
from dscl.run import (
    SUMMARY_FILE,
    CheckpointError,
    ClassifierRecord,
    RunDirError,
    Stage1Summary,
    check_run_config,
    load_run_config,
    make_out_dir,
    out_path_problem,
    stage1_summary,
)
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
    if cfg is None:
        cfg = load_run_config(run_dir)  # checked against the checkpoint there
    else:
        check_run_config(run_dir, cfg, "the config given to evaluate")
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
        raise UsageError(f"--split must be test or val, got {split!r}")
    predictor.backbone.to(memory_format=torch.channels_last)
    feats, labels = extract_features(predictor.backbone, dataset.with_transform(predictor.transform),
                                     batch_size=256, device=dev, workers=num_workers(cfg.data.num_workers),
                                     progress=progress, desc=f"{split} features")  # float32, as predict
    logits, summary, variants = score(predictor, feats, labels)
    if split == "val" and predictor.temperature is not None:
        summary["calibration"]["temperature_note"] += (
            "; this report is on that same validation split, so the row after temperature scaling is in-sample "
            "(optimistic)")
    stage1 = stage1_summary(run_dir)
    wall = stage1.wall_seconds + (record.wall_seconds if record else 0.0) + (time.perf_counter() - t0)
    method, epochs = imported_method(stage1, record) or trained_method(stage1, cfg, run_dir)
    report = build_report(summary, dataset=splits.name, method=method, seed=cfg.optim.seed,
                          epochs=epochs, wall_seconds=round(wall, 1), split=split,
                          selection=record.selection if record else "", variants=variants,
                          many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold,
                          run_info=run_facts(stage1, splits, cfg, classifier=record,
                                             standardized=predictor.feature_stats is not None, spec=predictor.spec))
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


def calibration_section(logits: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int], *,
                        many_threshold: int, few_threshold: int, temperature: float | None = None,
                        temperature_fit: Mapping[str, Any] | None = None, note: str = "") -> dict[str, Any]:
    """The ``calibration`` object of ``report.json`` for one set of logits (DESIGN.md "report.json keys").

    :func:`dscl.calibration.calibration_report` with ``n_bins`` 15 (MiSLAS's equal-width bins on the top-1
    confidence) and groups Many / Medium / Few from the run's training counts (:func:`dscl.metrics.shot_groups`),
    plus each group's reliability ``bins`` (``confidence_hist.png``), ``temperature`` and ``temperature_note``.

    Args:
        logits: (N, C) scores of the classifier reported; labels: (N,) true classes.
        train_counts: (C,) training images per class (the groups).
        many_threshold, few_threshold: the run's ``eval.*`` group boundaries.
        temperature: T fitted on the validation split (``classify``), or None: then ``temperature`` is None.
        temperature_fit: how T was fitted (stored in ``classifier.pt``), copied into ``temperature.fit``.
        note: one sentence on the temperature (how it was fitted, or why there is none).

    Returns:
        The calibration report (percent ECEs, NLL, Brier, ``bins``, ``groups``), with ``temperature``: None
        or ``{"method", "temperature", "fit", "top1", "many", "medium", "few"}`` plus the calibration report of
        ``logits / T`` (the argmax, hence every accuracy, is that of ``logits``), and ``temperature_note``.
    """
    cal = _calibration_with_group_bins(logits, labels, train_counts, many_threshold, few_threshold)
    cal["temperature"] = None
    if temperature is not None:
        scaled = apply_temperature(torch.as_tensor(logits).double(), temperature)  # float64: no new ties
        s = summarize(scaled, labels, train_counts, many_threshold=many_threshold, few_threshold=few_threshold)
        cal["temperature"] = {
            "method": f"+ temperature scaling (T={temperature:.3g})", "temperature": round(float(temperature), 6),
            "fit": dict(temperature_fit or {}), **{k: variant_row("", s)[k] for k in ("top1", *GROUPS)},
            **_calibration_with_group_bins(scaled, labels, train_counts, many_threshold, few_threshold)}
    cal["temperature_note"] = note
    return cal


def _calibration_with_group_bins(logits: Any, labels: torch.Tensor, train_counts: Sequence[int],
                                 many_threshold: int, few_threshold: int) -> dict[str, Any]:
    """:func:`calibration_report` by shot group, each non-empty group with its own reliability ``bins``."""
    groups = shot_groups(np.asarray(train_counts), many_threshold, few_threshold)
    cal = calibration_report(logits, labels, groups, n_bins=CALIBRATION_BINS)
    z, y = torch.as_tensor(logits), torch.as_tensor(labels)
    for name, ids in groups.items():
        entry = cal["groups"].get(name)
        if not entry or not entry["n_samples"]:
            continue
        rows = torch.isin(y, torch.as_tensor(ids, dtype=y.dtype))
        bins = reliability_bins(softmax(z[rows]), y[rows], n_bins=CALIBRATION_BINS)  # one group's (n, C) at a time
        entry["bins"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in b.items()} for b in bins]
    return cal


def score(predictor: Predictor | EnsemblePredictor, feats: Any, labels: torch.Tensor,
          ) -> tuple[torch.Tensor, dict[str, Any], list[dict[str, Any]]]:
    """The plain classifier's logits, its :func:`summarize` (groups from the run's training counts) with its
    ``calibration`` (:func:`calibration_section`, including the temperature-scaled row where the run has a
    temperature) and the post-hoc variant rows (logit adjustment, tau-norm, NCM where the run has class means),
    each with its long-tail summary and calibration (:func:`dscl.report.variant_row`)."""
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
    record = getattr(predictor, "record", None)
    summary["calibration"] = calibration_section(
        logits, labels, predictor.train_counts, many_threshold=many, few_threshold=few,
        temperature=predictor.temperature, temperature_fit=record.temperature_fit if record is not None else None,
        note=predictor.temperature_note())
    variants = []
    for name, lg in variants_logits.items():
        s = summarize(lg, labels, predictor.train_counts, many_threshold=many, few_threshold=few)
        s["calibration"] = calibration_section(lg, labels, predictor.train_counts, many_threshold=many,
                                               few_threshold=few)
        variants.append(variant_row(name, s))
    return logits, summary, variants


def labelled_data(data: str | Path, predictor: Predictor | EnsemblePredictor,
                  data_root: str | Path | None = None) -> Inputs:
    """The labelled images of ``data`` for :func:`evaluate_data`: a folder with one sub-folder per class
    (named like the run's classes, or their folder-safe spelling, :func:`dscl.data.readers.match_class_folders`,
    the mapping used in ``notes``; images found recursively) or a labelled list (class names or indices,
    :func:`dscl.data.inputs.read_labelled_list`; BBN json). Every image must have a label.

    Raises:
        DataError: a folder of an unknown class (named), a folder without class folders, an unlabelled
            list entry, or no image at all.
    """
    from dscl.data.readers import folder_safe_spellings, match_class_folders, read_folder_split

    path = Path(data)
    names = predictor.class_names
    if path.is_dir():
        _, unknown, notes = match_class_folders(path, names)  # the rule the folder datasets follow too
        if unknown:
            example = next((f" ({s} for {names[i]})" for s, i in folder_safe_spellings(names).items()), "")
            raise DataError(f"{path}: class folder(s) {', '.join(unknown[:10])} are not classes of the run "
                            f"{predictor.run_dir} ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}) "
                            f"or their folder-safe spellings{example}; rename them or leave them out")
        paths, labels, _ = read_folder_split(path, list(names))  # the run's class order
        inputs = Inputs(paths, list(labels), notes)
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
    by name (or a folder's folder-safe spelling of it). Writes report.json / report.md / per_class.csv /
    confusion.csv / predictions.csv / plots into ``out`` with Many / Medium / Few from the **run's**
    training counts; a run class with no image in ``data`` is reported as missing. A missing or unreadable
    image stops the evaluation before anything is written. ``run_dir`` may be an ensemble folder of
    ``dscl ensemble`` (:func:`evaluate_ensemble_data`; ``cfg`` must then be None). Returns the report.
    """
    run_dir, out = Path(run_dir), Path(out)
    check_data_out(out, overwrite)
    t0 = time.perf_counter()
    if is_ensemble(run_dir):
        if cfg is not None:
            raise UsageError(f"{run_dir} is an ensemble folder: its members' own configs are used, so no config "
                             "(section.key=value overrides) can be given for it")
        return evaluate_ensemble_data(load_ensemble(run_dir, device=device), data, out, data_root=data_root,
                                      batch_size=batch_size, workers=workers, t0=t0)
    predictor = load_run(run_dir, cfg=cfg, device=device)
    inputs, feats, labels = data_features(predictor, data, data_root, batch_size=batch_size, workers=workers)
    logits, summary, variants = score(predictor, feats, labels)
    cfg = predictor.cfg
    stage1 = stage1_summary(run_dir)
    method, epochs = imported_method(stage1, predictor.record) or trained_method(stage1, cfg, run_dir)
    facts = run_facts(stage1, None, cfg, classifier=predictor.record,
                      standardized=predictor.feature_stats is not None, spec=predictor.spec)
    facts.update(data_source=str(Path(data).resolve()), data_notes=inputs.notes, run=str(run_dir.resolve()))
    report = build_report(summary, dataset=f"{Path(data).name} (new data)", method=method, seed=cfg.optim.seed,
                          epochs=epochs, wall_seconds=round(time.perf_counter() - t0, 1), split="data",
                          selection=predictor.record.selection if predictor.record else "", variants=variants,
                          many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold,
                          run_info=facts)
    return _finish_data_report(out, report, logits, labels, predictor.class_names, inputs, cfg)


def check_data_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` for :func:`evaluate_data` that cannot take its files, before any work: under a file
    or onto a file (:func:`dscl.run.out_path_problem`), or a folder with files in it (unless ``overwrite``)."""
    problem = out_path_problem(out, folder=True)
    if problem:
        raise RunDirError(problem)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"--out {out} exists and is not empty; pass --overwrite to replace its report files, "
                          f"or choose another --out")


def data_features(predictor: Predictor | EnsemblePredictor, data: str | Path, data_root: str | Path | None, *,
                  batch_size: int, workers: int) -> tuple[Inputs, Any, torch.Tensor]:
    """The labelled images of ``data`` (:func:`labelled_data`), their features and labels ``(N,)``.

    Features: ``(N, D)`` float32 on the CPU, or for an ensemble one such tensor per member (a list). Every
    file is checked before any is decoded, so a wrong list fails at once, with one hint.

    Raises:
        DataError: files that do not exist or cannot be decoded (nothing was written).
    """
    from dscl.data.inputs import iter_files

    predictor.require_classifier()
    inputs = labelled_data(data, predictor, data_root)
    for note in inputs.notes:
        say(f"note: {note}")
    check_data_files(inputs.paths, Path(data), data_root)
    chunks: list[Any] = []  # per batch: a tensor, or a list of the members' tensors
    failed: list[str] = []
    for batch in iter_files(predictor.transform, inputs.paths, batch_size=batch_size, workers=workers):
        failed += [e for e in batch.errors if e is not None]
        if len(batch.images):
            f = predictor.features_of(batch.images)
            chunks.append([x.cpu() for x in f] if isinstance(f, list) else f.cpu())
    if failed:
        raise DataError(f"{len(failed)} image(s) of {data} could not be read ({'; '.join(failed[:3])}"
                        f"{'; ...' if len(failed) > 3 else ''}); replace or remove them; nothing was written")
    feats = ([torch.cat(parts) for parts in zip(*chunks, strict=True)] if isinstance(chunks[0], list)
             else torch.cat(chunks))
    return inputs, feats, torch.tensor([int(y) for y in inputs.labels if y is not None])


def check_data_files(paths: Sequence[str], data: Path, data_root: str | Path | None) -> None:
    """Refuse image files of ``data`` that do not exist, in one line, with the hint that fits: where the
    paths of a list are read from."""
    missing = [p for p in paths if not Path(p).is_file()]
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    if data.is_dir():
        raise DataError(f"{len(missing)} image file(s) of {data} disappeared while it was read ({shown}); "
                        "nothing was written")
    where = f"{data_root} (--data-root)" if data_root is not None else f"{data.parent.absolute()} (the list's folder)"
    raise DataError(f"{len(missing)} of the {len(paths)} image files listed in {data} do not exist ({shown}); "
                    f"its paths are read relative to {where}; pass --data-root DIR if they start in "
                    "another folder; nothing was written")


def evaluate_ensemble_data(ens: EnsemblePredictor, data: str | Path, out: Path, *, data_root: str | Path | None,
                           batch_size: int, workers: int, t0: float) -> dict[str, Any]:
    """:func:`evaluate_data` for an ensemble folder: the report of its averaged softmax predictions (post-hoc
    rows averaged the same way), one row per member below, ``members`` as in ``dscl ensemble``'s report."""
    inputs, feats, labels = data_features(ens, data, data_root, batch_size=batch_size, workers=workers)
    logits, summary, variants = score(ens, feats, labels)
    cfg = ens.cfg
    many, few = cfg.eval.many_threshold, cfg.eval.few_threshold
    members = []
    for k, (m, f) in enumerate(zip(ens.members, feats, strict=True), start=1):
        member_logits = m.logits_from_features(f)
        s = summarize(member_logits, labels, ens.train_counts, many_threshold=many, few_threshold=few)
        s["calibration"] = calibration_section(member_logits, labels, ens.train_counts, many_threshold=many,
                                               few_threshold=few)
        method = method_name(m.cfg)
        variants.append(variant_row(f"member {k}: {m.run_dir.name} ({method})", s))
        members.append({"run": str(m.run_dir.resolve()), "method": method, "top1": variants[-1]["top1"]})
    names = ", ".join(m["run"] for m in members)
    facts = {"members": members, "data_source": str(Path(data).resolve()), "data_notes": inputs.notes,
             "run": str(ens.run_dir.resolve())}
    report = build_report(summary, dataset=f"{Path(data).name} (new data)", method=f"ensemble of {len(members)} runs",
                          seed=cfg.optim.seed, epochs=cfg.optim.epochs, wall_seconds=round(time.perf_counter() - t0, 1),
                          split="data", selection=f"equal-weight average of the softmax outputs of {names}; each "
                          "run's own stage-2 selection", variants=variants, many_threshold=many, few_threshold=few,
                          run_info=facts)
    return _finish_data_report(out, report, logits, labels, ens.class_names, inputs, cfg)


def _finish_data_report(out: Path, report: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor,
                        class_names: list[str], inputs: Inputs, cfg: Config) -> dict[str, Any]:
    """Write the report of new labelled data (a run's or an ensemble's) and warn when it reads near chance."""
    write_evaluation_files(out, report, logits, labels, class_names, inputs.paths, cfg)
    warning = chance_warning(report["top1"], len(class_names))
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


def trained_method(stage1: Stage1Summary, cfg: Config, run_dir: Path) -> tuple[str, int]:
    """``(method, epochs)`` of a run dscl trained, as its stage-1 checkpoint records them (the config
    only for a checkpoint that lacks the method). A ``config.yaml`` whose ``optim.epochs`` says otherwise
    (hand-edited, or a ``--resume`` to more epochs that has not saved yet) gets a note: reports say what
    was trained."""
    if cfg.optim.epochs != stage1.epoch:
        say(f"note: {run_dir / 'config.yaml'} says optim.epochs={cfg.optim.epochs}, but stage 1 trained "
            f"{stage1.epoch} ({run_dir / SUMMARY_FILE}); the report says {stage1.epoch}")
    return stage1.facts.method or method_name(cfg), stage1.epoch


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


def run_facts(stage1: Stage1Summary, splits: DatasetSplits | None, cfg: Config, *,
              classifier: ClassifierRecord | None = None, standardized: bool | None = None,
              spec: BackboneSpec | None = None) -> dict[str, Any]:
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
    (README "Deliberate differences"); the classifier's protocol comes from ``classifier`` (its checkpoint's
    record) and its standardisation from ``standardized`` (whether the checkpoint holds the statistics)
    where given, since ``config.yaml``'s ``classifier.*`` may have been edited since stage 2 ran. The
    preset comparison uses the epochs stage 1 trained, not ``optim.epochs``. ``backbone``: the backbone
    spec the evaluated network was rebuilt from (``spec``: architecture and input settings, as stored in
    the checkpoint), when given.
    """
    fingerprint = splits.train.fingerprint() if splits is not None else None
    s1 = stage1.facts
    imported = s1.imported
    # an imported checkpoint's precision is unknown (the config's optim.amp did not train it)
    precision = s1.precision or (None if imported else {"none": "fp32"}.get(cfg.optim.amp, cfg.optim.amp))
    facts: dict[str, Any] = {"precision": precision, "device": s1.device, "torch_version": s1.torch_version,
                             "global_batch": s1.global_batch, "world_size": s1.world_size, "lr": s1.lr}
    if spec is not None:
        facts["backbone"] = spec.to_dict()
    if splits is not None:
        facts.update(train_fingerprint=fingerprint,
                     data_root=getattr(splits, "data_root", None) or cfg.data.data_root)
    if not imported:  # the config's conventions say how dscl trained it; an imported checkpoint's are unknown
        facts["profile"] = cfg.profile
        facts["conventions"] = {"patch_bn": cfg.model.patch_bn, "roi_aligned": cfg.model.roi_aligned,
                                "queue_init": cfg.model.queue_init,
                                "classifier_protocol": classifier.protocol if classifier else cfg.classifier.protocol,
                                "classifier_standardize": cfg.classifier.standardize,
                                "augmentation": {"views": describe_policy(cfg.views),
                                                 "classifier": describe_policy(cfg.classifier)}}
        if classifier is not None and standardized is not None and classifier.stats_recorded:
            facts["conventions"]["classifier_standardize"] = standardized
    if splits is not None and s1.train_fingerprint not in (None, fingerprint):
        facts["stage1_train_fingerprint"] = s1.train_fingerprint
    if imported:  # the source checkpoint, named (report.md says how it was trained is unknown)
        facts["imported"] = dict(imported)
    # the paper's numbers for this configuration, only when the run is the preset unchanged
    trained = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=stage1.epoch))
    facts["expected"] = (preset_expected(cfg.preset) if not (preset_changes(trained) or imported or splits is None)
                         else None)
    return facts


def write_evaluation_files(target: Path, report: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor,
                           class_names: Sequence[str], paths: Sequence[str | None], cfg: Config) -> list[Path]:
    """Every file of an evaluation into ``target``: report.json / .md, per_class.csv, confusion.csv,
    predictions.csv and plots (rank 0 only; each file atomic). Returns the paths written."""
    make_out_dir(target)
    conf = confusion_matrix(logits.argmax(1), labels, len(class_names))
    written = write_report(target, report, confusion=conf, class_names=class_names,
                           many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold)
    return [*written, write_predictions(target / "predictions.csv", logits, labels, class_names, paths=paths)]
