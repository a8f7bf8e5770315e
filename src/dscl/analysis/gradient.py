"""Gradient-ratio diagnostic: pull on the own augmented view vs pull on the other positives (paper Fig. 2).

For anchor query ``q_i`` the contrast set is exactly the one of :mod:`dscl.losses`: the other in-batch
queries, every in-batch key (the own key ``k_i`` included) and the queue's filled entries; the self
column is excluded. With ``p = softmax_j(q_i . f_j / tau)`` over that set, the gradient of anchor i's
loss w.r.t. ``q_i`` (other queries held constant; METHOD.md A.5, A.6, G 5) is

    dloss_i/dq_i = (1/tau) sum_j (p_j - w_j) f_j,

with ``w = 1/(|P_i|+1)`` on ``k_i`` and on each t in ``P_i`` for SCL, ``w = alpha`` on ``k_i`` and
``(1-alpha)/|P_i|`` on each t in ``P_i`` for DSCL, and ``w = 0`` on negatives. ``P_i`` = contrast
entries with the anchor's label other than ``k_i``. ``p`` and ``w`` are read off the dense reference
:func:`dscl.losses.dense_contrast` (the official loss's masks and weights, ``beta = (1-alpha)/alpha``;
SupCon's uniform weights for SCL), normalised. Two pull ratios per anchor (``1/tau`` cancels):

* **vector ratio** ``||(p_k - w_k) k_i|| / ||sum_{t in P_i} (p_t - w_t) f_t||`` — L2 norm of the term
  pulling toward the own view over the L2 norm of the term pulling toward the other positives;
* **coefficient ratio** ``|p_k - w_k| / sum_{t in P_i} |p_t - w_t|`` — the supplement's Eq. 3
  quantity. At uniform ``p`` (and ``1/|M| -> 0``) it is ``1/|P_i|`` for SCL and ``alpha/(1-alpha)``
  for DSCL (METHOD.md G 6).

Anchors with ``|P_i| = 0`` have no other positives and are skipped. :func:`gradient_ratio` measures
both losses on the same features for the run's final stage-1 model (with its saved queue) and for the
same model at initialisation (queue filled with real keys first), per class and per Many/Medium/Few.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dscl.analysis.common import (
    AnalysisError,
    analysis_dir,
    open_run,
    stage1_model,
)
from dscl.data.views import DSCLTransform
from dscl.dist import resolve_device
from dscl.io import save_figure, write_json
from dscl.losses import (
    _check_alpha,
    _check_temperature,
    dense_contrast,
    dscl_loss,
    positive_weights,
    supcon_loss,
)
from dscl.metrics import mean_or_none
from dscl.model import DSCLModel

__all__ = [
    "LOSSES",
    "AnchorTerms",
    "anchor_terms",
    "autograd_anchor_gradient",
    "uniform_pull_ratio",
    "gradient_ratio",
    "plot_gradient_ratio",
    "format_summary",
]

#: The two losses compared, in display order.
LOSSES: tuple[str, str] = ("scl", "dscl")
#: The two models compared, in display order.
MODELS: tuple[str, str] = ("final", "init")
_GROUPS: tuple[str, str, str] = ("many", "medium", "few")
_LOSS_TITLES = {"scl": "SCL", "dscl": "DSCL"}
_LOSS_COLOURS = {"scl": "#0072B2", "dscl": "#D55E00"}
_BN_MODES = {
    "train": "batch statistics (train mode, as in stage-1 training; forwards under no_grad)",
    "eval": "running statistics (eval mode; forwards under no_grad)",
}
_CHECK_TOL = 1e-8  # relative error allowed between the decomposition and autograd (float64)


# --------------------------------------------------------------------------------------------------
# Per-anchor decomposition
# --------------------------------------------------------------------------------------------------


@dataclass
class AnchorTerms:
    """The three terms of ``tau * dloss_i/dq_i`` for every anchor of one batch, and the pull ratios.

    Columns of ``delta`` follow :mod:`dscl.losses`: ``[queries (B) | keys (B) | queue (K)]``.

    Attributes:
        own: ``(B, D)`` ``(p_k - w_k) k_i`` — the pull toward the own augmented view.
        positives: ``(B, D)`` ``sum_{t in P_i} (p_t - w_t) f_t`` — the pull toward the other positives.
        negatives: ``(B, D)`` ``sum_{n in N_i} p_n f_n`` — the push from the negatives.
        own_coef: ``(B,)`` ``|p_k - w_k|``.
        pos_coef: ``(B,)`` ``sum_{t in P_i} |p_t - w_t|``.
        n_pos: ``(B,)`` int64 ``|P_i|``.
        p_own: ``(B,)`` ``p(k_i | i)``.
        delta: ``(B, 2B + K)`` ``p - w`` (0 in the self column).
        n_contrast: ``|M| = 2B - 1 + K``, the size of every anchor's contrast set.
        temperature: ``tau``.
    """

    own: Tensor
    positives: Tensor
    negatives: Tensor
    own_coef: Tensor
    pos_coef: Tensor
    n_pos: Tensor
    p_own: Tensor
    delta: Tensor
    n_contrast: int
    temperature: float

    def gradient(self) -> Tensor:
        """``(B, D)`` ``dloss_i/dq_i = (own + positives + negatives) / tau`` (other queries held constant)."""
        return (self.own + self.positives + self.negatives) / self.temperature

    @property
    def valid(self) -> Tensor:
        """``(B,)`` bool: anchors with at least one other positive (the others have no ratio)."""
        return self.n_pos > 0

    def vector_ratio(self) -> Tensor:
        """``(B,)`` ``||own|| / ||positives||``; NaN where ``|P_i| = 0``."""
        ratio = self.own.norm(dim=1) / self.positives.norm(dim=1)
        return torch.where(self.valid, ratio, torch.full_like(ratio, math.nan))

    def coef_ratio(self) -> Tensor:
        """``(B,)`` ``|p_k - w_k| / sum_{t in P_i} |p_t - w_t|``; NaN where ``|P_i| = 0``."""
        ratio = self.own_coef / self.pos_coef
        return torch.where(self.valid, ratio, torch.full_like(ratio, math.nan))


def _check_loss(loss: str, alpha: float, temperature: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    _check_alpha(alpha)
    _check_temperature(temperature)


@torch.no_grad()
def anchor_terms(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    *,
    loss: str,
    alpha: float = 1 / 9,
    temperature: float = 0.07,
) -> AnchorTerms:
    """Decompose every anchor's gradient into own-view, other-positive and negative terms (float64).

    Args:
        query: ``(B, D)`` L2-normalised anchor features (online encoder, query views).
        key: ``(B, D)`` L2-normalised momentum-encoder features of the key views.
        labels: ``(B,)`` integer labels of the batch.
        queue: ``(K, D)`` filled queue entries (K may be 0).
        queue_labels: ``(K,)`` integer labels of the queue entries.
        loss: ``"scl"`` (SupCon weights ``1/(|P_i|+1)``) or ``"dscl"`` (``alpha`` / ``(1-alpha)/|P_i|``).
        alpha: DSCL weight of the own key, in (0, 1] (ignored for SCL).
        temperature: ``tau > 0``.

    Returns:
        An :class:`AnchorTerms` on the inputs' device, in float64.

    Raises:
        ValueError: unknown ``loss``, bad ``alpha``/``temperature`` or inconsistent shapes.
    """
    _check_loss(loss, alpha, temperature)
    if query.dim() != 2 or key.shape != query.shape or queue.dim() != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(
            f"need query (B, D), key (B, D), queue (K, D); got query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}, queue {tuple(queue.shape)}"
        )
    if labels.shape != (query.shape[0],) or queue_labels.shape != (queue.shape[0],):
        raise ValueError(
            f"labels must be ({query.shape[0]},) and queue_labels ({queue.shape[0]},); got "
            f"{tuple(labels.shape)} and {tuple(queue_labels.shape)}"
        )
    dtype = torch.float64
    b = query.shape[0]
    q, k = query.detach().to(dtype), key.detach().to(dtype)
    beta = None if loss == "scl" else (1 - alpha) / alpha  # SupCon: every positive weight 1
    dense = dense_contrast(q, k, labels.long(), queue.detach().to(dtype), queue_labels.long().to(labels.device),
                           beta=beta, temperature=temperature)
    rows = torch.arange(b, device=q.device)
    p = dense.log_prob.exp() * dense.logits_mask  # (B, N) p(t|i); 0 in the self column
    delta = p - dense.weights / dense.weights.sum(dim=1, keepdim=True)  # p - w, w summing to 1 per anchor
    pos = (dense.mask - dense.own_key).bool()  # P_i: same label, neither self nor own key
    neg = (dense.logits_mask - dense.mask).bool()  # N_i: other labels
    d_own = delta[rows, b + rows]
    pos_delta = delta * pos
    return AnchorTerms(
        own=d_own[:, None] * k,
        positives=pos_delta @ dense.features,
        negatives=(p * neg) @ dense.features,
        own_coef=d_own.abs(),
        pos_coef=pos_delta.abs().sum(dim=1),
        n_pos=pos.sum(dim=1),
        p_own=p[rows, b + rows],
        delta=delta,
        n_contrast=dense.features.shape[0] - 1,
        temperature=float(temperature),
    )


def autograd_anchor_gradient(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    i: int,
    *,
    loss: str,
    alpha: float = 1 / 9,
    temperature: float = 0.07,
) -> Tensor:
    """``dloss_i/dq_i`` by autograd through :func:`~dscl.losses.dscl_loss` / :func:`~dscl.losses.supcon_loss`.

    Anchor i's loss alone is the batch-of-one loss with anchor ``q_i``, key ``k_i`` and, as the
    "queue", every other contrast entry of the batch (other queries, other keys, queue): same
    contrast set, same ``P_i``, and the other queries are constants, as in the decomposition.

    Args:
        query, key, labels, queue, queue_labels: as for :func:`anchor_terms`.
        i: the anchor's row.
        loss: ``"scl"`` or ``"dscl"``.
        alpha: DSCL weight of the own key.
        temperature: ``tau``.

    Returns:
        ``(D,)`` float64 gradient.
    """
    _check_loss(loss, alpha, temperature)
    b = query.shape[0]
    if not 0 <= i < b:
        raise ValueError(f"anchor index i={i} is outside 0..{b - 1}")
    dtype = torch.float64
    others = torch.tensor([j for j in range(b) if j != i], dtype=torch.long, device=query.device)
    bank = torch.cat([query[others], key[others], queue]).detach().to(dtype)
    bank_labels = torch.cat([labels[others], labels[others], queue_labels.to(labels.device)]).long()
    qi = query[i : i + 1].detach().to(dtype).requires_grad_(True)
    ki = key[i : i + 1].detach().to(dtype)
    with torch.enable_grad():
        if loss == "scl":
            value = supcon_loss(qi, ki, labels[i : i + 1].long(), bank, bank_labels, temperature=temperature)
        else:
            value = dscl_loss(qi, ki, labels[i : i + 1].long(), bank, bank_labels, alpha=alpha,
                              temperature=temperature)
        (grad,) = torch.autograd.grad(value, qi)
    return grad[0]


def uniform_pull_ratio(n_pos: Tensor, n_contrast: int, *, loss: str, alpha: float = 1 / 9) -> Tensor:
    """Exact coefficient (and vector) ratio when all logits are equal, ``p = 1/|M|`` (METHOD.md G 6).

    ``|1/M - w_k| / (|P_i| |1/M - w_t|)``: ``-> 1/|P_i|`` (SCL) and ``-> alpha/(1-alpha)`` (DSCL) as
    ``M`` grows. NaN where ``|P_i| = 0``.

    Args:
        n_pos: ``|P_i|`` per anchor (any shape, integer or float).
        n_contrast: ``|M|``, the contrast-set size.
        loss: ``"scl"`` or ``"dscl"``.
        alpha: DSCL weight of the own key.

    Returns:
        float64 tensor of ``n_pos``'s shape.
    """
    _check_loss(loss, alpha, 1.0)
    n = n_pos.to(torch.float64)
    w_own, w_pos = positive_weights(loss, n, float(alpha))
    u = 1.0 / n_contrast
    ratio = (u - w_own).abs() / (n * (u - w_pos).abs())
    return torch.where(n > 0, ratio, torch.full_like(ratio, math.nan))


# --------------------------------------------------------------------------------------------------
# Training batches of a run
# --------------------------------------------------------------------------------------------------


def _index_batches(n_images: int, batch: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` batches of training indices: shuffled epochs, cut into full batches (drop_last)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[np.ndarray] = []
    while len(out) < count:
        perm = torch.randperm(n_images, generator=gen).numpy()
        for start in range(0, n_images - batch + 1, batch):
            out.append(perm[start : start + batch])
            if len(out) == count:
                break
    return out


class _BatchMaker:
    """Query/key views of the run's training images, reproducible per batch position.

    Batch ``n`` of the stream always gets the same augmentations (its own generator, seeded from the
    run's seed and ``n``), so both models see identical images without holding them in memory.
    """

    def __init__(self, art: Any, seed: int) -> None:
        cfg = art.cfg
        self.views = dataclasses.replace(cfg.views, num_patches=0)  # patches are not needed here
        self.image_size = cfg.data.image_size
        self.mean, self.std = art.spec.mean, art.spec.std  # stage 1's normalisation
        self.train = art.splits.train
        self.seed = seed

    def __call__(self, position: int, indices: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        state = np.random.SeedSequence([self.seed, position]).generate_state(1, dtype=np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
        transform = DSCLTransform(self.image_size, self.views, self.mean, self.std, generator=gen)
        queries, keys = [], []
        for i in indices:
            views = transform(self.train.load(int(i)))
            queries.append(views.query)
            keys.append(views.key)
        labels = torch.tensor([self.train.targets[int(i)] for i in indices], dtype=torch.long)
        return torch.stack(queries), torch.stack(keys), labels


@torch.no_grad()
def _encode(model: DSCLModel, query: Tensor, key: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    q, _ = model.online(query.to(device))
    k, _ = model.momentum(key.to(device))
    return q.float().cpu(), k.float().cpu()


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def _per_class_rows(
    anchors: Mapping[str, np.ndarray], loss: str, alpha: float, names: list[str], counts: list[int],
    group_of: Mapping[int, str],
) -> list[dict[str, Any]]:
    rows = []
    for c, name in enumerate(names):
        of_class = anchors["labels"] == c
        used = of_class & (anchors["n_pos"] > 0)
        n_pos = anchors["n_pos"][used]
        mean_n_pos = mean_or_none(n_pos.astype(np.float64))
        theory = (alpha / (1 - alpha) if alpha < 1 else math.inf) if loss == "dscl" else \
            (1.0 / mean_n_pos if mean_n_pos else None)
        rows.append({
            "class": c,
            "name": name,
            "train_count": int(counts[c]),
            "group": group_of.get(c),
            "n_anchors": int(used.sum()),
            "n_skipped_no_positive": int((of_class & ~used).sum()),
            "mean_n_pos": mean_n_pos,
            "vector_ratio": mean_or_none(anchors[f"{loss}_vector"][used]),
            "coef_ratio": mean_or_none(anchors[f"{loss}_coef"][used]),
            "theory": theory if theory is None or math.isfinite(theory) else None,
            "uniform_p_ratio": mean_or_none(anchors[f"{loss}_uniform"][used]),
            "mean_p_own_key": mean_or_none(anchors["p_own"][used]),
        })
    return rows


def _per_group(rows: list[dict[str, Any]], groups: Mapping[str, list[int]]) -> dict[str, dict[str, Any]]:
    out = {}
    for g in _GROUPS:
        members = [rows[c] for c in groups.get(g, []) if rows[c]["n_anchors"] > 0]
        entry: dict[str, Any] = {"n_classes": len(members), "n_anchors": sum(r["n_anchors"] for r in members)}
        for field in ("vector_ratio", "coef_ratio", "theory", "uniform_p_ratio", "mean_n_pos"):
            vals = [r[field] for r in members if r[field] is not None]
            entry[field] = float(np.mean(vals)) if vals else None
        out[g] = entry
    return out


def _measure(
    model: DSCLModel, maker: _BatchMaker, batches: list[tuple[int, np.ndarray]], device: torch.device,
    alpha: float, temperature: float, bar: Any, check: dict[str, Any] | None,
) -> dict[str, np.ndarray]:
    """Per-anchor ratios over ``batches`` with the model's current queue (not updated)."""
    queue, queue_labels = (t.detach().float().cpu() for t in model.queue.snapshot())
    parts: dict[str, list[np.ndarray]] = {}

    def add(name: str, value: Tensor) -> None:
        parts.setdefault(name, []).append(value.detach().cpu().numpy())

    for position, indices in batches:
        query, key, labels = maker(position, indices)
        q, k = _encode(model, query, key, device)
        add("labels", labels)
        for loss in LOSSES:
            terms = anchor_terms(q, k, labels, queue, queue_labels, loss=loss, alpha=alpha, temperature=temperature)
            if loss == LOSSES[0]:
                add("n_pos", terms.n_pos)
                add("p_own", terms.p_own)
            add(f"{loss}_vector", terms.vector_ratio())
            add(f"{loss}_coef", terms.coef_ratio())
            add(f"{loss}_uniform", uniform_pull_ratio(terms.n_pos, terms.n_contrast, loss=loss, alpha=alpha))
            if check is not None and loss not in check:
                check[loss] = _autograd_check(terms, q, k, labels, queue, queue_labels, loss, alpha, temperature)
        bar.update(1)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _autograd_check(
    terms: AnchorTerms, q: Tensor, k: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor,
    loss: str, alpha: float, temperature: float,
) -> dict[str, Any]:
    """Compare the summed decomposition with autograd of our loss for one anchor; raise on mismatch."""
    valid = torch.nonzero(terms.valid).flatten()
    i = int(valid[0]) if valid.numel() else 0
    auto = autograd_anchor_gradient(q, k, labels, queue, queue_labels, i, loss=loss, alpha=alpha,
                                    temperature=temperature)
    mine = terms.gradient()[i]
    err = float((auto - mine).abs().max())
    rel = err / max(float(auto.abs().max()), 1e-300)
    if not rel <= _CHECK_TOL:
        raise RuntimeError(
            f"gradient decomposition of {loss} disagrees with autograd of dscl.losses for anchor {i} "
            f"(max abs diff {err:.3g}, relative {rel:.3g}); the analysis no longer matches the loss code"
        )
    return {"anchor": i, "n_pos": int(terms.n_pos[i]), "max_abs_diff": err, "relative_diff": rel,
            "tolerance": _CHECK_TOL}


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """The training batches of one measurement: those that fill the init model's queue, then the measured ones.

    Each entry is ``(position in the stream, training indices)``; the position seeds the batch's augmentations.
    """

    batch: int
    queue_size: int
    fill: list[tuple[int, np.ndarray]]
    measured: list[tuple[int, np.ndarray]]


def _batch_stream(art: Any, batches: int) -> _Stream:
    """``ceil(K/B)`` queue-filling batches, then ``batches`` measured ones, from the run's seeded stream."""
    cfg = art.cfg
    batch = min(int(cfg.optim.batch_size), len(art.splits.train))
    queue_size = int(cfg.model.queue_size)
    n_fill = math.ceil(queue_size / batch) if queue_size else 0
    stream = list(enumerate(_index_batches(len(art.splits.train), batch, n_fill + batches, cfg.optim.seed)))
    return _Stream(batch, queue_size, stream[:n_fill], stream[n_fill:])


def _fill_queue(model: DSCLModel, maker: _BatchMaker, fill: list[tuple[int, np.ndarray]], device: torch.device,
                bar: Any) -> None:
    """Enqueue the momentum encoder's keys of the ``fill`` batches (FIFO, true labels), as training would."""
    for position, indices in fill:
        _, key, labels = maker(position, indices)
        with torch.no_grad():
            k, _ = model.momentum(key.to(device))
        model.queue.enqueue(k.float(), labels.to(k.device))
        bar.update(1)


def _measure_models(
    art: Any, stream: _Stream, device: torch.device, bn: str, progress: bool
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int], dict[str, Any]]:
    """Per-anchor ratios of the final model (its saved queue) and the initial one (queue filled first).

    Returns ``(anchors by model, filled queue entries by model, the autograd check)``.
    """
    cfg = art.cfg
    alpha, tau = float(cfg.loss.alpha), float(cfg.loss.temperature)
    maker = _BatchMaker(art, cfg.optim.seed)
    final = stage1_model(art).to(device)
    initial = stage1_model(art, initial=True).to(device)
    final.train(bn == "train")
    initial.train(bn == "train")

    bar = tqdm(total=2 * len(stream.measured) + len(stream.fill), desc="gradient ratio", unit="batch",
               disable=not progress, leave=False, dynamic_ncols=True)
    check: dict[str, Any] = {}
    anchors = {"final": _measure(final, maker, stream.measured, device, alpha, tau, bar, check)}
    filled = {"final": len(final.queue)}
    del final
    _fill_queue(initial, maker, stream.fill, device, bar)
    anchors["init"] = _measure(initial, maker, stream.measured, device, alpha, tau, bar, None)
    filled["init"] = len(initial.queue)
    bar.close()
    return anchors, filled, check


