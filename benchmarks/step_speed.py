"""Images/s of one full stage-1 training step: dscl's step vs a straightforward one.

The project's step is :func:`dscl.pretrain.pretrain_step` (both encoders, all patches in one batched
forward, one ``roi_align`` call, the fused losses, backward, SGD step, momentum update, enqueue),
with channels_last, timed twice: with ``model.patch_bn=per-slot`` (the default and the paper's
BatchNorm semantics: each patch slot normalised with its own statistics inside the batched forward)
and with ``joint`` (one set of statistics over all L*B patches); ``per_slot_cost`` is the per-slot
step's extra time over the joint one. The straightforward step is written below from METHOD.md A.9's description of
the official code: a forward hook on layer4, a separate forward of the online encoder per patch, a
per-patch ``roi_align`` with a per-image box list, the DSCL loss with dense float masks over
``cat(q, k, queue)`` and PBSD as a per-patch loop (``dscl.losses.dscl_loss_dense`` /
``pbsd_loss_dense``, the plain references), a Python-loop EMA update and a pointer enqueue.

All variants run on the same random inputs, in an order that rotates step by step so machine noise
hits them alike; the median of the timed steps is reported. Example (the issue's command):

    python benchmarks/step_speed.py --backbone resnet18 --image-size 224 --patch-size 64 \
        --patches 5 --batch 16 --queue 4096 --steps 10 --json
"""

from __future__ import annotations

# ruff: noqa: E402  (the OpenMP settings below must be in place before torch is imported)
from dscl.threads import set_openmp_defaults

set_openmp_defaults()  # as `dscl` runs: capped OpenMP spinning (DSCL_OPENMP_DEFAULTS=0: OpenMP's own)

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import roi_align

from _results import median_ms
from dscl.backbones import build_backbone
from dscl.config import LossConfig
from dscl.losses import dscl_loss_dense, pbsd_loss_dense
from dscl.model import DSCLModel, Encoder
from dscl.pretrain import Batch, patches_channels_last, pretrain_step

RESULTS = Path(__file__).parent / "results" / "step_speed.json"


# ---------------------------------------------------------------- the straightforward step
class NaiveDSCL(nn.Module):
    """A torchvision ResNet with its fc replaced by the MLP head, hooked at layer4 (official style)."""

    def __init__(self, arch: str, dim: int, queue: int, num_classes: int) -> None:
        super().__init__()
        net = getattr(torchvision.models, arch)(num_classes=dim, zero_init_residual=True)
        width = net.fc.in_features
        net.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim))
        self.encoder_q = net
        self.encoder_k = copy.deepcopy(net)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue), dim=0))
        self.register_buffer("queue_labels", torch.randint(0, num_classes, (1, queue)))
        self.ptr = 0
        self.fmap: torch.Tensor | None = None
        self.encoder_q.layer4.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.fmap = output


def naive_step(model: NaiveDSCL, opt, q_img, k_img, patches, boxes, labels, *, m, beta, tau, lam):
    with torch.no_grad():
        for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
            pk.data = pk.data * m + pq.data * (1.0 - m)
    q = F.normalize(model.encoder_q(q_img), dim=1)
    fmap = model.fmap
    scale = fmap.shape[-1] / q_img.shape[-1]
    teachers, students = [], []
    for j in range(patches.shape[1]):
        box_list = [boxes[b, j][None] for b in range(boxes.shape[0])]
        pooled = roi_align(fmap, box_list, output_size=(2, 2), spatial_scale=scale).mean(dim=(2, 3))
        teachers.append(F.normalize(model.encoder_q.fc(pooled), dim=1))
    for j in range(patches.shape[1]):
        students.append(F.normalize(model.encoder_q(patches[:, j]), dim=1))
    with torch.no_grad():
        k = F.normalize(model.encoder_k(k_img), dim=1)
    queue, queue_labels = model.queue.T, model.queue_labels[0]
    loss_dscl = dscl_loss_dense(q, k, labels, queue, queue_labels, beta=beta, temperature=tau)
    loss_pbsd = pbsd_loss_dense(torch.stack(teachers), torch.stack(students), k, queue, temperature=tau)
    loss = loss_dscl + lam * loss_pbsd
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        b = k.shape[0]
        K = model.queue.shape[1]
        idx = torch.arange(model.ptr, model.ptr + b) % K
        model.queue[:, idx] = k.T
        model.queue_labels[0, idx] = labels
        model.ptr = (model.ptr + b) % K
    return float(loss.detach())


