"""``build_datasets``: a ``DataConfig`` in, train / val / test ``LTDataset``s and their statistics out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dscl.config import DataConfig
from dscl.data.core import DataError, LTDataset, long_tailed_counts, select_long_tailed
from dscl.data.readers import (
    FMNIST_CLASSES,
    ListSplit,
    find_cifar,
    find_fmnist,
    read_cifar,
    read_fmnist,
    read_folder_split,
    read_list,
    resolve_list_file,
    user_data_root,
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
# Held-out validation images per class (from the training images the LT subset leaves unused):
# enough for a steady class-balanced accuracy (fmnist-lt: 2,000 images vs 10,000 test; CIFAR-10:
# half the test set's 1,000 per class; CIFAR-100: half its 100 per class).
DEFAULT_VAL_PER_CLASS = {"fmnist-lt": 200, "cifar10-lt": 500, "cifar100-lt": 50}
# Where a validation split came from (DatasetSplits.val_source), as reports word it.
VAL_SOURCES = {
    "list": "the dataset's validation split",
    "held-out": "a class-balanced validation split held out from the training images the long-tailed "
                "subset did not use",
    "carved": "a validation split carved from the training set",
}


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
    # "list" (the dataset's own val list / folder), "held-out" (unused training images of a generated
    # LT set) or "carved" (taken out of the training set); None when there is no validation split
    val_source: str | None = None
    # the data folder actually read (absolute): the Fashion-MNIST / CIFAR folder found, the folder the
    # list paths are relative to, or the class-folder root; None only for hand-made splits
    data_root: str | None = None

    @property
    def val_is_carved(self) -> bool:
        """True when the validation images were taken out of the training set (they cost training data)."""
        return self.val_source == "carved"

    def val_description(self) -> str:
        """How the validation split was made, in words (for reports); "no validation split" if none."""
        return VAL_SOURCES.get(self.val_source or "", "no validation split")


def build_datasets(cfg: DataConfig, *, seed: int = 0) -> DatasetSplits:
    """Read the dataset described by ``cfg`` (see DataConfig) without opening any image file.

    Args:
        cfg: the data section of the config.
        seed: seeds the class-stratified validation carving (``cfg.val_fraction > 0``, only when the
            dataset has no validation split of its own); the long-tailed subset and the held-out
            validation split of generated LT sets are chosen by ``cfg.subset_seed``.

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
    if splits.val is not None and splits.val_source is None:
        splits.val_source = "list"
    if splits.data_root is None:
        splits.data_root = _found_root(cfg)
    if cfg.val_fraction > 0 and splits.val is None:
        splits = carve_validation(splits, cfg.val_fraction, seed)
    return splits


def _keep_classes(classes: tuple[int, ...], x_train, y_train, x_test, y_test, names: list[str]):
    """``data.classes``: only those classes of the source set, relabelled 0, 1, ... in the order given."""
    outside = [c for c in classes if c >= len(names)]
    if outside:
        raise DataError(f"data.classes lists {', '.join(map(str, outside))}, but the source has {len(names)} classes "
                        f"(ids 0-{len(names) - 1})")
    relabel = np.full(len(names), -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))

    def pick(x, y):
        y = np.asarray(y)
        keep = relabel[y] >= 0
        return x[keep], relabel[y[keep]]

    (x_train, y_train), (x_test, y_test) = pick(x_train, y_train), pick(x_test, y_test)
    return x_train, y_train, x_test, y_test, [names[c] for c in classes]


def _generated(cfg: DataConfig, x_train, y_train, x_test, y_test, names, source: str) -> DatasetSplits:
    if cfg.classes is not None:
        x_train, y_train, x_test, y_test, names = _keep_classes(tuple(cfg.classes), x_train, y_train, x_test, y_test,
                                                                list(names))
    num_classes = len(names)
    n_max = cfg.n_max if cfg.n_max is not None else DEFAULT_N_MAX[cfg.dataset]
    counts = long_tailed_counts(num_classes, n_max, cfg.imbalance_factor, cfg.profile)
    keep = select_long_tailed(np.asarray(y_train), counts, cfg.subset_seed, source)
    train = LTDataset(y_train[keep], num_classes, names, images=x_train, index=keep)
    test = LTDataset(y_test, num_classes, names, images=x_test)
    per_class = cfg.val_per_class if cfg.val_per_class is not None else DEFAULT_VAL_PER_CLASS[cfg.dataset]
    val = None
    if per_class > 0:
        val_idx = held_out_indices(np.asarray(y_train), keep, per_class, cfg.subset_seed)
        val = LTDataset(y_train[val_idx], num_classes, names, images=x_train, index=val_idx)
    mean, std = STATS[cfg.dataset]
    return DatasetSplits(cfg.dataset, train, val, test, num_classes, list(names), counts, mean, std,
                         val_source="held-out" if val is not None else None)


