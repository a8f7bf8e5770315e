"""Milliseconds per sample of the DSCL multi-view transform on one CPU thread (as in a DataLoader worker).

For context it also times the same recipe written as a chain of torchvision.transforms.v2 ops, per
view, on uint8 tensors and on PIL images (what the official code does), with the same sizes.

    python benchmarks/view_speed.py            # prints a table, writes benchmarks/results/view_speed.json
    python benchmarks/view_speed.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from dscl.config import ViewConfig
from dscl.data import DSCLTransform

CASES = [  # (global view px, patches L, patch px, source image (H, W))
    (28, 3, 14, (28, 28)),
    (32, 3, 16, (32, 32)),
    (224, 5, 64, (375, 500)),
]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_chain(size: int, num_patches: int, patch: int, blur: bool):
    """The A.2 recipe as per-view torchvision v2 transforms (reference only)."""
    strong = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
    if blur:
        strong.append(T.RandomApply([T.GaussianBlur(2 * (size // 20) + 1, (0.1, 2.0))], p=0.5))
    tail = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)]
    query_tf = T.Compose(strong + tail)
    patch_tf = T.Compose([T.RandomHorizontalFlip()] + strong + tail)
    key_tf = T.Compose([T.ColorJitter(0.4, 0.4, 0.4, 0.0), T.RandomHorizontalFlip()] + tail)
    rrc = T.RandomResizedCrop(size, antialias=True)
    small = T.RandomResizedCrop(patch, scale=(0.05, 0.6), antialias=True)

    def run(image):
        query, key = rrc(image), rrc(image)
        if torch.rand(()) < 0.5:
            query = TF.horizontal_flip(query)
        patches = [patch_tf(small(query)) for _ in range(num_patches)]
        return query_tf(query), key_tf(key), patches

    return run


def time_ms(fn, image, repeats: int, inner: int) -> float:
    for _ in range(3):
        fn(image)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn(image)
        samples.append((time.perf_counter() - start) * 1000 / inner)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "view_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    repeats = 5 if args.quick else 15
    rows = []
    for size, num_patches, patch, (h, w) in CASES:
        views = ViewConfig(num_patches=num_patches, patch_size=patch, blur=size >= 64)
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        inner = 200 if size <= 64 else 10
        ours = time_ms(DSCLTransform(size, views, MEAN, STD), image, repeats, inner)
        chain = torchvision_chain(size, num_patches, patch, views.blur)
        tv_tensor = time_ms(chain, image, max(3, repeats // 3), max(1, inner // 4))
        tv_pil = time_ms(chain, TF.to_pil_image(image), max(3, repeats // 3), max(1, inner // 4))
        rows.append({"image_size": size, "num_patches": num_patches, "patch_size": patch, "source": [h, w],
                     "dscl_ms": round(ours, 3), "torchvision_tensor_ms": round(tv_tensor, 3),
                     "torchvision_pil_ms": round(tv_pil, 3)})
    header = (f"{'view px':>7} {'L':>2} {'patch':>5} {'source':>9} | {'DSCLTransform':>13} | "
              f"{'tv2 tensor':>10} {'tv2 PIL':>8}")
    print("ms per sample, 1 thread, median of repeats")
    print(header)
    print("-" * len(header))
    for r in rows:
        src = f"{r['source'][0]}x{r['source'][1]}"
        print(f"{r['image_size']:>7} {r['num_patches']:>2} {r['patch_size']:>5} {src:>9} | {r['dscl_ms']:>13.3f} | "
              f"{r['torchvision_tensor_ms']:>10.3f} {r['torchvision_pil_ms']:>8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": 1, "statistic": "median ms per sample"}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
