"""Stage-1 images/s of ``dscl pretrain`` on a quiet machine vs beside a competing job (thread thrashing).

Conditions, each in fresh processes:

* ``quiet``:  one ``dscl pretrain`` alone;
* ``matmul``: beside a plain 2-thread torch matmul loop (a typical multi-threaded neighbour, with
  OpenMP's own defaults: its idle threads spin);
* ``dscl``:   beside a second, identical ``dscl pretrain`` started at the same moment (both are
  measured; their mean is the figure).

Variants: ``new`` is dscl's defaults (OpenMP spinning capped, intra-op threads = cores - DataLoader
workers, fewer threads while other processes use the cores: ``dscl.threads.ThreadAdapter``); ``fixed``
is ``new`` with the thread count held (``DSCL_ADAPT_THREADS=0``); ``old`` reproduces the behaviour
before issue #15 (``DSCL_OPENMP_DEFAULTS=0`` and torch's default thread count); ``threadsN`` fixes N
threads (``DSCL_NUM_THREADS=N``). A run's figure is the median of the images/s it logs after its first epoch
(``metrics.jsonl``; the first epoch holds process start-up and worker spawn). Conditions and
variants run round-robin, ``--repeats`` rounds with the order rotated each round, and the median over
rounds is reported with every sample. The headline is the fraction of the quiet figure kept beside
one competitor: the goal is >= 0.40 (0.50 is the fair share of a shared machine).

Needs a machine with nothing else running (check ``uptime``); the final measurement (~15 minutes on
2 cores):

    python benchmarks/contention.py --preset fmnist-lt --epochs 3 --repeats 3 --variants new,fixed

Writes ``benchmarks/results/contention.json`` with the CPU model and the load average before/after.
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

RESULTS = Path(__file__).parent / "results" / "contention.json"
#: Thread and OpenMP settings a caller's shell may carry; every child starts without them.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT",
               "DSCL_NUM_THREADS", "DSCL_OPENMP_DEFAULTS", "DSCL_ADAPT_THREADS")
MATMUL = "import torch\ntorch.set_num_threads({threads})\na = torch.randn({n}, {n})\nwhile True:\n    a @ a\n"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def torch_default_threads() -> int:
    res = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, env=clean_env(), check=True)
    return int(res.stdout.strip())


def variant_env(variant: str, default_threads: int) -> dict[str, str]:
    env = clean_env()
    if variant == "old":
        env.update(DSCL_OPENMP_DEFAULTS="0", DSCL_NUM_THREADS=str(default_threads))
    elif variant == "fixed":
        env["DSCL_ADAPT_THREADS"] = "0"
    elif variant.startswith("threads"):  # a fixed intra-op thread count, e.g. threads1
        env["DSCL_NUM_THREADS"] = variant.removeprefix("threads")
    elif variant != "new":
        raise ValueError(f"unknown variant {variant!r}; use new, fixed, old or threadsN")
    return env


def start_dscl(out: Path, env: dict[str, str], args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dscl", "pretrain", "--preset", args.preset, "--out", str(out), "--no-progress",
           f"optim.epochs={args.epochs}", f"optim.log_every={args.log_every}", *args.override]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, out: Path) -> tuple[float, list[int]]:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"dscl pretrain --out {out} failed ({proc.returncode}):\n{err[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r.get("stage") == "pretrain" and r["epoch"] > 1]
    if not measured:
        raise RuntimeError(f"{out}: no images/s logged after the first epoch; use --epochs 2 or more")
    threads = sorted({r["threads"] for r in measured if "threads" in r})  # compute threads seen
    return statistics.median(r["img_per_s"] for r in measured), threads


def measure(variant: str, condition: str, workdir: Path, tag: str, args: argparse.Namespace,
            default_threads: int) -> dict:
    """One run of ``condition``: returns the measured images/s (both runs' for ``dscl``)."""
    env = variant_env(variant, default_threads)
    competitor = None
    if condition == "matmul":
        code = MATMUL.format(threads=args.matmul_threads, n=args.matmul_size)
        competitor = subprocess.Popen([sys.executable, "-c", code], env=clean_env(),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elif condition not in ("quiet", "dscl"):
        raise ValueError(f"unknown condition {condition!r}; use quiet, matmul or dscl")
    t = time.perf_counter()
    try:
        runs = [workdir / f"{tag}-a"] + ([workdir / f"{tag}-b"] if condition == "dscl" else [])
        procs = [start_dscl(out, env, args) for out in runs]
        done = [finish(p, out) for p, out in zip(procs, runs, strict=True)]
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    values = [v for v, _ in done]
    return {"img_per_s": statistics.mean(values), "runs": values, "threads": [th for _, th in done],
            "wall_seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="fmnist-lt")
    ap.add_argument("--epochs", type=int, default=3, help="stage-1 epochs per run (the first is not measured)")
    ap.add_argument("--log-every", type=int, default=5, help="steps per logged images/s interval")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all variants x conditions (median)")
    ap.add_argument("--variants", default="new,fixed", help="new (dscl's defaults), fixed (new without thread "
                    "adaptation), old (before issue #15: slow, ~4.5 min per run beside matmul), threadsN")
    ap.add_argument("--conditions", default="quiet,matmul,dscl")
    ap.add_argument("--matmul-threads", type=int, default=2)
    ap.add_argument("--matmul-size", type=int, default=1024)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for the dscl runs (repeatable), e.g. data.n_max=300")
    ap.add_argument("--out", default=str(RESULTS), help="results file ('' to skip writing)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    conditions = [c for c in args.conditions.split(",") if c]
    if "quiet" not in conditions:
        ap.error("--conditions must include quiet (the figure the others are compared with)")
    default_threads = torch_default_threads()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before starting: the machine is not quiet, "
              f"the figures will be low and noisy", file=sys.stderr)
    cells = [(v, c) for v in variants for c in conditions]
    samples: dict[tuple[str, str], list[dict]] = {cell: [] for cell in cells}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = cells[r % len(cells):] + cells[: r % len(cells)]  # rotate: drift hits every cell alike
            for v, c in order:
                result = measure(v, c, Path(tmp), f"r{r}-{v}-{c}", args, default_threads)
                samples[(v, c)].append(result)
                print(f"round {r + 1}/{args.repeats}  {v:<4} {c:<7} {result['img_per_s']:7.1f} img/s  "
                      f"(runs {[round(x, 1) for x in result['runs']]}, threads {result['threads']}, "
                      f"{result['wall_seconds']} s)", flush=True)
    rows = []
    for v in variants:
        quiet = statistics.median(s["img_per_s"] for s in samples[(v, "quiet")])
        for c in conditions:
            med = statistics.median(s["img_per_s"] for s in samples[(v, c)])
            rows.append({"variant": v, "condition": c, "img_per_s_median": round(med, 1),
                         "fraction_of_quiet": round(med / quiet, 3) if quiet else None,
                         "samples": samples[(v, c)]})
    print(f"\n{'variant':<8} {'condition':<10} {'img/s':>8} {'of quiet':>9}")
    for row in rows:
        print(f"{row['variant']:<8} {row['condition']:<10} {row['img_per_s_median']:>8} {row['fraction_of_quiet']:>9}")
    load_after = os.getloadavg()
    if not args.out:
        return {"results": rows}
    from dscl.runtime import cpu_model  # imports torch: only once the measurements are done

    return write_results(
        args.out, "contention", argv, results=rows,
        settings={"preset": args.preset, "epochs": args.epochs, "log_every": args.log_every, "repeats": args.repeats,
                  "overrides": args.override, "matmul_threads": args.matmul_threads, "matmul_size": args.matmul_size,
                  "old_variant": f"DSCL_OPENMP_DEFAULTS=0 DSCL_NUM_THREADS={default_threads}",
                  "fixed_variant": "DSCL_ADAPT_THREADS=0"},
        machine={"cpu_model": cpu_model(),
                 "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                 "torch_default_threads": default_threads, "load_average_before": list(load_before),
                 "load_average_after": list(load_after)},
    )


if __name__ == "__main__":
    main()
