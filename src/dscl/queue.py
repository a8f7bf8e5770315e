"""LabeledQueue: the FIFO memory of momentum-encoder keys and their labels (METHOD.md A.4).

Unlike the official code, the queue starts empty and knows how full it is: :meth:`LabeledQueue.snapshot`
returns only the filled entries, so no random features or labels ever enter the losses and any batch
size works (no ``K % batch == 0`` requirement; enqueues wrap around). :meth:`LabeledQueue.fill_random`
gives the official start instead (``model.queue_init=random``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class LabeledQueue(nn.Module):
    """FIFO of ``(feature, label)`` pairs held in registered buffers.

    Buffers (they follow ``.to(device)`` and are saved in ``state_dict``):
    ``features`` ``(size, dim)`` float32, ``labels`` ``(size,)`` int64 (-1 where never written),
    ``ptr`` (next write row) and ``filled`` (number of valid rows), both 0-dim int64.

    ``ptr``/``filled`` are mirrored in Python ints so that an enqueue never reads a device tensor
    (no host-device sync per training step); the mirrors are refreshed by ``load_state_dict``.
    Note that ``len(queue)`` is the fill level, so an empty queue is falsy.

    Args:
        size: capacity K (METHOD.md A.4: 65536 for ImageNet-LT). 0 gives a queue that stays empty.
        dim: feature dimension D (the embedding dimension, 128).
    """

    features: Tensor
    labels: Tensor
    ptr: Tensor
    filled: Tensor
    rejected: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.size = size
        self.dim = dim
        self.register_buffer("features", torch.zeros(size, dim, dtype=torch.float32))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        # rows with an inf/NaN feature that enqueue kept out (an fp16 overflow of the momentum encoder),
        # counted on the device so that no step waits for the host; not saved in checkpoints
        self.register_buffer("rejected", torch.zeros((), dtype=torch.int64), persistent=False)
        self._ptr = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    @property
    def is_full(self) -> bool:
        """True once ``size`` entries have been written (always true for a size-0 queue)."""
        return self._filled == self.size

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={self._filled}"

    @torch.no_grad()
    def fill_random(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """The official code's start (METHOD.md A.4, C.2 item 1): every row a random unit vector
        (L2-normalised standard Gaussian), every label uniform in ``[0, num_classes)``, the queue full
        and the write pointer at row 0. Until the first ``size`` keys have been enqueued these random
        entries take part in the losses, with random "positives" among them.

        Args:
            num_classes: the dataset's class count (the official code hard-codes 1000).
            generator: random source (default: the global torch RNG, so a seeded run is reproducible).
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if self.size == 0:
            return
        feats = torch.randn(self.size, self.dim, generator=generator)
        self.features.copy_(torch.nn.functional.normalize(feats, dim=1))
        self.labels.copy_(torch.randint(0, num_classes, (self.size,), generator=generator))
        self._ptr, self._filled = 0, self.size
        self.ptr.fill_(0)
        self.filled.fill_(self.size)

    @torch.no_grad()
    def enqueue(self, features: Tensor, labels: Tensor) -> None:
        """Write ``N`` rows at ``ptr`` (FIFO, wrapping around), overwriting the oldest entries.

        Equivalent to enqueuing the rows one at a time: for ``N > size`` only the last ``size`` rows
        survive. Features are stored detached, in float32, on the queue's device. A row with a
        non-finite feature (an fp16 overflow in the momentum encoder) is kept out: its slot keeps its
        previous entry (during the first pass over an empty queue: a zero row labelled -1, which matches
        no class) and :attr:`rejected` counts it, without a host-device sync. One NaN key in the queue
        would otherwise make every later loss NaN until the queue wrapped.

        Args:
            features: ``(N, dim)`` keys (normally L2-normalised momentum-encoder outputs).
            labels: ``(N,)`` integer class labels aligned with ``features``.

        Raises:
            ValueError: non-2D features, wrong feature dim, label shape/length mismatch or
                non-integer labels.
        """
        if features.dim() != 2:
            raise ValueError(f"features must be 2-D (N, {self.dim}), got shape {tuple(features.shape)}")
        if features.shape[1] != self.dim:
            raise ValueError(
                f"features must have dim {self.dim} (queue dim), got shape {tuple(features.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"labels must have shape ({features.shape[0]},) to match features "
                f"{tuple(features.shape)}, got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        n_total = features.shape[0]
        if self.size == 0 or n_total == 0:
            return
        n = min(n_total, self.size)
        feats = features[n_total - n:].detach().to(self.features.dtype)
        labs = labels[n_total - n:]
        ok = torch.isfinite(feats).all(dim=1)  # (n,) on the device: no host read
        self.rejected += (~ok).sum()
        # Start where the first surviving row would have been written by row-by-row enqueues.
        start = (self._ptr + n_total - n) % self.size
        first = min(n, self.size - start)
        for dst, src in ((slice(start, start + first), slice(0, first)), (slice(0, n - first), slice(first, n))):
            if src.stop <= src.start:
                continue
            keep = ok[src]
            self.features[dst].copy_(torch.where(keep[:, None], feats[src], self.features[dst]))
            self.labels[dst].copy_(torch.where(keep, labs[src].to(self.labels.dtype), self.labels[dst]))
        self._ptr = (start + n) % self.size
        self._filled = min(self.size, self._filled + n_total)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    def snapshot(self) -> tuple[Tensor, Tensor]:
        """The filled entries: ``(features (filled, dim), labels (filled,))``.

        These are views of the buffers (no copy). Finish the backward pass of any loss computed
        from them before the next :meth:`enqueue`, which writes in place (autograd would report the
        modification); this is the order of METHOD.md A.9 (losses, backward, then enqueue).
        Row order is storage order, not age order; the losses do not depend on it.
        """
        return self.features[: self._filled], self.labels[: self._filled]

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        feats = state_dict.get(prefix + "features")
        if feats is not None and tuple(feats.shape) != (self.size, self.dim):
            raise ValueError(
                f"queue state {prefix}features has shape {tuple(feats.shape)}, but this queue has "
                f"size={self.size}, dim={self.dim}; build the queue with the checkpoint's size and dim"
            )
        labels = state_dict.get(prefix + "labels")
        if labels is not None and tuple(labels.shape) != (self.size,):
            raise ValueError(
                f"queue state {prefix}labels has shape {tuple(labels.shape)}, expected ({self.size},)"
            )
        for name, upper in (("ptr", max(self.size - 1, 0)), ("filled", self.size)):
            value = state_dict.get(prefix + name)
            if value is not None and (value.numel() != 1 or not 0 <= int(value) <= upper):
                raise ValueError(f"queue state {prefix}{name}={value.tolist()} is outside [0, {upper}]")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr = int(self.ptr)
        self._filled = int(self.filled)
