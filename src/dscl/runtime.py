"""Devices, numeric precision, data loaders: the runtime choices every stage shares.

Nothing here knows about DSCL: stage 1 (:mod:`dscl.pretrain`), stage 2 (:mod:`dscl.classify`),
evaluation and inference all pick their device, autocast dtype and DataLoader the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dscl import dist


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("optim.amp=fp16 needs a CUDA device; use bf16 on the CPU")
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def num_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, dist.world_size()) - 1))


def make_loader(dataset: Any, batch: int, *, sampler: Any, workers: int, device: torch.device,
            drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x



def say(msg: str) -> None:
    """A status line on stderr from rank 0 only (tqdm-safe: does not break a progress bar)."""
    if dist.is_main():
        tqdm.write(msg, file=sys.stderr)
