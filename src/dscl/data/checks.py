"""Dataset summaries (counts, Many/Medium/Few groups, empty classes) and parallel file checks.

Two checks, one rule each: :func:`check_files_before_training` opens every file's header (fast; run
by ``pretrain`` before anything is built), :func:`find_bad_files` / :func:`check_images` decode every
file with the training decoder (thorough; ``dscl data --check``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dscl import dist
from dscl.data.core import DECODABLE_MODES, DataError, LTDataset, read_image_file
from dscl.data.datasets import DatasetSplits
from dscl.metrics import shot_groups


def summarize_dataset(splits: DatasetSplits, many_threshold: int = 100, few_threshold: int = 20) -> dict[str, Any]:
    """Counts and shot groups (OLTR: many > many_threshold, few < few_threshold, medium otherwise).

    Besides the totals: ``class_names``, per-class ``train_counts`` / ``val_counts`` / ``test_counts``,
    ``classes`` (one row per class: name, shot group, count in each split) and ``empty_classes``
    (per split, the names of the classes with no image there: such a class is left out of its
    group's Many/Medium/Few average, so ``dscl data`` warns about it).
    """
    counts = list(splits.train_counts)
    groups = shot_groups(counts, many_threshold, few_threshold)
    many, few = len(groups["many"]), len(groups["few"])
    group_of = {c: g for g, members in groups.items() for c in members}
    per_split: dict[str, list[int] | None] = {
        "train": counts, "val": splits.val.class_counts() if splits.val is not None else None,
        "test": splits.test.class_counts(),
    }
    names = list(splits.class_names)
    return {
        "dataset": splits.name,
        "num_classes": splits.num_classes,
        "num_train": len(splits.train),
        "num_val": len(splits.val) if splits.val is not None else None,
        "val_counts": splits.val.class_counts() if splits.val is not None else None,
        "val_source": splits.val_source,
        # images in both train and val (0 for a held-out or carved split; a listed split is checked too)
        "val_train_overlap": (len(set(splits.train.identities()) & set(splits.val.identities()))
                              if splits.val is not None else None),
        "num_test": len(splits.test),
        "train_counts": counts,
        "shot_classes": {"many": many, "medium": len(counts) - many - few, "few": few},
        "data_root": splits.data_root,
        "class_names": names,
        "test_counts": per_split["test"],
        "classes": [
            {"class": names[c], "group": group_of[c],
             **{split: (n[c] if n is not None else None) for split, n in per_split.items()}}
            for c in range(splits.num_classes)
        ],
        "empty_classes": {split: ([names[c] for c, k in enumerate(n) if k == 0] if n is not None else None)
                          for split, n in per_split.items()},
    }


@dataclass(frozen=True)
class FileProblem:
    """One image file that cannot be used: which split lists it, the file, where it is listed, why."""

    split: str
    path: str
    error: str
    where: str | None = None  # "lists/test.txt, line 12" for list datasets, None for class folders

    def __str__(self) -> str:
        listed = f" (listed at {self.where})" if self.where else ""
        return f"{self.split}: {self.path}{listed}: {self.error}"


def _probe_header(path: str) -> str | None:
    """Cheap check: the file exists and PIL can parse its header (size and mode); no pixel is decoded."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except FileNotFoundError:
        return "missing file"
    except IsADirectoryError:
        return "a folder, not an image file"
    except PermissionError:
        return "not readable (permission denied)"
    except UnidentifiedImageError:
        return "not an image file (PIL cannot identify its format: empty, truncated header or not an image)"
    except Exception as exc:  # noqa: BLE001 - every failure is a finding here, none is fatal
        return f"cannot be opened: {type(exc).__name__}: {exc}"
    if width < 1 or height < 1:
        return f"empty image ({width}x{height} pixels)"
    if mode not in DECODABLE_MODES:
        return f"image mode {mode!r} cannot be decoded (supported: {', '.join(sorted(DECODABLE_MODES))})"
    return None


def _probe_decode(path: str) -> str | None:
    """Thorough check: decode the whole file exactly as training does (truncated data fails here)."""
    try:
        read_image_file(path)
    except DataError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return "missing file"
        return f"unreadable: {exc.__cause__ if exc.__cause__ is not None else exc}"
    return None


def _default_workers(full_decode: bool) -> int:
    # decoding is CPU work (PIL releases the GIL); a header check mostly waits on the disk or the
    # network file system, so more threads than cores pay off
    cpus = os.cpu_count() or 1
    return min(16, 2 * cpus) if full_decode else min(32, 4 * cpus)


def _files_of(dataset: LTDataset, split: str) -> list[tuple[str, str, str | None]]:
    """``(split, path, where)`` per distinct file of a file-backed dataset, in path order."""
    first: dict[str, int] = {}
    for i in range(len(dataset)):
        first.setdefault(dataset.path(i), i)  # type: ignore[arg-type]
    return [(split, path, dataset.location(first[path])) for path in sorted(first)]


def _scan(
    files: list[tuple[str, str, str | None]], *, full_decode: bool, workers: int | None, progress: bool,
    bar_from: int,
) -> list[FileProblem]:
    probe = _probe_decode if full_decode else _probe_header
    paths = [path for _, path, _ in files]
    problems = []
    with ThreadPoolExecutor(max_workers=workers or _default_workers(full_decode)) as pool, tqdm(
        total=len(files), desc="decoding images" if full_decode else "checking image files", unit="file",
        disable=not progress or len(files) < bar_from, leave=False, dynamic_ncols=True,
    ) as bar:
        for (split, path, where), error in zip(files, pool.map(probe, paths), strict=True):
            if error is not None:
                problems.append(FileProblem(split, path, error, where))
            bar.update(1)
    return problems


def find_bad_files(
    dataset: LTDataset, *, split: str = "train", full_decode: bool = True, workers: int | None = None,
    progress: bool = True,
) -> list[FileProblem]:
    """Every missing or unusable image file of a file-backed dataset (``[]`` for in-memory ones).

    Args:
        dataset: the split to check; each distinct file is checked once.
        split: its name, copied into the problems.
        full_decode: True decodes every file with :func:`dscl.data.core.read_image_file` (what
            ``dscl data --check`` does: finds truncated files too; about as slow as one epoch of
            reading); False only opens each file's header (existence, format, size, mode).
        workers: threads (default: 2 x cpus for decoding, 4 x cpus for headers, at most 16 / 32).
        progress: show a progress bar.

    Returns:
        One :class:`FileProblem` per bad file, in path order.
    """
    if dataset.in_memory or len(dataset) == 0:
        return []
    return _scan(_files_of(dataset, split), full_decode=full_decode, workers=workers, progress=progress, bar_from=0)


def check_images(dataset: LTDataset, *, workers: int | None = None, progress: bool = True) -> list[tuple[str, str]]:
    """Decode every image of a file-backed dataset; ``(path, error)`` for each missing/unreadable one.

    The same full decode as training (:func:`dscl.data.core.read_image_file`); ``error`` is
    ``"missing file"`` or starts with ``"unreadable"``. In-memory datasets return ``[]`` at once.
    """
    return [(p.path, p.error) for p in find_bad_files(dataset, workers=workers, progress=progress)]


# Above this many files the pre-training check shows a progress bar (~1 s of header reads locally).
PROGRESS_FROM = 1000
# Problems quoted in the error (the count says how many more there are).
SHOWN_PROBLEMS = 10


def check_files_before_training(
    splits: DatasetSplits, *, enabled: bool = True, progress: bool = True, workers: int | None = None
) -> None:
    """Stop a run before any compute if an image file of train, val or test is missing or unopenable.

    Opens the header of every distinct file (no pixel decode: seconds for ImageNet-LT's ~186k files
    on a local disk), in a thread pool, with a progress bar above 1,000 files. Under ``torchrun``
    each process checks its share of the files and all of them raise the same error. In-memory
    datasets (Fashion-MNIST, CIFAR) have nothing to check. A truncated file whose header is intact
    passes here; ``dscl data --check`` decodes every file.

    Args:
        splits: the datasets of the run.
        enabled: ``cfg.data.check_files``; False returns at once (data you trust).
        progress: show the bar (on the main process only).
        workers: threads per process (default 4 x cpus, at most 32).

    Raises:
        DataError: naming the first 10 bad files (split, path, list file and line, reason), the
            number of bad files, and the fixes.
    """
    if not enabled:
        return
    files = [f for split in ("train", "val", "test")
             if (ds := getattr(splits, split)) is not None and not ds.in_memory for f in _files_of(ds, split)]
    if not files:
        return
    share = files[dist.rank()::dist.world_size()]
    problems = _scan(share, full_decode=False, workers=workers, progress=progress and dist.is_main(),
                     bar_from=PROGRESS_FROM)
    gathered = cast(list[list[FileProblem]], dist.gather_objects(problems))
    problems = [p for part in gathered for p in part]
    if not problems:
        return
    problems.sort(key=lambda p: ("train", "val", "test").index(p.split))
    shown = "\n".join(f"  {p}" for p in problems[:SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    raise DataError(
        f"{len(problems)} of {len(files)} image files of dataset {splits.name!r} cannot be used (checked before "
        f"training: each listed file must exist and open as an image):\n{shown}{more}\n"
        "Fix or remove these files (or their list lines) and run the same command again. "
        "Run `dscl data --check` (with the same --preset/--data-root/overrides) to decode every file "
        "and list all problems; on data you trust, skip this check with data.check_files=false."
    )
