"""Everything that touches ``torch.distributed``.

Every function is an identity (or the obvious single-process answer) when no process group exists,
so the training loop has one code path for a CPU, one GPU, or many processes under ``torchrun``.
Collectives carry no gradient: they are used for momentum keys, labels and metrics only.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as tdist
from torch import nn


def is_dist() -> bool:
    """True when a process group is initialised and has more than one process."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``--device`` rule of every command: ``auto`` = ``cuda`` when torch sees a GPU, else ``cpu``;
    any other name (``cpu``, ``cuda``, ``cuda:1``, ...) or a ``torch.device`` as given.

    Raises:
        RuntimeError: a CUDA device was asked for but torch sees no CUDA GPU.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu")
    return dev


def init(device: str = "auto") -> torch.device:
    """Pick the device (:func:`resolve_device`) and, under torchrun (WORLD_SIZE > 1), join the process group.

    Backend: nccl when each process drives a GPU, gloo on the CPU. ``LOCAL_RANK`` chooses the GPU.
    Multi-node runs use torchrun's own rendezvous flags (``--nnodes``, ``--node_rank``,
    ``--rdzv_endpoint``); nothing here needs to know about them.
    """
    dev = resolve_device(device)
    if launched_by_torchrun() and not tdist.is_initialized():
        if dev.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    elif dev.type == "cuda" and dev.index is not None and not launched_by_torchrun():
        # --device cuda:N: make GPU N the current device, so that pinned memory, the CUDA RNG state saved
        # and restored with checkpoints, and any tensor made with device="cuda" belong to it, not GPU 0
        torch.cuda.set_device(dev.index)
    return dev


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        tdist.barrier()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor, *, equal_sizes: bool = False) -> torch.Tensor:
    """Concatenate ``x`` (N_r, ...) from every rank along dim 0, rank order; N_r may differ.

    ``equal_sizes=True`` is the caller's promise that every rank passes the same shape (stage 1's
    fixed per-rank batch): one collective and no read-back of the sizes, so a GPU step never waits
    for the host. A broken promise is a backend error or a hang, so only pass it when it holds.
    """
    if not is_dist():
        return x
    if equal_sizes:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    tdist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in counts]
    tdist.all_gather(out, padded.contiguous())
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)])


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned)."""
    if is_dist():
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (in place and returned)."""
    if is_dist():
        tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return x


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce (identity in a single process).

    We reduce by hand instead of wrapping the encoder in DistributedDataParallel because one step
    runs the online encoder twice (global view and patches) before a single backward.
    """
    if not is_dist():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module) -> None:
    """Give every rank the pooled BatchNorm running statistics of all ranks (identity in one process).

    Ranks that normalise with statistics of their own shard of the data drift apart, and features
    computed on different ranks are then normalised differently. Pooling (rather than broadcasting
    rank 0's) keeps every rank's images in the estimate: running_mean becomes the mean over ranks and
    running_var the variance of the equal-weight mixture, mean_r(var_r + mean_r^2) - mean^2 (reduced
    in float64: the difference cancels digits). num_batches_tracked becomes the maximum.
    """
    if not is_dist():
        return
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None and m.running_var is not None]
    if not bns:
        return
    means = torch.cat([m.running_mean.double() for m in bns])  # type: ignore[union-attr]
    second = torch.cat([m.running_var.double() for m in bns]) + means * means  # type: ignore[union-attr]
    flat = torch.cat([means, second])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= world_size()
    mean, second = flat[: means.numel()], flat[means.numel():]
    var = (second - mean * mean).clamp_min(0.0)
    offset = 0
    for m in bns:
        n = m.running_mean.numel()  # type: ignore[union-attr]
        m.running_mean.copy_(mean[offset : offset + n])  # type: ignore[union-attr]
        m.running_var.copy_(var[offset : offset + n])  # type: ignore[union-attr]
        offset += n
    counts = torch.stack([m.num_batches_tracked for m in bns if m.num_batches_tracked is not None])
    if counts.numel():
        tdist.all_reduce(counts, op=tdist.ReduceOp.MAX)
        for m, c in zip((m for m in bns if m.num_batches_tracked is not None), counts, strict=True):
            m.num_batches_tracked.copy_(c)  # type: ignore[union-attr]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank hold rank ``src``'s parameters and buffers."""
    if not is_dist():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, src=src)


@torch.no_grad()
def shuffled_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """MoCo's shuffle-BN: run ``fn`` on a random cross-rank permutation of the global batch.

    BatchNorm statistics of the momentum encoder then come from a different subset of images than
    the query encoder's, which stops the model from cheating through BN. With one process this is
    a plain ``fn(x)`` (no shuffle is possible or needed). Assumes equal per-rank batches.
    """
    if not is_dist():
        return fn(x)
    b = x.shape[0]
    full = all_gather_cat(x, equal_sizes=True)
    perm = torch.randperm(full.shape[0], device=x.device)
    tdist.broadcast(perm, src=0)
    r = rank()
    mine = perm[r * b : (r + 1) * b]
    out_local = fn(full[mine])
    out_full = all_gather_cat(out_local, equal_sizes=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return out_full[inverse[r * b : (r + 1) * b]]


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if not is_dist():
        return [obj]
    out: list[object] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
