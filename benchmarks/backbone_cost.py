"""What a small ViT costs on this CPU next to the builtin convnet: the README "Backbones" numbers.

Runs ``dscl run --preset smoke`` for each backbone ``--times`` times in fresh processes, alternating the
backbones so drift of a shared machine hits both alike, with fixed threads (``DSCL_NUM_THREADS``,
``DSCL_ADAPT_THREADS=0``). The ViT is timm's ``vit_tiny_patch16_224`` (all 12 blocks, random weights
written by this script to a local ``.safetensors`` file, seed 0: the README's command) on Fashion-MNIST
upsampled to 64 px with 32 px patches. Reports medians of the stage-1 seconds (sum of the epochs'
``wall_seconds`` in metrics.jsonl), the stage-1 images/s (median of the logged steps) and the whole
command's wall seconds. Needs the ``timm`` extra and Fashion-MNIST.

    python benchmarks/backbone_cost.py --times 3
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

VIT_ARGS = ["model.backbone=timm:vit_tiny_patch16_224", "data.image_size=64", "views.patch_size=32"]


def _vit_weights(path: Path) -> None:
    import safetensors.torch
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _one(args: list[str], out: Path, threads: int) -> dict[str, float]:
    env = {**os.environ, "DSCL_NUM_THREADS": str(threads), "DSCL_ADAPT_THREADS": "0", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dscl", "run", "--preset", "smoke", "--out", str(out), "--no-progress",
                    "--device", "cpu", *args], check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["wall_seconds"] for r in records if r.get("stage") == "pretrain_epoch"]
    steps = [r["img_per_s"] for r in records if r.get("stage") == "pretrain" and "img_per_s" in r]
    return {"stage1_s": sum(epochs), "img_per_s": statistics.median(steps), "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--times", type=int, default=3, help="runs per backbone (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="compute threads (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/backbone_cost.json", help="results file ('' = none)")
    args = p.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"convnet": [], "timm:vit_tiny_patch16_224": []}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "vit_tiny_patch16_224.safetensors"
        _vit_weights(weights)
        backbone_args = {"convnet": [], "timm:vit_tiny_patch16_224": [*VIT_ARGS, f"model.pretrained={weights}"]}
        for i in range(args.times):
            for name, extra in backbone_args.items():
                runs[name].append(_one(extra, Path(tmp) / f"run-{i}-{name.replace(':', '_')}", args.threads))
                print(f"{name} run {i + 1}: {runs[name][-1]}", flush=True)
    medians = {name: {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0]} for name, rs in runs.items()}
    for name, m in medians.items():
        print(f"{name:28s} stage 1 {m['stage1_s']:6.1f} s  {m['img_per_s']:7.1f} img/s  whole run {m['wall_s']:6.1f} s")
    from dscl.runtime import cpu_model

    fields = {"medians": medians, "runs": runs, "threads": args.threads, "vit_args": VIT_ARGS,
              "machine": {"cpu_model": cpu_model()}}
    if args.out:
        write_results(args.out, "backbone_cost", argv, **fields)
    return fields


if __name__ == "__main__":
    main()
