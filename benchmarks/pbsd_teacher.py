"""How informative is the PBSD teacher of a finished run? (issue #6's PBSD investigation)

PBSD distils the teacher distribution ``softmax([c·k_i, c·Q]/τ)`` of a patch's ROI-pooled feature
c into the patch crop's own feature. If that distribution is nearly uniform over the K + 1
candidates, the target carries almost no information and PBSD reduces to pushing each patch away
from every key alike. This script measures, on real training batches of a run's final stage-1
model (train-mode BatchNorm, as in training), per patch setting:

* teacher entropy (nats) against the uniform ``log(K+1)``, and the same for the global view
  ``softmax([q·k_i, q·Q]/τ)``;
* the teacher's probability on the image's own key and the mass on queue entries of the image's
  class (is the target at least class-consistent?), against the same for the global view;
* the student's cross-entropy to the teacher (the PBSD loss) and its KL to the teacher;
* the ROI feature map size in cells, and the number of cells a patch box covers.

    python benchmarks/pbsd_teacher.py --run runs/compare-fmnist-lt/runs/dscl+pbsd-seed0 \
        --settings "14:0.05-0.6,14:0.25-0.6,28:0.05-0.6" --batches 4

Each setting is ``PATCH_PX:MIN_AREA-MAX_AREA`` (patch crop size, box area range as a fraction of the
query view). Writes ``benchmarks/results/pbsd_teacher.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from _results import write_results
from dscl.analysis.common import open_run, stage1_model
from dscl.data import DSCLTransform

RESULTS = Path(__file__).parent / "results" / "pbsd_teacher.json"


def parse_settings(text: str) -> list[tuple[int, float, float]]:
    out = []
    for item in text.split(","):
        size, _, scale = item.partition(":")
        lo, _, hi = scale.partition("-")
        out.append((int(size), float(lo), float(hi)))
    return out


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


@torch.no_grad()
def measure(run: str, settings: list[tuple[int, float, float]], batches: int, seed: int) -> dict:
    art = open_run(run)
    cfg = art.cfg
    model = stage1_model(art).train()  # train-mode BN, as in stage 1
    queue, queue_labels = model.queue.snapshot()
    tau = cfg.loss.temperature
    k_total = queue.shape[0] + 1
    out = {"run": str(run), "method": art.stage1.get("method"), "queue_size": queue.shape[0],
           "temperature": tau, "uniform_entropy": round(math.log(k_total), 4), "settings": []}
    for psize, lo, hi in settings:
        views = dataclasses.replace(cfg.views, patch_size=psize, patch_scale=(lo, hi))
        gen = torch.Generator().manual_seed(seed)
        transform = DSCLTransform(cfg.data.image_size, views, art.splits.mean, art.splits.std, generator=gen)
        order = torch.randperm(len(art.splits.train), generator=torch.Generator().manual_seed(seed))
        bsz = min(cfg.optim.batch_size, len(order))
        stats: dict[str, list[float]] = {}
        cells_per_box: list[float] = []
        fmap_cells = None
        for b in range(batches):
            idx = order[(b * bsz) % len(order):][:bsz].tolist()
            samples = [transform(art.splits.train.load(i)) for i in idx]
            labels = torch.tensor([art.splits.train.targets[i] for i in idx])
            query = torch.stack([s.query for s in samples])
            key_img = torch.stack([s.key for s in samples])
            patches = torch.stack([s.patches for s in samples])
            boxes = torch.stack([s.boxes for s in samples])
            z, fmap = model.online(query)
            keys = model.momentum(key_img)[0]
            teacher = model.patch_teacher(fmap, boxes, cfg.data.image_size)  # (L, B, D)
            student = model.patch_student(patches)
            fmap_cells = fmap.shape[-1]
            cell = cfg.data.image_size / fmap_cells
            w = (boxes[..., 2] - boxes[..., 0]) / cell
            h = (boxes[..., 3] - boxes[..., 1]) / cell
            cells_per_box += (w * h).flatten().tolist()

            def dist(f: torch.Tensor, keys: torch.Tensor = keys) -> torch.Tensor:  # (.., B, D) -> (.., B, K+1)
                own = (f * keys).sum(-1, keepdim=True)
                return torch.cat([own, f @ queue.T], dim=-1) / tau

            same = (queue_labels[None, :] == labels[:, None]).float()  # (B, K)
            pt = F.softmax(dist(teacher), -1)
            ps_log = F.log_softmax(dist(student), -1)
            pg = F.softmax(dist(z), -1)
            rows = {
                "teacher_entropy": _entropy(pt), "global_entropy": _entropy(pg),
                "teacher_p_own_key": pt[..., 0], "global_p_own_key": pg[..., 0],
                "teacher_mass_same_class": (pt[..., 1:] * same).sum(-1),
                "global_mass_same_class": (pg[..., 1:] * same).sum(-1),
                "student_ce": -(pt * ps_log).sum(-1),
                "student_kl": -(pt * ps_log).sum(-1) - _entropy(pt),
                "teacher_student_cosine": (teacher * student).sum(-1),
            }
            for name, t in rows.items():
                stats.setdefault(name, []).append(float(t.mean()))
        row = {"patch_size": psize, "patch_scale": [lo, hi], "feature_map_cells": fmap_cells,
               "median_cells_per_box": round(statistics.median(cells_per_box), 2)}
        row.update({k: round(statistics.fmean(v), 4) for k, v in stats.items()})
        row["class_share_in_queue"] = round(float(torch.bincount(queue_labels).max() / queue.shape[0]), 4)
        out["settings"].append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, nargs="+", help="finished stage-1 run(s) with PBSD or without")
    ap.add_argument("--settings", default="14:0.05-0.6", help="PATCH_PX:MIN-MAX[,...] (see the module doc)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    results = [measure(r, parse_settings(args.settings), args.batches, args.seed) for r in args.run]
    for res in results:
        print(f"{res['run']} ({res['method']}), K = {res['queue_size']}, tau = {res['temperature']}, "
              f"uniform entropy log(K+1) = {res['uniform_entropy']}")
        print(f"{'patch':>5} {'area':>9} {'cells':>5} | {'H teach':>7} {'H glob':>6} | {'p own T':>7} "
              f"{'p own G':>7} | {'cls T':>5} {'cls G':>5} | {'CE':>5} {'KL':>5} {'cos':>5}")
        for r in res["settings"]:
            print(f"{r['patch_size']:>5} {r['patch_scale'][0]:>4}-{r['patch_scale'][1]:<4} "
                  f"{r['median_cells_per_box']:>5} | {r['teacher_entropy']:>7.3f} {r['global_entropy']:>6.3f} | "
                  f"{r['teacher_p_own_key']:>7.4f} {r['global_p_own_key']:>7.4f} | "
                  f"{r['teacher_mass_same_class']:>5.3f} {r['global_mass_same_class']:>5.3f} | "
                  f"{r['student_ce']:>5.3f} {r['student_kl']:>5.3f} {r['teacher_student_cosine']:>5.3f}")
    return write_results(args.out, "pbsd_teacher", argv, results=results)


if __name__ == "__main__":
    main()
