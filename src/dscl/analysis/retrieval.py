"""Nearest-neighbour retrieval of training images (paper Fig. 1) and patch-based retrieval (paper Fig. 4).

``retrieval``: every test image queries the training set with the evaluation backbone's globally pooled
features, L2-normalised (cosine similarity). Top-k precision (fraction of the k neighbours that share the
query's label) is reported per class, per Many/Medium/Few group (mean over the group's classes) and overall,
with the top-1 nearest-neighbour accuracy; the picture shows a few queries per selected class with their
neighbours, optionally for two runs side by side.

``patch_retrieval``: a box on one test image is ROI-pooled from the evaluation backbone's feature map with
:func:`dscl.patches.pool_boxes` (the pooling PBSD's teacher uses, METHOD.md A.7) and L2-normalised. Every
training image gets a response map, the cosine similarity between that patch feature and the (per-position
L2-normalised) feature at each position of its map, and is scored by the maximum of the map; the top-k
images are drawn with their response maps overlaid.

Both write a PNG and a JSON into ``RUN/analysis`` (or ``--out``); ``retrieval`` also writes the full
neighbour lists of every test image to ``retrieval_neighbours.npz``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dscl.analysis.common import (
    AnalysisError,
    RunArtifacts,
    analysis_dir,
    default_classes,
    eval_backbone,
    open_run,
    resolve_classes,
)
from dscl.backbones import Backbone
from dscl.config import method_name
from dscl.data.core import LTDataset
from dscl.data.preprocess import ImageTransform
from dscl.dist import resolve_device
from dscl.features import extract_features
from dscl.io import atomic_write, save_figure, write_json
from dscl.metrics import mean_or_none, shot_group_bounds
from dscl.patches import ALIGNED_DEFAULT, pool_boxes

GROUPS: tuple[str, ...] = ("many", "medium", "few")
MAX_ROWS = 40  # query rows drawn in retrieval.png at most (the numbers always cover every test image)
BATCH_SIZE = 256
QUERY_CHUNK = 1024  # test queries per similarity matrix block (bounds memory on large test sets)
DISPLAY_PX = 112  # small images are nearest-upscaled to at least this many pixels in the pictures

FEATURES_NOTE = (
    "evaluation backbone (stage-2 copy with re-estimated BatchNorm statistics if present, else the stage-1 "
    "online backbone), globally average-pooled, L2-normalised; similarity = cosine (dot product)"
)
PRECISION_NOTE = (
    "precision@k = fraction of a test query's k nearest training images that have the query's label; "
    "per class = mean over the class's test queries; per group and overall = mean over classes "
    "(class-balanced; overall_micro = mean over all test queries); top1 = nearest-neighbour accuracy"
)
SCORE_NOTE = (
    "response map = cosine similarity between the query patch feature and the L2-normalised feature at each "
    "position of a training image's backbone feature map; image score = maximum of its response map"
)


# ----------------------------------------------------------------------------------------------
# pure computations (unit-tested on constructed inputs)


def nearest_neighbours(queries: Tensor, gallery: Tensor, k: int, *,
                       chunk: int = QUERY_CHUNK) -> tuple[Tensor, Tensor]:
    """Top-k gallery items of every query by cosine similarity.

    Args:
        queries: ``(N, C)`` query features (normalised here).
        gallery: ``(M, C)`` gallery features (normalised here), ``k <= M``.
        k: neighbours per query.
        chunk: queries per similarity block (memory is ``chunk x M``).

    Returns:
        ``(similarities, indices)``, both ``(N, k)`` on the queries' device; similarities are sorted
        descending along each row (float32), indices are gallery rows (int64).
    """
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k must be in 1..{gallery.shape[0]} (gallery size), got {k}")
    q = F.normalize(queries.float(), dim=1)
    g = F.normalize(gallery.float(), dim=1).to(q.device)
    sims, idx = [], []
    for lo in range(0, q.shape[0], chunk):
        s, i = torch.topk(q[lo:lo + chunk] @ g.T, k, dim=1, largest=True, sorted=True)
        sims.append(s)
        idx.append(i)
    if not sims:
        return torch.zeros(0, k, device=q.device), torch.zeros(0, k, dtype=torch.long, device=q.device)
    return torch.cat(sims), torch.cat(idx)


def retrieval_metrics(neighbour_labels: Tensor, query_labels: Tensor, num_classes: int,
                      groups: dict[str, list[int]]) -> dict[str, Any]:
    """Top-k precision and nearest-neighbour accuracy per class, per shot group and overall.

    Args:
        neighbour_labels: ``(N, k)`` labels of each query's neighbours, nearest first.
        query_labels: ``(N,)`` labels of the queries.
        num_classes: number of classes.
        groups: ``{"many": [...], "medium": [...], "few": [...]}`` class indices.

    Returns:
        ``{"per_class": [{"class", "test_count", "precision_at_k", "top1"}], "groups": {group: {"classes",
        "precision_at_k", "top1"}}, "overall": {"precision_at_k", "precision_at_k_micro", "top1",
        "top1_micro"}}``. Per-class values are None for classes without queries; group values are means
        over the group's classes that have queries (None when there are none).
    """
    if neighbour_labels.dim() != 2 or neighbour_labels.shape[0] != query_labels.shape[0]:
        raise ValueError(f"neighbour_labels must be (N, k) for {query_labels.shape[0]} queries, "
                         f"got {tuple(neighbour_labels.shape)}")
    hits = (neighbour_labels.cpu() == query_labels.cpu()[:, None]).double()
    prec, top1 = hits.mean(dim=1), hits[:, 0]
    labels = query_labels.cpu()
    per_class: list[dict[str, Any]] = []
    for c in range(num_classes):
        mask = labels == c
        n = int(mask.sum())
        per_class.append({
            "class": c, "test_count": n,
            "precision_at_k": float(prec[mask].mean()) if n else None,
            "top1": float(top1[mask].mean()) if n else None,
        })
    out_groups = {}
    for g in GROUPS:
        members = [per_class[c] for c in groups.get(g, [])]
        out_groups[g] = {
            "classes": len(members),
            "precision_at_k": mean_or_none([r["precision_at_k"] for r in members]),
            "top1": mean_or_none([r["top1"] for r in members]),
        }
    n_all = hits.shape[0]
    overall = {
        "precision_at_k": mean_or_none([r["precision_at_k"] for r in per_class]),
        "precision_at_k_micro": float(prec.mean()) if n_all else None,
        "top1": mean_or_none([r["top1"] for r in per_class]),
        "top1_micro": float(top1.mean()) if n_all else None,
    }
    return {"per_class": per_class, "groups": out_groups, "overall": overall}


def query_patch_feature(feature_map: Tensor, box: Sequence[float], image_size: int) -> Tensor:
    """The L2-normalised ROI-pooled feature of one box, exactly as PBSD's teacher pools it (before the head).

    Args:
        feature_map: ``(1, C, H, W)`` backbone map of the query image.
        box: ``(x1, y1, x2, y2)`` in pixels of the ``image_size`` x ``image_size`` image behind the map.
        image_size: side of that image in pixels.

    Returns:
        ``(C,)`` float32 unit vector.
    """
    boxes = torch.tensor([[list(box)]], dtype=torch.float32, device=feature_map.device)
    pooled = pool_boxes(feature_map, boxes, image_size)  # (1, 1, C)
    return F.normalize(pooled[0, 0], dim=0)


def response_maps(feature_maps: Tensor, query: Tensor) -> Tensor:
    """Cosine similarity between ``query`` and every position of every feature map.

    Args:
        feature_maps: ``(N, C, H, W)``; each position's C-vector is L2-normalised (all-zero positions give 0).
        query: ``(C,)`` query feature (normalised here).

    Returns:
        ``(N, H, W)`` float32 response maps in [-1, 1].
    """
    fmap = F.normalize(feature_maps.float(), dim=1)
    q = F.normalize(query.float().to(fmap.device), dim=0)
    return torch.einsum("nchw,c->nhw", fmap, q)


def response_scores(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Score of each response map (its maximum) and the ``(row, col)`` where it is reached.

    Args:
        maps: ``(N, H, W)`` response maps.

    Returns:
        ``(scores (N,), argmax (N, 2))``: the maximum and its (row, col), first position on ties.
    """
    flat = maps.flatten(1)
    scores, pos = flat.max(dim=1)
    return scores, torch.stack([pos // maps.shape[2], pos % maps.shape[2]], dim=1)


def parse_box(text: str | None, image_size: int) -> tuple[float, float, float, float]:
    """``--box X1,Y1,X2,Y2`` in pixels of the evaluation-size image; None -> the central half.

    Args:
        text: the raw option value or None.
        image_size: side of the (square) evaluation image.

    Returns:
        ``(x1, y1, x2, y2)`` floats with ``0 <= x1 < x2 <= size`` and ``0 <= y1 < y2 <= size``.

    Raises:
        AnalysisError: not four numbers, or a box outside the image or empty.
    """
    s = image_size
    if text is None:
        return (s / 4, s / 4, 3 * s / 4, 3 * s / 4)
    example = f"e.g. --box {s // 4},{s // 4},{3 * s // 4},{3 * s // 4} (the central half)"
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 4:
            raise ValueError
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError:
        raise AnalysisError(
            f"--box {text!r}: expected four comma-separated numbers X1,Y1,X2,Y2 in pixels of the "
            f"{s}x{s} evaluation image, {example}"
        ) from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise AnalysisError(f"--box {text!r}: coordinates must be finite numbers, {example}")
    if not (0 <= x1 <= s and 0 <= x2 <= s and 0 <= y1 <= s and 0 <= y2 <= s):
        raise AnalysisError(
            f"--box {text!r} is not inside the {s}x{s} evaluation image: every coordinate must be in 0..{s}, "
            f"{example}"
        )
    if x2 <= x1 or y2 <= y1:
        raise AnalysisError(
            f"--box {text!r} is empty: it needs X1 < X2 and Y1 < Y2 (top-left corner first), {example}"
        )
    return (x1, y1, x2, y2)


# ----------------------------------------------------------------------------------------------
# helpers shared by both analyses


def _check_k(k: int, art: RunArtifacts, what: str = "--k") -> None:
    n = len(art.splits.train)
    if k < 1:
        raise AnalysisError(f"{what} {k}: must be at least 1")
    if k > n:
        raise AnalysisError(f"{what} {k} exceeds the {n} training images of {art.run_dir}; use --k {n} or less")


def _run_method(art: RunArtifacts) -> str:
    return art.stage1.facts.method or method_name(art.cfg)


def _backbone_source(art: RunArtifacts) -> str:
    if (art.run_dir / "checkpoints" / "classifier.pt").is_file():
        return "checkpoints/classifier.pt (BatchNorm statistics re-estimated on clean training images)"
    return "checkpoints/last.pt online backbone (stage 1)"


def _eval_transform(art: RunArtifacts) -> ImageTransform:
    """The run's own input conversion (:func:`dscl.inference.load_run`), as evaluation uses it."""
    return art.predictor.transform


def _workers(ds: LTDataset, art: RunArtifacts) -> int:
    """No worker processes for in-memory data (start-up costs more than it saves); the config's for files."""
    if ds.in_memory:
        return 0
    from dscl.runtime import num_workers

    return num_workers(art.cfg.data.num_workers)


def _features(backbone: nn.Module, ds: LTDataset, art: RunArtifacts, dev: torch.device, progress: bool,
              desc: str) -> tuple[Tensor, Tensor]:
    return extract_features(backbone, ds.with_transform(_eval_transform(art)), batch_size=BATCH_SIZE, device=dev,
                            workers=_workers(ds, art), progress=progress, desc=desc)


def _display_image(art: RunArtifacts, ds: LTDataset, i: int) -> np.ndarray:
    """Sample ``i`` at evaluation size (the same resize/crop as the features saw), ``(S, S, 3)`` in [0, 1]."""
    x = _eval_transform(art)(ds.load(i))
    mean = torch.tensor(art.predictor.mean)[:, None, None]
    std = torch.tensor(art.predictor.std)[:, None, None]
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _upscale_factor(size: int) -> int:
    return max(1, math.ceil(DISPLAY_PX / size))


def _nearest_up(img: np.ndarray, factor: int) -> np.ndarray:
    return img if factor == 1 else img.repeat(factor, axis=0).repeat(factor, axis=1)


def _short(name: str, n: int = 16) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _unique_labels(arts: Sequence[RunArtifacts]) -> list[str]:
    labels: list[str] = []
    for a in arts:
        label = a.run_dir.resolve().name
        while label in labels:
            label += " (2)"
        labels.append(label)
    return labels


# ----------------------------------------------------------------------------------------------
# retrieval (Fig. 1)


def _check_same_dataset(a: RunArtifacts, b: RunArtifacts) -> None:
    sa, sb = a.splits, b.splits
    where = f"--run {a.run_dir} ({sa.name}) and --compare-run {b.run_dir} ({sb.name})"
    if sa.num_classes != sb.num_classes:
        raise AnalysisError(f"{where} have different class counts ({sa.num_classes} vs {sb.num_classes}); "
                            "compare two runs trained on the same dataset")
    if len(sa.test) != len(sb.test) or sa.test.targets != sb.test.targets:
        raise AnalysisError(f"{where} have different test sets ({len(sa.test)} vs {len(sb.test)} images"
                            f"{'' if len(sa.test) != len(sb.test) else ', different labels'}); "
                            "compare two runs trained on the same dataset")


def _pick_queries(test: LTDataset, class_ids: list[int], per_class: int) -> tuple[list[int], list[int]]:
    """The first ``per_class`` test images of each class, in test order; returns (indices, classes drawn)."""
    by_class: dict[int, list[int]] = {c: [] for c in class_ids}
    for i, t in enumerate(test.targets):
        lst = by_class.get(t)
        if lst is not None and len(lst) < per_class:
            lst.append(i)
    drawn = [c for c in class_ids if by_class[c]]
    return [i for c in drawn for i in by_class[c]], drawn


def _open_runs(run: str | Path, compare_run: str | Path | None, k: int) -> list[RunArtifacts]:
    """The run, and the comparison run (same dataset) if given; ``k`` must fit both training sets."""
    arts = [open_run(run)]
    if compare_run is not None:
        arts.append(open_run(compare_run))
        _check_same_dataset(arts[0], arts[1])
    for a in arts:
        _check_k(k, a)
    return arts


def _drawn_queries(art: RunArtifacts, classes: str, queries_per_class: int) -> tuple[list[int], list[int], list[int],
                                                                                     str | None]:
    """The test queries drawn in the picture: ``(class indices selected, queries, classes drawn, note)``.

    At most :data:`MAX_ROWS` rows: beyond that, classes evenly spaced in the selection are kept and ``note``
    says so (None otherwise).
    """
    class_ids = resolve_classes(classes, art)
    queries, drawn = _pick_queries(art.splits.test, class_ids, queries_per_class)
    if not queries:
        names = ", ".join(art.splits.class_names[c] for c in class_ids)
        raise AnalysisError(f"--classes {classes!r} ({names}) has no test images in {art.run_dir}; "
                            "pick other classes")
    note = None
    if len(queries) > MAX_ROWS:
        keep_classes = max(1, MAX_ROWS // queries_per_class)
        picks = np.unique(np.linspace(0, len(drawn) - 1, keep_classes).round().astype(int))
        note = (f"picture limited to {MAX_ROWS} rows: {len(picks)} of the {len(drawn)} selected classes drawn "
                "(evenly spaced in the selection)")
        queries, drawn = _pick_queries(art.splits.test, [drawn[p] for p in picks], queries_per_class)
        queries = queries[:MAX_ROWS]
    return class_ids, queries, drawn, note


def _retrieve(a: RunArtifacts, label: str, k: int, dev: torch.device, progress: bool) -> dict[str, Any]:
    """Every test image of one run against its training set: its entry of ``runs`` in retrieval.json, plus
    ``_sims`` / ``_idx`` / ``_nb_labels`` (N_test, k) for the picture and the neighbours file."""
    backbone = eval_backbone(a).to(dev)
    f_train, y_train = _features(backbone, a.splits.train, a, dev, progress, f"{label}: train features")
    f_test, y_test = _features(backbone, a.splits.test, a, dev, progress, f"{label}: test features")
    sims, idx = nearest_neighbours(f_test.to(dev), f_train.to(dev), k)
    sims, idx = sims.cpu(), idx.cpu()
    nb_labels = y_train[idx]
    metrics = retrieval_metrics(nb_labels, y_test, a.splits.num_classes, a.groups())
    counts = a.train_counts
    for row in metrics["per_class"]:
        row["name"] = a.splits.class_names[row["class"]]
        row["train_count"] = counts[row["class"]]
    return {
        "label": label, "run_dir": str(a.run_dir), "method": _run_method(a),
        "backbone": _backbone_source(a), "train_images": len(a.splits.train), "test_images": len(a.splits.test),
        "feature_dim": int(f_train.shape[1]),
        "group_classes": {g: list(v) for g, v in a.groups().items()},
        **metrics,
        "_sims": sims, "_idx": idx, "_nb_labels": nb_labels,
    }


def _neighbour_arrays(arts: Sequence[RunArtifacts], runs_out: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The arrays of ``retrieval_neighbours.npz`` (see ``neighbours_npz_keys`` in retrieval.json)."""
    arrays: dict[str, np.ndarray] = {"test_labels": np.asarray(arts[0].splits.test.targets, dtype=np.int64)}
    for r, (a, ro) in enumerate(zip(arts, runs_out, strict=True)):
        arrays[f"run{r}_indices"] = ro["_idx"].numpy()
        arrays[f"run{r}_similarities"] = ro["_sims"].numpy()
        arrays[f"run{r}_train_labels"] = np.asarray(a.splits.train.targets, dtype=np.int64)
    return arrays


def _query_rows(art: RunArtifacts, queries: list[int], runs_out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per drawn query: its class and, per run, its neighbours (index, label, similarity)."""
    class_names = art.splits.class_names
    counts = art.train_counts
    drawn_rows = []
    for qi in queries:
        y = art.splits.test.targets[qi]
        per_run = []
        for ro in runs_out:
            per_run.append({"label": ro["label"], "neighbours": [
                {"index": int(j), "label": int(lab), "class_name": class_names[int(lab)], "similarity": float(s),
                 "same_class": int(lab) == y}
                for j, lab, s in zip(ro["_idx"][qi].tolist(), ro["_nb_labels"][qi].tolist(),
                                     ro["_sims"][qi].tolist(), strict=True)
            ]})
        drawn_rows.append({"test_index": qi, "label": y, "class_name": class_names[y], "train_count": counts[y],
                           "runs": per_run})
    return drawn_rows


def retrieval(run: str | Path, *, compare_run: str | Path | None = None, classes: str | None = None, k: int = 5,
              queries_per_class: int = 1, out: str | Path | None = None, device: str = "auto",
              progress: bool = True) -> dict[str, Any]:
    """Top-k nearest training images of every test image, head vs tail classes (paper Fig. 1).

    Args:
        run: a run directory with a finished stage 1.
        compare_run: a second run on the same dataset, drawn side by side and measured the same way.
        classes: classes drawn in the picture (names, indices, head/medium/tail/all; see ``resolve_classes``);
            None = the run's most and least frequent non-empty shot groups (``default_classes``: head and
            tail when the run has both). The numbers always cover every test image.
        k: neighbours per query.
        queries_per_class: test queries drawn per selected class (the first ones in test order).
        out: output folder (default ``RUN/analysis``).
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show progress bars.

    Returns:
        The dict written to ``retrieval.json`` (settings, per-run numbers, drawn queries, file paths).

    Raises:
        AnalysisError: bad arguments or runs that cannot be compared; RunDirError: unusable run directory.
    """
    if queries_per_class < 1:
        raise AnalysisError(f"--queries-per-class {queries_per_class}: must be at least 1")
    if k < 1:
        raise AnalysisError(f"--k {k}: must be at least 1")
    arts = _open_runs(run, compare_run, k)
    art = arts[0]
    if classes is None:
        classes = default_classes(art)
    class_ids, queries, drawn, note = _drawn_queries(art, classes, queries_per_class)
    dev = resolve_device(device)
    out_dir = analysis_dir(art, out)
    runs_out = [_retrieve(a, label, k, dev, progress) for a, label in zip(arts, _unique_labels(arts), strict=True)]
    drawn_rows = _query_rows(art, queries, runs_out)

    fig_path = out_dir / "retrieval.png"
    npz_path = out_dir / "retrieval_neighbours.npz"
    json_path = out_dir / "retrieval.json"
    _plot_retrieval(arts, runs_out, drawn_rows, k, fig_path)
    arrays = _neighbour_arrays(arts, runs_out)
    atomic_write(npz_path, lambda f: np.savez_compressed(f, **arrays))  # type: ignore[arg-type]
    bounds = shot_group_bounds(art.cfg.eval.many_threshold, art.cfg.eval.few_threshold)
    result = {
        "analysis": "retrieval",
        "settings": {
            "k": k, "classes": classes, "class_indices": class_ids, "drawn_classes": drawn,
            "queries_per_class": queries_per_class,
            "query_choice": "the first test images of each drawn class, in test-set order",
            "features": FEATURES_NOTE, "precision": PRECISION_NOTE,
            "queries": f"every test image ({len(art.splits.test)})", "gallery": "the training set of each run",
            "group_thresholds": {g: f"{bounds[g]} training images" for g in ("many", "few")},
            "device": str(dev), "picture_note": note,
        },
        "runs": [{k_: v for k_, v in ro.items() if not k_.startswith("_")} for ro in runs_out],
        "queries": drawn_rows,
        "files": {"figure": str(fig_path), "json": str(json_path), "neighbours": str(npz_path)},
        "neighbours_npz_keys": ("test_labels; run<r>_indices / run<r>_similarities (N_test, k), nearest first; "
                                "run<r>_train_labels (N_train,); r = position in runs"),
    }
    write_json(json_path, result)
    return result


def _plot_retrieval(arts: Sequence[RunArtifacts], runs_out: list[dict[str, Any]], rows: list[dict[str, Any]],
                    k: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n_rows, n_blocks = len(rows), len(arts)
    cell = 1.25
    width = n_blocks * (k + 1) * cell + 1.6
    height = n_rows * (cell + 0.42) + 1.6
    fig = Figure(figsize=(width, height), layout="constrained")
    label_w = 1.2  # the first block also holds the row labels
    ratios = [(k + 1) * cell + (label_w if b == 0 else 0.0) for b in range(n_blocks)]
    subfigs = np.atleast_1d(cast(Any, fig.subfigures(1, n_blocks, width_ratios=ratios)))
    art0 = arts[0]
    names = art0.splits.class_names
    factor = _upscale_factor(art0.cfg.data.image_size)
    for b, (a, ro, sf) in enumerate(zip(arts, runs_out, subfigs, strict=True)):
        grp = ro["groups"]
        nums = " · ".join(f"{g} {grp[g]['precision_at_k']:.2f}" for g in GROUPS
                          if grp[g]["precision_at_k"] is not None)
        sf.suptitle(f"{ro['method']} — {ro['label']}\nprecision@{k}: {nums}", fontsize=11, fontweight="bold")
        axes = sf.subplots(n_rows, k + 1, squeeze=False)
        for r, row in enumerate(rows):
            q_ax = axes[r][0]
            q_ax.imshow(_nearest_up(_display_image(a, a.splits.test, row["test_index"]), factor),
                        interpolation="nearest")
            _frame(q_ax, "#1f4e9c", 3)
            q_ax.set_xlabel(f"test #{row['test_index']}", fontsize=7)
            if b == 0:
                q_ax.set_ylabel(f"{_short(row['class_name'])}\n({row['train_count']} train)", fontsize=9,
                                rotation=0, ha="right", va="center", labelpad=6)
            if r == 0:
                q_ax.set_title("query", fontsize=9)
            for j, nb in enumerate(row["runs"][b]["neighbours"]):
                ax = axes[r][j + 1]
                ax.imshow(_nearest_up(_display_image(a, a.splits.train, nb["index"]), factor),
                          interpolation="nearest")
                color = "#1a9641" if nb["same_class"] else "#d7191c"
                _frame(ax, color, 3)
                ax.set_xlabel(f"{_short(names[nb['label']], 13)}\n{nb['similarity']:.2f}", fontsize=7, color=color)
                if r == 0:
                    ax.set_title(f"#{j + 1}", fontsize=9)
    title = (f"Top-{k} nearest training images of test queries (cosine similarity of L2-normalised pooled "
             "backbone features; similarity under each image)")
    # wrapped to the figure's width (a character is ~0.6 x the font size wide): a centred title wider
    # than a narrow (k=5, one run) figure is clipped at both edges
    fig.suptitle(textwrap.fill(title, width=max(20, int(width * 72 / (0.6 * 11)))), fontsize=11)
    fig.legend(handles=[Patch(facecolor="none", edgecolor="#1a9641", linewidth=3, label="same class as query"),
                        Patch(facecolor="none", edgecolor="#d7191c", linewidth=3, label="other class"),
                        Patch(facecolor="none", edgecolor="#1f4e9c", linewidth=3, label="query (test image)")],
               loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    return save_figure(fig, path, close=True)


def _frame(ax: Any, color: str, width: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def format_retrieval(result: dict[str, Any]) -> str:
    """A short text summary of :func:`retrieval`'s result: a group x run table and the written files.

    Args:
        result: the dict returned by :func:`retrieval`.

    Returns:
        Multi-line text.
    """
    k = result["settings"]["k"]
    runs = result["runs"]

    def cell(v: float | None) -> str:
        return "   —  " if v is None else f"{v:6.3f}"

    width = 32
    title = f"{'':<9}{'':>8}"
    head = f"{'group':<9}{'classes':>8}"
    for ro in runs:
        title += f"  | {_short(ro['method'] + ' (' + ro['label'] + ')', width):<{width}}"
        head += f"  | {'P@' + str(k):>7} {'NN top-1':>9}{'':<{width - 17}}"
    lines = [f"retrieval: {runs[0]['test_images']} test queries vs the training set, top-{k} by cosine similarity "
             "(L2-normalised pooled backbone features; group = mean over its classes)", title.rstrip(), head.rstrip()]
    for g in (*GROUPS, "overall"):
        n = runs[0]["groups"][g]["classes"] if g in GROUPS else len(runs[0]["per_class"])
        line = f"{g:<9}{n:>8}"
        for ro in runs:
            d = ro["groups"][g] if g in GROUPS else ro["overall"]
            line += f"  | {cell(d['precision_at_k']):>7} {cell(d['top1']):>9}{'':<{width - 17}}"
        lines.append(line.rstrip())
    if result["settings"].get("picture_note"):
        lines.append(f"note: {result['settings']['picture_note']}")
    files = result["files"]
    lines += [f"figure: {files['figure']}", f"json:   {files['json']}", f"neighbours: {files['neighbours']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# patch retrieval (Fig. 4)


class _ResponseHead(nn.Module):
    """Backbone + response map against a fixed query feature; ``forward`` gives ``(B, H*W)`` flattened maps.

    Lets :func:`dscl.features.extract_features` run the batched loop (progress bar, device, gather).
    """

    query: Tensor

    def __init__(self, backbone: Backbone, query: Tensor, map_hw: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("query", query.detach().clone())
        self.num_features = map_hw[0] * map_hw[1]

    def forward(self, x: Tensor) -> Tensor:
        return response_maps(self.backbone.forward_features(x), self.query).flatten(1)


def _default_query(art: RunArtifacts) -> int:
    test = art.splits.test.targets
    present = sorted(set(test))
    if not present:
        raise AnalysisError(f"the test set of {art.run_dir} is empty; nothing to query")
    counts = art.train_counts
    rarest = min(present, key=lambda c: (counts[c], c))
    return test.index(rarest)


def patch_retrieval(run: str | Path, *, query: int | None = None, box: str | None = None, k: int = 5,
                    out: str | Path | None = None, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Training images whose feature maps best match a ROI-pooled patch of a test image (paper Fig. 4).

    Args:
        run: a run directory with a finished stage 1.
        query: test-set index of the query image (None: the first test image of the rarest training class).
        box: ``"X1,Y1,X2,Y2"`` in pixels of the evaluation-size image (None: the central half).
        k: training images retrieved.
        out: output folder (default ``RUN/analysis``).
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show progress bars.

    Returns:
        The dict written to ``patch_retrieval.json`` (query, box, retrieved images and scores, file paths).

    Raises:
        AnalysisError: bad query index, box or k; RunDirError: unusable run directory.
    """
    if k < 1:
        raise AnalysisError(f"--k {k}: must be at least 1")
    art = open_run(run)
    _check_k(k, art)
    test, train = art.splits.test, art.splits.train
    if query is None:
        query = _default_query(art)
        query_choice = "default: the first test image of the rarest training class"
    else:
        if not 0 <= query < len(test):
            raise AnalysisError(f"--query {query} is out of range: the test set of {art.run_dir} has "
                                f"{len(test)} images (indices 0..{len(test) - 1})")
        query_choice = "given with --query"
    size = art.cfg.data.image_size
    x1y1x2y2 = parse_box(box, size)
    dev = resolve_device(device)
    out_dir = analysis_dir(art, out)

    backbone = eval_backbone(art).to(dev)
    with torch.no_grad():
        q_img = _eval_transform(art)(test.load(query))[None].to(dev)
        q_map = backbone.forward_features(q_img).float()
        q_feat = query_patch_feature(q_map, x1y1x2y2, size)
    map_hw = (int(q_map.shape[2]), int(q_map.shape[3]))
    head = _ResponseHead(backbone, q_feat, map_hw).to(dev)
    flat, y_train = _features(head, train, art, dev, progress, "train response maps")
    maps = flat.view(-1, *map_hw)
    scores, argmax = response_scores(maps)
    top_scores, top_idx = torch.topk(scores, k, largest=True, sorted=True)

    names = art.splits.class_names
    q_label = test.targets[query]
    retrieved = []
    for rank, (j, s) in enumerate(zip(top_idx.tolist(), top_scores.tolist(), strict=True), start=1):
        lab = int(y_train[j])
        retrieved.append({"rank": rank, "index": j, "label": lab, "class_name": names[lab], "score": float(s),
                          "same_class": lab == q_label, "argmax_cell": [int(v) for v in argmax[j]]})
    same = sum(r["same_class"] for r in retrieved) / k
    counts = art.train_counts

    fig_path = out_dir / "patch_retrieval.png"
    json_path = out_dir / "patch_retrieval.json"
    result = {
        "analysis": "patch_retrieval",
        "run_dir": str(art.run_dir), "method": _run_method(art), "backbone": _backbone_source(art),
        "query": {"test_index": query, "choice": query_choice, "label": q_label, "class_name": names[q_label],
                  "train_count": counts[q_label], "box": list(x1y1x2y2),
                  "box_units": f"pixels of the {size}x{size} evaluation-size image (x1, y1, x2, y2)"},
        "settings": {
            "k": k, "image_size": size, "feature_map_size": list(map_hw), "feature_dim": int(q_map.shape[1]),
            "query_feature": ("ROI-pooled (dscl.patches.pool_boxes, the PBSD teacher's pooling: 2x2 roi_align bins "
                              f"averaged, aligned={ALIGNED_DEFAULT}) from the evaluation backbone's feature map of "
                              "the query, in backbone feature space (no projection head), L2-normalised"),
            "score": SCORE_NOTE, "gallery": f"the training set ({len(train)} images)", "device": str(dev),
        },
        "retrieved": retrieved,
        "same_class_fraction": same,
        "chance_same_class_fraction": counts[q_label] / len(train),
        "files": {"figure": str(fig_path), "json": str(json_path)},
    }
    _plot_patch_retrieval(art, result, maps[top_idx], fig_path)
    write_json(json_path, result)
    return result


def _plot_patch_retrieval(art: RunArtifacts, result: dict[str, Any], maps: Tensor, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    q = result["query"]
    retrieved = result["retrieved"]
    k = len(retrieved)
    size = result["settings"]["image_size"]
    factor = _upscale_factor(size)
    disp = size * factor
    heat = F.interpolate(maps[:, None].float().cpu(), size=(disp, disp), mode="bilinear", align_corners=False)[:, 0]
    vmin, vmax = float(maps.min()), float(maps.max())
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.05, vmax + 0.05

    ncols = min(k + 1, 6)
    nrows = math.ceil((k + 1) / ncols)
    fig = Figure(figsize=(ncols * 2.4 + 1.0, nrows * 2.9 + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[k + 1:]:
        ax.set_axis_off()
    ax = axes[0]
    ax.imshow(_nearest_up(_display_image(art, art.splits.test, q["test_index"]), factor), interpolation="nearest")
    x1, y1, x2, y2 = (v * factor for v in q["box"])
    # imshow puts pixel p's centre at p, so pixel edges (box coordinates) sit at -0.5 offsets.
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="#00e5ff", linewidth=2.5))
    _frame(ax, "#1f4e9c", 3)
    ax.set_title(f"query: test #{q['test_index']}", fontsize=10)
    ax.set_xlabel(f"{_short(q['class_name'], 18)} ({q['train_count']} train)\nbox {_fmt_box(q['box'])}",
                  fontsize=9)
    image = None
    fh, fw = result["settings"]["feature_map_size"]
    for r, item in enumerate(retrieved):
        ax = axes[r + 1]
        ax.imshow(_nearest_up(_display_image(art, art.splits.train, item["index"]), factor), interpolation="nearest")
        image = ax.imshow(heat[r].numpy(), cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax, interpolation="bilinear")
        row, col = item["argmax_cell"]
        ax.plot((col + 0.5) * disp / fw - 0.5, (row + 0.5) * disp / fh - 0.5, marker="+", color="white",
                markersize=12, markeredgewidth=2.5)
        color = "#1a9641" if item["same_class"] else "#d7191c"
        _frame(ax, color, 3)
        ax.set_title(f"#{item['rank']}: train #{item['index']}", fontsize=10)
        verdict = "same class" if item["same_class"] else "other class"
        ax.set_xlabel(f"{_short(item['class_name'], 18)}\nscore {item['score']:.3f} · {verdict}", fontsize=9,
                      color=color)
    if image is not None:  # an opaque colour bar (the overlay itself is semi-transparent)
        fig.colorbar(ScalarMappable(norm=image.norm, cmap=image.cmap), ax=list(axes[1:k + 1]), shrink=0.8, pad=0.02,
                     label="cosine similarity to the query patch")
    fig.suptitle(
        f"Patch retrieval ({result['method']}): top-{k} training images by max response to the boxed query patch "
        f"— {sum(r['same_class'] for r in retrieved)}/{k} in the query's class\n"
        f"response = cosine(ROI-pooled query patch, each position of the {fh}x{fw} backbone map), upsampled "
        "bilinearly; + = best position; border green = same class, red = other",
        fontsize=10,
    )
    return save_figure(fig, path, close=True)


def _fmt_box(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def format_patch_retrieval(result: dict[str, Any]) -> str:
    """A short text summary of :func:`patch_retrieval`'s result.

    Args:
        result: the dict returned by :func:`patch_retrieval`.

    Returns:
        Multi-line text.
    """
    q, s = result["query"], result["settings"]
    lines = [
        f"patch retrieval ({result['method']}, {result['run_dir']}): query test #{q['test_index']} "
        f"({q['class_name']}, {q['train_count']} training images), box {_fmt_box(q['box'])} of "
        f"{s['image_size']}x{s['image_size']} px, feature map {s['feature_map_size'][0]}x{s['feature_map_size'][1]}",
        f"{'rank':>4}  {'train #':>7}  {'class':<18} {'score':>6}  same class",
    ]
    for r in result["retrieved"]:
        lines.append(f"{r['rank']:>4}  {r['index']:>7}  {_short(r['class_name'], 18):<18} {r['score']:6.3f}  "
                     f"{'yes' if r['same_class'] else 'no'}")
    lines += [
        f"same class as the query: {result['same_class_fraction']:.2f} of {len(result['retrieved'])} "
        f"(chance from the training prior {result['chance_same_class_fraction']:.3f})",
        f"figure: {result['files']['figure']}",
        f"json:   {result['files']['json']}",
    ]
    return "\n".join(lines)
