"""Memory and speed of the stage-1 step per fine-tuning mode (``model.finetune``): full, lora, last:2, frozen,
and lora with gradient checkpointing (``lora+ckpt``: ``model.grad_checkpointing=true``).

The step is dscl's own (``Stage1.step``: momentum update, both encoders, the patches, DSCL + PBSD losses,
backward, SGD on the trainable tensors, enqueue), built by ``setup_stage1`` from the imagenet-lt preset
with overrides: open_clip's ``ViT-B-16`` image tower (``open_clip:ViT-B-16``), random weights that this
script writes (seed 0) to a local ``.safetensors`` file in open_clip's layout (the ``visual.*`` keys of a
CLIP state dict, so nothing is downloaded) and loads as ``model.pretrained``; 224 px, 5 patches of 64 px,
batch 8, K = 4096 (a full queue: ``model.queue_init=random``). The training data are synthetic uint8 images
held in memory; their views are made by dscl's training path (the stage's loader, with no worker process,
and its batched on-device transform where ``views.augment_on=auto`` picks it, i.e. on CUDA), outside the
timed part of each step.

Each mode runs in a FRESH subprocess, so its peak memory is its own: build (``setup_stage1``), then
``--warmup`` steps, then ``--steps`` timed steps. Per run: the resident memory after the build (before any
step) and before it (imports done: python, torch, open_clip, peft take ~0.8 GiB), the process's peak
resident memory (build included), the peak during the steps alone (the kernel's peak counter, VmHWM, reset
after the build where ``/proc/self/clear_refs`` allows; without it the peak is ``ru_maxrss``), the peak
minus the memory before the build (what the model and its training take), and the median img/s over the
timed steps. On CUDA (``--device cuda``) the memory columns are ``torch.cuda`` allocated
bytes instead (after the build, ``max_memory_allocated`` over the whole run and over the steps alone).
Everything is repeated ``--repeats`` times with the order of the modes rotated each round; reported are
medians over the repeats and the ratios of each mode's peak to full's (the issue's goal: lora <= 60%,
frozen <= 45%).

    python benchmarks/finetune_cost.py                     # CPU, the settings above, 3 repeats
    python benchmarks/finetune_cost.py --tiny              # a 3-block ViT at 64 px: checks that it runs
    python benchmarks/finetune_cost.py --device cuda --amp bf16 --batch 64 --modes full,lora,frozen

Writes ``benchmarks/results/finetune_cost.json`` (with ``--tiny`` only where ``--out`` says). Needs the
``open_clip`` and ``lora`` (peft) extras.
"""

from __future__ import annotations

# ruff: noqa: E402  (the OpenMP settings below must be in place before torch is imported)
from dscl.threads import set_openmp_defaults

set_openmp_defaults()  # as `dscl` runs: capped OpenMP spinning

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import write_results

RESULTS = Path(__file__).parent / "results" / "finetune_cost.json"
BACKBONE = "open_clip:ViT-B-16"
#: --tiny: the same open_clip tower family, 3 blocks of width 128 (2 heads), at 64 px with 32 px patches
TINY_ARGS = {"width": 128, "layers": 3, "head_width": 64, "image_size": 64}
MODES = ("full", "lora", "last:2", "frozen", "lora+ckpt")
CKPT = "+ckpt"  # a mode's suffix: the same with model.grad_checkpointing=true
GOALS = {"lora": 0.60, "frozen": 0.45}  # peak memory / full's (the goals)
CLASSES = 100


# ---------------------------------------------------------------- the child: one mode, one fresh process
def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _round(x: float | None) -> float | None:
    return round(x, 1) if x is not None else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS
        return True
    except OSError:
        return False


def _split_mode(mode: str) -> tuple[str, bool]:
    """``lora+ckpt`` -> (``lora``, True): the model.finetune value and whether to checkpoint the blocks."""
    return (mode[:-len(CKPT)], True) if mode.endswith(CKPT) else (mode, False)


