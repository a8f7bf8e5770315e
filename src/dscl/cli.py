"""Command-line interface: the only module that reads argv or chooses exit codes.

``dscl pretrain | classify | evaluate | run | data | compare`` (``analyze`` and ``sweep`` are
announced but not built yet). ``torchrun --nproc_per_node N -m dscl ...`` runs the same commands
distributed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130

NOT_YET = {
    "analyze": "gradient-ratio, retrieval and patch-retrieval pictures (arrives with issue #7)",
    "sweep": "one hyperparameter over several values (arrives with issue #7)",
}


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

    sub.add_parser("presets", help="list the shipped presets")
    for name, what in NOT_YET.items():
        p = sub.add_parser(name, help=f"[not built yet] {what}")
        p.add_argument("rest", nargs=argparse.REMAINDER)
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
    from dscl.train import load_run_config

    cfg = load_run_config(args.out)
    overrides = list(args.overrides or [])
    if args.data_root is not None:
        overrides.append(f"data.data_root={args.data_root}")
    if overrides:
        apply_mapping(cfg, parse_overrides(overrides), "override")
        validate(cfg)
    return cfg


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dscl.train import pretrain

    cfg = _resume_cfg(args) if args.resume else _load_cfg(args)
    path = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                    progress=not args.no_progress)
    _print_main(f"stage 1 checkpoint: {path}")
    return EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    from dscl.train import classify, load_run_config

    cfg = load_run_config(args.run)
    if args.protocol:
        cfg.classifier.protocol = args.protocol
    path = classify(args.run, cfg=cfg, device=args.device, progress=not args.no_progress)
    _print_main(f"stage 2 classifier: {path}")
    return EXIT_OK


def _table(report: dict) -> str:
    from dscl.evaluate import format_table

    rows = [{"method": report["method"], **{k: report[k] for k in ("top1", "many", "medium", "few")}}]
    rows += report.get("variants", [])
    return format_table(rows)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dscl.train import evaluate

    report = evaluate(args.run, split=args.split, device=args.device, progress=not args.no_progress)
    if args.json:
        _print_main(json.dumps(report, indent=2))
    else:
        where = Path(args.run) if args.split == "test" else Path(args.run) / "val"
        _print_main(_table(report) + f"\n\nreport: {where / 'report.md'}  plots: {where / 'plots'}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from dscl.train import classify, evaluate, pretrain

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
    if args.command in NOT_YET:
        print(f"dscl {args.command}: not built yet — {NOT_YET[args.command]}", file=sys.stderr)
        return EXIT_ERROR
    handlers = {"pretrain": cmd_pretrain, "classify": cmd_classify, "evaluate": cmd_evaluate, "run": cmd_run,
                "data": cmd_data, "compare": cmd_compare, "presets": cmd_presets}
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
