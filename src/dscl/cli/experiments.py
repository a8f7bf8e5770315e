"""``dscl compare | sweep | analyze``: methods x seeds, one-parameter sweeps, the paper's analyses."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from dscl.cli.common import EXIT_OK, config_args, load_cfg, print_main, runtime_args
from dscl.errors import UsageError


def cmd_compare(args: argparse.Namespace) -> int:
    from dscl.compare import compare, parse_methods, parse_seeds

    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    cfg = load_cfg(args)
    command = "dscl " + shlex.join(args.argv)
    result = compare(cfg, methods, seeds, args.out, command=command, device=args.device,
                     progress=not args.no_progress)
    from dscl.compare import format_markdown

    print_main(format_markdown(result) + f"\nwrote {Path(args.out) / 'compare.json'} and compare.md")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from dscl.sweep import format_markdown, parse_param, sweep

    name, values = parse_param(args.param)
    cfg = load_cfg(args)
    from dscl.compare import parse_methods, parse_seeds

    methods = parse_methods(args.method)
    if len(methods) != 1:
        raise UsageError(f"--method {args.method!r}: a sweep trains one method; name exactly one")
    method = methods[0]
    result = sweep(cfg, name, values, method=method, seeds=parse_seeds(args.seeds), out=args.out,
                   val_fraction=args.val_fraction, command="dscl " + shlex.join(args.argv), device=args.device,
                   progress=not args.no_progress)
    print_main(format_markdown(result) + f"\nwrote {Path(args.out) / 'sweep.json'}, sweep.md and sweep.png")
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    from dscl.run import RunDirError, out_path_problem

    problem = args.out is not None and out_path_problem(Path(args.out), folder=True)
    if problem:  # before the measurement, which may take minutes
        raise RunDirError(problem)
    progress = not args.no_progress
    if args.analysis == "gradient-ratio":
        from dscl.analysis.gradient import format_summary, gradient_ratio

        result = gradient_ratio(args.run, batches=args.batches, out=args.out, device=args.device, progress=progress)
        print_main(format_summary(result))
    elif args.analysis == "retrieval":
        from dscl.analysis.retrieval import format_retrieval, retrieval

        result = retrieval(args.run, compare_run=args.compare_run, classes=args.classes, k=args.k,
                           queries_per_class=args.queries_per_class, out=args.out, device=args.device,
                           progress=progress)
        print_main(format_retrieval(result))
    else:
        from dscl.analysis.retrieval import format_patch_retrieval, patch_retrieval

        result = patch_retrieval(args.run, query=args.query, box=args.box, k=args.k, out=args.out,
                                 device=args.device, progress=progress)
        print_main(format_patch_retrieval(result))
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register compare, sweep and analyze."""
    p = sub.add_parser("compare", help="several methods x seeds on one preset -> compare.json / compare.md")
    p.add_argument("--methods", default="ce,scl,dscl,dscl+pbsd",
                   help="comma-separated, from ce, scl, dscl, scl+pbsd, dscl+pbsd (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="comparison folder; rerunning the same command continues a killed comparison")
    config_args(p)
    runtime_args(p)
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("sweep", help="one hyperparameter over several values, chosen on a validation split")
    p.add_argument("--param", required=True, metavar="NAME=V1,V2,...",
                   help="alpha, lambda, patches, patch_scale, queue or any section.key, with its values, "
                        "e.g. alpha=0.05,0.1,0.2 or patch_scale=[0.05,0.3],[0.1,0.6]")
    p.add_argument("--method", default="dscl+pbsd",
                   help="the method every point trains (default: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="carve this fraction of each training class for choosing (default: the dataset's "
                        "own validation split — fmnist-lt / cifar*-lt hold one out of their unused training "
                        "images — else 0.1)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="sweep folder; rerunning the same command continues a killed sweep")
    config_args(p)
    runtime_args(p)
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("analyze", help="the paper's analyses for a finished run (PNG + JSON in RUN/analysis)")
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    a = asub.add_parser("gradient-ratio",
                        help="pull on the own augmented view / pull on other positives, SCL vs DSCL (Fig. 2)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--batches", type=int, default=4, help="training batches to measure (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    runtime_args(a)
    a = asub.add_parser("retrieval", help="top-k nearest training images of test queries, head vs tail (Fig. 1)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--compare-run", default=None, metavar="DIR2", help="a second run drawn side by side")
    a.add_argument("--classes", default=None,
                   help="query classes: names, indices, or head/medium/tail/all (default: head,tail, or the "
                        "run's most and least frequent non-empty shot groups when it lacks one of them)")
    a.add_argument("--k", type=int, default=5, help="neighbours per query (default: %(default)s)")
    a.add_argument("--queries-per-class", type=int, default=1,
                   help="query images drawn per class in the picture (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    runtime_args(a)
    a = asub.add_parser("patch-retrieval",
                        help="training images whose patch features best match a query box, with response maps (Fig. 4)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--query", type=int, default=None, metavar="INDEX",
                   help="test-set index of the query image (default: the first test image of the rarest class)")
    a.add_argument("--box", default=None, metavar="X1,Y1,X2,Y2",
                   help="query box in pixels of the evaluation-size image (default: the central half)")
    a.add_argument("--k", type=int, default=5, help="retrieved training images (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    runtime_args(a)
    p.set_defaults(handler=cmd_analyze)
