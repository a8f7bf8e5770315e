"""Versioned, atomic checkpoints of unwrapped modules, optimiser, scaler, queue and RNG states."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from an incompatible run."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    An interrupted save (Ctrl-C, a full disk) leaves the previous checkpoint untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"version": CHECKPOINT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, checking its version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc}); it may be truncated") from exc
    if not isinstance(state, dict) or "version" not in state:
        raise CheckpointError(f"{path} is not a dscl checkpoint (no 'version' key)")
    if state["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state['version']}, newer than this dscl "
            f"({CHECKPOINT_VERSION}); upgrade dscl"
        )
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU and *its own* CUDA device.

    Only the current device's CUDA state is saved (a rank drives one GPU): saving every visible
    GPU's state made a resume with fewer GPUs, or a narrower ``CUDA_VISIBLE_DEVICES``, fail. A
    process that never used CUDA saves none (and does not initialise CUDA to ask).
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
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
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    if isinstance(cuda, (list, tuple)):
        index = torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def derived_seed(seed: int, rank: int, epoch: int | None = None, *, stream: int | None = None) -> int:
    """A seed for a rank that has no saved RNG state (a resume with more processes than saved), or for
    a separate random stream (``stream``: e.g. the batched views' generator) of rank ``rank``.

    Distinct for every (seed, rank, stream, epoch), and never rank 0's continuing stream, so no two ranks
    draw the same augmentations; reproducible for the same resume.
    """
    words = [seed % 2**63, rank, *([stream] if stream is not None else []), *([epoch] if epoch is not None else [])]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
