"""Command-line interface: the only module that reads argv or chooses exit codes.

``dscl pretrain | classify | evaluate | run | data | compare | sweep | analyze | presets``.
``torchrun --nproc_per_node N -m dscl ...`` runs the training commands distributed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130



def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", default=None,
                   help="preset name (default fmnist-lt; see `dscl presets`)")
    g.add_argument("--config", default=None, metavar="FILE", help="YAML file applied over the preset")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="dataset folder (same as data.data_root=DIR; default $DSCL_DATA or the standard place)")
    g.add_argument("--seed", type=int, default=None, help="training seed (same as optim.seed=N)")
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local backbone state dict to start from, e.g. ImageNet weights for Places-LT "
                        "(same as model.pretrained=PATH; nothing is downloaded)")
    g.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. optim.epochs=5 loss.alpha=0.2 model.backbone=resnet18")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log files still written)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _out_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--out", required=required, default=None, metavar="DIR",
                   help="run directory (refused if it exists and is not empty, unless --resume/--overwrite)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the dscl files of an existing run in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscl",
        description="Decoupled Contrastive Learning (DSCL + PBSD) for long-tailed recognition.",
        epilog="`dscl run` with no arguments trains and evaluates on the embedded Fashion-MNIST-LT default.",
    )
    from dscl import __version__

    parser.add_argument("--version", action="version", version=f"dscl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="stage 1: DSCL (+PBSD) representation learning")
    _config_args(p)
    _out_args(p, required=True)
    _runtime_args(p)

    p = sub.add_parser("classify", help="stage 2: class-balanced linear classifier on the frozen backbone")
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    p.add_argument("--protocol", choices=("cached", "official"), default=None,
                   help="cached: features extracted once (default); official: backbone every epoch")
    _runtime_args(p)

    p = sub.add_parser("evaluate", help="top-1/top-5 and Many/Medium/Few report of a classified run")
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory with a stage-2 classifier")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _runtime_args(p)

    p = sub.add_parser("run", help="the main job: pretrain, classify and evaluate, then print the table")
    _config_args(p)
    _out_args(p, required=False)
    _runtime_args(p)

    p = sub.add_parser("data", help="summarise and check a dataset (counts, shot groups, unreadable files)")
    p.add_argument("--dataset", default=None, help="fmnist-lt, cifar10-lt, cifar100-lt, split or folder")
    p.add_argument("--train-list", default=None, metavar="FILE")
    p.add_argument("--val-list", default=None, metavar="FILE")
    p.add_argument("--test-list", default=None, metavar="FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true", help="open every image and list missing/unreadable files")
    _config_args(p)
    _runtime_args(p)

    p = sub.add_parser("compare", help="several methods x seeds on one preset -> compare.json / compare.md")
    p.add_argument("--methods", default="ce,scl,dscl,dscl+pbsd",
                   help="comma-separated, from ce, scl, dscl, scl+pbsd, dscl+pbsd (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="comparison folder; rerunning the same command continues a killed comparison")
    _config_args(p)
    _runtime_args(p)

    p = sub.add_parser("sweep", help="one hyperparameter over several values, chosen on a validation split")
    p.add_argument("--param", required=True, metavar="NAME=V1,V2,...",
                   help="alpha, lambda, patches, patch_scale, queue or any section.key, with its values, "
                        "e.g. alpha=0.05,0.1,0.2 or patch_scale=[0.05,0.3],[0.1,0.6]")
    p.add_argument("--method", default="dscl+pbsd",
                   help="the method every point trains (default: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of each class carved from train for choosing (default 0.1, or the "
                        "dataset's own validation split)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="sweep folder; rerunning the same command continues a killed sweep")
    _config_args(p)
    _runtime_args(p)

    p = sub.add_parser("analyze", help="the paper's analyses for a finished run (PNG + JSON in RUN/analysis)")
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    a = asub.add_parser("gradient-ratio",
                        help="pull on the own augmented view / pull on other positives, SCL vs DSCL (Fig. 2)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--batches", type=int, default=4, help="training batches to measure (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    _runtime_args(a)
    a = asub.add_parser("retrieval", help="top-k nearest training images of test queries, head vs tail (Fig. 1)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--compare-run", default=None, metavar="DIR2", help="a second run drawn side by side")
    a.add_argument("--classes", default="head,tail",
                   help="query classes: names, indices, or head/medium/tail/all (default: %(default)s)")
    a.add_argument("--k", type=int, default=5, help="neighbours per query (default: %(default)s)")
    a.add_argument("--queries-per-class", type=int, default=1,
                   help="query images drawn per class in the picture (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    _runtime_args(a)
    a = asub.add_parser("patch-retrieval",
                        help="training images whose patch features best match a query box, with response maps (Fig. 4)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--query", type=int, default=None, metavar="INDEX",
                   help="test-set index of the query image (default: the first test image of the rarest class)")
    a.add_argument("--box", default=None, metavar="X1,Y1,X2,Y2",
                   help="query box in pixels of the evaluation-size image (default: the central half)")
    a.add_argument("--k", type=int, default=5, help="retrieved training images (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    _runtime_args(a)

    sub.add_parser("presets", help="list the shipped presets")
    return parser


def _load_cfg(args: argparse.Namespace, extra: list[str] | None = None):
    from dscl.config import load_config

    overrides = list(args.overrides or [])
    if args.data_root is not None:
        overrides.append(f"data.data_root={args.data_root}")
    if args.seed is not None:
        overrides.append(f"optim.seed={args.seed}")
    if args.pretrained is not None:
        overrides.append(f"model.pretrained={args.pretrained}")
    overrides += extra or []
    return load_config(args.preset, args.config, overrides)


def _resume_cfg(args: argparse.Namespace):
    """On --resume the run's own config.yaml is the base; explicit overrides still apply."""
    from dscl.config import apply_mapping, parse_overrides, validate
    from dscl.rundir import load_run_config

    cfg = load_run_config(args.out)
    overrides = list(args.overrides or [])
    if args.data_root is not None:
        overrides.append(f"data.data_root={args.data_root}")
    if overrides:
        apply_mapping(cfg, parse_overrides(overrides), "override")
        validate(cfg)
    return cfg


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dscl.pretrain import pretrain

    cfg = _resume_cfg(args) if args.resume else _load_cfg(args)
    path = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                    progress=not args.no_progress)
    _print_main(f"stage 1 checkpoint: {path}")
    return EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    from dscl.classify import classify
    from dscl.rundir import load_run_config

    cfg = load_run_config(args.run)
    if args.protocol:
        cfg.classifier.protocol = args.protocol
    path = classify(args.run, cfg=cfg, device=args.device, progress=not args.no_progress)
    _print_main(f"stage 2 classifier: {path}")
    return EXIT_OK


