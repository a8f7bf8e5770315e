"""Run under torchrun with 2 gloo processes by tests/test_dist.py; writes what each rank saw."""

import sys

import torch
import torch.distributed as tdist

from dscl import dist
from dscl.backbones import build_backbone
from dscl.config import LossConfig
from dscl.model import DSCLModel, Encoder
from dscl.pretrain import Batch, pretrain_step


def main(out: str) -> None:
    dist.init("cpu")
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(0)  # same initial weights on every rank
    model = DSCLModel(Encoder(build_backbone("convnet"), dim=16), queue_size=64)
    dist.broadcast_module(model)
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(100 + rank)  # different data per rank
    first_labels = []
    for step in range(3):
        labels = torch.randint(0, 4, (6,))
        boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).repeat(6, 2, 1)
        batch = Batch(torch.randn(6, 3, 28, 28), torch.randn(6, 3, 28, 28), torch.randn(6, 2, 3, 14, 14),
                      boxes, labels)
        pretrain_step(model, batch, opt, lr=0.1, m=0.9, loss_cfg=LossConfig())
        if step == 0:
            first_labels = labels
            queue_after_first = model.queue.snapshot()[1].clone()
    flat = torch.cat([p.detach().reshape(-1) for p in model.online.parameters()])
    flat_m = torch.cat([p.detach().reshape(-1) for p in model.momentum.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    tdist.all_gather(gathered, flat)
    gathered_m = [torch.zeros_like(flat_m) for _ in range(world)]
    tdist.all_gather(gathered_m, flat_m)
    all_first = dist.gather_objects(first_labels)
    if rank == 0:
        torch.save({"params": gathered, "momentum": gathered_m, "first_labels": all_first,
                    "queue_after_first": queue_after_first, "queue_len": len(model.queue)}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
