"""``dscl pretrain | classify | evaluate | run``: the two stages, the report, and all three at once."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dscl.cli.common import EXIT_OK, config_args, load_cfg, out_args, print_main, resume_cfg, runtime_args, table


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dscl.pretrain import pretrain

    cfg = resume_cfg(args) if args.resume else load_cfg(args)
    path = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                    progress=not args.no_progress)
    print_main(f"stage 1 checkpoint: {path}")
    return EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    from dscl.classify import classify
    from dscl.rundir import load_run_config

    cfg = load_run_config(args.run)
    if args.protocol:
        cfg.classifier.protocol = args.protocol
    path = classify(args.run, cfg=cfg, device=args.device, progress=not args.no_progress)
    print_main(f"stage 2 classifier: {path}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dscl.evaluation import evaluate

    report = evaluate(args.run, split=args.split, device=args.device, progress=not args.no_progress)
    if args.json:
        print_main(json.dumps(report, indent=2))
    else:
        where = Path(args.run) if args.split == "test" else Path(args.run) / "val"
        print_main(table(report) + f"\n\nreport: {where / 'report.md'}  plots: {where / 'plots'}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from dscl.classify import classify
    from dscl.evaluation import evaluate
    from dscl.pretrain import pretrain

    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR (the run to continue)")
    cfg = resume_cfg(args) if args.resume else load_cfg(args)
    out = args.out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    progress = not args.no_progress
    pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device, progress=progress)
    classify(out, cfg=cfg, device=args.device, progress=progress)
    report = evaluate(out, cfg=cfg, device=args.device, progress=progress)
    minutes = (time.perf_counter() - t0) / 60
    print_main(
        f"\n{report['dataset']} — {report['method']} (seed {report['seed']}, {report['epochs']} stage-1 epochs, "
        f"{minutes:.1f} min); top-1 % on the {report['split']} set, Many/Medium/Few = mean per-class accuracy\n"
        f"{table(report)}\n\nselection: {report['selection']}\n"
        f"report: {Path(out) / 'report.md'}\nplots:  {Path(out) / 'plots'}"
    )
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
    runtime_args(p)
    p.set_defaults(handler=cmd_classify)

    p = sub.add_parser("evaluate", help="top-1/top-5 and Many/Medium/Few report of a classified run")
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory with a stage-2 classifier")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    runtime_args(p)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("run", help="the main job: pretrain, classify and evaluate, then print the table")
    config_args(p)
    out_args(p, required=False)
    runtime_args(p)
    p.set_defaults(handler=cmd_run)
