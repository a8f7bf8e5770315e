"""Stage-1 images/s with 1 vs N processes on the CPU (gloo), same global batch, same code path.

Runs ``torchrun --standalone --nproc_per_node P -m dscl pretrain`` for each P on the fmnist-lt data
with the smoke preset's backbone (convnet) and reads the images/s that the run logs to
``metrics.jsonl`` (median over the logged intervals after the first epoch). Each process gets
``cpus / P`` threads, so on a 2-core machine 2 processes cannot be faster in total: the number shows
the cost of the collectives (gradient all-reduce, key/label gathering, shuffle-BN), not a speed-up.

    python benchmarks/ddp_speed.py --procs 1,2 --epochs 3

Writes ``benchmarks/results/ddp_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

RESULTS = Path(__file__).parent / "results" / "ddp_speed.json"


def run(procs: int, epochs: int, batch: int, workdir: Path) -> dict:
    out = workdir / f"p{procs}"
    threads = max(1, (os.cpu_count() or 1) // procs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "dscl", "pretrain", "--preset", "fmnist-lt", "--out", str(out), "--no-progress",
           f"optim.epochs={epochs}", f"optim.batch_size={batch}", "optim.log_every=5", "data.num_workers=0"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ips = [r["img_per_s"] for r in rows if r["stage"] == "pretrain" and r["epoch"] > 1]
    return {"procs": procs, "threads_per_proc": threads, "img_per_s_median": statistics.median(ips),
            "img_per_s": ips, "wall_seconds": round(wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in (int(x) for x in args.procs.split(",")):
            row = run(p, args.epochs, args.batch, Path(tmp))
            rows.append(row)
            print(f"{p} process(es) x {row['threads_per_proc']} thread(s): {row['img_per_s_median']:.0f} img/s "
                  f"(median of {len(row['img_per_s'])} intervals), wall {row['wall_seconds']} s")
    base = rows[0]["img_per_s_median"]
    for row in rows:
        row["relative_to_first"] = round(row["img_per_s_median"] / base, 3)
    return write_results(args.out, "ddp_speed", argv, results=rows, machine={"backend": "gloo"},
                         settings={"preset": "fmnist-lt", "backbone": "convnet", "epochs": args.epochs,
                                   "batch": args.batch})


if __name__ == "__main__":
    main()
