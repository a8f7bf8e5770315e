"""RandAugment speed: batched on the device vs per image (issue #32).

RandAugment(N=2, M=9) on B images of S x S pixels, img/s (median over ``--repeats`` timed rounds after
warm-up), at 28 px (Fashion-MNIST) and 224 px (ImageNet):

* ``torchvision per image``: ``torchvision.transforms.v2.RandAugment`` called image by image on uint8
  tensors, as a DataLoader worker applies it (one thread: one worker);
* ``dscl per image``: dscl's loader path (:func:`dscl.data.policies.draw_policy` +
  :func:`~dscl.data.policies.apply_policy_one`: torchvision's functional ops on float images), one thread;
* ``dscl batched``: dscl's on-device path (draw + :func:`~dscl.data.policies.apply_policy_batch`) on the
  whole batch, on one thread and on every thread of the machine (and on CUDA when there is one);
* ``kornia batched`` (when kornia is installed): ``kornia.augmentation.auto.RandAugment(n=2, m=9)`` on the
  batch; it draws ONE op sequence per call for the whole batch (the others draw one per image), so it
  does less work than the recipe asks and is listed for reference.

Speed-ups are ratios measured side by side in one run. Writes benchmarks/results/augment_speed.json.

    python benchmarks/augment_speed.py            # about 3 min on 2 cores; run it with nothing else busy
    python benchmarks/augment_speed.py --quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision.transforms.v2 as T

from _results import median_ms, write_results
from dscl.data.policies import Policy, apply_policy_batch, apply_policy_one, draw_policy, policy_uniforms
from view_speed import one_thread

POLICY = Policy("randaugment", 2, 9)
CASES = ((28, 256), (224, 32))  # (side, batch)


def measure(size: int, batch: int, repeats: int, threads: int) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    floats = images.float() / 255
    n_u = policy_uniforms(POLICY)
    widths, on = (size,) * batch, (True,) * batch
    tv = T.RandAugment(num_ops=2, magnitude=9)

    def torchvision_per_image() -> None:
        for img in images:
            tv(img)

    def dscl_per_image() -> None:
        for img in floats:
            u = torch.rand(1, n_u, dtype=torch.float64).numpy()
            p = draw_policy(u, POLICY, (size,), (True,), (True,))
            apply_policy_one(img[None], p.ops, p.magnitude)

    def batched(x: torch.Tensor) -> None:
        u = torch.rand(batch, n_u, dtype=torch.float64, device=x.device)
        p = draw_policy(u, POLICY, widths, on, on)
        apply_policy_batch(x, p.ops, p.magnitude)

    inner_small = 1 if size > 64 else 3
    row: dict = {"size": size, "batch": batch}
    row["torchvision_per_image"] = batch * 1000 / one_thread(lambda: median_ms(torchvision_per_image, repeats,
                                                                              inner_small))
    row["dscl_per_image"] = batch * 1000 / one_thread(lambda: median_ms(dscl_per_image, repeats, inner_small))
    row["dscl_batched_1_thread"] = batch * 1000 / one_thread(lambda: median_ms(lambda: batched(floats), repeats,
                                                                              inner_small))
    torch.set_num_threads(threads)
    row["dscl_batched_all_threads"] = batch * 1000 / median_ms(lambda: batched(floats), repeats, inner_small)
    if torch.cuda.is_available():
        on_gpu = floats.cuda()
        row["dscl_batched_cuda"] = batch * 1000 / median_ms(lambda: batched(on_gpu), repeats, 10,
                                                            torch.cuda.synchronize)
    try:
        from kornia.augmentation.auto import RandAugment as KorniaRandAugment
    except ImportError:
        row["kornia_batched_all_threads"] = None
    else:
        kornia_ra = KorniaRandAugment(n=2, m=9)
        row["kornia_batched_all_threads"] = batch * 1000 / median_ms(lambda: kornia_ra(floats), repeats,
                                                                     inner_small)
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "augment_speed.json"),
                        help="results file ('' to skip writing)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    repeats = 3 if args.quick else 7
    rows = [measure(size, batch, repeats, threads) for size, batch in CASES]
    print(f"RandAugment(2, 9), img/s (median of {repeats}); per-image rows on 1 thread, 'all' = {threads} threads")
    cols = ["torchvision_per_image", "dscl_per_image", "dscl_batched_1_thread", "dscl_batched_all_threads",
            "dscl_batched_cuda", "kornia_batched_all_threads"]
    print(f"{'px':>4} {'batch':>5} " + " ".join(f"{c:>26}" for c in cols))
    for r in rows:
        print(f"{r['size']:>4} {r['batch']:>5} " + " ".join(f"{r.get(c) if r.get(c) is not None else '-':>26}"
                                                          for c in cols))
        base = r["torchvision_per_image"]
        print(f"      batched / torchvision per image: {r['dscl_batched_1_thread'] / base:.2f}x on 1 thread, "
              f"{r['dscl_batched_all_threads'] / base:.2f}x on {threads} threads")
    from dscl.runtime import cpu_model

    machine = {"cpu_model": cpu_model(), "torch_threads": threads, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if not args.out:
        return {"results": rows, "machine": machine}
    return write_results(args.out, "augment_speed", argv, statistic="median img/s", results=rows, machine=machine)


if __name__ == "__main__":
    main()
