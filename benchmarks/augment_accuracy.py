"""Does RandAugment on the contrastive views help on the default long tail? (issue #32)

For each RandAugment strength (``none`` and each ``--strengths`` entry ``N,M``: ``views.randaugment=[N, M]``
on the query view and the patches, the default ``views.policy_on``; stage 2 unchanged) and each method
(``--methods``, default ce and dscl+pbsd), ``dscl compare --preset fmnist-lt`` trains ``--seeds`` seeds.
Stage 2 picks its epoch on the held-out validation split; the validation top-1 of that epoch is the
number to choose a strength by, and the test top-1 (read once per run) is reported beside it. Prints
mean +- std over seeds and writes benchmarks/results/augment_accuracy.json.

Methods run as ``--jobs`` processes side by side, one thread each (``DSCL_NUM_THREADS=1``, fixed:
``DSCL_ADAPT_THREADS=0``), so the numbers do not depend on the machine's load. Finished runs are reused
(rerunning continues); ``--none-from DIR`` reuses a finished ``dscl compare --preset fmnist-lt`` folder
(same preset, no overrides) for the ``none`` rows.

    python benchmarks/augment_accuracy.py --none-from runs/compare-fmnist-lt      # about 80 min on 2 cores
    python benchmarks/augment_accuracy.py --strengths 2,9 --seeds 0 --epochs 2    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import write_results

HERE = Path(__file__).resolve().parent


def _compare(out: Path, methods: list[str], seeds: str, overrides: list[str], jobs: int) -> None:
    """``dscl compare`` of ``methods`` into ``out``: one process per method, ``jobs`` at a time, then once
    more with every method to write compare.json (all runs reused)."""
    env = {**os.environ, "DSCL_NUM_THREADS": "1", "DSCL_ADAPT_THREADS": "0"}

    def command(ms: list[str]) -> list[str]:
        return [sys.executable, "-m", "dscl", "compare", "--preset", "fmnist-lt", "--methods", ",".join(ms),
                "--seeds", seeds, "--out", str(out), "--no-progress", *overrides]

    pending = [[m] for m in methods]
    running: list[subprocess.Popen[bytes]] = []
    out.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < jobs:
            ms = pending.pop(0)
            log = open(out / f"log-{ms[0]}.txt", "ab")  # noqa: SIM115 (closed with the process)
            running.append(subprocess.Popen(command(ms), env=env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode != 0:
                raise SystemExit(f"dscl compare failed (exit {proc.returncode}); see the logs in {out}")
    subprocess.run(command(methods), env=env, check=True, stdout=subprocess.DEVNULL)


def _run_numbers(run: Path) -> dict[str, float]:
    report = json.loads((run / "report.json").read_text())
    # stage 2 keeps the epoch with the best class-balanced validation top-1; that value is the run's
    # validation number
    val = max(rec["val_balanced_top1"] for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if rec.get("stage") == "classify" and rec.get("val_balanced_top1") is not None)
    return {"val_top1": val, **{k: report[k] for k in ("top1", "many", "medium", "few")},
            "ece": report["calibration"]["ece"], "wall_seconds": report["wall_seconds"]}


def _mean_std(values: list[float]) -> list[float]:
    return [round(statistics.fmean(values), 2), round(statistics.stdev(values), 2) if len(values) > 1 else 0.0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strengths", default="2,5;2,9", help="RandAugment [N, M] pairs, ';'-separated (default 2,5;2,9)")
    ap.add_argument("--methods", default="ce,dscl+pbsd")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="stage-1 epochs (default: the preset's 60)")
    ap.add_argument("--work", default="runs/augment-accuracy", help="folder of the runs (reused when rerun)")
    ap.add_argument("--none-from", default=None, metavar="DIR",
                    help="a finished `dscl compare --preset fmnist-lt` folder to reuse for the none rows")
    ap.add_argument("--jobs", type=int, default=2, help="processes side by side (one thread each)")
    ap.add_argument("--out", default=str(HERE / "results" / "augment_accuracy.json"))
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    seeds = args.seeds
    extra = [f"optim.epochs={args.epochs}"] if args.epochs else []
    # none last: its rows may come from a --none-from comparison still finishing when this starts
    strengths = [s.strip() for s in args.strengths.split(";") if s.strip()] + ["none"]
    work = Path(args.work)
    rows = []
    start = time.time()
    for strength in strengths:
        overrides = list(extra)
        if strength == "none" and args.none_from and not extra:
            folder = Path(args.none_from)
        else:
            folder = work / strength.replace(",", "-")
            if strength != "none":
                n, m = (int(v) for v in strength.split(","))
                overrides.append(f"views.randaugment=[{n}, {m}]")
        print(f"== RandAugment {strength}: {folder}", flush=True)
        _compare(folder, methods, seeds, overrides, args.jobs)
        for method in methods:
            runs = [_run_numbers(folder / "runs" / f"{method}-seed{s}") for s in seeds.split(",")]
            row = {"randaugment": strength, "method": method, "folder": str(folder),
                   **{k: _mean_std([r[k] for r in runs]) for k in ("val_top1", "top1", "many", "medium", "few", "ece")},
                   "runs": runs}
            rows.append(row)
            print(f"{strength:6s} {method:10s} val {row['val_top1'][0]:5.1f} ± {row['val_top1'][1]:.1f}  test "
                  f"{row['top1'][0]:5.1f} ± {row['top1'][1]:.1f}  many {row['many'][0]:5.1f} medium "
                  f"{row['medium'][0]:5.1f} few {row['few'][0]:5.1f}  ECE {row['ece'][0]:.2f}", flush=True)
    write_results(args.out, "augment_accuracy", argv, seeds=[int(s) for s in seeds.split(",")], rows=rows,
                  wall_seconds=round(time.time() - start, 1),
                  note="views.randaugment on the query and the patches (views.policy_on default); stage 2 "
                       "unchanged; mean and sample std over seeds; val = the selected stage-2 epoch's "
                       "class-balanced validation top-1")


if __name__ == "__main__":
    main()
