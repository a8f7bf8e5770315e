#!/usr/bin/env bash
# The prepared device check (issue #22): everything that needs a GPU, in one command, into one folder.
#
#   bash scripts/gpu_check.sh [--dry-run] [OUT]          (OUT defaults to gpu_check/)
#
# On a machine with a CUDA GPU, from the repository root; dscl need not be installed (src/ is put on
# PYTHONPATH; torch, torchvision, numpy, pillow, pyyaml, tqdm and matplotlib must be importable; step 3 also
# needs open_clip_torch, peft and safetensors, the open_clip and lora extras). About 6-10 minutes on one
# H100 / H200. Steps, each logged to OUT/<step>.log and timed in OUT/summary.txt:
#   1. cuda-tests     pytest -m cuda (the GPU tests: autocast, bf16/fp16 steps, determinism, nccl, views)
#   2. gpu-speed      benchmarks/gpu_speed.py: the stage-1 step in fp32 / bf16 / fp16 vs the straightforward
#                     step at ImageNet-LT settings (resnet50, 224 px, 5 x 64 px patches, K = 65536, batch 128),
#                     img/s and peak memory -> OUT/gpu_speed.json
#   3. finetune-step  benchmarks/finetune_cost.py: the stage-1 step of open_clip ViT-B/16 (random weights in a
#                     local file) with model.finetune = full / lora / frozen, each in a fresh process, bf16
#                     autocast, 224 px, 5 x 64 px patches, K = 65536, batch 64: img/s and peak
#                     torch.cuda.max_memory_allocated, ratios to full -> OUT/finetune_cost.json
#   4. stage1-*       a short stage 1 on synthetic long-tailed images (written to OUT/data), once with
#                     per-slot and once with joint patch BatchNorm -> OUT/stage1-per-slot/, OUT/stage1-joint/
#   5. resume         the per-slot run continued for one more epoch with --resume
#   6. augment-speed  benchmarks/augment_speed.py: RandAugment(2, 9) batched on the GPU vs per image (img/s at
#                     28 and 224 px) -> OUT/augment_speed.json
# --dry-run runs the same steps on the CPU with tiny sizes (CI does, so the script keeps working); its
# numbers mean nothing. The exit code is non-zero when any step failed; later steps still run.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}

if [ $dry = 1 ]; then
  device=cpu
  speed_args=(--device cpu --backbone resnet18 --image-size 64 --patch-size 32 --batch 4 --queue 8 --classes 5 --steps 1)
  finetune_args=(--tiny --device cpu --modes full,lora,frozen --steps 1 --warmup 1 --repeats 1)
  stage1=(model.backbone=convnet data.image_size=32 views.patch_size=16 views.num_patches=2 optim.batch_size=16
          model.queue_size=64 classifier.epochs=1 data.num_workers=0)
  per_class="12,8,5,4,3,3,2,2"
else
  device=cuda
  speed_args=(--device cuda --backbone resnet50 --image-size 224 --patch-size 64 --patches 5 --batch 128
              --queue 65536 --classes 1000 --steps 20)
  finetune_args=(--device cuda --amp bf16 --batch 64 --image-size 224 --patch-size 64 --patches 5 --queue 65536
                 --modes full,lora,frozen --steps 10 --warmup 3 --repeats 1)
  stage1=(model.backbone=resnet18 data.image_size=64 views.patch_size=32 views.num_patches=5 optim.batch_size=128
          model.queue_size=4096 model.channels_last=true)
  per_class="600,400,260,170,110,70,45,30,20,12"
fi
{
  echo "dscl device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $( [ $dry = 1 ] && echo "DRY RUN on the CPU" || echo "device $device")"
  git log -1 --format='commit %h %s' 2>/dev/null || true
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>&1
} > "$out/summary.txt"

failed=0
step() {  # step NAME COMMAND...: run, log, time, record ok / FAILED
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$out/summary.txt"
  if "$@" > "$out/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)" | tee -a "$out/summary.txt"
  else
    echo "   FAILED (exit $?, $((SECONDS - t0)) s): see $out/$name.log" | tee -a "$out/summary.txt"
    failed=1
  fi
}

# 1. the GPU tests (they skip on a CPU: the dry run only checks that they are collected)
step cuda-tests "$py" -m pytest -q -m cuda tests -p no:cacheprovider

# 2. the step benchmark at ImageNet-LT settings
step gpu-speed "$py" benchmarks/gpu_speed.py "${speed_args[@]}" --out "$out/gpu_speed.json"

# 3. the step per fine-tuning mode (open_clip ViT-B/16): speed and peak GPU memory of full / lora / frozen
step finetune-step "$py" benchmarks/finetune_cost.py "${finetune_args[@]}" --out "$out/finetune_cost.json"

# 4. synthetic long-tailed images: class k gets per_class[k] train images, 8 test images each
step data "$py" - "$out/data" "$per_class" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, counts = Path(sys.argv[1]), [int(c) for c in sys.argv[2].split(",")]
rng = np.random.default_rng(0)
for split, sizes in (("train", counts), ("test", [8] * len(counts))):
    for k, n in enumerate(sizes):
        folder = root / split / f"class{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 80, (72, 72, 3), dtype=np.uint8)
            img[:, :, k % 3] += np.uint8(60 + 15 * (k // 3))  # a class-dependent colour to learn
            Image.fromarray(img).save(folder / f"{i}.png")
print("wrote", root)
EOF
common=(--preset smoke data.dataset=folder --data-root "$out/data" "${stage1[@]}" optim.epochs=2
        optim.warmup_epochs=1 optim.log_every=1 --device "$device" --no-progress --overwrite)
for bn in per-slot joint; do
  step "stage1-$bn" "$py" -m dscl run "${common[@]}" model.patch_bn=$bn --out "$out/stage1-$bn"
done

# 5. resume: one more epoch of the per-slot run (exact continuation is tested on the CPU in CI)
step resume "$py" -m dscl pretrain --out "$out/stage1-per-slot" --resume optim.epochs=3 --device "$device" --no-progress

# 6. RandAugment batched on the device vs per image (issue #32)
step augment-speed "$py" benchmarks/augment_speed.py $( [ $dry = 1 ] && echo --quick ) --out "$out/augment_speed.json"

"$py" - "$out" 2>&1 <<'EOF' | tee -a "$out/summary.txt"
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
for bn in ("per-slot", "joint"):
    log = out / f"stage1-{bn}" / "metrics.jsonl"
    if not log.is_file():
        continue
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    rates = [r["img_per_s"] for r in rows if r.get("stage") == "pretrain" and r.get("epoch", 0) >= 2]
    report = out / f"stage1-{bn}" / "report.json"
    top1 = json.loads(report.read_text())["top1"] if report.is_file() else None
    print(f"stage 1 {bn}: median {statistics.median(rates) if rates else float('nan'):.1f} img/s over the "
          f"logged steps of epochs >= 2; top-1 {top1}")
EOF
echo "summary: $out/summary.txt$( [ $failed = 1 ] && echo " (a step FAILED)")"
exit $failed
