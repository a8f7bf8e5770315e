"""``dscl data``: look at a dataset (``dscl presets`` lives in ``cli/__init__.py``)."""

from __future__ import annotations

import argparse
import json
import sys

from dscl.cli.common import EXIT_ERROR, EXIT_OK, config_args, load_cfg, runtime_args


def _class_table(summary: dict) -> str:
    """One row per class: name, shot group, images in train / val / test ("-": no such split)."""
    rows = summary["classes"]
    width = max([len("class")] + [len(r["class"]) for r in rows])
    has_val = summary.get("num_val") is not None
    head = f"{'class':<{width}}  {'group':<6}  {'train':>7}  " + (f"{'val':>6}  " if has_val else "") + f"{'test':>6}"
    lines = [head]
    for r in rows:
        val = f"{r['val']:>6}  " if has_val else ""
        lines.append(f"{r['class']:<{width}}  {r['group']:<6}  {r['train']:>7}  {val}{r['test']:>6}")
    return "\n".join(lines)


def _empty_class_warnings(summary: dict) -> list[str]:
    """A warning per evaluated split (val, test) that has classes without any image."""
    group_of = {r["class"]: r["group"] for r in summary["classes"]}
    out = []
    for split in ("val", "test"):
        empty = summary["empty_classes"].get(split) or []
        if empty:
            named = ", ".join(f"{name!r} ({group_of[name]})" for name in empty[:20])
            named += f" and {len(empty) - 20} more" if len(empty) > 20 else ""
            out.append(
                f"warning: the {split} split has no image of {len(empty)} of {summary['num_classes']} classes: "
                f"{named}. Accuracy on {split} leaves them out, so their Many/Medium/Few group is averaged over "
                "fewer classes; add images of these classes to the split if you can."
            )
    return out


def cmd_data(args: argparse.Namespace) -> int:
    from dscl.data import build_datasets, find_bad_files, summarize_dataset

    cfg = load_cfg(args)  # --dataset / --train-list / ... are shared configuration flags (cli/common.py)
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    summary = summarize_dataset(splits, cfg.eval.many_threshold, cfg.eval.few_threshold)
    problems = []
    if args.check:
        for name in ("train", "val", "test"):
            ds = getattr(splits, name)
            if ds is not None:
                problems += find_bad_files(ds, split=name, full_decode=True, progress=not args.no_progress)
        summary["unreadable"] = [{"split": p.split, "path": p.path, "where": p.where, "error": p.error}
                                 for p in problems]
    warnings = _empty_class_warnings(summary)
    if args.json:
        print(json.dumps(summary))
    else:
        tables = {"classes", "class_names", "train_counts", "val_counts", "test_counts", "empty_classes",
                  "unreadable"}
        for key, value in summary.items():
            if key not in tables:
                print(f"{key:>17}: {value}")
        print(f"\n{_class_table(summary)}")
        if args.check:
            checked = "every file decoded" if not splits.train.in_memory else "in memory: nothing to decode"
            print(f"\n{'unreadable':>17}: {len(problems)} ({checked})")
            for p in problems:
                print(f"  {p}")
    for line in warnings:
        print(line, file=sys.stderr)
    return EXIT_ERROR if problems else EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register data."""
    p = sub.add_parser("data", help="summarise and check a dataset (counts, shot groups, unreadable files)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true",
                   help="decode every image of train/val/test exactly as training does and list each missing or "
                        "unreadable file (with its list file and line); exit code 2 if any")
    config_args(p)
    runtime_args(p)
    p.set_defaults(handler=cmd_data)
