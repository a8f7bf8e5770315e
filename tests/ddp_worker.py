"""Run under torchrun with 2 gloo processes by tests/test_dist.py; writes what each rank saw.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT SCENARIO...

Scenarios (each one's result, or its traceback, goes under its name in the torch file OUT):
``queue`` (gathered keys and labels, identical weights), ``gather`` (the equal-size gather), ``fp16``
(an inf gradient on rank 0 only under a GradScaler), ``bn`` (pooling BatchNorm statistics),
``official_bn`` (stage 2's official protocol keeps BatchNorm statistics identical; needs
Fashion-MNIST), ``shuffle`` (MoCo's shuffle-BN forward: what each rank computed and got back),
``pretrain_1_epoch=DIR`` (the first epoch of a 2-epoch smoke stage 1 into DIR, for the resume tests),
``slurm`` (started like ``srun python ...`` without torchrun: the torchrun variables dscl derived from
SLURM's, backend, a sum and a gather over the two processes, the processes per node it counts).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as tdist

from dscl import dist

if TYPE_CHECKING:
    from dscl.model import DSCLModel
    from dscl.pretrain import Batch

# The model and training modules are imported by the scenarios that use them: a launch that runs only
# `slurm` starts in half the time.


def _model(queue: int = 64) -> DSCLModel:
    from dscl.backbones import build_backbone
    from dscl.model import DSCLModel, Encoder

    torch.manual_seed(0)  # same initial weights on every rank
    model = DSCLModel(Encoder(build_backbone("convnet"), dim=16), queue_size=queue)
    dist.broadcast_module(model)
    return model


def _batch(n: int = 6) -> Batch:
    from dscl.pretrain import Batch

    labels = torch.randint(0, 4, (n,))
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).repeat(n, 2, 1)
    return Batch(torch.randn(n, 3, 28, 28), torch.randn(n, 3, 28, 28), torch.randn(n, 2, 3, 14, 14), boxes, labels)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _all(x: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.zeros_like(x) for _ in range(dist.world_size())]
    tdist.all_gather(out, x.contiguous())
    return out


def queue_scenario() -> dict:
    from dscl.config import LossConfig
    from dscl.pretrain import pretrain_step

    rank = dist.rank()
    model = _model()
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(100 + rank)  # different data per rank
    first_labels, queue_after_first = None, None
    for step in range(3):
        batch = _batch()
        pretrain_step(model, batch, opt, lr=0.1, m=0.9, loss_cfg=LossConfig())
        if step == 0:
            first_labels = batch.labels
            queue_after_first = model.queue.snapshot()[1].clone()
    return {"params": _all(_flat(model.online.parameters())), "momentum": _all(_flat(model.momentum.parameters())),
            "first_labels": dist.gather_objects(first_labels), "queue_after_first": queue_after_first,
            "queue_len": len(model.queue)}


def gather_scenario() -> dict:
    """Issue #15: the gather without a size exchange (stage 1's equal per-rank batches)."""
    x = torch.randn(5, 3) + dist.rank()
    return {"equal": dist.all_gather_cat(x, equal_sizes=True), "general": dist.all_gather_cat(x)}


def fp16_scenario() -> dict:
    """Issue #11 item 1: an inf gradient on rank 0 only, with a GradScaler on every rank."""
    from dscl.config import LossConfig
    from dscl.pretrain import pretrain_step

    rank = dist.rank()
    model = _model()
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")  # the CUDA scaler's logic, runnable on the CPU
    torch.manual_seed(100 + rank)
    before = _flat(model.online.parameters()).clone()
    hook = None
    if rank == 0:
        hook = model.online.head[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    pretrain_step(model, _batch(), opt, lr=0.1, m=0.9, loss_cfg=LossConfig(), scaler=scaler)
    after_inf = _flat(model.online.parameters())
    if hook is not None:
        hook.remove()
    result = {"skipped": dist.gather_objects(bool(torch.equal(before, after_inf))),
              "finite": dist.gather_objects(bool(torch.isfinite(after_inf).all())),
              "scale": dist.gather_objects(float(scaler.get_scale()))}
    if not all(result["finite"]):  # (the bug) a NaN-weighted rank would fail its next step alone: a hang
        return result
    pretrain_step(model, _batch(), opt, lr=0.1, m=0.9, loss_cfg=LossConfig(), scaler=scaler)
    final = _flat(model.online.parameters())
    result.update(stepped=dist.gather_objects(not torch.equal(after_inf, final)),
                  scale_next=dist.gather_objects(float(scaler.get_scale())), params=_all(final))
    return result


def bn_scenario() -> dict:
    """Pooling BatchNorm running statistics over ranks (identity for non-BN modules)."""
    rank = dist.rank()
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(2))
    g = torch.Generator().manual_seed(rank)
    for bn in (module[1], module[2]):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(10 + rank)
    before = {k: _all(v) for k, v in module.state_dict().items()}
    dist.average_batchnorm_stats(module)
    return {"before": before, "after": {k: _all(v) for k, v in module.state_dict().items()}}


