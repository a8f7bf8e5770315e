"""Stage-1 step images/s on a GPU: dscl's full step (forwards, losses, backward, optimiser, enqueue) in
fp32, under bf16 autocast, and under fp16 autocast with a GradScaler, against the straightforward
(official-structure) step in fp32 — resnet50, 224 px, the paper's K = 65536.

Needs a CUDA GPU for the numbers it was written for (never part of CI); ``--device cpu`` with tiny
sizes only checks that it runs. The three variants run on the same random inputs, round-robin step
by step (so clock and thermal drift hit all alike), timed with ``torch.cuda.synchronize``; the
median of the timed steps is reported. cuDNN autotuning is on, as in a dscl run without
``optim.deterministic``. Example (under 10 minutes on an H100):

    python benchmarks/gpu_speed.py --backbone resnet50 --batch 128 --queue 65536 --steps 20

Writes ``benchmarks/results/gpu_speed.json`` with the GPU's name.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from _results import write_results
from dscl.backbones import build_backbone
from dscl.config import LossConfig
from dscl.model import DSCLModel, Encoder
from dscl.pretrain import Batch, pretrain_step
from dscl.runtime import configure_backends
from step_speed import NaiveDSCL, naive_step, random_inputs

RESULTS = Path(__file__).parent / "results" / "gpu_speed.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=64)
    ap.add_argument("--patches", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--queue", type=int, default=65536)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 3 warm-up rounds)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(RESULTS), help="results file ('' to skip writing)")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU here; this benchmark is for a GPU machine (--device cpu only checks that it runs)")
    if args.queue % args.batch:
        ap.error("the straightforward step (like the official code) needs --queue divisible by --batch")
    return args


def build_variants(args: argparse.Namespace, dev: torch.device,
                   gen: torch.Generator) -> tuple[dict[str, Callable[[tuple], None]], torch.amp.GradScaler]:
    """The four timed steps by name (dscl fp32 / bf16 autocast / fp16 + scaler, straightforward fp32), each
    with its own model and optimiser, and the fp16 variant's gradient scaler."""
    alpha = 1 / 9
    loss_cfg = LossConfig(loss="dscl", alpha=alpha, temperature=0.07, pbsd_weight=1.5)

    def ours_model() -> tuple[DSCLModel, torch.optim.Optimizer]:
        model = DSCLModel(Encoder(build_backbone(args.backbone, zero_init_residual=True), dim=128),
                          queue_size=args.queue).to(dev)
        model.to(memory_format=torch.channels_last)
        model.queue.enqueue(F.normalize(torch.randn(args.queue, 128, generator=gen), dim=1).to(dev),
                            torch.randint(0, args.classes, (args.queue,), generator=gen).to(dev))
        model.train()
        return model, torch.optim.SGD(model.online.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    fp32, opt32 = ours_model()
    bf16, opt_bf16 = ours_model()
    fp16, opt_fp16 = ours_model()
    scaler = torch.amp.GradScaler(dev.type)  # dscl's fp16 recipe; the CPU scaler only for the smoke check
    naive = NaiveDSCL(args.backbone, 128, args.queue, args.classes).to(dev).train()
    opt_naive = torch.optim.SGD(naive.encoder_q.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def ours(model, opt, dtype, grad_scaler=None):
        def step(inputs):
            q, k, p, bx, y = inputs
            batch = Batch(q.contiguous(memory_format=torch.channels_last),
                          k.contiguous(memory_format=torch.channels_last), p, bx, y)
            # num_classes as training passes it: without it the losses call torch.unique (a host sync per step)
            pretrain_step(model, batch, opt, lr=0.01, m=0.999, loss_cfg=loss_cfg, dtype=dtype, scaler=grad_scaler,
                          num_classes=args.classes)
        return step

    def straightforward(inputs):
        q, k, p, bx, y = inputs
        naive_step(naive, opt_naive, q, k, p, bx, y, m=0.999, beta=(1 - alpha) / alpha, tau=0.07, lam=1.5)

    variants = {"dscl fp32": ours(fp32, opt32, None), "dscl bf16 autocast": ours(bf16, opt_bf16, torch.bfloat16),
                "dscl fp16 + scaler": ours(fp16, opt_fp16, torch.float16, scaler),
                "straightforward fp32": straightforward}
    return variants, scaler


def time_rounds(variants: dict[str, Callable[[tuple], None]], args: argparse.Namespace, dev: torch.device,
                gen: torch.Generator, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each variant's timed steps: round-robin on the same inputs, order rotated every round."""

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps + warmup):
        inputs = tuple(t.to(dev) for t in random_inputs(args, args.classes, gen))
        names = list(variants)
        names = names[i % len(names):] + names[:i % len(names)]  # rotate the order every round
        for name in names:
            sync()
            t = time.perf_counter()
            variants[name](inputs)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
        print(f"round {i + 1}/{args.steps + warmup}", file=sys.stderr, flush=True)
    return times


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    configure_backends(dev, deterministic=False)  # cudnn.benchmark on CUDA, as pretrain() does
    variants, scaler = build_variants(args, dev, gen)
    times = time_rounds(variants, args, dev, gen)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"variant": k, "median_ms": round(v * 1e3, 2), "img_per_s": round(args.batch / v, 1),
             "samples_ms": [round(t * 1e3, 2) for t in times[k]]} for k, v in med.items()]
    base = med["straightforward fp32"]
    print(f"{'variant':<22} {'median ms':>10} {'img/s':>8} {'vs straightforward':>19}")
    for row, v in zip(rows, med.values(), strict=True):
        row["speedup_vs_straightforward"] = round(base / v, 3)
        print(f"{row['variant']:<22} {row['median_ms']:>10} {row['img_per_s']:>8} "
              f"{row['speedup_vs_straightforward']:>18}x")
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke check only)"
    peak = round(torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else None
    print(f"device: {gpu}; peak allocated {peak} MiB (all four models); fp16 grad scale {scaler.get_scale():g}")
    settings = {k: getattr(args, k) for k in ("backbone", "image_size", "patch_size", "patches", "batch", "queue",
                                              "classes", "steps")}
    if not args.out:
        return {"results": rows}
    return write_results(args.out, "gpu_speed", argv, results=rows, settings=settings,
                         machine={"device": gpu, "torch": torch.__version__, "peak_allocated_mib": peak})


if __name__ == "__main__":
    main()
