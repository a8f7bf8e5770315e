"""Samples/s of the DSCL view pipeline: per sample (DataLoader-worker style) vs batched on the device.

For each case (global view size, patches, source image size, batch) it measures:

* ``per-sample``: :class:`dscl.data.DSCLTransform` on one image at a time, one torch thread, as a
  DataLoader worker runs it (``views.augment_on=loader``). Several workers multiply this figure,
  and they run beside the training step, not in it.
* ``canvas``: file datasets only: the loader-side work of the batched path (decoded image -> uint8
  working canvas, :class:`CanvasTransform`), one thread, per sample.
* ``batched cpu``: :class:`BatchedDSCLTransform` on a whole uint8 batch with torch's default threads
  (``views.augment_on=device`` on a CPU: it runs in the training process, between steps).
* ``batched cuda``: the same on the GPU when there is one (timed with ``torch.cuda.synchronize``).
* for context, the recipe as a chain of torchvision.transforms.v2 ops per view on uint8 tensors and
  on PIL images (what the official code does), one thread.

Every figure is the median over ``--repeats`` timed rounds after warm-up. On a shared machine take
the ratios, not the absolute numbers.

    python benchmarks/view_speed.py            # prints a table, writes benchmarks/results/view_speed.json
    python benchmarks/view_speed.py --quick    # fewer repeats, no torchvision columns
"""

from __future__ import annotations

# ruff: noqa: E402  (the OpenMP settings below must be in place before torch is imported)
from dscl.threads import set_openmp_defaults

set_openmp_defaults()  # as `dscl` runs: capped OpenMP spinning (DSCL_OPENMP_DEFAULTS=0: OpenMP's own)

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from _results import median_ms, write_results
from dscl.config import ViewConfig
from dscl.data import DSCLTransform
from dscl.data.batched_views import BatchedDSCLTransform, Canvas, CanvasTransform, working_size

CASES = [  # (global view px, patches L, patch px, source image (H, W), batch, in-memory dataset)
    (28, 3, 14, (28, 28), 128, True),  # fmnist-lt preset
    (32, 3, 16, (32, 32), 256, True),  # cifar-lt presets
    (64, 4, 24, (64, 64), 128, True),
    (224, 5, 64, (375, 500), 32, False),  # imagenet-lt settings (files)
]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_chain(size: int, num_patches: int, patch: int, blur: bool) -> Callable:
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


def one_thread(fn: Callable[[], float]) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def measure_case(size: int, num_patches: int, patch: int, source: tuple[int, int], batch: int, in_memory: bool,
                 *, repeats: int, torchvision: bool) -> dict:
    """One row of the table: ms per sample of every pipeline for this case."""
    h, w = source
    views = ViewConfig(num_patches=num_patches, patch_size=patch, blur=size >= 64)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    small = size <= 64
    per_sample = DSCLTransform(size, views, MEAN, STD)
    row: dict = {"image_size": size, "num_patches": num_patches, "patch_size": patch, "source": [h, w], "batch": batch}
    row["per_sample_ms"] = one_thread(lambda: median_ms(lambda: per_sample(image), repeats, 100 if small else 5))
    side = working_size(size, views, in_memory)
    canvas_tf = CanvasTransform(side)
    row["canvas_ms"] = one_thread(lambda: median_ms(lambda: canvas_tf(image), repeats, 20)) if side is not None else 0.0
    one = canvas_tf(image)
    canvas = Canvas(one.image.expand(batch, -1, -1, -1).contiguous(), one.size.expand(batch, -1).contiguous())
    batched = BatchedDSCLTransform(size, views, MEAN, STD)
    row["batched_cpu_ms"] = median_ms(lambda: batched(canvas), repeats, 3 if small else 1) / batch
    row["batched_cpu_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        on_gpu = BatchedDSCLTransform(size, views, MEAN, STD, device="cuda")
        gpu_canvas = Canvas(canvas.image.cuda(), canvas.size.cuda())
        row["batched_cuda_ms"] = median_ms(lambda: on_gpu(gpu_canvas), repeats, 10, torch.cuda.synchronize) / batch
    if torchvision:
        chain = torchvision_chain(size, num_patches, patch, views.blur)
        row["torchvision_tensor_ms"] = one_thread(lambda: median_ms(lambda: chain(image), 3, 20 if small else 2))
        pil = TF.to_pil_image(image)
        row["torchvision_pil_ms"] = one_thread(lambda: median_ms(lambda: chain(pil), 3, 20 if small else 2))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no torchvision columns")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "view_speed.json"),
                        help="results file ('' to skip writing)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    cuda = torch.cuda.is_available()
    rows = [measure_case(*case, repeats=repeats, torchvision=not args.quick) for case in CASES]

    header = (f"{'view':>4} {'L':>2} {'patch':>5} {'source':>8} {'batch':>5} | {'per-sample':>10} {'canvas':>7} "
              f"{'batched cpu':>11} {'batched cuda':>12} | {'x cpu':>6} | {'tv2 tensor':>10} {'tv2 PIL':>8}")
    print("ms per sample (median); per-sample, canvas and torchvision on 1 thread; "
          f"batched cpu on {torch.get_num_threads()} threads; x cpu = per-sample / batched cpu")
    print(header)
    print("-" * len(header))
    for r in rows:
        src = f"{r['source'][0]}x{r['source'][1]}"
        cuda_ms = f"{r['batched_cuda_ms']:.4f}" if "batched_cuda_ms" in r else "-"
        tv = (f"{r['torchvision_tensor_ms']:>10.3f} {r['torchvision_pil_ms']:>8.3f}"
              if "torchvision_pil_ms" in r else f"{'-':>10} {'-':>8}")
        print(f"{r['image_size']:>4} {r['num_patches']:>2} {r['patch_size']:>5} {src:>8} {r['batch']:>5} | "
              f"{r['per_sample_ms']:>10.3f} {r['canvas_ms']:>7.3f} {r['batched_cpu_ms']:>11.4f} {cuda_ms:>12} | "
              f"{r['per_sample_ms'] / r['batched_cpu_ms']:>5.1f}x | {tv}")
    machine = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if not args.out:
        return {"results": rows, "machine": machine}
    return write_results(args.out, "view_speed", argv, statistic="median ms per sample", results=rows,
                         machine=machine)


if __name__ == "__main__":
    main()
