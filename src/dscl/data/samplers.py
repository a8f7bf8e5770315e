"""Class-balanced sampling for the stage-2 classifier (METHOD.md B), DDP-aware."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class ClassBalancedSampler(Sampler[int]):
    """Each draw picks a class uniformly (among classes with >= 1 image), then an image of it uniformly.

    Args:
        targets: label of every dataset index.
        num_samples: draws per epoch over all ranks (default ``len(targets)``); rounded up to a multiple
            of ``world_size`` so that every rank gets the same count.
        seed: the draws of epoch ``e`` come from ``np.random.default_rng([seed, e])``; call
            ``set_epoch(e)`` every epoch (as with DistributedSampler).
        rank, world_size: rank ``r`` yields draws ``r, r + world_size, ...`` of the epoch, so the ranks'
            shares are disjoint and together cover the epoch.
    """

    def __init__(
        self,
        targets: Sequence[int] | np.ndarray | torch.Tensor,
        num_samples: int | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels = np.asarray(targets.tolist() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("ClassBalancedSampler needs a non-empty 1-D list of targets")
        if labels.min() < 0:
            raise ValueError("targets must be non-negative class indices")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        total = len(labels) if num_samples is None else int(num_samples)
        if total < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels)
        self._classes = np.flatnonzero(counts)  # classes that can be drawn
        self._counts = counts[self._classes]
        self._offsets = np.concatenate([[0], np.cumsum(counts)])[self._classes]
        self._order = order  # dataset indices grouped by class
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_samples_per_rank = -(-total // self.world_size)
        self.total_size = self.num_samples_per_rank * self.world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_draws(self) -> np.ndarray:
        """All ``total_size`` dataset indices of the current epoch (before the split over ranks)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        cls = rng.integers(0, len(self._classes), size=self.total_size)
        within = np.minimum((rng.random(self.total_size) * self._counts[cls]).astype(np.int64), self._counts[cls] - 1)
        return self._order[self._offsets[cls] + within]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_draws()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples_per_rank
