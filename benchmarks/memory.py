"""Peak CPU memory of one stage-1 training step at the default preset and at ImageNet-LT settings.

Each setting runs in a fresh subprocess: build the model and a full queue, run a warm-up step, then
reset the kernel's peak-RSS counter (``/proc/self/clear_refs``, where available) and run one more
step. Reported: resident memory before the step (model, optimiser state, queue), the peak during
the step, and their difference (what the step itself needs: activations, gradients, loss buffers).

    python benchmarks/memory.py            # fmnist-lt default and imagenet-lt at batch 16

Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import write_results

RESULTS = Path(__file__).parent / "results" / "memory.json"

SETTINGS = {
    # the default preset as shipped (batch 128, 3 patches of 14 px, K = 1024, convnet at 28 px)
    "fmnist-lt": {"preset": "fmnist-lt", "batch": 128},
    # the official ImageNet-LT settings (resnet50 at 224 px, 5 patches of 64 px, K = 65536) at batch 16
    "imagenet-lt": {"preset": "imagenet-lt", "batch": 16},
}


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(preset: str, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dscl.config import load_config
    from dscl.model import DSCLModel, build_encoder
    from dscl.pretrain import Batch, pretrain_step

    cfg = load_config(preset)
    torch.manual_seed(0)
    model = DSCLModel(build_encoder(cfg), queue_size=cfg.model.queue_size)
    model.to(memory_format=torch.channels_last)
    model.queue.enqueue(F.normalize(torch.randn(cfg.model.queue_size, cfg.model.dim), dim=1),
                        torch.randint(0, 1000, (cfg.model.queue_size,)))
    opt = torch.optim.SGD(model.online.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    s, p, n = cfg.data.image_size, cfg.views.patch_size, cfg.views.num_patches
    side = torch.full((batch, n, 2), 0.5 * s)
    boxes = torch.cat([torch.zeros(batch, n, 2), side], dim=-1)

    def step() -> None:
        b = Batch(torch.randn(batch, 3, s, s).contiguous(memory_format=torch.channels_last),
                  torch.randn(batch, 3, s, s).contiguous(memory_format=torch.channels_last),
                  torch.randn(batch, n, 3, p, p), boxes, torch.randint(0, 10, (batch,)))
        pretrain_step(model, b, opt, lr=0.01, m=0.999, loss_cfg=cfg.loss)

    step()  # warm-up: optimiser momentum buffers and allocator pools exist afterwards
    before = _rss_mib("VmRSS")
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        pass
    t = time.perf_counter()
    step()
    seconds = time.perf_counter() - t
    peak = _rss_mib("VmHWM")
    return {"preset": preset, "backbone": cfg.model.backbone, "image_size": s, "batch": batch,
            "patches": n, "patch_size": p, "queue": cfg.model.queue_size,
            "rss_before_step_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
            "step_extra_peak_mib": round(peak - before, 1) if reset else None,
            "step_seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated from " + ", ".join(SETTINGS))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return {}
    rows = []
    for name in args.settings.split(","):
        spec = SETTINGS[name]
        res = subprocess.run([sys.executable, __file__, "--child", spec["preset"], str(spec["batch"])],
                             capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:<12} {row['backbone']:<9} {row['image_size']:>4}px batch {row['batch']:>3}  L={row['patches']} "
              f"K={row['queue']:<6} before step {row['rss_before_step_mib']:>7.0f} MiB  "
              f"peak {row['peak_rss_mib']:>7.0f} MiB  step extra {row['step_extra_peak_mib']} MiB  "
              f"({row['step_seconds']} s)")
    return write_results(args.out, "memory", argv, results=rows)


if __name__ == "__main__":
    main()