def shuffle_scenario() -> dict:
    """dist.shuffled_forward with a per-sample forward whose output identifies its input image.

    Each rank holds 4 images; image ``g`` (global index, rank-major) is filled with ``g`` plus a fixed
    pattern, so any image, and the key computed from it, says which image it is. Three trials: two
    permutations drawn by rank 0 (seeded), and a fixed cyclic shift by one (``torch.randperm``
    replaced) that is not its own inverse and sends images across ranks. Per trial the result holds
    this rank's images, the images the forward saw on this rank (they reveal the permutation), the
    keys the forward computed from them, the keys returned, and the keys of this rank's own images
    computed without any shuffle (what the returned keys must equal)."""
    rank, b = dist.rank(), 4
    pattern = torch.arange(12, dtype=torch.float32).view(1, 3, 2, 2) / 100
    images = (torch.arange(b, dtype=torch.float32) + rank * b).view(b, 1, 1, 1) + pattern

    trials = []
    for trial in ("seed0", "seed1", "shift"):
        seen: list[torch.Tensor] = []
        computed: list[torch.Tensor] = []
        forward = _recording(seen, computed)
        saved = torch.randperm
        if trial == "shift":
            torch.randperm = lambda n, **kw: torch.roll(torch.arange(n, device=kw.get("device")), 1)
        else:
            torch.manual_seed(int(trial[-1]) + 10 * rank)  # only rank 0's permutation is used
        try:
            keys = dist.shuffled_forward(forward, images)
        finally:
            torch.randperm = saved
        trials.append({"name": trial, "images": images, "seen": torch.cat(seen), "computed": torch.cat(computed),
                       "keys": keys, "expected": key_of(images)})
    return {"trials": dist.gather_objects(trials)}


def _recording(seen: list[torch.Tensor], computed: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`key_of` as the forward, recording its inputs in ``seen`` and its outputs in ``computed``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        computed.append(key_of(x))
        return computed[-1]

    return forward


def key_of(x: torch.Tensor) -> torch.Tensor:
    """A fixed per-sample function (no mixing across the batch): the image's number and a checksum."""
    return torch.stack([x[:, 0, 0, 0].round(), (x.flatten(1) * torch.arange(1.0, 13.0)).sum(1)], 1)


def official_bn_scenario() -> dict:
    """Issue #11 item 5: stage 2's official protocol (update_bn) on two ranks with different shards."""
    from dscl.backbones import build_backbone
    from dscl.classify import train_linear_official
    from dscl.config import load_config
    from dscl.data import build_datasets

    cfg = load_config("smoke", overrides=["classifier.protocol=official", "classifier.epochs=1",
                                          "classifier.select=last", "classifier.update_bn=true"])
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone)
    fc, _, _ = train_linear_official(backbone, splits, cfg, device=torch.device("cpu"), progress=False, val=None)
    buffers = {k: _all(v.float()) for k, v in backbone.state_dict().items() if "running" in k}
    return {"buffers": buffers, "fc": _all(_flat(fc.parameters()))}


def slurm_scenario() -> dict:
    """Launched like ``srun python ...`` (tests/test_dist.py fakes SLURM's variables): what dscl made of them."""
    from dscl.runtime import processes_per_node

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    total = dist.all_reduce_sum(torch.tensor([float(dist.rank() + 1)]))
    return {"env": dist.gather_objects({k: os.environ.get(k) for k in names}),
            "rank_world": dist.gather_objects((dist.rank(), dist.world_size(), tdist.get_backend())),
            "sum": dist.gather_objects(float(total.item())),
            "gathered": dist.all_gather_cat(torch.arange(2) + 10 * dist.rank()),
            "processes_per_node": dist.gather_objects(processes_per_node())}


def pretrain_1_epoch(out: str) -> dict:
    from dscl.config import load_config
    from dscl.pretrain import pretrain

    pretrain(load_config("smoke", overrides=["optim.epochs=2"]), out, max_epochs=1, progress=False)
    return {"done": True}


SCENARIOS: dict[str, Callable[[], dict]] = {
    "queue": queue_scenario, "gather": gather_scenario, "fp16": fp16_scenario, "bn": bn_scenario,
    "official_bn": official_bn_scenario, "shuffle": shuffle_scenario, "slurm": slurm_scenario,
}


def main(out: str, names: list[str]) -> None:
    dist.init("cpu")
    results: dict[str, dict] = {}
    for name in names:
        try:
            if name.startswith("pretrain_1_epoch="):
                results[name] = pretrain_1_epoch(name.split("=", 1)[1])
            else:
                results[name] = SCENARIOS[name]()
        except Exception:  # noqa: BLE001 - reported to the test, which shows it
            results[name] = {"error": f"rank {dist.rank()}: {traceback.format_exc()}"}
        dist.barrier()
    if dist.rank() == 0:
        torch.save(results, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["queue"])
