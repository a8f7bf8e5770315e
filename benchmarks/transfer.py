"""Does starting from pretrained weights help on a long tail, and how much of the network should train?

Issue 30's evidence on data we have (README "Fine-tuning a pretrained backbone"). Two steps:

1. **Source weights.** A backbone is trained with cross-entropy on Fashion-MNIST classes 0-4 (T-shirt,
   Trouser, Pullover, Dress, Coat), balanced, all 6,000 training images of each (``data.classes``,
   ``data.imbalance_factor=1``), and its weights are written to a file the way a downloaded checkpoint
   comes: the convnet in dscl's backbone layout (``.pth``), the ViT in timm's own layout (``.safetensors``).
2. **Target runs.** ``dscl run`` on a long-tailed subset of the other five classes (5-9: Sandal, Shirt,
   Sneaker, Bag, Ankle boot; IF 100, head 1,000 images: 1000 / 316 / 100 / 31 / 10) for ce and dscl+pbsd x
   {scratch (random init, full training), full, lora, last:K, frozen} at the same budget (stage-1 epochs,
   batch, learning rate), ``--seeds`` seeds each. Stage 2 picks its epoch on the held-out validation split
   (200 unused training images per class); the test set (1,000 per class) is read once per run.

Nothing is tuned per mode: every run uses the fmnist-lt preset's recipe with the stated overrides, so the
table compares fine-tuning modes at one budget, not each at its best. Prints mean +- std (over seeds) of
validation and test top-1 and test Many / Medium / Few, and writes benchmarks/results/transfer.json.

    python benchmarks/transfer.py                        # convnet and the small ViT, 3 seeds (about 2 h on 2 cores)
    python benchmarks/transfer.py --backbones convnet --seeds 0 --epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import write_results

HERE = Path(__file__).resolve().parent
SOURCE_CLASSES = "[0, 1, 2, 3, 4]"
TARGET_CLASSES = "[5, 6, 7, 8, 9]"
# the small ViT: timm's ViT-tiny shrunk to 4 blocks of width 96, 4 px patches on the 28 px images (7 x 7 grid)
VIT = ["model.backbone=timm:vit_tiny_patch16_224",
       "model.backbone_args={depth: 4, embed_dim: 96, num_heads: 3, patch_size: 4, img_size: 28}",
       "views.patch_size=16"]
BACKBONES = {"convnet": ["model.backbone=convnet"], "vit": VIT}
LAST = {"convnet": "last:2", "vit": "last:2"}  # half of the 4 conv units / 4 blocks
MODES = ("scratch", "full", "lora", "last", "frozen")
LOSSES = {"ce": ["loss.loss=ce"], "dscl+pbsd": ["loss.loss=dscl"]}


def _dscl(args: list[str], threads: int) -> None:
    env = {**os.environ, "DSCL_NUM_THREADS": str(threads), "DSCL_ADAPT_THREADS": "0",
           "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-m", "dscl", *args, "--no-progress", "--device", "cpu"], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"dscl {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")


def source_weights(backbone: str, work: Path, epochs: int, threads: int) -> Path:
    """Train the backbone on classes 0-4 (balanced, every image) with cross-entropy and write its weights as a
    downloaded checkpoint would come; reused when it exists."""
    import torch

    from dscl.run import load_stage1

    path = work / f"source-{backbone}.{'safetensors' if backbone == 'vit' else 'pth'}"
    if path.exists():
        return path
    run = work / f"source-{backbone}-run"
    _dscl(["pretrain", "--preset", "fmnist-lt", "--out", str(run), "--overwrite", *BACKBONES[backbone],
           f"data.classes={SOURCE_CLASSES}", "data.imbalance_factor=1", "data.n_max=6000", "data.val_per_class=0",
           "loss.loss=ce", f"optim.epochs={epochs}", "optim.warmup_epochs=1", "optim.seed=0"], threads)
    weights = load_stage1(run).backbone_weights()
    if backbone == "vit":  # timm's own layout, as timm / the hub store a ViT
        import safetensors.torch

        safetensors.torch.save_file({k[len("model."):]: v.contiguous() for k, v in weights.items()}, str(path))
    else:  # dscl's backbone layout (a .pth state dict)
        torch.save(weights, path)
    return path


def target_run(backbone: str, loss: str, mode: str, seed: int, source: Path, work: Path, epochs: int,
               threads: int) -> dict[str, float]:
    out = work / f"{backbone}-{loss}-{mode}-e{epochs}-s{seed}"
    if not (out / "report.json").exists():
        start = [] if mode == "scratch" else [f"model.pretrained={source}",
                                              f"model.finetune={LAST[backbone] if mode == 'last' else mode}"]
        _dscl(["run", "--preset", "fmnist-lt", "--out", str(out), "--overwrite", *BACKBONES[backbone],
               *LOSSES[loss], *start, f"data.classes={TARGET_CLASSES}", "data.imbalance_factor=100",
               "data.n_max=1000", f"optim.epochs={epochs}", f"optim.seed={seed}"], threads)
    test = json.loads((out / "report.json").read_text())
    # stage 2 keeps the epoch with the best class-balanced validation top-1 (report.json "selection"); that
    # best value is the run's validation number
    val = max((rec["val_balanced_top1"] for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if rec.get("stage") == "classify" and rec.get("val_balanced_top1") is not None),
              default=float("nan"))
    return {"val_top1": val, **{k: test[k] for k in ("top1", "many", "medium", "few")}}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="convnet,vit")
    p.add_argument("--losses", default="ce,dscl+pbsd")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20, help="stage-1 epochs of every target run")
    p.add_argument("--source-epochs", type=int, default=5, help="epochs of the source pretraining")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(HERE.parent / "runs" / "transfer-bench"),
                   help="where the source weights and the runs go (reused when there: delete to start over)")
    p.add_argument("--out", default=str(HERE / "results" / "transfer.json"))
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    t0 = time.perf_counter()
    for backbone in a.backbones.split(","):
        source = source_weights(backbone, work, a.source_epochs, a.threads)
        for loss in a.losses.split(","):
            for mode in a.modes.split(","):
                runs = [target_run(backbone, loss, mode, s, source, work, a.epochs, a.threads) for s in seeds]
                row = {"backbone": backbone, "loss": loss, "mode": LAST[backbone] if mode == "last" else mode,
                       "seeds": seeds, "runs": runs}
                for k in ("val_top1", "top1", "many", "medium", "few"):
                    row[k] = _mean_std([r[k] for r in runs])
                rows.append(row)
                print(f"{backbone:8s} {loss:10s} {row['mode']:8s} val {row['val_top1'][0]:5.1f}  test "
                      + "  ".join(f"{k} {row[k][0]:5.1f} +- {row[k][1]:4.1f}" for k in ("top1", "many", "medium",
                                                                                       "few"))
                      + f"   [{time.perf_counter() - t0:.0f} s]", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    write_results(a.out, "transfer", argv, rows=rows, epochs=a.epochs, source_epochs=a.source_epochs,
                  machine={"cpu_model": cpu}, wall_seconds=round(time.perf_counter() - t0, 1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
