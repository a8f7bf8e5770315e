"""Is this version of dscl slower than another? Stage-1 throughput of two code versions, side by side.

Checks out ``--base`` (a git revision) into a temporary worktree and runs the same ``dscl pretrain``
command with each version's ``src`` on the import path, alternating base / current ``--times`` times
in fresh processes (so drift of a shared machine hits both alike). Reports the median stage-1 images/s
of each version (from the ``pretrain`` lines of ``metrics.jsonl``, the first epoch's warm-up left out)
and wall seconds, and their ratio. Threads are fixed (``DSCL_NUM_THREADS``) so the two see the same
CPU budget.

    python benchmarks/version_speed.py --base c2708aa --times 3 -- --preset fmnist-lt optim.epochs=2
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

ROOT = Path(__file__).resolve().parent.parent


def _one(src: Path, args: list[str], out: Path, threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "DSCL_NUM_THREADS": str(threads), "DSCL_ADAPT_THREADS": "0",
           "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dscl", "pretrain", "--out", str(out), "--no-progress", "--device", "cpu",
                    *args], check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("stage") == "pretrain" and r.get("epoch", 1) > 1] or \
        [r for r in records if r.get("stage") == "pretrain"]
    return {"img_per_s": statistics.median(r["img_per_s"] for r in steps), "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare against (e.g. the last release)")
    p.add_argument("--times", type=int, default=3, help="runs of each version, alternating")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "version_speed.json"))
    p.add_argument("dscl_args", nargs=argparse.REMAINDER, help="after --: the `dscl pretrain` arguments")
    a = p.parse_args(argv)
    args = [x for x in a.dscl_args if x != "--"]
    from dscl.runtime import cpu_model

    runs: dict[str, list[dict[str, float]]] = {"base": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), a.base], check=True,
                       capture_output=True)
        try:
            for i in range(a.times):
                for name, src in (("base", base / "src"), ("current", ROOT / "src")):
                    r = _one(src, args, Path(tmp) / f"{name}{i}", a.threads)
                    runs[name].append(r)
                    print(f"{name:8s} run {i + 1}: {r['img_per_s']:.1f} img/s, {r['wall_s']:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("img_per_s", "wall_s")} for n, rs in runs.items()}
    ratio = med["current"]["img_per_s"] / med["base"]["img_per_s"]
    print(f"median img/s: base {med['base']['img_per_s']:.1f}, current {med['current']['img_per_s']:.1f} "
          f"(current / base {ratio:.3f}); median wall s: base {med['base']['wall_s']:.1f}, "
          f"current {med['current']['wall_s']:.1f}")
    return write_results(a.out, "version_speed", argv, base=a.base, dscl_args=args, threads=a.threads, runs=runs,
                         median=med, ratio_img_per_s=round(ratio, 3), machine={"cpu": cpu_model()})


if __name__ == "__main__":
    main()
