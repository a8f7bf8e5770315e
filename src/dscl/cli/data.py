"""``dscl data | presets``: look at a dataset and at the shipped presets."""

from __future__ import annotations

import argparse
import json

from dscl.cli.common import EXIT_ERROR, EXIT_OK, config_args, load_cfg, runtime_args


def cmd_data(args: argparse.Namespace) -> int:
    from dscl.data import build_datasets, check_images, summarize_dataset

    extra = []
    for key, value in (("dataset", args.dataset), ("train_list", args.train_list),
                       ("val_list", args.val_list), ("test_list", args.test_list)):
        if value is not None:
            extra.append(f"data.{key}={value}")
    cfg = load_cfg(args, extra)
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


def cmd_presets(args: argparse.Namespace) -> int:
    from dscl.config import preset_names

    print("\n".join(preset_names()))
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register data (presets is registered by the top level)."""
    p = sub.add_parser("data", help="summarise and check a dataset (counts, shot groups, unreadable files)")
    p.add_argument("--dataset", default=None, help="fmnist-lt, cifar10-lt, cifar100-lt, split or folder")
    p.add_argument("--train-list", default=None, metavar="FILE")
    p.add_argument("--val-list", default=None, metavar="FILE")
    p.add_argument("--test-list", default=None, metavar="FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true", help="open every image and list missing/unreadable files")
    config_args(p)
    runtime_args(p)
    p.set_defaults(handler=cmd_data)
