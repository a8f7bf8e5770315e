"""``dscl pretrain | classify | evaluate | run``: the two stages, the report, and all three at once."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dscl.cli.common import (
    EVALUATE_KEYS,
    EXIT_OK,
    config_args,
    load_cfg,
    out_args,
    print_main,
    resume_cfg,
    resuming,
    run_cfg_with_overrides,
    runtime_args,
    table,
)
from dscl.errors import UsageError

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only inside the commands
    from dscl.config import Config
    from dscl.data import DatasetSplits


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dscl.pretrain import pretrain

    resume = resuming(args)
    cfg = resume_cfg(args) if resume else load_cfg(args)
    path = pretrain(cfg, args.out, resume=resume, overwrite=args.overwrite, device=args.device,
                    progress=not args.no_progress)
    print_main(f"stage 1 checkpoint: {path}")
    return EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    from dscl.classify import classify
    from dscl.run import STAGE2_KEYS, record_stage2_config

    cfg = run_cfg_with_overrides(args.run, args, STAGE2_KEYS, "classify",
                                 [f"classifier.protocol={args.protocol}"] if args.protocol else [])
    record_stage2_config(Path(args.run), cfg)  # config.yaml says what the classifier used (if anything changed)
    path = classify(args.run, cfg=cfg, device=args.device, progress=not args.no_progress)
    print_main(f"stage 2 classifier: {path}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dscl.cli.common import OVERRIDE
    from dscl.evaluation import evaluate, evaluate_data
    from dscl.inference import is_ensemble
    from dscl.run import record_stage2_config

    if args.data is not None and OVERRIDE.match(args.data):  # argparse put an override into DATA
        args.overrides, args.data = [args.data, *(args.overrides or [])], None
    if is_ensemble(args.run):  # a folder of `dscl ensemble`: its members' configs, its report on their split
        check_ensemble_evaluation(args)
    if args.data is not None:
        if args.out is None:
            raise UsageError(f"evaluating {args.data} needs --out DIR (the folder for its report files)")
        if args.split != "test":
            raise UsageError("--split chooses a split of the run's own dataset; it does not go with DATA")
        # with DATA, --data-root is where the list's paths start, not the run's dataset folder
        cfg = (None if is_ensemble(args.run) else
               run_cfg_with_overrides(args.run, args, EVALUATE_KEYS, "evaluate", data_root_key=False))
        report = evaluate_data(args.run, args.data, args.out, data_root=args.data_root, device=args.device,
                               progress=not args.no_progress, overwrite=args.overwrite, cfg=cfg)
        if args.json:
            print_main(json.dumps(report, indent=2))
        else:
            out = Path(args.out)
            print_main(f"{report['dataset']} — {report['method']} of {args.run}; top-1 % on "
                       f"{sum(r['test_count'] for r in report['per_class'])} images, Many/Medium/Few from the run's "
                       f"training counts\n{table(report)}\n\nreport: {out / 'report.md'}  plots: {out / 'plots'}  "
                       f"per class / predictions: {out / 'per_class.csv'}, {out / 'predictions.csv'}")
        warn_missing_classes(report, to_stderr=args.json)
        return EXIT_OK
    if args.out is not None:
        raise UsageError("--out goes with DATA (new labelled data); the run's own splits are reported in the run")
    cfg = run_cfg_with_overrides(args.run, args, EVALUATE_KEYS, "evaluate")
    record_stage2_config(Path(args.run), cfg)  # the report's thresholds / post-hoc settings, recorded
    report = evaluate(args.run, split=args.split, cfg=cfg, device=args.device, progress=not args.no_progress)
    if args.json:
        print_main(json.dumps(report, indent=2))
    else:
        where = Path(args.run) if args.split == "test" else Path(args.run) / "val"
        print_main(table(report) + f"\n\nreport: {where / 'report.md'}  plots: {where / 'plots'}  "
                   f"per class / predictions: {where / 'per_class.csv'}, {where / 'predictions.csv'}")
    warn_missing_classes(report, to_stderr=args.json)
    return EXIT_OK


def check_ensemble_evaluation(args: argparse.Namespace) -> None:
    """``dscl evaluate --run ENSEMBLE``: DATA and --out are needed (``dscl ensemble`` reported its split already)
    and no overrides (its members' own configs are used)."""
    if args.data is None:
        raise UsageError(f"{args.run} is an ensemble folder (dscl ensemble): its report on its members' split is "
                         f"{Path(args.run) / 'report.md'} (dscl ensemble --split val for the validation split); "
                         f"evaluate it on new labelled data with DATA --out DIR")
    if args.overrides:
        raise UsageError(f"{' '.join(args.overrides)}: {args.run} is an ensemble folder, evaluated with its members' "
                         f"own configs; drop the overrides (or evaluate a member run with them)")


def warn_missing_classes(report: dict, *, to_stderr: bool = False) -> None:
    """Name the classes with no image in the evaluated split, on stdout (stderr when stdout is JSON)."""
    from dscl.report import missing_classes_warning
    from dscl.runtime import say

    warning = missing_classes_warning(report)
    if warning:
        (say if to_stderr else print_main)(warning)


def stage2_forward_images(cfg: Config, n_train: int, n_val: int, n_test: int) -> int:
    """Images the backbone encodes (forward only) in stage 2 and the test evaluation of ``dscl run``."""
    cc = cfg.classifier
    val = n_val if cc.select == "val" else 0
    if cc.protocol == "cached":
        # BN re-estimation + clean features + augmented copies, validation once, then the test set
        return n_train * (int(cc.update_bn) + 1 + cc.augmented_copies) + val + n_test
    # the official protocol encodes the training set (and validation split) every epoch
    return (n_train + val) * cc.epochs + n_train + n_test


def stage2_estimate(cfg: Config, out: Path, splits: DatasetSplits) -> float | None:
    """Seconds stage 2 + evaluation will take, from stage 1's measured speed (None if unknown).

    Rough on purpose: one stage-1 image costs a forward and backward pass of the online encoder
    (~3 forwards) plus the momentum encoder's forward, so the backbone's forward rate is taken as
    4 x stage 1's images/s (patches ignored). Data loading and the linear classifier are not counted.
    """
    from dscl.run import MetricsLog

    log = MetricsLog(out / "metrics.jsonl")
    rates = [float(r["img_per_s"]) for r in log.read("pretrain") if r.get("img_per_s")]
    if not rates:
        return None
    n_val = len(splits.val) if splits.val is not None else 0
    images = stage2_forward_images(cfg, len(splits.train), n_val, len(splits.test))
    return images / (4 * statistics.median(rates[-20:]))


def cmd_run(args: argparse.Namespace) -> int:
    from dscl import dist
    from dscl.classify import classify
    from dscl.data import build_datasets
    from dscl.evaluation import evaluate
    from dscl.io import format_duration
    from dscl.pretrain import pretrain
    from dscl.runtime import say

    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR (the run to continue)")
    resume = resuming(args)
    cfg = resume_cfg(args) if resume else load_cfg(args)
    out = args.out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.out = out  # so an interrupt can name the directory to resume
    t0 = time.perf_counter()
    progress = not args.no_progress
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)  # once for the three stages
    pretrain(cfg, out, resume=resume, overwrite=args.overwrite, device=args.device, progress=progress,
             splits=splits)
    t1 = time.perf_counter()
    estimate = stage2_estimate(cfg, Path(out), splits) if dist.is_main() else None
    if estimate is not None:
        say(f"stage 2 + evaluation: roughly {format_duration(estimate)} (estimated from stage 1's speed)")
    classify(out, cfg=cfg, device=args.device, progress=progress, splits=splits)
    report = evaluate(out, cfg=cfg, device=args.device, progress=progress, splits=splits)
    say(f"stage 2 + evaluation took {format_duration(time.perf_counter() - t1)}")
    minutes = (time.perf_counter() - t0) / 60
    print_main(
        f"\n{report['dataset']} — {report['method']} (seed {report['seed']}, {report['epochs']} stage-1 epochs, "
        f"{minutes:.1f} min); top-1 % on the {report['split']} set, Many/Medium/Few = mean per-class accuracy\n"
        f"{table(report)}\n\nselection: {report['selection']}\n"
        f"report: {Path(out) / 'report.md'}\nplots:  {Path(out) / 'plots'}\n"
        f"csv:    {Path(out) / 'per_class.csv'}, {Path(out) / 'confusion.csv'}, {Path(out) / 'predictions.csv'}"
    )
    warn_missing_classes(report)
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register pretrain, classify, evaluate and run."""
    p = sub.add_parser("pretrain", help="stage 1: DSCL (+PBSD) representation learning")
    config_args(p)
    out_args(p, required=True)
    runtime_args(p)
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser("classify", help="stage 2: class-balanced linear classifier on the frozen backbone")
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    p.add_argument("--protocol", choices=("cached", "official"), default=None,
                   help="cached: features extracted once (default); official: backbone every epoch")
    p.add_argument("--data-root", default=None, metavar="DIR", help="the dataset's folder, if it moved "
                                                                      "(same as data.data_root=DIR)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="changes to the run's config for stage 2: classifier.*, eval.*, data.data_root, "
                        "data.num_workers (keys that describe stage 1 are refused)")
    runtime_args(p)
    p.set_defaults(handler=cmd_classify)

    p = sub.add_parser("evaluate", help="top-1/top-5 and Many/Medium/Few report of a classified run, on its own "
                                        "test / val split or on new labelled data")
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory with a stage-2 classifier")
    p.add_argument("data", nargs="?", default=None, metavar="DATA",
                   help="new labelled data: a folder with one sub-folder per class (named like the run's classes) "
                        "or a labelled list (.txt 'path label', label = class name or index; BBN .json); "
                        "needs --out. Without DATA: the run's own --split")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the report files of DATA")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="with DATA: the folder the paths of a DATA list are relative to (default: the list's "
                        "folder); without: the run's dataset folder, if it moved (data.data_root=DIR)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    runtime_args(p)
    # section.key=value overrides anywhere (eval.*, classifier.tau_norm / logit_adjust_tau, data.data_root)
    p.set_defaults(handler=cmd_evaluate, overrides=[])

    p = sub.add_parser("run", help="the main job: pretrain, classify and evaluate, then print the table")
    config_args(p)
    out_args(p, required=False)
    runtime_args(p)
    p.set_defaults(handler=cmd_run)
