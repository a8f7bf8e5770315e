"""Pieces every command shares: argument groups, config assembly, exit codes, rank-0 printing."""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


def config_args(p: argparse.ArgumentParser) -> None:
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


def runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log files still written)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def out_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--out", required=required, default=None, metavar="DIR",
                   help="run directory (refused if it exists and is not empty, unless --resume/--overwrite)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the dscl files of an existing run in --out")


def load_cfg(args: argparse.Namespace, extra: list[str] | None = None):
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


def resume_cfg(args: argparse.Namespace):
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


def table(report: dict) -> str:
    from dscl.report import format_table

    rows = [{"method": report["method"], **{k: report[k] for k in ("top1", "many", "medium", "few")}}]
    rows += report.get("variants", [])
    return format_table(rows)


def print_main(text: str) -> None:
    from dscl import dist

    if dist.is_main():
        print(text, flush=True)
