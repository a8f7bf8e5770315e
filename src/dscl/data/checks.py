"""Dataset summaries (counts, Many/Medium/Few groups) and a parallel check that every image opens."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image
from tqdm import tqdm

from dscl.data.core import LTDataset
from dscl.data.datasets import DatasetSplits


def summarize_dataset(splits: DatasetSplits, many_threshold: int = 100, few_threshold: int = 20) -> dict[str, Any]:
    """Counts and shot groups (OLTR: many > many_threshold, few < few_threshold, medium otherwise)."""
    counts = list(splits.train_counts)
    many = sum(c > many_threshold for c in counts)
    few = sum(c < few_threshold for c in counts)
    return {
        "dataset": splits.name,
        "num_classes": splits.num_classes,
        "num_train": len(splits.train),
        "num_val": len(splits.val) if splits.val is not None else None,
        "num_test": len(splits.test),
        "train_counts": counts,
        "shot_classes": {"many": many, "medium": len(counts) - many - few, "few": few},
    }


def _probe(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()  # decodes the whole file: truncated data fails here, not at training time
    except FileNotFoundError:
        return "missing file"
    except Exception as exc:  # noqa: BLE001 - every decoder failure is reported, none is fatal here
        return f"unreadable: {exc}"
    return None


def check_images(dataset: LTDataset, *, workers: int | None = None, progress: bool = True) -> list[tuple[str, str]]:
    """Open every image of a file-backed dataset; return ``(path, error)`` for each missing/unreadable one.

    Decoding releases the GIL, so a thread pool (default ``min(16, 2 * cpus)`` threads) scales.
    In-memory datasets return ``[]`` at once.
    """
    if dataset.in_memory or len(dataset) == 0:
        return []
    paths = sorted({dataset.path(i) for i in range(len(dataset))})  # type: ignore[type-var]
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(paths), desc="checking images", unit="img", disable=not progress
    ) as bar:
        for path, error in zip(paths, pool.map(_probe, paths), strict=True):
            if error is not None:
                bad.append((str(path), error))
            bar.update(1)
    return bad
