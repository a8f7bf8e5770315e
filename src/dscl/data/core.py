"""Dataset object shared by every reader, the error type, and the long-tailed count profiles."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from dscl.errors import DsclError


class DataError(DsclError, ValueError):
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


# ------------------------------------------------------------------------------------------ decoding
#
# Every image, whatever its file mode, becomes uint8 RGB by fixed rules (no per-image statistics, so
# the same stored value always gives the same pixel):
#   1, L, RGB, CMYK, YCbCr, LAB, HSV, RGBX    PIL's own conversion to RGB (grey -> 3 equal channels)
#   I;16, I;16B, I;16L, I;16N (16-bit)        round(v / 257): the full 16-bit range maps onto 0..255
#   I (32-bit int)                            clipped to 0..65535, then as 16-bit (16-bit PGM/PNG/TIFF open as I)
#   F (32-bit float)                          all finite values in [0, 1]: round(255 v); otherwise
#                                             round(v) clipped to 0..255; NaN -> 0
#   alpha (RGBA, LA, PA, La, RGBa, P or L/RGB with a transparency entry)
#                                             composited over black: round(c * a / 255)
#   EXIF orientation (tags 2-8)               applied (ImageOps.exif_transpose); an unreadable EXIF
#                                             block is ignored (the pixels themselves are fine)
#   several frames (GIF, TIFF, APNG)          the first frame
# Why not per-image min/max for 16-bit data: stretching every image to its own range changes the
# intensity of the same tissue/object between images and turns a flat image into noise.
# Why black under alpha: it equals premultiplied alpha, and fully transparent pixels are stored as
# (0, 0, 0, 0) by most encoders, so most files decode as a plain ``convert("RGB")`` would have.
# 12-bit data stored in 16-bit files (some cameras, medical scans) therefore looks dark: rescale such
# files once, offline, if that matters.

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
# Every mode decode_image handles; a file in another mode is reported by the header check.
DECODABLE_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "I", "F"}) | (
    SIXTEEN_BIT_MODES | ALPHA_MODES
)
_ORIENTATION_TAG = 0x0112


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (the same object when there is nothing to do)."""
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block says nothing about the pixels
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    return ImageOps.exif_transpose(img)


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    """The rules above, on an opened image: (H, W, 3) uint8."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = _upright(img)
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if mode == "I":
            values = np.clip(values, 0, 65535)
        # (v + 128) // 257 == round(v / 257) for integers (v / 257 is never exactly x.5)
        grey = ((values + 128) // 257).astype(np.uint8)
    elif mode == "F":
        floats = np.asarray(img, dtype=np.float64)
        finite = floats[np.isfinite(floats)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            floats = floats * 255.0
        grey = np.clip(np.rint(np.nan_to_num(floats, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.uint8)
    elif mode in ALPHA_MODES or "transparency" in img.info:  # P / L / RGB with a transparent entry
        rgba = np.asarray((img.convert("LA") if mode == "La" else img).convert("RGBA"), dtype=np.uint16)
        alpha = rgba[..., 3:]
        return ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8)
    else:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def decode_image(source: str | os.PathLike[str] | Image.Image) -> torch.Tensor:
    """Decode an image, exactly as training sees it, to a uint8 ``(3, H, W)`` tensor.

    The one decoder of the package: ``LTDataset.load``, ``dscl data --check`` and inference all use
    it. Every mode PIL opens is mapped to 8-bit RGB by fixed rules (16-bit as ``round(v / 257)``,
    float in [0, 1] times 255, alpha composited over black, EXIF orientation applied, first frame of
    multi-frame files; the comment above this function lists them all). Greyscale images come out as
    three equal channels.

    Args:
        source: a file path, or an already opened PIL image (not closed; its frame may be reset to 0).

    Returns:
        uint8 tensor (3, H, W), H x W after the EXIF rotation.

    Raises:
        DataError: the file does not exist, or cannot be opened or decoded (names the file).
    """
    if isinstance(source, Image.Image):
        array = _to_uint8_rgb(source)
    else:
        path = os.fspath(source)
        try:
            with Image.open(path) as img:
                array = _to_uint8_rgb(img)
        except FileNotFoundError as exc:
            raise DataError(
                f"image file {path} does not exist; check the data root / list file, or run "
                "`dscl data --check` (same --preset/--data-root/overrides) to list every missing file"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error ...
            raise DataError(
                f"cannot read image file {path}: {exc}; replace or remove the file "
                "(`dscl data --check` decodes every file and lists the unreadable ones)"
            ) from exc
    # PIL hands out read-only buffers: copy only then (torch tensors must be writable)
    return torch.from_numpy(np.require(array, np.uint8, ["C", "W"])).permute(2, 0, 1).contiguous()


def read_image_file(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode the image file ``path`` to a uint8 (3, H, W) tensor (``decode_image`` of a path)."""
    return decode_image(path)