def _summaries(art: Any, anchors: Mapping[str, Mapping[str, np.ndarray]], alpha: float) -> dict[str, Any]:
    """``{model: {loss: {"per_class", "per_group"}}}`` from the per-anchor ratios."""
    groups = art.groups()
    group_of = {c: g for g in _GROUPS for c in groups.get(g, [])}
    models: dict[str, Any] = {}
    for m in MODELS:
        models[m] = {}
        for loss in LOSSES:
            rows = _per_class_rows(anchors[m], loss, alpha, art.splits.class_names, art.train_counts, group_of)
            models[m][loss] = {"per_class": rows, "per_group": _per_group(rows, groups)}
    return models


def _settings(art: Any, stream: _Stream, filled: Mapping[str, int], bn: str, device: torch.device) -> dict[str, Any]:
    """The ``settings`` block of ``gradient_ratio.json``: what was measured, how, and the definitions."""
    cfg = art.cfg
    batch, n_fill, batches = stream.batch, len(stream.fill), len(stream.measured)
    return {
        "run": str(art.run_dir),
        "dataset": art.splits.name,
        "trained_loss": cfg.loss.loss,
        "alpha": float(cfg.loss.alpha),
        "temperature": float(cfg.loss.temperature),
        "batches": batches,
        "batch_size": batch,
        "anchors_measured": batches * batch,
        "queue_size": stream.queue_size,
        "queue_filled": dict(filled),
        "contrast_set_size": 2 * batch - 1 + filled["final"],
        "bn_mode": _BN_MODES[bn],
        "final_queue": (
            "the stage-1 checkpoint's saved queue (filled entries only; it may hold other views of "
            "measured images, as at an epoch boundary in training)"
        ),
        "init_queue_fill": (
            f"FIFO-filled with the initial momentum encoder's keys of the {n_fill} batches "
            f"({n_fill * batch} key views) preceding the measured batches in the same shuffled "
            "stream, with their true labels"
        ),
        "train_counts": [int(c) for c in art.train_counts],
        "many_threshold": int(cfg.eval.many_threshold),
        "few_threshold": int(cfg.eval.few_threshold),
        "seed": int(cfg.optim.seed),
        "device": str(device),
        "definitions": {
            "vector_ratio": "||(p_k - w_k) k_i|| / ||sum_{t in P_i} (p_t - w_t) f_t|| (mean over anchors)",
            "coef_ratio": "|p_k - w_k| / sum_{t in P_i} |p_t - w_t| (supp. Eq. 3; mean over anchors)",
            "weights": "SCL w = 1/(|P_i|+1) on k_i and each t in P_i; DSCL w = alpha on k_i, "
                       "(1-alpha)/|P_i| on each t in P_i; 0 on negatives",
            "theory": "SCL 1/mean|P_i| of the class; DSCL alpha/(1-alpha) (uniform p, 1/|M| -> 0)",
            "uniform_p_ratio": "exact ratio at p = 1/|M| for each anchor's |P_i|, averaged",
            "skipped": "anchors with |P_i| = 0 (no other positive) are not counted",
            "groups": "per-group values are means of the class means",
        },
    }