# ---------------------------------------------------------------- harness
def random_inputs(args, num_classes, gen):
    b, L, s, p = args.batch, args.patches, args.image_size, args.patch_size
    side = torch.empty(b, L, 2).uniform_(0.25 * s, 0.75 * s, generator=gen)
    x1 = torch.rand(b, L, generator=gen) * (s - side[..., 0])
    y1 = torch.rand(b, L, generator=gen) * (s - side[..., 1])
    boxes = torch.stack([x1, y1, x1 + side[..., 0], y1 + side[..., 1]], dim=-1)
    return (torch.randn(b, 3, s, s, generator=gen), torch.randn(b, 3, s, s, generator=gen),
            torch.randn(b, L, 3, p, p, generator=gen), boxes, torch.randint(0, num_classes, (b,), generator=gen))


def encoder_breakdown(model: DSCLModel, args, gen, repeats: int = 5) -> dict[str, float]:
    """Median seconds of the backbone+head work inside our step, each part alone: the online encoder's
    forward+backward on the query views, the momentum encoder's no-grad forward on the key views, and
    the online encoder's forward+backward on all patches (one batch of L*B, channels-last, L-major)."""
    b, L, s, p = args.batch, args.patches, args.image_size, args.patch_size
    cl = torch.channels_last
    q = torch.randn(b, 3, s, s, generator=gen).contiguous(memory_format=cl)
    patches = patches_channels_last(torch.randn(b, L, 3, p, p, generator=gen)).transpose(0, 1).reshape(L * b, 3, p, p)

    def fwd_bwd(x):
        z, _ = model.online(x)
        z.sum().backward()
        model.online.zero_grad(set_to_none=True)

    def key_fwd():
        with torch.no_grad():
            model.momentum(q)

    parts = {"query fwd+bwd": lambda: fwd_bwd(q), "key fwd": key_fwd, "patches fwd+bwd": lambda: fwd_bwd(patches)}
    return {name: median_ms(fn, repeats, warmup=1) / 1e3 for name, fn in parts.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=64)
    ap.add_argument("--patches", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the online encoder's three convolution workloads of our step alone (query "
                         "forward+backward, key forward, patches forward+backward): the floor under our step, and "
                         "so the ceiling of its speed-up over the straightforward step")
    ap.add_argument("--no-straightforward", action="store_true",
                    help="time only dscl's step (per-slot and joint patch BatchNorm); needed for backbones the "
                         "straightforward step does not build (it takes torchvision ResNets), e.g. convnet")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    ap.add_argument("--out", default=str(RESULTS), help="results file ('' to skip writing)")
    args = ap.parse_args(argv)
    args.straight = not args.no_straightforward
    if args.straight and not hasattr(torchvision.models, args.backbone):
        ap.error(f"the straightforward step builds torchvision ResNets only; use --no-straightforward with "
                 f"--backbone {args.backbone}")
    if args.straight and args.queue % args.batch:
        ap.error("the straightforward step (like the official code) needs --queue divisible by --batch")
    return args


