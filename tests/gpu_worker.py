"""Run by tests/test_gpu.py under ``torchrun --nproc_per_node 1`` on a GPU: the nccl code path.

With one process ``dscl.dist`` is an identity, so this worker joins a 1-process nccl group itself and
switches the collectives on (``dist.is_dist``), then runs fp16 stage-1 steps (one with an inf
gradient), the equal-size gather and the BatchNorm pooling on CUDA tensors. Writes a JSON summary.
"""

import json
import os
import sys

import torch
import torch.distributed as tdist

from dscl import dist
from dscl.backbones import build_backbone
from dscl.config import LossConfig
from dscl.model import DSCLModel, Encoder
from dscl.pretrain import Batch, pretrain_step


def main(out: str) -> None:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dev = torch.device("cuda", torch.cuda.current_device())
    tdist.init_process_group(backend="nccl")
    dist.is_dist = lambda: True  # the real collectives, on a group of one
    torch.manual_seed(0)
    model = DSCLModel(Encoder(build_backbone("convnet"), dim=16), queue_size=64).to(dev)
    model.to(memory_format=torch.channels_last)
    dist.broadcast_module(model)
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    skipped = False
    for step in range(3):
        labels = torch.randint(0, 4, (16,), device=dev)
        boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]], device=dev).repeat(16, 2, 1)
        batch = Batch(torch.randn(16, 3, 28, 28, device=dev), torch.randn(16, 3, 28, 28, device=dev),
                      torch.randn(16, 2, 3, 14, 14, device=dev), boxes, labels)
        hook = None
        if step == 1:
            hook = model.online.head[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
            before = [p.detach().clone() for p in model.online.parameters()]
        pretrain_step(model, batch, opt, lr=0.1, m=0.99, loss_cfg=LossConfig(), scaler=scaler, dtype=torch.float16)
        if hook is not None:
            hook.remove()
            skipped = all(torch.equal(a, p) for a, p in zip(before, model.online.parameters(), strict=True))
    x = torch.randn(5, 3, device=dev)
    dist.average_batchnorm_stats(model)
    result = {
        "backend": tdist.get_backend(),
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "queue": len(model.queue),
        "gather_equal": bool(torch.equal(dist.all_gather_cat(x, equal_sizes=True), dist.all_gather_cat(x))),
        "skipped_inf_step": skipped,
    }
    with open(out, "w") as fh:
        json.dump(result, fh)
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
