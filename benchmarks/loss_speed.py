"""Speed and memory of ``dscl_loss + 1.5 * pbsd_loss`` (forward + backward) on the CPU.

Compares ``dscl.losses`` ("ours") with a straightforward implementation written from METHOD.md's
description of the official code ("straightforward": ``dscl.losses.dscl_loss_dense`` and
``pbsd_loss_dense``, the plain references the tests check against loops): ``features = cat(q, k,
queue)`` (so autograd also computes the gradient w.r.t. the whole feature matrix), a dense float
label mask of B x (2B+K), masked logits, log-softmax and a dense weights matrix for DSCL; a Python
loop over the L patches with separate matmuls, softmax / log_softmax per patch for PBSD. Both compute
the same number (checked: the script prints the relative difference of the two loss values).

The baseline's PBSD loops over the L patches like the official code, so the memory comparison is
against what users of that code run today. What is measured, per size:

* time (one subprocess for both variants): ``--repeats`` rounds after 2 warm-up steps each; every
  round times one forward+backward of each variant back to back, in alternating order, so that
  load from other jobs hits both alike. Reported: each variant's median and all samples in
  milliseconds (wall clock), the ratio of the medians (``speedup``, the headline) and the median
  of the per-round ratios (``speedup_paired_median``).
* memory (a fresh subprocess per variant, so one variant's allocator state cannot help or hurt the
  other), extra peak: after a warm-up step and ``malloc_trim``, the kernel's peak-RSS counter is
  reset (``echo 5 > /proc/self/clear_refs``), then one forward+backward runs; the figure is
  ``VmHWM`` after the step minus ``VmRSS`` before it, i.e. the most resident memory the step added
  on top of the inputs (everything the allocator really touched: logits, masks, autograd buffers,
  gradients). Needs Linux; ``null`` elsewhere.
* saved MiB: total size of the tensors autograd keeps for backward (via
  ``torch.autograd.graph.saved_tensors_hooks``), not counting storage shared with the inputs.

The machine may be shared with other jobs: timings are noisy; the JSON keeps every sample. Torch
runs with the OpenMP settings ``dscl`` uses (passive waits, :mod:`dscl.threads`); beside other jobs
the default busy-waiting slows both variants several-fold and distorts the ratio.

Usage:
    python benchmarks/loss_speed.py [--repeats 7] [--quick] [--out benchmarks/results/loss_speed.json]
"""

from __future__ import annotations

# ruff: noqa: E402  (the OpenMP settings below must be in place before torch is imported)
from dscl.threads import set_openmp_defaults

set_openmp_defaults()  # as `dscl` runs: capped OpenMP spinning (DSCL_OPENMP_DEFAULTS=0: OpenMP's own)

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dscl.runtime import cpu_model

PBSD_WEIGHT = 1.5  # METHOD.md A.8
ALPHA = 1 / 9  # beta = 8, the official main.py default
TAU = 0.07
N_CLASSES = 1000

FULL_SIZES = [
    {"B": 128, "D": 128, "K": 16384, "L": 5},
    {"B": 256, "D": 128, "K": 65536, "L": 5},
]
QUICK_SIZES = [{"B": 16, "D": 32, "K": 256, "L": 2}]


# --------------------------------------------------------------------------------------------------
# The straightforward implementation: dscl.losses' dense references (METHOD.md A.6 "Official
# implementation" and A.7, written equation for equation)
# --------------------------------------------------------------------------------------------------


def step_straightforward(inp):
    from dscl.losses import dscl_loss_dense, pbsd_loss_dense

    beta = (1 - ALPHA) / ALPHA
    loss = dscl_loss_dense(inp["q"], inp["k"], inp["y"], inp["queue"], inp["queue_y"], beta=beta, temperature=TAU)
    return loss + PBSD_WEIGHT * pbsd_loss_dense(inp["c"], inp["s"], inp["k"], inp["queue"], temperature=TAU)


def step_ours(inp):
    from dscl.losses import dscl_loss, pbsd_loss

    loss = dscl_loss(inp["q"], inp["k"], inp["y"], inp["queue"], inp["queue_y"], alpha=ALPHA, temperature=TAU)
    return loss + PBSD_WEIGHT * pbsd_loss(inp["c"], inp["s"], inp["k"], inp["queue"], temperature=TAU)


STEPS = {"ours": step_ours, "straightforward": step_straightforward}


# --------------------------------------------------------------------------------------------------
# Worker (one variant, one size, fresh process)
# --------------------------------------------------------------------------------------------------


def make_inputs(size, seed=0):
    """Unit features; long-tailed labels (p(c) ~ 1/(c+1)) so head-class anchors have many positives."""
    b, d, k, n_patches = size["B"], size["D"], size["K"], size["L"]
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape):
        x = torch.randn(*shape, generator=gen)
        return x.div_(x.norm(dim=-1, keepdim=True))

    class_p = 1.0 / torch.arange(1, N_CLASSES + 1, dtype=torch.float64)
    return {
        "q": unit(b, d).requires_grad_(),
        "k": unit(b, d),
        "y": torch.multinomial(class_p, b, replacement=True, generator=gen),
        "queue": unit(k, d),
        "queue_y": torch.multinomial(class_p, k, replacement=True, generator=gen),
        # the ROI teacher is built with gradients in the official code (METHOD.md C.2 item 8)
        "c": unit(n_patches, b, d).requires_grad_(),
        "s": unit(n_patches, b, d).requires_grad_(),
    }


