"""Stage-2 recipe variants on the same finished stage-1 runs, chosen on the validation split.

Stage 2 is cheap next to stage 1, so its choices (feature standardisation, augmented copies, lr,
epochs, BatchNorm re-estimation, epoch selection) are compared on the *same* frozen backbones: every
variant gets a copy of each run's stage-1 checkpoint (a hard link), its config overrides, its own
stage 2, and an evaluation on the validation split (used for choosing) and on the test set (reported
beside, never used for choosing).

    python benchmarks/stage2_recipe.py --runs RUN_SEED0 RUN_SEED1 --out-dir runs/stage2-recipe \\
        --variant base: --variant std:classifier.standardize=true \\
        --variant std-noaug:classifier.standardize=true,classifier.augmented_copies=0

``NAME:key=value,key=value`` (an empty list is the runs' own config). Rerunning the same command reuses
finished variants. Writes ``benchmarks/results/stage2_recipe.json`` (``--results``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _results import write_results
from dscl.classify import classify
from dscl.config import apply_mapping, dump_config, parse_overrides, validate
from dscl.evaluation import evaluate
from dscl.run import load_run_config
from dscl.sweep import split_values

RESULTS = Path(__file__).parent / "results" / "stage2_recipe.json"
METRICS = {"val_balanced": ("val", "top1_macro"), "val_many": ("val", "many"), "val_medium": ("val", "medium"),
           "val_few": ("val", "few"), "test_all": ("test", "top1"), "test_many": ("test", "many"),
           "test_medium": ("test", "medium"), "test_few": ("test", "few")}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, colon, rest = text.partition(":")
    if not colon or not name.strip():
        raise SystemExit(f"--variant {text!r} must look like NAME:key=value,key=value (or NAME: for the base)")
    return name.strip(), [v for v in split_values(rest) if v] if rest.strip() else []


def run_variant(src: Path, dst: Path, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Stage 2 + evaluation (val and test) of ``src``'s stage 1 under ``overrides``, in ``dst``."""
    if (dst / "report.json").is_file() and (dst / "val" / "report.json").is_file():
        return {"test": json.loads((dst / "report.json").read_text()),
                "val": json.loads((dst / "val" / "report.json").read_text())}
    cfg = load_run_config(src)
    if overrides:
        apply_mapping(cfg, parse_overrides(overrides), "variant")
        validate(cfg)
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    target = dst / "checkpoints" / "last.pt"
    if not target.exists():
        try:
            os.link(src / "checkpoints" / "last.pt", target)
        except OSError:
            shutil.copy2(src / "checkpoints" / "last.pt", target)
    dump_config(cfg, dst / "config.yaml")
    classify(dst, cfg=cfg, progress=False)
    val = evaluate(dst, split="val", cfg=cfg, progress=False)
    test = evaluate(dst, cfg=cfg, progress=False)
    return {"val": val, "test": test}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="finished stage-1 runs (one per seed)")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:key=value,...")
    ap.add_argument("--out-dir", required=True, help="where the variants' run copies live")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, overrides in variants:
        reports = [run_variant(Path(r), Path(args.out_dir) / name / Path(r).name, overrides) for r in args.runs]
        row: dict[str, Any] = {"overrides": overrides, "selection": reports[0]["test"]["selection"]}
        for metric, (split, key) in METRICS.items():
            values = [rep[split][key] for rep in reports]
            present = [v for v in values if v is not None]
            row[metric] = {"mean": round(statistics.fmean(present), 2) if present else None,
                           "std": round(statistics.stdev(present), 2) if len(present) > 1 else 0.0,
                           "runs": values}
        rows[name] = row
        print(f"{name:<24} val balanced {row['val_balanced']['mean']:6.2f} ± {row['val_balanced']['std']:.2f}   "
              f"(test All {row['test_all']['mean']:6.2f} ± {row['test_all']['std']:.2f}, not used)", flush=True)
    chosen = max(rows, key=lambda n: rows[n]["val_balanced"]["mean"])
    print(f"chosen on validation: {chosen}")
    result = write_results(args.results, "stage2_recipe", argv if argv is not None else sys.argv[1:],
                           runs=args.runs, variants=rows, chosen_on_val=chosen,
                           wall_seconds=round(time.perf_counter() - t0, 1),
                           preset=load_run_config(Path(args.runs[0])).preset)
    return result


if __name__ == "__main__":
    main()