def held_out_indices(targets: np.ndarray, used: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A class-balanced validation split from the images the long-tailed subset did not use.

    For every class, ``min(per_class, unused images of the class)`` indices are drawn without
    replacement from the class's images not in ``used``, with a generator of its own
    (``default_rng([seed, 1])``): the split depends only on the subset seed, never overlaps the
    training subset, and does not change which images the subset itself picks.

    Args:
        targets: (N,) labels of the whole source training set.
        used: indices of the long-tailed training subset.
        per_class: images wanted per class.
        seed: the subset seed.

    Returns:
        Sorted indices into the source training set.
    """
    rng = np.random.default_rng([seed, 1])
    free = np.ones(len(targets), dtype=bool)
    free[np.asarray(used, dtype=np.int64)] = False
    chosen = []
    for c in range(int(targets.max()) + 1 if len(targets) else 0):
        pool = np.flatnonzero(free & (targets == c))
        if len(pool):
            chosen.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _build_fmnist(cfg: DataConfig) -> DatasetSplits:
    x_train, y_train, x_test, y_test, folder = read_fmnist(cfg.data_root)
    return _generated(cfg, x_train, y_train, x_test, y_test, list(FMNIST_CLASSES), f"Fashion-MNIST ({folder})")


def _build_cifar(cfg: DataConfig) -> DatasetSplits:
    x_train, y_train, x_test, y_test, names, folder = read_cifar(cfg.dataset, cfg.data_root)
    return _generated(cfg, x_train, y_train, x_test, y_test, names, f"{cfg.dataset} ({folder})")


def _image_root(cfg: DataConfig, fallback: Path) -> Path:
    """The folder list paths are relative to: data.data_root / $DSCL_DATA when named (it must exist),
    else ``fallback`` (the train list's folder)."""
    named = user_data_root(
        cfg.data_root, "Pass the folder the image paths in the lists are relative to as --data-root"
    )
    return named[0] if named is not None else fallback


def _check_labels(split: ListSplit, num_classes: int, what: str) -> None:
    """Every label of ``split`` in [0, num_classes); an error names the list file and line/annotation."""
    for k, label in enumerate(split.labels):
        if not 0 <= label < num_classes:
            raise DataError(
                f"{split.where[k]}: label {label} is outside [0, {num_classes}) "
                f"({num_classes} classes come from the train list); fix that line of the {what} list"
            )


def _missing_classes_error(train: ListSplit, num_classes: int, present: set[int]) -> DataError:
    """The train list leaves classes empty: name them, and where the largest label is listed (a label
    typed with an extra digit, e.g. 1000 for 100, is the usual cause)."""
    empty: list[int] = []
    for c in range(num_classes):  # stops after 11 empty classes: num_classes may be huge (a typo)
        if c not in present:
            empty.append(c)
            if len(empty) > 10:
                break
    n_empty = num_classes - len(present)
    shown = ", ".join(str(c) for c in empty[:10]) + (" ..." if n_empty > 10 else "")
    top = max(train.labels)
    lines = [train.where[k] for k, label in enumerate(train.labels) if label == top]
    where = "; ".join(lines[:3]) + (f" and {len(lines) - 3} more" if len(lines) > 3 else "")
    source = "the list's num_classes" if train.num_classes is not None else f"the largest label, {top}"
    return DataError(
        f"{train.source}: {n_empty} of {num_classes} classes have no training image (classes {shown}); "
        f"the number of classes comes from {source}, and label {top} is at {where}. Labels must be "
        "0..C-1 with every class present in the train list: fix a mistyped label there, or renumber"
    )


def read_class_names(name: str, list_dir: str | None, num_classes: int) -> list[str]:
    """``data.class_names_file`` (relative to ``list_dir``): one class name per line, line k naming
    label k - 1 (blank lines at the end ignored)."""
    path = Path(name) if Path(name).is_absolute() or list_dir is None else Path(list_dir) / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class names file {path} (data.class_names_file): {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for k, name in enumerate(names):
        if not name:
            raise DataError(f"{path}, line {k + 1}: empty class name (line k names label k - 1; no blank lines)")
    if len(names) != num_classes:
        raise DataError(f"{path}: {len(names)} class names for the {num_classes} classes of the train list; "
                        "give one name per line, line k naming label k - 1")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: class names must be unique, repeated: {', '.join(dupes[:5])}")
    return names


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
    present = set(train.labels)
    if len(present) < num_classes:
        raise _missing_classes_error(train, num_classes, present)
    counts = np.bincount(train.labels, minlength=num_classes)
    names = (read_class_names(cfg.class_names_file, cfg.list_dir, num_classes) if cfg.class_names_file
             else [str(c) for c in range(num_classes)])

    def make(split: ListSplit) -> LTDataset:
        return LTDataset(split.labels, num_classes, names, paths=split.paths, where=split.where)

    others = {}
    for what, name in (("val", cfg.val_list), ("test", cfg.test_list)):
        if name:
            split = read_list(resolve_list_file(name, cfg.list_dir, what), root)
            if split.num_classes is not None and split.num_classes != num_classes:
                raise DataError(
                    f"{split.source}: num_classes is {split.num_classes} but the train list "
                    f"{train.source} has {num_classes} classes; the lists must describe the same classes"
                )
            _check_labels(split, num_classes, what)
            others[what] = make(split)
    mean, std = STATS["files"]
    return DatasetSplits(
        "split", make(train), others.get("val"), others["test"], num_classes, names,
        [int(c) for c in counts], mean, std, data_root=str(root.absolute()),
    )


def _build_folder(cfg: DataConfig) -> DatasetSplits:
    layout = "a folder with train/<class>/ and test/<class>/ image folders (val/<class>/ optional)"
    named = user_data_root(cfg.data_root, f"Dataset 'folder' needs {layout}")
    if named is None:
        raise DataError(f"dataset 'folder' needs --data-root DIR (data.data_root or DSCL_DATA): {layout}")
    root = named[0]
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
        [int(c) for c in counts], mean, std, data_root=str(root.absolute()),
    )


def _found_root(cfg: DataConfig) -> str | None:
    """The folder a generated LT set (Fashion-MNIST, CIFAR) was read from (the same search as the reader)."""
    if cfg.dataset == "fmnist-lt":
        return str(find_fmnist(cfg.data_root).absolute())
    if cfg.dataset in ("cifar10-lt", "cifar100-lt"):
        return str(find_cifar(cfg.dataset, cfg.data_root).absolute())
    return None


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
    return dataclasses.replace(splits, train=train, val=val, train_counts=train.class_counts(), val_source="carved")