def _table(report: dict) -> str:
    from dscl.report import format_table

    rows = [{"method": report["method"], **{k: report[k] for k in ("top1", "many", "medium", "few")}}]
    rows += report.get("variants", [])
    return format_table(rows)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dscl.evaluation import evaluate

    report = evaluate(args.run, split=args.split, device=args.device, progress=not args.no_progress)
    if args.json:
        _print_main(json.dumps(report, indent=2))
    else:
        where = Path(args.run) if args.split == "test" else Path(args.run) / "val"
        _print_main(_table(report) + f"\n\nreport: {where / 'report.md'}  plots: {where / 'plots'}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from dscl.classify import classify
    from dscl.evaluation import evaluate
    from dscl.pretrain import pretrain

    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR (the run to continue)")
    cfg = _resume_cfg(args) if args.resume else _load_cfg(args)
    out = args.out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    progress = not args.no_progress
    pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device, progress=progress)
    classify(out, cfg=cfg, device=args.device, progress=progress)
    report = evaluate(out, cfg=cfg, device=args.device, progress=progress)
    minutes = (time.perf_counter() - t0) / 60
    _print_main(
        f"\n{report['dataset']} — {report['method']} (seed {report['seed']}, {report['epochs']} stage-1 epochs, "
        f"{minutes:.1f} min); top-1 % on the {report['split']} set, Many/Medium/Few = mean per-class accuracy\n"
        f"{_table(report)}\n\nselection: {report['selection']}\n"
        f"report: {Path(out) / 'report.md'}\nplots:  {Path(out) / 'plots'}"
    )
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    from dscl.data import build_datasets, check_images, summarize_dataset

    extra = []
    for key, value in (("dataset", args.dataset), ("train_list", args.train_list),
                       ("val_list", args.val_list), ("test_list", args.test_list)):
        if value is not None:
            extra.append(f"data.{key}={value}")
    cfg = _load_cfg(args, extra)
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    summary = summarize_dataset(splits, cfg.eval.many_threshold, cfg.eval.few_threshold)
    problems: list[tuple[str, str]] = []
    if args.check:
        for name in ("train", "val", "test"):
            ds = getattr(splits, name)
            if ds is not None:
                problems += check_images(ds, progress=not args.no_progress)
        summary["unreadable"] = [{"path": p, "error": e} for p, e in problems]
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            if key == "unreadable":
                continue
            print(f"{key:>14}: {value}")
        if args.check:
            print(f"{'unreadable':>14}: {len(problems)}")
            for p, e in problems:
                print(f"  {p}: {e}")
    return EXIT_ERROR if problems else EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from dscl.compare import compare, parse_methods, parse_seeds

    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    cfg = _load_cfg(args)
    command = "dscl " + shlex.join(args.argv)
    result = compare(cfg, methods, seeds, args.out, command=command, device=args.device,
                     progress=not args.no_progress)
    from dscl.compare import format_markdown

    _print_main(format_markdown(result) + f"\nwrote {Path(args.out) / 'compare.json'} and compare.md")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from dscl.sweep import format_markdown, parse_param, sweep

    name, values = parse_param(args.param)
    cfg = _load_cfg(args)
    from dscl.compare import parse_methods, parse_seeds

    methods = parse_methods(args.method)
    if len(methods) != 1:
        raise ValueError(f"--method {args.method!r}: a sweep trains one method; name exactly one")
    method = methods[0]
    result = sweep(cfg, name, values, method=method, seeds=parse_seeds(args.seeds), out=args.out,
                   val_fraction=args.val_fraction, command="dscl " + shlex.join(args.argv), device=args.device,
                   progress=not args.no_progress)
    _print_main(format_markdown(result) + f"\nwrote {Path(args.out) / 'sweep.json'}, sweep.md and sweep.png")
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.analysis == "gradient-ratio":
        from dscl.analysis.gradient import format_summary, gradient_ratio

        result = gradient_ratio(args.run, batches=args.batches, out=args.out, device=args.device, progress=progress)
        _print_main(format_summary(result))
    elif args.analysis == "retrieval":
        from dscl.analysis.retrieval import format_retrieval, retrieval

        result = retrieval(args.run, compare_run=args.compare_run, classes=args.classes, k=args.k,
                           queries_per_class=args.queries_per_class, out=args.out, device=args.device,
                           progress=progress)
        _print_main(format_retrieval(result))
    else:
        from dscl.analysis.retrieval import format_patch_retrieval, patch_retrieval

        result = patch_retrieval(args.run, query=args.query, box=args.box, k=args.k, out=args.out,
                                 device=args.device, progress=progress)
        _print_main(format_patch_retrieval(result))
    return EXIT_OK


def cmd_presets(args: argparse.Namespace) -> int:
    from dscl.config import preset_names

    print("\n".join(preset_names()))
    return EXIT_OK


def _print_main(text: str) -> None:
    from dscl import dist

    if dist.is_main():
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\ndscl: name a command; `dscl run` trains and evaluates on the default dataset", file=sys.stderr)
        return EXIT_ERROR
    handlers = {"pretrain": cmd_pretrain, "classify": cmd_classify, "evaluate": cmd_evaluate, "run": cmd_run,
                "data": cmd_data, "compare": cmd_compare, "sweep": cmd_sweep, "analyze": cmd_analyze,
                "presets": cmd_presets}
    from dscl import dist
    from dscl.checkpoint import CheckpointError
    from dscl.config import ConfigError

    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch's checkpoint is intact; continue with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"dscl {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
