"""Random streams: seeding, and saving / restoring every RNG a process draws from."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device's) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(seed: int, rank: int, epoch: int | None = None, *, stream: int | None = None) -> int:
    """A seed for a rank that has no saved RNG state (a resume with more processes than saved), or for
    a separate random stream (``stream``: e.g. the batched views' generator) of rank ``rank``.

    Distinct for every (seed, rank, stream, epoch), and never rank 0's continuing stream, so no two ranks
    draw the same augmentations; reproducible for the same resume.
    """
    words = [seed % 2**63, rank, *([stream] if stream is not None else []), *([epoch] if epoch is not None else [])]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _numpy_state() -> dict[str, Any]:
    """numpy's global generator as plain data: checkpoints are read with ``torch.load(weights_only=True)``,
    which refuses the uint32 array of ``np.random.get_state()``; 624 ints and the cached gaussian are exact."""
    s = np.random.get_state(legacy=False)
    return {"bit_generator": str(s["bit_generator"]),
            "state": {"key": [int(k) for k in s["state"]["key"]], "pos": int(s["state"]["pos"])},
            "has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}


def _set_numpy_state(state: Any) -> None:
    """Restore :func:`_numpy_state`, or the legacy tuple ``('MT19937', uint32 array, pos, has_gauss, gauss)``
    that checkpoints written before it hold."""
    if isinstance(state, Mapping):
        inner = state["state"]
        state = {**state, "state": {"key": np.asarray(inner["key"], dtype=np.uint32), "pos": int(inner["pos"])}}
    np.random.set_state(state)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU and *its own* CUDA device, as tensors
    and plain containers (a checkpoint holding them loads with ``weights_only=True``).

    Only the current device's CUDA state is saved (a rank drives one GPU): saving every visible
    GPU's state made a resume with fewer GPUs, or a narrower ``CUDA_VISIBLE_DEVICES``, fail. A
    process that never used CUDA saves none (and does not initialise CUDA to ask).
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (CUDA: onto the current device, whatever its index).

    Checkpoints written before one-device states held a list of every visible GPU's state; the
    entry of the current device is used when it exists, else the CUDA RNG is left as it is.
    """
    random.setstate(state["python"])
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    if isinstance(cuda, (list, tuple)):
        index = torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