def gradient_ratio(
    run: str | Path,
    *,
    batches: int = 4,
    out: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    bn: str = "train",
) -> dict[str, Any]:
    """Measure the own-view / other-positive pull ratios of SCL and DSCL for a finished run (Fig. 2).

    ``batches`` training batches of ``cfg.optim.batch_size`` (capped at the training-set size) are
    drawn deterministically from ``cfg.optim.seed``: shuffled epochs of full batches, each batch with
    its own seeded augmentations. For the **final** model (the stage-1 checkpoint) the queue is the
    checkpoint's saved queue. For the **init** model (same construction and seed as training), the
    queue is first filled FIFO with the momentum-encoder keys of the ``ceil(K/B)`` batches that precede
    the measured ones in the same stream (as the queue of a training step holds the previous batches'
    keys), so its entries have real labels. Both models, and both losses, see the same images.

    Args:
        run: a run directory whose stage 1 has finished.
        batches: number of measured batches (>= 1).
        out: output folder (default ``RUN/analysis``).
        device: ``auto``, ``cpu``, ``cuda``, ...
        progress: show a progress bar.
        bn: ``train`` (BatchNorm batch statistics, as in training) or ``eval`` (running statistics).

    Returns:
        The dict written to ``gradient_ratio.json`` (see the module docstring for the ratios).

    Raises:
        AnalysisError: ``batches < 1``, unknown ``bn``, or a run trained with cross-entropy.
        RunDirError: the run directory is missing, has no finished stage-1 checkpoint.
        RuntimeError: the decomposition disagrees with autograd of :mod:`dscl.losses` (checked once per call).
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise AnalysisError(f"--batches must be an integer >= 1, got {batches!r}")
    if bn not in _BN_MODES:
        raise AnalysisError(f"bn must be one of {', '.join(_BN_MODES)}, got {bn!r}")
    art = open_run(run)
    dev = resolve_device(device)
    stream = _batch_stream(art, batches)
    anchors, filled, check = _measure_models(art, stream, dev, bn, progress)
    alpha = float(art.cfg.loss.alpha)
    groups = art.groups()
    dest = analysis_dir(art, out)
    json_path, png_path = dest / "gradient_ratio.json", dest / "gradient_ratio.png"
    result: dict[str, Any] = {
        "analysis": "gradient_ratio",
        "settings": _settings(art, stream, filled, bn, dev),
        "autograd_check": check,
        "theory": {"dscl": alpha / (1 - alpha) if alpha < 1 else None, "scl": "1 / mean |P_i| per class"},
        "groups": {g: list(groups.get(g, [])) for g in _GROUPS},
        "models": _summaries(art, anchors, alpha),
        "outputs": {"json": str(json_path), "png": str(png_path)},
    }
    plot_gradient_ratio(result, png_path)
    write_json(json_path, result)
    return result


# --------------------------------------------------------------------------------------------------
# Plot and summary
# --------------------------------------------------------------------------------------------------


def plot_gradient_ratio(result: Mapping[str, Any], path: Path) -> Path:
    """Two panels (coefficient ratio, vector ratio) vs class size, SCL and DSCL, final and init.

    Args:
        result: the dict returned by :func:`gradient_ratio`.
        path: PNG to write (atomically).

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # pyplot-free: renders with Agg, no global backend change

    settings = result["settings"]
    alpha = settings["alpha"]
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("coef_ratio", "coefficient ratio |p_k−w_k| / Σ_P |p_t−w_t|"),
              ("vector_ratio", "vector ratio ‖own-view term‖ / ‖other-positives term‖"))
    all_y: list[float] = []
    counts = [max(c, 1) for c in settings["train_counts"]]
    x_lo, x_hi = min(counts) / 1.4, max(counts) * 1.4
    for ax, (field, title) in zip(axes, panels, strict=True):
        for loss in LOSSES:
            colour = _LOSS_COLOURS[loss]
            for m, face in (("final", colour), ("init", "none")):
                rows = [r for r in result["models"][m][loss]["per_class"] if r[field] is not None and r[field] > 0]
                x = [max(r["train_count"], 1) for r in rows]
                y = [r[field] for r in rows]
                all_y += y
                label = f"{_LOSS_TITLES[loss]}, {'final checkpoint' if m == 'final' else 'initialisation'}"
                ax.scatter(x, y, s=52, marker="o" if m == "final" else "D", facecolors=face, edgecolors=colour,
                           linewidths=1.4, zorder=3, label=label)
        theory_rows = sorted((r for r in result["models"]["final"]["scl"]["per_class"] if r["theory"]),
                             key=lambda r: r["train_count"])
        if theory_rows:
            ty = [r["theory"] for r in theory_rows]
            all_y += ty
            ax.plot([max(r["train_count"], 1) for r in theory_rows], ty, ls="--", color=_LOSS_COLOURS["scl"],
                    lw=1.5, zorder=2, label="SCL theory 1/|P_i| (class mean |P_i|)")
        if alpha < 1:
            ax.axhline(alpha / (1 - alpha), ls="--", color=_LOSS_COLOURS["dscl"], lw=1.5, zorder=2,
                       label=f"DSCL theory α/(1−α) = {alpha / (1 - alpha):.3g}")
            all_y.append(alpha / (1 - alpha))
        for t in (settings["few_threshold"], settings["many_threshold"]):
            ax.axvline(t, color="0.45", ls=":", lw=1.2, zorder=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax, x_lo, x_hi)
        ax.set_xlim(x_lo, x_hi)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("training images per class (log scale)", fontsize=11)
        ax.grid(True, which="both", alpha=0.25)
        ax.tick_params(labelsize=10)
    axes[0].set_ylabel("pull on own view / pull on other positives (ratio, log scale)", fontsize=11)
    if all_y:
        lo, hi = min(all_y), max(all_y)
        axes[0].set_ylim(lo / 2, hi * 2)
    axes[1].legend(loc="best", fontsize=9, framealpha=0.9)
    bounds = f"dotted: Few < {settings['few_threshold']} ≤ Medium ≤ {settings['many_threshold']} < Many"
    axes[0].text(0.01, 0.01, bounds, transform=axes[0].transAxes, fontsize=9, color="0.35", va="bottom")
    fig.suptitle(
        f"Gradient pull on the own augmented view vs the other positives (paper Fig. 2) — "
        f"{'/'.join(Path(settings['run']).parts[-2:])} ({settings['dataset']})\n"
        f"α = {alpha:.4g}, τ = {settings['temperature']:g}, {settings['batches']} batches × "
        f"{settings['batch_size']} anchors, queue {settings['queue_filled']['final']} (final) / "
        f"{settings['queue_filled']['init']} (init); filled = final, hollow = init",
        fontsize=12,
    )
    return save_figure(fig, path, close=True)