def _proc_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _trim():
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: the peak figure is then a little pessimistic
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _run_step(step, inp):
    loss = step(inp)
    loss.backward()
    for name in ("q", "c", "s"):
        inp[name].grad = None
    return float(loss.detach())


def worker(variant, size, repeats):
    step = STEPS[variant]
    inp = make_inputs(size)
    value = _run_step(step, inp)  # warm-up (and first-call imports)

    # saved-for-backward bytes, excluding storage shared with the inputs
    input_ptrs = {t.untyped_storage().data_ptr() for t in inp.values()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(inp)
    del loss
    for name in ("q", "c", "s"):
        inp[name].grad = None

    peak_mib = None
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        rss_before = _proc_kib("VmRSS")
        _run_step(step, inp)
        peak_mib = (_proc_kib("VmHWM") - rss_before) / 1024
    except OSError:
        _run_step(step, inp)

    return {
        "variant": variant,
        "size": size,
        "loss": value,
        "extra_peak_mib": peak_mib,
        "saved_mib": sum(saved.values()) / 2**20,
        "threads": torch.get_num_threads(),
    }


def timing_worker(size, repeats):
    """Both variants in one process on the same inputs, alternating step by step (the order flips
    every round), so that load from other jobs on a shared machine hits both alike."""
    inp = make_inputs(size)
    for variant in STEPS:  # two warm-up steps each
        _run_step(STEPS[variant], inp)
        _run_step(STEPS[variant], inp)
    times = {variant: [] for variant in STEPS}
    for i in range(repeats):
        for variant in (list(STEPS) if i % 2 == 0 else list(STEPS)[::-1]):
            t0 = time.perf_counter()
            _run_step(STEPS[variant], inp)
            times[variant].append((time.perf_counter() - t0) * 1e3)
    return {"times_ms": times, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _mem_available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _estimated_straightforward_bytes(size):
    b, k, n = size["B"], size["K"], size["L"]
    return 4 * (14 * b * (2 * b + k) + 8 * n * b * (k + 1))


def memory_budget_mib(size):
    """Issue #15's ceiling for our extra peak memory: one (L*B) x (K+1) float32 buffer plus the
    B x (2B+K) float32 logits (55 MB at B=128, K=16384, L=5)."""
    b, k, n = size["B"], size["K"], size["L"]
    return 4 * (n * b * (k + 1) + b * (2 * b + k)) / 2**20


def run_worker(worker_name, size, repeats, threads):
    """``worker_name`` = a variant (its memory, fresh process) or ``timing`` (both variants' times)."""
    cmd = [sys.executable, __file__, "--_worker", worker_name, "--_size", json.dumps(size), "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke check only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loss_speed.json")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker == "timing":
        print(json.dumps(timing_worker(json.loads(args._size), args.repeats)))
        return 0
    if args._worker:
        print(json.dumps(worker(args._worker, json.loads(args._size), args.repeats)))
        return 0

    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    rows, skipped = [], []
    for size in sizes:
        need, avail = _estimated_straightforward_bytes(size), _mem_available_bytes()
        if avail is not None and need * 2 > avail:
            skipped.append({"size": size, "reason": f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} available"})
            continue
        res = {v: run_worker(v, size, args.repeats, args.threads) for v in ("straightforward", "ours")}
        timing = run_worker("timing", size, args.repeats, args.threads)
        for v, r in res.items():
            r["times_ms"] = timing["times_ms"][v]
            r["median_ms"] = statistics.median(r["times_ms"])
        ours, ref = res["ours"], res["straightforward"]
        rows.append(
            {
                "size": size,
                "straightforward": ref,
                "ours": ours,
                "speedup": ref["median_ms"] / ours["median_ms"],
                # each round timed both back to back: the median of the per-round ratios
                "speedup_paired_median": statistics.median(
                    s / o for s, o in zip(ref["times_ms"], ours["times_ms"], strict=True)),
                "memory_budget_mib": memory_budget_mib(size),
                "loss_rel_diff": abs(ours["loss"] - ref["loss"]) / abs(ref["loss"]),
            }
        )

    header = (
        f"{'B':>4} {'D':>4} {'K':>6} {'L':>2} | {'variant':<16} {'median ms':>10} {'extra peak MiB':>15} "
        f"{'saved MiB':>10} | {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["size"]
        for v in ("straightforward", "ours"):
            r = row[v]
            peak = f"{r['extra_peak_mib']:.1f}" if r["extra_peak_mib"] is not None else "n/a"
            speed = f"{row['speedup']:.2f}x" if v == "ours" else ""
            print(
                f"{s['B']:>4} {s['D']:>4} {s['K']:>6} {s['L']:>2} | {v:<16} {r['median_ms']:>10.1f} "
                f"{peak:>15} {r['saved_mib']:>10.1f} | {speed:>7}"
            )
        print(f"     loss values agree to rel {row['loss_rel_diff']:.1e}; extra-peak budget (one (L*B) x (K+1) "
              f"buffer + the B x (2B+K) logits) {row['memory_budget_mib']:.1f} MiB")
    for s in skipped:
        print(f"skipped {s['size']}: {s['reason']}")

    result = {
        "benchmark": "dscl_loss + 1.5 * pbsd_loss, forward + backward, CPU",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "memory_method": "VmHWM after one step minus VmRSS before it (peak reset via /proc/self/clear_refs)",
        "results": rows,
        "skipped": skipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
