"""Stage 2 protocols side by side on one finished stage-1 run: accuracy and wall time.

``cached`` extracts the frozen backbone's features once (plus ``classifier.augmented_copies``
augmented copies) and trains the linear classifier on them; ``official`` re-runs the backbone on
strongly augmented images every epoch with BatchNorm statistics updated (METHOD.md B). Both use
class-balanced sampling, the same epochs, lr and milestones of the run's config.

    python benchmarks/stage2_protocols.py --run runs/fmnist-lt-... [--repeats 1]

Each protocol runs on a copy of the run directory (the original is not modified). Writes
``benchmarks/results/stage2_protocols.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dscl.classify import classify
from dscl.evaluation import evaluate
from dscl.run import load_run_config

RESULTS = Path(__file__).parent / "results" / "stage2_protocols.json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory with a finished stage 1")
    ap.add_argument("--repeats", type=int, default=1, help="timings per protocol (median reported)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    run = Path(args.run)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in ("cached", "official"):
            times, report = [], None
            for r in range(args.repeats):
                copy = Path(tmp) / f"{protocol}-{r}"
                shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report*", "plots", "val", "classifier.pt"))
                cfg = load_run_config(copy)
                cfg.classifier.protocol = protocol
                t0 = time.perf_counter()
                classify(copy, cfg=cfg, progress=False)
                times.append(time.perf_counter() - t0)
                report = evaluate(copy, cfg=cfg, progress=False)
            assert report is not None
            rows[protocol] = {
                "stage2_seconds_median": round(statistics.median(times), 1),
                "stage2_seconds": [round(t, 1) for t in times],
                **{k: report[k] for k in ("top1", "many", "medium", "few")},
                "selection": report["selection"],
            }
            print(f"{protocol:<9} {rows[protocol]['stage2_seconds_median']:>7.1f} s   top-1 {report['top1']:.1f}  "
                  f"many {report['many']}  medium {report['medium']}  few {report['few']}")
    cfg = load_run_config(run)
    result = {
        "benchmark": "stage2_protocols",
        "command": "python benchmarks/stage2_protocols.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "run": str(run), "preset": cfg.preset,
        "classifier": {"epochs": cfg.classifier.epochs, "lr": cfg.classifier.lr,
                       "batch_size": cfg.classifier.batch_size, "augmented_copies": cfg.classifier.augmented_copies},
        "protocols": rows,
        "speedup_cached_vs_official": round(rows["official"]["stage2_seconds_median"]
                                            / rows["cached"]["stage2_seconds_median"], 2),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__, "device": "cpu"},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"cached is {result['speedup_cached_vs_official']}x faster than official; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
