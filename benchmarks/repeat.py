"""Run a speed benchmark several times in fresh processes and report the median of its headline ratios.

One run of a timing benchmark on a shared machine can be off by 20% or more; the README quotes the
median over runs. Each run writes its own results file; this script collects the headline numbers
of every run and their medians into ``results/<benchmark>_repeats.json``.

    python benchmarks/repeat.py --times 3 loss_speed -- --repeats 7
    python benchmarks/repeat.py --times 3 step_speed -- --steps 10
    python benchmarks/repeat.py --times 3 ddp_speed -- --epochs 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from _results import write_results

HERE = Path(__file__).parent


def _loss(r: dict) -> dict[str, float]:
    out = {}
    for row in r["results"]:
        s = row["size"]
        out[f"speedup B={s['B']} K={s['K']}"] = round(row["straightforward"]["median_ms"] / row["ours"]["median_ms"], 3)
    return out


def _step(r: dict) -> dict[str, float]:
    return {"dscl img/s": r["img_per_s"],
            **({"joint img/s": r["joint_img_per_s"], "per-slot cost": r["per_slot_cost"]}
               if "per_slot_cost" in r else {}),
            **({"speedup": r["speedup"], "straightforward img/s": r["straightforward_img_per_s"]}
               if "speedup" in r else {}),
            **({"ceiling": r["speedup_ceiling"]} if "speedup_ceiling" in r else {})}


def _ddp(r: dict) -> dict[str, float]:
    return {f"{row['procs']} proc img/s": row["img_per_s_median"] for row in r["results"]} | {
        "2 vs 1": r["results"][-1]["relative_to_first"]}


HEADLINES: dict[str, Callable[[dict], dict[str, float]]] = {"loss_speed": _loss, "step_speed": _step, "ddp_speed": _ddp}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("benchmark", choices=sorted(HEADLINES))
    ap.add_argument("--times", type=int, default=3)
    ap.add_argument("--out", default=None, help="results file (default results/<benchmark>_repeats.json)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="after --: arguments for the benchmark")
    args = ap.parse_args(argv)
    extra = [a for a in args.args if a != "--"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.times):
            out = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, str(HERE / f"{args.benchmark}.py"), *extra, "--out", str(out)]
            print(f"run {i + 1}/{args.times}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            result = json.loads(out.read_text())
            runs.append({"headline": HEADLINES[args.benchmark](result), "result": result})
            print("   ", runs[-1]["headline"], flush=True)
    keys = runs[0]["headline"].keys()
    medians = {k: statistics.median(r["headline"][k] for r in runs) for k in keys}
    print("median over runs:", medians)
    target = Path(args.out) if args.out else HERE / "results" / f"{args.benchmark}_repeats.json"
    return write_results(target, "repeat", argv,
                         repeated=f"benchmarks/{args.benchmark}.py " + " ".join(extra), times=args.times,
                         median=medians, per_run=[r["headline"] for r in runs], runs=[r["result"] for r in runs])


if __name__ == "__main__":
    main()