def _overrides(job: dict[str, Any]) -> list[str]:
    """The config a run of this mode would have (the imagenet-lt preset with the benchmark's sizes)."""
    mode, ckpt = _split_mode(job["mode"])
    out = [f"model.backbone={BACKBONE}", f"model.pretrained={job['weights']}", f"model.finetune={mode}",
           f"model.grad_checkpointing={str(ckpt).lower()}",
           f"model.queue_size={job['queue']}", "model.queue_init=random", f"optim.batch_size={job['batch']}",
           f"data.image_size={job['image_size']}", f"views.patch_size={job['patch_size']}",
           f"views.num_patches={job['patches']}", "data.num_workers=0", f"optim.amp={job['amp']}"]
    if job["tiny"]:
        out.append(f"model.backbone_args={json.dumps(TINY_ARGS)}")
    return out


def _synthetic_splits(n: int, image_size: int, seed: int) -> Any:
    """``n`` random uint8 RGB images (a little larger than the views, not square) as an in-memory split."""
    import numpy as np

    from dscl.data import DatasetSplits, LTDataset

    rng = np.random.default_rng(seed)
    h, w = image_size + image_size // 7, image_size * 4 // 3
    images = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, n).tolist()
    names = [f"class{k}" for k in range(CLASSES)]
    ds = LTDataset(labels, CLASSES, names, images=images)
    counts = np.bincount(np.asarray(labels), minlength=CLASSES).tolist()
    return DatasetSplits("synthetic", ds, None, ds, CLASSES, names, counts, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def child(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from dscl.config import load_config
    from dscl.pretrain import _batches, setup_stage1
    from dscl.runtime import amp_dtype, configure_backends

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    dev = torch.device(job["device"])
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    cfg = load_config("imagenet-lt", overrides=_overrides(job))
    dtype = amp_dtype(cfg.optim.amp, dev)
    configure_backends(dev, deterministic=False)  # as pretrain() does: cudnn.benchmark on CUDA
    splits = _synthetic_splits(2 * job["batch"], job["image_size"], seed=0)
    import open_clip  # noqa: F401  (imported by the build anyway: its import is part of the baseline, not the model)

    if _split_mode(job["mode"])[0] == "lora":
        import peft  # noqa: F401  (likewise)
    rss_before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = setup_stage1(cfg, Path(tmp), dev, dtype, progress=False, splits=splits)
    build_s = time.perf_counter() - t0
    online = run.model.online
    trained = sum(p.numel() for p in online.parameters() if p.requires_grad)
    total = sum(p.numel() for p in online.parameters())
    sync()
    rss_build = _status_mib("VmRSS")
    peak_build = _status_mib("VmHWM")  # the build's peak: read now, the reset below lowers it (and ru_maxrss)
    reset = _reset_peak_rss()
    if cuda:
        cuda_build = torch.cuda.memory_allocated(dev) / 2**20
        cuda_peak_build = torch.cuda.max_memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)

    def batches():  # the training loop's batches, epoch after epoch of the small synthetic set
        epoch = 0
        while True:
            run.sampler.set_epoch(epoch)
            yield from _batches(iter(run.loader), dev, cfg.model.channels_last, run.augment)
            epoch += 1

    run.model.train()
    source = batches()
    seconds = []
    losses = []
    for i in range(job["warmup"] + job["steps"]):
        batch = next(source)  # views made here, outside the timed step
        sync()
        t = time.perf_counter()
        parts = run.step(batch, run.base_lr)
        sync()
        if i >= job["warmup"]:
            seconds.append(time.perf_counter() - t)
        losses.append(float(parts["loss"]))
    peak_steps = _status_mib("VmHWM")
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; since the reset, if any
    row: dict[str, Any] = {
        "mode": job["mode"], "device": dev.type, "amp": job["amp"], "threads": torch.get_num_threads(),
        "trained_params": trained, "encoder_params": total, "build_s": round(build_s, 2),
        "step_s": [round(s, 4) for s in seconds], "img_per_s": round(job["batch"] / statistics.median(seconds), 3),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "rss_before_build_mib": _round(rss_before), "rss_after_build_mib": _round(rss_build),
        "peak_rss_mib": _round(max(peak_build or 0.0, peak_steps or 0.0) if reset else ru_maxrss),
        "peak_rss_build_mib": _round(peak_build), "peak_rss_steps_mib": _round(peak_steps) if reset else None,
    }
    if rss_before is not None and row["peak_rss_mib"] is not None:
        row["peak_rss_model_mib"] = round(row["peak_rss_mib"] - rss_before, 1)  # the peak above the imports
    if cuda:
        cuda_steps = torch.cuda.max_memory_allocated(dev) / 2**20
        row.update({"cuda_after_build_mib": round(cuda_build, 1),
                    "cuda_peak_mib": round(max(cuda_peak_build, cuda_steps), 1),
                    "cuda_peak_steps_mib": round(cuda_steps, 1), "gpu": torch.cuda.get_device_name(dev)})
    return row


# ---------------------------------------------------------------- the parent
def write_weights(path: Path, tiny: bool) -> int:
    """Random (seed 0) weights of the tower in open_clip's layout (``visual.*`` of a CLIP state dict)."""
    import safetensors.torch
    import torch

    from dscl.backbones import BackboneSpec, build_backbone_from_spec

    torch.manual_seed(0)
    spec = BackboneSpec.from_name(BACKBONE, args=TINY_ARGS if tiny else {})
    tower = build_backbone_from_spec(spec).model
    state = {f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    safetensors.torch.save_file(state, str(path))
    return sum(v.numel() for v in state.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated model.finetune values, each "
                    "optionally with +ckpt (model.grad_checkpointing=true) (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5; --tiny 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per mode, fresh processes, the order of the "
                    "modes rotated each round (default 3; --tiny 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=None, help="default 224 (--tiny 64)")
    ap.add_argument("--patch-size", type=int, default=None, help="views.patch_size, a multiple of 16 "
                    "(default 64; --tiny 32)")
    ap.add_argument("--patches", type=int, default=5)
    ap.add_argument("--queue", type=int, default=None, help="K (default 4096; --tiny 256)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each run on a CPU (0: dscl's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="optim.amp (default: none)")
    ap.add_argument("--tiny", action="store_true", help="a 3-block ViT of width 128 at 64 px: only checks that "
                    "the script runs (its numbers mean nothing)")
    ap.add_argument("--out", default=None, help="results file ('' = none; default "
                    "benchmarks/results/finetune_cost.json, none with --tiny)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return args
    tiny = args.tiny
    for name, full, small in (("steps", 5, 2), ("repeats", 3, 1), ("image_size", 224, 64), ("patch_size", 64, 32),
                              ("queue", 4096, 256)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    if args.out is None:
        args.out = "" if tiny else str(RESULTS)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from dscl.adapters import Finetune

    for m in args.modes:
        Finetune.parse(_split_mode(m)[0])  # a clear message for a typo, before anything runs
    if args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA GPU here; use --device cpu")
    return args


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    if job["threads"] and not job["device"].startswith("cuda"):
        env.update({"DSCL_NUM_THREADS": str(job["threads"]), "OMP_NUM_THREADS": str(job["threads"])})
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        raise RuntimeError(f"finetune={job['mode']} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3 if key == "img_per_s" else 1) if values else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    cuda = args.device.startswith("cuda")
    # (before build, after build, peak, peak in the steps, peak above the imports): allocated CUDA memory has
    # no baseline of imports, so there the last one is the peak itself
    mem = (None, "cuda_after_build_mib", "cuda_peak_mib", "cuda_peak_steps_mib", "cuda_peak_mib") if cuda else \
        ("rss_before_build_mib", "rss_after_build_mib", "peak_rss_mib", "peak_rss_steps_mib", "peak_rss_model_mib")
    keys = [k for k in dict.fromkeys(mem) if k is not None]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / ("vit_tiny_open_clip.safetensors" if args.tiny else "ViT-B-16_random.safetensors")
        n_weights = write_weights(weights, args.tiny)
        print(f"{BACKBONE}{' (tiny: ' + json.dumps(TINY_ARGS) + ')' if args.tiny else ''}: {n_weights:,} random "
              f"weights -> {weights.name}", flush=True)
        for r in range(args.repeats):
            order = args.modes[r % len(args.modes):] + args.modes[:r % len(args.modes)]
            for mode in order:
                job = {"mode": mode, "weights": str(weights), "tiny": args.tiny, "device": args.device,
                       "amp": args.amp, "threads": args.threads, "batch": args.batch, "image_size": args.image_size,
                       "patch_size": args.patch_size, "patches": args.patches, "queue": args.queue,
                       "warmup": args.warmup, "steps": args.steps}
                row = _run_child(job)
                runs[mode].append(row)
                print(f"repeat {r + 1}/{args.repeats} {mode:<9} {row['img_per_s']:8.2f} img/s  "
                      + "  ".join(f"{k} {row.get(k)}" for k in keys), flush=True)
    medians = {m: {"trained_params": rs[0]["trained_params"], "encoder_params": rs[0]["encoder_params"],
                   "img_per_s": _median(rs, "img_per_s"), **{k: _median(rs, k) for k in keys}}
               for m, rs in runs.items()}
    unit = "MiB allocated (torch.cuda)" if cuda else "MiB resident (RSS)"
    print(f"\nmedians over {args.repeats} repeat(s); memory in {unit}; batch {args.batch}, {args.image_size} px, "
          f"{args.patches} x {args.patch_size} px patches, K = {args.queue}, {args.device}, amp {args.amp}")
    heads = ("before build", "after build", "peak", "peak in steps", "peak - before")
    print(f"{'mode':<9} {'trained params':>15} {'img/s':>9} " + " ".join(f"{h:>13}" for h in heads))
    for m, row in medians.items():
        cells = [row.get(k) if k is not None else None for k in mem]
        print(f"{m:<9} {row['trained_params']:>15,} {row['img_per_s']!s:>9} "
              + " ".join(f"{'-' if c is None else c:>13}" for c in cells))
    ratios: dict[str, dict[str, float | None]] = {}
    full = medians.get("full")
    if full:
        for m, row in medians.items():
            if m == "full":
                continue
            ratios[m] = {"peak": _ratio(row[mem[2]], full[mem[2]]), "peak_steps": _ratio(row[mem[3]], full[mem[3]]),
                         "peak_above_imports": _ratio(row.get(mem[4]), full.get(mem[4])),
                         "img_per_s": _ratio(row["img_per_s"], full["img_per_s"])}
            goal = GOALS.get(m)
            print(f"{m}/full: peak {_pct(ratios[m]['peak'], goal)}, peak above the imports "
                  f"{_pct(ratios[m]['peak_above_imports'], goal)}, peak in steps {_pct(ratios[m]['peak_steps'])}, "
                  f"img/s {ratios[m]['img_per_s']}x")
    from dscl.runtime import cpu_model

    settings = {k: getattr(args, k) for k in ("modes", "batch", "image_size", "patch_size", "patches", "queue",
                                              "steps", "warmup", "repeats", "threads", "device", "amp", "tiny")}
    settings["backbone"] = BACKBONE + (f" {json.dumps(TINY_ARGS)}" if args.tiny else "")
    fields: dict[str, Any] = {"settings": settings, "memory_unit": unit, "medians": medians, "ratios_to_full": ratios,
                              "goals": GOALS, "runs": runs}
    machine: dict[str, Any] = {"cpu_model": cpu_model()}
    if cuda:
        import torch

        machine.update({"device": torch.cuda.get_device_name(0), "torch": torch.__version__})
    if args.out:
        return write_results(args.out, "finetune_cost", argv, machine=machine, **fields)
    return {**fields, "machine": machine}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _pct(x: float | None, goal: float | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1%}" + ("" if goal is None else f" (goal <= {goal:.0%}: {'met' if x <= goal else 'NOT met'})")


if __name__ == "__main__":
    main()