def build_variants(args: argparse.Namespace, gen: torch.Generator) -> tuple[list[tuple[str, Any]], DSCLModel]:
    """``[(name, run)]``: our step with per-slot and with joint patch BatchNorm, and the straightforward
    step unless ``--no-straightforward``; ``run(inputs)`` takes one step and returns its seconds. Also
    returns our model (for ``--breakdown``)."""
    alpha = 1 / 9
    beta = (1 - alpha) / alpha
    loss_cfg = LossConfig(loss="dscl", alpha=alpha, temperature=0.07, pbsd_weight=1.5)

    ours = DSCLModel(Encoder(build_backbone(args.backbone), dim=128), queue_size=args.queue)
    ours.to(memory_format=torch.channels_last)
    ours.queue.enqueue(F.normalize(torch.randn(args.queue, 128, generator=gen), dim=1),
                       torch.randint(0, args.classes, (args.queue,), generator=gen))
    opt_ours = torch.optim.SGD(ours.online.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    joint = copy.deepcopy(ours)
    joint.patch_bn = "joint"
    opt_joint = torch.optim.SGD(joint.online.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if args.straight:
        naive = NaiveDSCL(args.backbone, 128, args.queue, args.classes)
        opt_naive = torch.optim.SGD([p for p in naive.encoder_q.parameters()], lr=0.01, momentum=0.9,
                                    weight_decay=5e-4)
        naive.train()
    ours.train()
    joint.train()

    def stepper(model, opt):
        def run(inputs):
            q, k, p, bx, y = inputs
            # the layouts the training loop hands the step (pretrain._batches): channels-last views and
            # L-major channels-last patches (the student's batched forward then needs no layout change)
            batch = Batch(q.contiguous(memory_format=torch.channels_last),
                          k.contiguous(memory_format=torch.channels_last), patches_channels_last(p), bx, y)
            t = time.perf_counter()
            pretrain_step(model, batch, opt, lr=0.01, m=0.999, loss_cfg=loss_cfg)
            return time.perf_counter() - t
        return run

    def run_naive(inputs):
        q, k, p, bx, y = inputs
        t = time.perf_counter()
        naive_step(naive, opt_naive, q, k, p, bx, y, m=0.999, beta=beta, tau=0.07, lam=1.5)
        return time.perf_counter() - t

    variants = [("dscl", stepper(ours, opt_ours)), ("dscl-joint", stepper(joint, opt_joint))]
    if args.straight:
        variants.append(("straightforward", run_naive))
    return variants, ours


def time_variants(variants: list[tuple[str, Any]], args: argparse.Namespace,
                  gen: torch.Generator) -> dict[str, list[float]]:
    """Seconds of every timed step per variant: 2 warm-up steps, then ``--steps``; the same random inputs
    for all variants of a step, in an order that rotates step by step."""
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for i in range(args.steps + 2):
        inputs = random_inputs(args, args.classes, gen)
        shift = i % len(variants)
        order = variants[shift:] + variants[:shift]
        for name, fn in order:
            dt = fn(inputs)
            if i >= 2:
                times[name].append(dt)
        print(f"step {i + 1}/{args.steps + 2}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()
                                                          if t), file=sys.stderr)
    return times


def summarize(args: argparse.Namespace, argv: list[str] | None, times: dict[str, list[float]],
              breakdown: dict[str, float] | None) -> dict:
    """The results record: medians, speed-ups, per-slot cost, samples, encoder breakdown, machine."""
    straight = args.straight
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "step_speed",
        "command": "python benchmarks/step_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: getattr(args, k) for k in ("backbone", "image_size", "patch_size", "patches", "batch",
                                                   "queue", "classes", "steps")},
        "img_per_s": round(args.batch / med["dscl"], 2),
        "joint_img_per_s": round(args.batch / med["dscl-joint"], 2),
        # extra time of the per-slot BatchNorm step over the joint one: of the medians, and the median of
        # the per-step ratios (each step's variants ran back to back on the same inputs)
        "per_slot_cost": round(med["dscl"] / med["dscl-joint"] - 1, 4),
        "per_slot_cost_per_step_median": round(statistics.median(
            d / j for d, j in zip(times["dscl"], times["dscl-joint"], strict=True)) - 1, 4),
        "median_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
        **({"straightforward_img_per_s": round(args.batch / med["straightforward"], 2),
            "speedup": round(med["straightforward"] / med["dscl"], 3),
            # each step's variants ran back to back on the same inputs: the per-step ratios and their median
            "speedup_per_step_median": round(statistics.median(
                s / d for s, d in zip(times["straightforward"], times["dscl"], strict=True)), 3)} if straight else {}),
        "samples_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
        **({"encoder_ms": {k: round(v * 1e3, 1) for k, v in breakdown.items()},
            "encoder_share_of_dscl_step": round(sum(breakdown.values()) / med["dscl"], 3),
            **({"speedup_ceiling": round(med["straightforward"] / sum(breakdown.values()), 3)} if straight else {}),
            } if breakdown else {}),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "device": "cpu"},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def print_summary(result: dict, straight: bool, breakdown: dict[str, float] | None) -> None:
    print(f"{'variant':<16} {'median ms':>10} {'img/s':>8}")
    print(f"{'dscl':<16} {result['median_ms']['dscl']:>10} {result['img_per_s']:>8}")
    print(f"{'dscl-joint':<16} {result['median_ms']['dscl-joint']:>10} {result['joint_img_per_s']:>8}")
    if straight:
        print(f"{'straightforward':<16} {result['median_ms']['straightforward']:>10} "
              f"{result['straightforward_img_per_s']:>8}")
        print(f"speed-up (straightforward time / dscl time): {result['speedup']}x "
              f"(median of the per-step ratios: {result['speedup_per_step_median']}x)")
    print(f"per-slot patch BatchNorm costs {result['per_slot_cost']:+.1%} over joint "
          f"(median of the per-step ratios: {result['per_slot_cost_per_step_median']:+.1%})")
    if breakdown:
        print("our encoder alone (median ms): " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in breakdown.items())
              + f" = {sum(breakdown.values()) * 1e3:.0f} ms, {result['encoder_share_of_dscl_step']:.0%} of our step"
              + (f"; a step with nothing but these would be {result['speedup_ceiling']}x the straightforward step"
                 if straight else ""))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    variants, ours = build_variants(args, gen)
    times = time_variants(variants, args, gen)
    breakdown = encoder_breakdown(ours, args, gen) if args.breakdown else None
    result = summarize(args, argv, times, breakdown)
    print_summary(result, args.straight, breakdown)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps({k: result[k] for k in ("img_per_s", "per_slot_cost", "speedup") if k in result}))
    return result


if __name__ == "__main__":
    main()