class LTDataset(Dataset):
    """A (long-tailed) labelled image set: ``dataset[i] -> (transform(image) or image, label)``.

    Images are either held in memory as one uint8 array (Fashion-MNIST ``(N, H, W)``, CIFAR
    ``(N, 3, H, W)``) or read from files on every ``load`` with :func:`decode_image` (every PIL mode,
    EXIF orientation). ``load(i)`` always returns a ``torch.uint8`` tensor of shape ``(3, H, W)``;
    greyscale images are replicated to 3 equal channels so that every backbone and transform sees RGB.
    File datasets read from a list file may carry ``where=`` (the list file and line of each path) so
    that every error about a file also names the line that lists it.

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
        where: Sequence[str] | None = None,
    ) -> None:
        if (images is None) == (paths is None):
            raise ValueError("LTDataset needs exactly one of images= (in memory) or paths= (files)")
        self._images = images
        self._paths = list(paths) if paths is not None else None
        # where each file is listed ("train.txt, line 12"), parallel to paths; None = not from a list
        self._where = list(where) if where is not None else None
        if self._where is not None and len(self._where) != len(self._paths or []):
            raise ValueError(f"{len(self._where)} list locations for {len(self._paths or [])} paths")
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

    def location(self, i: int) -> str | None:
        """Where sample ``i`` is listed, e.g. ``"lists/train.txt, line 12"`` (None if not from a list file)."""
        if self._where is None:
            return None
        return self._where[int(self._index[i])]

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

    def identities(self) -> list[int] | list[str]:
        """What each sample is, in order: its row in the image storage (in-memory datasets, e.g. the
        index into Fashion-MNIST's 60,000 training images) or its file path. Two splits drawn from the
        same storage overlap exactly where their identities do."""
        if self._paths is None:
            return [int(k) for k in self._index]
        return [self._paths[int(k)] for k in self._index]

    def fingerprint(self) -> str:
        """Short hash of which samples this split holds, in order, with their labels (12 hex chars).

        sha256 over one ``identity<TAB>label`` line per sample, where the identity is the storage
        index (in-memory datasets) or the file path relative to the folder all paths share (file
        datasets, so the hash does not depend on where the data lives). Two runs trained on the same
        long-tailed subset in the same order have the same fingerprint; CIFAR-LT subsets drawn by
        different papers' code do not.
        """
        ids: list[int] | list[str] = self.identities()
        if not self.in_memory and ids:
            paths = [str(p) for p in ids]
            root = os.path.commonpath(paths) if len(set(paths)) > 1 else os.path.dirname(paths[0])
            ids = [Path(os.path.relpath(p, root)).as_posix() for p in paths]
        digest = hashlib.sha256()
        for ident, label in zip(ids, self.targets, strict=True):
            digest.update(f"{ident}\t{label}\n".encode())
        return digest.hexdigest()[:12]

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


__all__ = [
    "DECODABLE_MODES",
    "DataError",
    "LTDataset",
    "decode_image",
    "long_tailed_counts",
    "read_image_file",
    "select_long_tailed",
]
