"""Dataset object shared by every reader, the error type, and the long-tailed count profiles."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class DataError(ValueError):
    """Bad or missing data. The message names the file (and line), what is wrong and how to fix it."""


def long_tailed_counts(num_classes: int, n_max: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Images per class of a generated long-tailed split (class 0 is the head).

    ``exp``: ``n_i = int(n_max * (1/IF) ** (i / (C - 1)))`` (LDAM-DRW's IMBALANCECIFAR formula, FIELD.md 1.3);
    ``step``: the first ``C // 2`` classes get ``n_max``, the others ``int(n_max * (1/IF))``.
    (For an odd C the IMBALANCECIFAR code silently drops the last class; here it is a tail class.)

    Raises:
        DataError: IF < 1, n_max < 1, an unknown profile, or a profile that would leave a class empty.
    """
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    if n_max < 1:
        raise DataError(f"n_max (images of the head class) must be >= 1, got {n_max}; set data.n_max >= 1")
    if not imbalance_factor >= 1:
        raise DataError(
            f"imbalance_factor must be >= 1 (IF = n_max / n_min), got {imbalance_factor}; "
            "standard values are 10, 50, 100, 200"
        )
    ratio = 1.0 / float(imbalance_factor)
    if profile == "exp":
        if num_classes == 1:
            counts = [int(n_max)]
        else:
            counts = [int(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    elif profile == "step":
        half = num_classes // 2
        counts = [int(n_max) if i < half else int(n_max * ratio) for i in range(num_classes)]
    else:
        raise DataError(f"unknown long-tail profile {profile!r}; use 'exp' or 'step'")
    if min(counts) < 1:
        raise DataError(
            f"n_max={n_max} with imbalance_factor={imbalance_factor} ({profile}) leaves class "
            f"{counts.index(min(counts))} with no image; raise n_max or lower the imbalance factor"
        )
    return counts


def read_image_file(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) tensor (PIL ``convert('RGB')``: grey becomes 3 equal channels)."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(
            f"image file {path} does not exist; check the data root / list file, or run `dscl data` "
            "to list every missing file"
        ) from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read image file {path}: {exc}; replace or remove the file "
            "(`dscl data` lists every unreadable file)"
        ) from exc
    array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class LTDataset(Dataset):
    """A (long-tailed) labelled image set: ``dataset[i] -> (transform(image) or image, label)``.

    Images are either held in memory as one uint8 array (Fashion-MNIST ``(N, H, W)``, CIFAR
    ``(N, 3, H, W)``) or read from files with PIL on every ``load``. ``load(i)`` always returns a
    ``torch.uint8`` tensor of shape ``(3, H, W)``; greyscale images are replicated to 3 equal channels
    so that every backbone and transform sees RGB.

    ``subset`` and ``with_transform`` return shallow copies that share the image storage.
    """

    def __init__(
        self,
        targets: Sequence[int],
        num_classes: int,
        class_names: Sequence[str],
        *,
        images: np.ndarray | None = None,
        paths: Sequence[str] | None = None,
        index: np.ndarray | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        if (images is None) == (paths is None):
            raise ValueError("LTDataset needs exactly one of images= (in memory) or paths= (files)")
        self._images = images
        self._paths = list(paths) if paths is not None else None
        storage = len(images) if images is not None else len(self._paths or [])
        self._index = np.arange(storage, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        self.targets: list[int] = [int(t) for t in targets]
        if len(self.targets) != len(self._index):
            raise ValueError(f"{len(self.targets)} targets for {len(self._index)} images")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.transform = transform

    @property
    def in_memory(self) -> bool:
        """True for array-backed datasets (nothing to open, nothing to check)."""
        return self._images is not None

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> str | None:
        """File of sample ``i`` (None for in-memory datasets)."""
        if self._paths is None:
            return None
        return self._paths[int(self._index[i])]

    def load(self, i: int) -> torch.Tensor:
        """Sample ``i`` as a uint8 (3, H, W) tensor. Raises DataError naming the file if it cannot be read."""
        if self._images is None:
            return read_image_file(self._paths[int(self._index[i])])  # type: ignore[index]
        array = self._images[int(self._index[i])]
        image = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))
        if image.ndim == 2:
            return image.unsqueeze(0).repeat(3, 1, 1)
        return image

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.load(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]

    def with_transform(self, transform: Callable[[torch.Tensor], Any] | None) -> LTDataset:
        """Shallow copy with another transform (the image storage is shared)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def subset(self, indices: Sequence[int] | np.ndarray) -> LTDataset:
        """Shallow copy holding samples ``indices`` (in that order) of this dataset."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"subset indices must be in [0, {len(self)})")
        other = copy.copy(self)
        other._index = self._index[idx]
        other.targets = [self.targets[int(k)] for k in idx]
        return other

    def class_counts(self) -> list[int]:
        """Number of samples of each class, in class order."""
        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=self.num_classes)
        return [int(c) for c in counts]

    def __repr__(self) -> str:
        kind = "in-memory" if self.in_memory else "files"
        return f"LTDataset({len(self)} images, {self.num_classes} classes, {kind})"


def select_long_tailed(targets: np.ndarray, counts: Sequence[int], seed: int, source: str) -> np.ndarray:
    """Indices of the long-tailed subset, exactly as IMBALANCECIFAR (LDAM-DRW) picks them.

    ``np.random.seed(seed)`` once, then for each class in label order: ``idx = np.where(targets == c)[0]``,
    ``np.random.shuffle(idx)``, keep ``idx[:n_c]``. A private ``RandomState`` gives the same stream
    without touching numpy's global state.
    """
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n_c in enumerate(counts):
        idx = np.where(targets == c)[0]
        if len(idx) < n_c:
            raise DataError(
                f"{source}: class {c} has {len(idx)} images but the long-tailed profile asks for {n_c}; "
                "lower data.n_max"
            )
        rng.shuffle(idx)
        chosen.append(idx[:n_c])
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


__all__ = ["DataError", "LTDataset", "long_tailed_counts", "read_image_file", "select_long_tailed"]