def _plain_log_ticks(ax: Any, x_lo: float, x_hi: float) -> None:
    """Plain numbers (6, 10, 60, 100) on a log x axis; minor labels only when it spans < 1.5 decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain if math.log10(x_hi / x_lo) < 1.5 else NullFormatter())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_summary(result: Mapping[str, Any]) -> str:
    """Short text table: Many/Medium/Few mean ratios per model and loss, beside the theory.

    Args:
        result: the dict returned by :func:`gradient_ratio`.

    Returns:
        Multi-line string ending with the output paths.
    """
    s = result["settings"]
    groups = result["groups"]
    lines = [
        "gradient ratio: pull on own view / pull on other positives (paper Fig. 2)",
        f"run {s['run']}: alpha {s['alpha']:.4g}, tau {s['temperature']:g}, {s['batches']} batches x "
        f"{s['batch_size']} anchors, queue {s['queue_filled']['final']} (final) / {s['queue_filled']['init']} (init)",
    ]
    final = result["models"]["final"][LOSSES[0]]["per_group"]
    lines.append("anchors with |P_i| > 0 (final model): " + ", ".join(
        f"{g.capitalize()} {final[g]['n_anchors']} in {len(groups[g])} classes" for g in _GROUPS))
    head = f"{'model':<6} {'loss':<5} {'ratio':<12}" + "".join(f"{g.capitalize():>9}" for g in _GROUPS)
    head += "  | theory " + " ".join(f"{g.capitalize():>8}" for g in _GROUPS)
    lines += [head, "-" * len(head)]
    for m in MODELS:
        for loss in LOSSES:
            per_group = result["models"][m][loss]["per_group"]
            theory = " ".join(f"{_fmt(per_group[g]['theory']):>8}" for g in _GROUPS)
            for field, label in (("coef_ratio", "coefficient"), ("vector_ratio", "vector")):
                vals = "".join(f"{_fmt(per_group[g][field]):>9}" for g in _GROUPS)
                lines.append(f"{m:<6} {_LOSS_TITLES[loss]:<5} {label:<12}{vals}  |        {theory}")
    lines += [f"json: {result['outputs']['json']}", f"png:  {result['outputs']['png']}"]
    return "\n".join(lines)
