"""``build_datasets``: a ``DataConfig`` in, train / val / test ``LTDataset``s and their statistics out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dscl.config import DataConfig
from dscl.data.core import DataError, LTDataset, long_tailed_counts, select_long_tailed
from dscl.data.readers import (
    FMNIST_CLASSES,
    ListSplit,
    read_cifar,
    read_fmnist,
    read_folder_split,
    read_list,
    resolve_list_file,
)

# Normalisation statistics (per channel, images in [0, 1]). Fashion-MNIST: mean/std of the 60k
# training images, replicated to 3 channels; CIFAR: the usual values of the balanced training sets;
# files (ImageNet-LT, iNat, Places): the ImageNet values every peer uses.
STATS = {
    "fmnist-lt": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
    "cifar10-lt": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100-lt": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "files": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_N_MAX = {"fmnist-lt": 1000, "cifar10-lt": 5000, "cifar100-lt": 500}


@dataclass
class DatasetSplits:
    """Everything a run needs to know about its data. ``val`` is None when there is no validation split."""

    name: str
    train: LTDataset
    val: LTDataset | None
    test: LTDataset
    num_classes: int
    class_names: list[str]
    train_counts: list[int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val_is_carved: bool = False


def build_datasets(cfg: DataConfig, *, seed: int = 0) -> DatasetSplits:
    """Read the dataset described by ``cfg`` (see DataConfig) without opening any image file.

    Args:
        cfg: the data section of the config.
        seed: seeds the class-stratified validation carving (``cfg.val_fraction > 0``); the
            long-tailed subset itself is chosen by ``cfg.subset_seed``.

    Raises:
        DataError: missing or malformed data; the message says where and how to fix it.
    """
    name = cfg.dataset
    if name == "fmnist-lt":
        splits = _build_fmnist(cfg)
    elif name in ("cifar10-lt", "cifar100-lt"):
        splits = _build_cifar(cfg)
    elif name == "split":
        splits = _build_split(cfg)
    elif name == "folder":
        splits = _build_folder(cfg)
    else:
        raise DataError(f"unknown dataset {name!r}; use fmnist-lt, cifar10-lt, cifar100-lt, split or folder")
    if cfg.val_fraction > 0 and splits.val is None:
        splits = carve_validation(splits, cfg.val_fraction, seed)
    return splits


def _generated(cfg: DataConfig, x_train, y_train, x_test, y_test, names, source: str) -> DatasetSplits:
    num_classes = len(names)
    n_max = cfg.n_max if cfg.n_max is not None else DEFAULT_N_MAX[cfg.dataset]
    counts = long_tailed_counts(num_classes, n_max, cfg.imbalance_factor, cfg.profile)
    keep = select_long_tailed(np.asarray(y_train), counts, cfg.subset_seed, source)
    train = LTDataset(y_train[keep], num_classes, names, images=x_train, index=keep)
    test = LTDataset(y_test, num_classes, names, images=x_test)
    mean, std = STATS[cfg.dataset]
    return DatasetSplits(cfg.dataset, train, None, test, num_classes, list(names), counts, mean, std)


def _build_fmnist(cfg: DataConfig) -> DatasetSplits:
    x_train, y_train, x_test, y_test, folder = read_fmnist(cfg.data_root)
    return _generated(cfg, x_train, y_train, x_test, y_test, list(FMNIST_CLASSES), f"Fashion-MNIST ({folder})")


def _build_cifar(cfg: DataConfig) -> DatasetSplits:
    x_train, y_train, x_test, y_test, names, folder = read_cifar(cfg.dataset, cfg.data_root)
    return _generated(cfg, x_train, y_train, x_test, y_test, names, f"{cfg.dataset} ({folder})")


def _image_root(cfg: DataConfig, fallback: Path) -> Path:
    root = cfg.data_root or os.environ.get("DSCL_DATA")
    if root is None:
        return fallback
    if not Path(root).is_dir():
        raise DataError(
            f"data root {root} does not exist or is not a folder; pass the folder the image paths are "
            "relative to as --data-root (data.data_root) or DSCL_DATA"
        )
    return Path(root)


def _check_labels(split: ListSplit, num_classes: int, what: str) -> None:
    for k, label in enumerate(split.labels):
        if not 0 <= label < num_classes:
            raise DataError(
                f"{split.where[k]}: label {label} is outside [0, {num_classes}) "
                f"({num_classes} classes come from the train split); fix the {what} list"
            )


def _build_split(cfg: DataConfig) -> DatasetSplits:
    if not cfg.train_list or not cfg.test_list:
        raise DataError("dataset 'split' needs data.train_list and data.test_list (OLTR txt or BBN json files)")
    train_file = resolve_list_file(cfg.train_list, cfg.list_dir, "train")
    root = _image_root(cfg, train_file.parent)
    train = read_list(train_file, root)
    if min(train.labels) < 0:
        k = int(np.argmin(train.labels))
        raise DataError(f"{train.where[k]}: label {train.labels[k]} is negative; labels must be in [0, C)")
    num_classes = train.num_classes if train.num_classes is not None else max(train.labels) + 1
    _check_labels(train, num_classes, "train")
    counts = np.bincount(train.labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        shown = ", ".join(str(c) for c in empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise DataError(
            f"{train.source}: {len(empty)} of {num_classes} classes have no training image (classes {shown}); "
            "labels must be 0..C-1 with every class present in the train list"
        )
    names = [str(c) for c in range(num_classes)]

    def make(split: ListSplit) -> LTDataset:
        return LTDataset(split.labels, num_classes, names, paths=split.paths)

    others = {}
    for what, name in (("val", cfg.val_list), ("test", cfg.test_list)):
        if name:
            split = read_list(resolve_list_file(name, cfg.list_dir, what), root)
            _check_labels(split, num_classes, what)
            others[what] = make(split)
    mean, std = STATS["files"]
    return DatasetSplits(
        "split", make(train), others.get("val"), others["test"], num_classes, names,
        [int(c) for c in counts], mean, std,
    )


def _build_folder(cfg: DataConfig) -> DatasetSplits:
    root_name = cfg.data_root or os.environ.get("DSCL_DATA")
    if root_name is None or not Path(root_name).is_dir():
        raise DataError(
            f"dataset 'folder' needs data.data_root pointing to a folder with train/<class>/ and "
            f"test/<class>/ image folders; got {root_name!r} which does not exist"
        )
    root = Path(root_name)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"{root / part} is missing; a folder dataset needs {root}/train/<class>/ and "
                            f"{root}/test/<class>/")
    paths, labels, names = read_folder_split(root / "train", None)
    if not names:
        raise DataError(f"{root / 'train'} has no class subfolders; put images under train/<class>/")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    empty = [names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{root / 'train'}: class folders {empty[:10]} contain no image; remove them or add images")
    train = LTDataset(labels, len(names), names, paths=paths)
    splits = {}
    for part in ("val", "test"):
        if (root / part).is_dir():
            p, lab, _ = read_folder_split(root / part, names)
            if not p:
                raise DataError(f"{root / part}: the split is empty (no image files under {root / part}/<class>/)")
            splits[part] = LTDataset(lab, len(names), names, paths=p)
    mean, std = STATS["files"]
    return DatasetSplits(
        "folder", train, splits.get("val"), splits["test"], len(names), names,
        [int(c) for c in counts], mean, std,
    )


def carve_validation(splits: DatasetSplits, fraction: float, seed: int) -> DatasetSplits:
    """Move ``round(fraction * n_c)`` images of every class (>= 1 when n_c >= 2, never the last one)
    from train to a new validation split, chosen with ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(splits.train.targets, dtype=np.int64)
    val_idx = []
    for c in range(splits.num_classes):
        idx = np.flatnonzero(targets == c)
        n_c = len(idx)
        k = 0 if n_c < 2 else min(max(int(round(fraction * n_c)), 1), n_c - 1)
        if k:
            val_idx.append(np.sort(rng.choice(idx, size=k, replace=False)))
    chosen = np.concatenate(val_idx) if val_idx else np.zeros(0, np.int64)
    mask = np.ones(len(targets), bool)
    mask[chosen] = False
    train = splits.train.subset(np.flatnonzero(mask))
    val = splits.train.subset(chosen)
    return DatasetSplits(
        splits.name, train, val, splits.test, splits.num_classes, splits.class_names,
        train.class_counts(), splits.mean, splits.std, val_is_carved=True,
    )
