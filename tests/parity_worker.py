"""Run under torchrun with 2 gloo processes by tests/test_parity.py: dscl's stage-1 steps on two ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parity_worker.py SPEC OUT

SPEC (torch file written by the test): config overrides, class count, the global batches, one
shuffle-BN permutation per step, lr, m, loss and SGD settings. Every rank builds the official-profile
model from the same seed (then takes rank 0's tensors to be safe), trains on its half of each global
batch (rank r: rows r*b..(r+1)*b-1) with ``dscl.pretrain.pretrain_step``, and ``torch.randperm`` is
replaced during each step by the permutation the test chose, so the test's reference can use the
same shuffle. Rank 0 writes OUT: the initial model state and, per rank, the final state (parameters,
that rank's BatchNorm buffers, queue), the per-step losses and the number of randperm calls.
"""

import sys

import torch

from dscl import dist
from dscl.config import LossConfig, load_config
from dscl.model import build_model
from dscl.pretrain import Batch, pretrain_step


def main(spec_path: str, out_path: str) -> None:
    dist.init("cpu")
    spec = torch.load(spec_path, weights_only=False)
    rank, world = dist.rank(), dist.world_size()
    cfg = load_config("smoke", overrides=spec["overrides"], profile="official")
    torch.manual_seed(0)  # the same initial weights and random queue on every rank
    model = build_model(cfg, spec["classes"])
    dist.broadcast_module(model)
    model.train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    momentum, weight_decay = spec["sgd"]
    opt = torch.optim.SGD(model.online.parameters(), lr=0.0, momentum=momentum, weight_decay=weight_decay)
    loss_cfg = LossConfig(**spec["loss_cfg"])

    losses, calls = [], 0
    original = torch.randperm
    for data, perm in zip(spec["batches"], spec["perms"], strict=True):
        b = data["query"].shape[0] // world
        batch = Batch(**{k: v[rank * b : (rank + 1) * b] for k, v in data.items()})

        def fixed_randperm(n, *args, perm=perm, **kwargs):
            nonlocal calls
            if n != perm.numel():
                raise AssertionError(f"randperm({n}) but the test's permutation has {perm.numel()} entries")
            calls += 1
            return perm.clone().to(kwargs.get("device") or "cpu")

        torch.randperm = fixed_randperm
        try:
            parts = pretrain_step(model, batch, opt, lr=spec["lr"], m=spec["m"], loss_cfg=loss_cfg,
                                  num_classes=spec["classes"])
        finally:
            torch.randperm = original
        losses.append({k: float(v) for k, v in parts.items()})

    state = {k: v.clone() for k, v in model.state_dict().items()}
    ranks = dist.gather_objects({"state": state, "losses": losses, "randperm_calls": calls})
    if dist.is_main():
        torch.save({"initial": initial, "ranks": ranks}, out_path)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
