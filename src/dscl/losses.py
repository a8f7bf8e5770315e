"""DSCL, SupCon (SCL baseline) and PBSD losses as pure functions of tensors (METHOD.md A.5-A.7).

Notation (METHOD.md G): for anchor query ``q_i`` the contrast set is every other in-batch query
``q_j`` (j != i, these carry gradient), every in-batch key ``k_j`` and every queue entry; the
logits are ``l_it = q_i . f_t / tau`` and ``p(t|i) = softmax_t(l_i)`` over that set. ``P_i`` is the
set of contrast entries other than ``k_i`` with the anchor's label.

* DSCL (A.6):  ``loss_i = -[alpha log p(k_i|i) + (1 - alpha)/|P_i| sum_{t in P_i} log p(t|i)]``,
  and ``-log p(k_i|i)`` when ``P_i`` is empty. This is the official ``DSCLLoss`` with
  ``beta = (1 - alpha) / alpha``.
* SupCon (A.5): uniform weight ``1/(|P_i| + 1)`` over ``{k_i} U P_i``.
* PBSD (A.7): soft cross-entropy between teacher and student distributions over
  ``[own key, queue...]`` (K + 1 entries).

Implementation notes (why it looks the way it does):

* No dense label masks. A DSCL/SupCon anchor needs ``sum_{t in P_i} l_it``, which equals
  ``q_i . (S_{y_i} - q_i - k_i) / tau`` with ``S_c`` the sum of all contrast features of class ``c``
  (one ``index_add_`` over the batch and the queue). The only B x (2B+K) buffers are the logits
  ((B, 2B) in-batch and (B, K) queue parts), turned into the softmax in place and kept for the
  analytic backward.
* Both contrastive cores are ``torch.autograd.Function`` s with analytic backwards (first-order
  only; double backward is not supported). Large fresh allocations are expensive on CPUs (first
  touch of mmap-ed pages), so the big buffers are written in place. PBSD never holds an
  (L*B) x (K+1) matrix: it walks blocks of rows (teacher and student logits of a block, 8 MiB each
  on a CPU), and each block's contribution to the student gradient is computed in the forward, so
  only the (L, B, D) gradient is saved (and not even computed when no gradient is needed). Peak
  extra memory at B = 128, K = 16384, L = 5: ~26 MiB, where two (L*B) x (K+1) buffers took 84 MB.
* Matmul outputs are contiguous (queue logits apart from the in-batch / own-key columns): a matmul
  into a column slice of a wider buffer makes a hidden copy.
* No host-device synchronisation when ``num_classes`` is given (GPU steps do not stall); without it
  ``torch.unique`` compresses the labels to the classes present, which waits for the device.
* Losses are computed in float32 even under ``torch.autocast`` (the fp16 guards of the official code
  overflow, METHOD.md C.2 item 5); float64 inputs stay float64.
* Keys, queue and the PBSD teacher are detached: no gradient ever reaches them.

:func:`dscl_loss_dense` and :func:`pbsd_loss_dense` are the plain references: the official code's
computation written equation for equation (dense label masks over ``cat(q, k, queue)``, a loop over
the patches). Tests, the benchmarks and the gradient analysis (:mod:`dscl.analysis.gradient`) use
them; training never does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "DSCLLoss",
    "DenseContrast",
    "PBSDLoss",
    "SupConLoss",
    "dense_contrast",
    "dscl_loss",
    "dscl_loss_dense",
    "pbsd_loss",
    "pbsd_loss_dense",
    "supcon_loss",
]

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# PBSD row blocks. A block's teacher and student (rows, K) logits hold at most _BLOCK_ELEMENTS
# elements each (8 MiB of float32: 128 rows at K = 16384, so both and the queue stay in a 32 MiB
# last-level cache), but never fewer than _MIN_BLOCK_ROWS rows: on a CPU the matmuls run 1.5-2x
# slower at 32-64 rows than at 128-256. A GPU gains nothing from blocking and pays per kernel
# launch: 64M elements (256 MiB) is one or two blocks at ImageNet-LT size (L*B = 1280, K = 65536).
_BLOCK_ELEMENTS = 1 << 21
_BLOCK_ELEMENTS_CUDA = 1 << 26
_MIN_BLOCK_ROWS = 128

# Maps |P_i| (per-anchor count of other positives, as a float tensor of the compute dtype) to the
# weight on log p(k_i|i) and the weight on each log p(t|i), t in P_i.
_WeightFn = Callable[[Tensor], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------------------------------
# Validation and dtype handling
# --------------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")


def _check_labels(name: str, labels: Tensor, expected: int, expected_from: str) -> None:
    if labels.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype} with shape {_shape(labels)}")
    if labels.dim() != 1 or labels.shape[0] != expected:
        raise ValueError(
            f"{name} must have shape ({expected},) to match {expected_from}, got {_shape(labels)}"
        )


def _check_contrastive_inputs(
    query: Tensor, key: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor
) -> None:
    for name, t in (("query", query), ("key", key), ("queue", queue)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {_shape(t)}")
    if query.shape[0] == 0:
        raise ValueError(f"query must hold at least one anchor (empty batch), got shape {_shape(query)}")
    if key.shape != query.shape:
        raise ValueError(f"key must have the shape of query, got key {_shape(key)} vs query {_shape(query)}")
    if queue.shape[1] != query.shape[1]:
        raise ValueError(
            f"queue feature dim must match query, got queue {_shape(queue)} vs query {_shape(query)}"
        )
    _check_labels("labels", labels, query.shape[0], f"query {_shape(query)}")
    _check_labels("queue_labels", queue_labels, queue.shape[0], f"queue {_shape(queue)}")


def _check_pbsd_inputs(patch_teacher: Tensor, patch_student: Tensor, key: Tensor, queue: Tensor) -> None:
    for name, t in (("patch_teacher", patch_teacher), ("patch_student", patch_student)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (L, B, D), got shape {_shape(t)}")
    if patch_teacher.shape != patch_student.shape:
        raise ValueError(
            "patch_teacher and patch_student must have the same shape, got "
            f"patch_teacher {_shape(patch_teacher)} vs patch_student {_shape(patch_student)}"
        )
    for name, t in (("key", key), ("queue", queue)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {_shape(t)}")
    n_patches, batch, dim = patch_student.shape
    if n_patches == 0 or batch == 0:
        raise ValueError(
            f"patch_student must hold at least one patch and one image, got {_shape(patch_student)}"
        )
    if key.shape[1] != dim:
        raise ValueError(
            f"key feature dim must match the patches, got key {_shape(key)} vs patch_student "
            f"{_shape(patch_student)}"
        )
    if key.shape[0] != batch:
        raise ValueError(
            f"key batch must match the patches' batch, got key {_shape(key)} vs patch_student "
            f"{_shape(patch_student)}"
        )
    if queue.shape[1] != dim:
        raise ValueError(
            f"queue feature dim must match the patches, got queue {_shape(queue)} vs patch_student "
            f"{_shape(patch_student)}"
        )


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half/bfloat16 inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# Shared numerics
# --------------------------------------------------------------------------------------------------


def _softmax_parts_(*parts: Tensor) -> Tensor:
    """Row softmax over the columns of all ``parts`` (each (R, n_i)) together, written in place.

    Returns the row log-sum-exp (R,). In place on purpose: a fresh (R, N) buffer costs as much as the
    exp itself on a CPU. Keeping the parts apart lets each be a contiguous matmul output.
    """
    parts = tuple(p for p in parts if p.shape[1])
    row_max = parts[0].amax(dim=1)
    for p in parts[1:]:
        row_max = torch.maximum(row_max, p.amax(dim=1))
    row_sum = torch.zeros_like(row_max)
    for p in parts:
        row_sum += p.sub_(row_max[:, None]).exp_().sum(dim=1)
    for p in parts:
        p.div_(row_sum[:, None])
    return row_max + row_sum.log()


def _pbsd_block_elements(device: torch.device) -> int:
    return _BLOCK_ELEMENTS_CUDA if device.type == "cuda" else _BLOCK_ELEMENTS


def _pbsd_block_rows(device: torch.device, rows: int, k_len: int) -> int:
    """Rows per PBSD block for ``rows`` rows of ``k_len`` queue logits (see _BLOCK_ELEMENTS)."""
    return max(1, min(rows, max(_MIN_BLOCK_ROWS, _pbsd_block_elements(device) // max(k_len, 1))))


def _check_num_classes(num_classes: int | None, labels: Tensor, queue_labels: Tensor) -> None:
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1 or None, got {num_classes!r}")
    # The range check reads the labels on the host: free on a CPU, a stall on a GPU, where an
    # out-of-range label trips index_add_'s device-side bounds assertion instead.
    for name, t in (("labels", labels), ("queue_labels", queue_labels)):
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, num_classes={num_classes}), got values in "
                f"[{int(t.min())}, {int(t.max())}]; pass num_classes=None for arbitrary integer labels"
            )


def _class_ids(
    labels: Tensor, queue_labels: Tensor, num_classes: int | None = None
) -> tuple[Tensor, Tensor, int]:
    """Class ids 0..C-1 of the batch and the queue, and C.

    With ``num_classes`` the labels are the ids (no host-device synchronisation). Without it, labels
    are compressed to the classes present in the batch (``torch.unique``, which waits for the device):
    queue entries whose class is not in the batch are never positives for any anchor and get the
    spare id C. Returns (batch ids (B,), queue ids (K,), C).
    """
    labels, queue_labels = labels.long(), queue_labels.long()
    if num_classes is not None:
        return labels, queue_labels, num_classes
    classes, batch_ids = torch.unique(labels, sorted=True, return_inverse=True)
    n_classes = classes.numel()
    if queue_labels.numel() == 0:
        return batch_ids, queue_labels.new_empty(0, dtype=torch.long), n_classes
    pos = torch.searchsorted(classes, queue_labels).clamp_(max=n_classes - 1)
    queue_ids = torch.where(classes[pos] == queue_labels, pos, torch.full_like(pos, n_classes))
    return batch_ids, queue_ids, n_classes


# --------------------------------------------------------------------------------------------------
# DSCL / SupCon core
# --------------------------------------------------------------------------------------------------


class _WeightedContrast(torch.autograd.Function):
    """Mean over anchors of ``lse_i - a_i l_{i,k_i} - c_i sum_{t in P_i} l_it`` (METHOD.md G 1, 5).

    Contrast columns: [queries (B) | keys (B)] in one (B, 2B) buffer and the queue (K) in a
    contiguous (B, K) one (a matmul into a column slice of a wider buffer costs a copy); the self
    column (diagonal of the query block) is -inf, so it is absent from numerator and denominator.
    Gradient (G 5): ``dloss_i/dl_it = p_it - w_it``, with ``w = a_i`` on ``k_i`` and ``c_i`` on each
    t in P_i.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        query: Tensor,
        key: Tensor,
        queue: Tensor,
        batch_ids: Tensor,
        queue_ids: Tensor,
        n_classes: int,
        key_weight: Tensor,
        pos_weight: Tensor,
        temperature: float,
    ) -> Tensor:
        b, k_len = query.shape[0], queue.shape[0]
        scaled = query * (1.0 / temperature)  # (B, D): q_i / tau
        prob = query.new_empty(b, 2 * b)
        torch.mm(scaled, query.t(), out=prob[:, :b])  # (B, B): q_i . q_j / tau
        torch.mm(scaled, key.t(), out=prob[:, b:])  # (B, B): q_i . k_j / tau
        queue_prob = scaled @ queue.t()  # (B, K): q_i . queue_m / tau
        prob[:, :b].diagonal().fill_(-math.inf)
        own_key = prob[:, b:].diagonal().clone()  # (B,): l_{i,k_i}

        # S_c: sum of all contrast features of class c (row C collects queue entries of other classes).
        class_sum = query.new_zeros(n_classes + 1, query.shape[1])
        class_sum.index_add_(0, batch_ids, query).index_add_(0, batch_ids, key)
        if k_len:
            class_sum.index_add_(0, queue_ids, queue)
        others = class_sum[batch_ids] - query - key  # (B, D): sum_{t in P_i} f_t
        pos_sum = (scaled * others).sum(dim=1)  # (B,): sum_{t in P_i} l_it

        lse = _softmax_parts_(prob, queue_prob)
        loss = (lse - key_weight * own_key - pos_weight * pos_sum).mean()

        ctx.save_for_backward(prob, queue_prob, query, key, queue, batch_ids, key_weight, pos_weight, others)
        ctx.n_classes = n_classes
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        prob, queue_prob, query, key, queue, batch_ids, key_weight, pos_weight, others = ctx.saved_tensors
        b = query.shape[0]
        with torch.autocast(device_type=query.device.type, enabled=False):
            # Anchor side: sum_t (p_it - w_it) f_t.
            grad = prob[:, :b] @ query  # (B, B) @ (B, D)
            grad.addmm_(prob[:, b:], key)  # (B, B) @ (B, D)
            if queue.shape[0]:
                grad.addmm_(queue_prob, queue)  # (B, K) @ (K, D)
            grad.sub_(key_weight.unsqueeze(1) * key + pos_weight.unsqueeze(1) * others)
            # Contrast side (q_j as a column of other anchors): sum_i (p_ij - w_ij) q_i, where
            # w_ij = c_i for i != j of the same class.
            grad.addmm_(prob[:, :b].t(), query)  # (B, B) @ (B, D)
            weighted = pos_weight.unsqueeze(1) * query  # (B, D): c_i q_i
            class_weighted = query.new_zeros(ctx.n_classes, query.shape[1]).index_add_(0, batch_ids, weighted)
            grad.sub_(class_weighted[batch_ids] - weighted)
            grad.mul_(grad_out / (b * ctx.temperature))
        return grad, None, None, None, None, None, None, None, None


def _dscl_weights(alpha: float) -> _WeightFn:
    def weights(n_pos: Tensor) -> tuple[Tensor, Tensor]:
        has_pos = n_pos > 0
        key_weight = torch.where(has_pos, torch.full_like(n_pos, alpha), 1.0)
        pos_weight = torch.where(has_pos, (1.0 - alpha) / n_pos.clamp(min=1.0), 0.0)
        return key_weight, pos_weight

    return weights


def _supcon_weights(n_pos: Tensor) -> tuple[Tensor, Tensor]:
    w = 1.0 / (n_pos + 1)
    return w, w


def positive_weights(loss: str, n_pos: Tensor, alpha: float = 1 / 9) -> tuple[Tensor, Tensor]:
    """Per-anchor ``(weight on the own key, weight on each other positive)`` of ``scl`` or ``dscl``.

    ``n_pos`` (float) = |P_i|, the other positives of each anchor; the weights are those the losses use.
    """
    if loss == "scl":
        return _supcon_weights(n_pos)
    if loss == "dscl":
        return _dscl_weights(alpha)(n_pos)
    raise ValueError(f"loss must be scl or dscl, got {loss!r}")


def _class_counts(ids: Tensor, n: int) -> Tensor:
    """``bincount(ids, minlength=n)`` for ids known to be < n, without bincount's device sync."""
    return ids.new_zeros(n).index_add_(0, ids, torch.ones_like(ids))


def _weighted_contrastive_loss(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    weight_fn: _WeightFn,
    temperature: float,
    num_classes: int | None,
) -> Tensor:
    _check_temperature(temperature)
    _check_contrastive_inputs(query, key, labels, queue, queue_labels)
    _check_num_classes(num_classes, labels, queue_labels)
    dtype = _compute_dtype(query, key, queue)
    with torch.autocast(device_type=query.device.type, enabled=False):
        query = query.to(dtype)
        key = key.detach().to(dtype)
        queue = queue.detach().to(dtype)
        batch_ids, queue_ids, n_classes = _class_ids(labels, queue_labels, num_classes)
        # Class sizes within the contrast set: each batch image contributes its query and its key.
        counts = 2 * _class_counts(batch_ids, n_classes + 1)
        if queue_ids.numel():
            counts += _class_counts(queue_ids, n_classes + 1)
        n_pos = (counts[batch_ids] - 2).to(dtype)  # |P_i|: minus self and own key
        key_weight, pos_weight = weight_fn(n_pos)
        return _WeightedContrast.apply(
            query,
            key,
            queue,
            batch_ids,
            queue_ids,
            n_classes,
            key_weight,
            pos_weight,
            float(temperature),
        )


def dscl_loss(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    *,
    alpha: float = 1 / 9,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> Tensor:
    """Decoupled supervised contrastive loss (paper Sec. 3.2, "formula 9"; METHOD.md A.6).

    ``loss_i = -[alpha log p(k_i|i) + (1 - alpha)/|P_i| sum_{t in P_i} log p(t|i)]``, or
    ``-log p(k_i|i)`` when ``P_i`` is empty; mean over the B anchors. Equals the official
    ``DSCLLoss`` with ``beta = (1 - alpha) / alpha`` (default alpha = 1/9 <-> beta = 8).

    Args:
        query: (B, D) L2-normalised anchor features; the other queries are also contrast entries
            and receive gradient through them.
        key: (B, D) momentum-encoder features of the other view; detached here.
        labels: (B,) integer class labels of the batch.
        queue: (K, D) filled queue entries (K may be 0); detached here.
        queue_labels: (K,) integer labels of the queue entries.
        alpha: weight of the own key, in (0, 1]; alpha = 1 ignores labels (instance discrimination).
        temperature: tau > 0.
        num_classes: optional number of classes C when every label (batch and queue) is in [0, C):
            the loss then needs no host-device synchronisation (no ``torch.unique``), which keeps a
            GPU step from stalling. Same value either way; checked on the CPU only.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).

    Raises:
        ValueError: on bad shapes, dtypes or hyperparameters (the message names the argument).
    """
    _check_alpha(alpha)
    return _weighted_contrastive_loss(
        query, key, labels, queue, queue_labels, _dscl_weights(float(alpha)), temperature, num_classes
    )


def supcon_loss(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    *,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> Tensor:
    """Supervised contrastive loss, the paper's SCL baseline (METHOD.md A.5).

    ``loss_i = -1/(|P_i| + 1) sum_{t in {k_i} U P_i} log p(t|i)`` over the same contrast set as
    :func:`dscl_loss` (i.e. DSCL with a per-anchor ``alpha_i = 1/(|P_i| + 1)``); mean over anchors.

    Args:
        query: (B, D) L2-normalised anchor features (with grad).
        key: (B, D) momentum-encoder features; detached here.
        labels: (B,) integer labels.
        queue: (K, D) filled queue entries (K may be 0); detached here.
        queue_labels: (K,) integer labels.
        temperature: tau > 0.
        num_classes: optional number of classes C when every label (batch and queue) is in [0, C):
            the loss then needs no host-device synchronisation (no ``torch.unique``), which keeps a
            GPU step from stalling. Same value either way; checked on the CPU only.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).

    Raises:
        ValueError: on bad shapes, dtypes or temperature (the message names the argument).
    """
    return _weighted_contrastive_loss(
        query, key, labels, queue, queue_labels, _supcon_weights, temperature, num_classes
    )


# --------------------------------------------------------------------------------------------------
# PBSD
# --------------------------------------------------------------------------------------------------


class _PatchDistill(torch.autograd.Function):
    """Mean over L*B rows of ``CE(softmax(teacher logits), log_softmax(student logits))``.

    Row r = (patch j, image b) = ``j * B + b``; entries = [own key k_b, queue (K)]. The gradient
    w.r.t. the student features is ``(softmax(student) - target) @ [k_b; queue] / (tau L B)``
    (METHOD.md G 11). It is computed here, in the forward, one block of rows at a time, and is the
    only thing saved for the backward (an (L, B, D) tensor): no (L*B) x (K+1) buffer outlives its
    block. The own-key column is kept apart from the (rows, K) queue block so that every matmul
    writes and reads contiguous memory (a strided ``out=`` costs a copy).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        teacher: Tensor,
        key: Tensor,
        queue: Tensor,
        temperature: float,
        needs_grad: bool,
    ) -> Tensor:
        n_patches, b, dim = student.shape
        rows, k_len = n_patches * b, queue.shape[0]
        inv_tau = 1.0 / temperature
        grad = student.new_zeros(rows, dim) if needs_grad else None
        loss = student.new_zeros(())
        if k_len:  # with an empty queue each distribution has one entry: loss 0, gradient 0
            s_scaled = student.reshape(rows, dim) * inv_tau  # (L*B, D): s / tau
            t_scaled = teacher.reshape(rows, dim) * inv_tau  # (L*B, D): c / tau
            key_rows = key.repeat(n_patches, 1)  # (L*B, D): row j*B + b holds k_b
            s_own_all = (s_scaled * key_rows).sum(dim=1, keepdim=True)  # (L*B, 1): s . k_b / tau
            t_own_all = (t_scaled * key_rows).sum(dim=1, keepdim=True)  # (L*B, 1): c . k_b / tau
            block = _pbsd_block_rows(student.device, rows, k_len)
            buf = student.new_empty(2 * block, k_len)  # a block's teacher rows, then its student rows
            for start in range(0, rows, block):
                stop = min(start + block, rows)
                n = stop - start
                both = buf[: 2 * n]
                # (2n, D) @ (D, K): [c; s] . queue / tau in one matmul (twice the rows: faster on a CPU)
                torch.mm(torch.cat([t_scaled[start:stop], s_scaled[start:stop]]), queue.t(), out=both)
                t_q, s_q = both[:n], both[n:]
                t_own, s_own = t_own_all[start:stop], s_own_all[start:stop]
                _softmax_parts_(t_own, t_q)  # t_own, t_q now hold the target
                # sum_r sum_t target_rt * s_rt; a flat dot needs no block-sized temporary
                cross = torch.dot(t_q.reshape(-1), s_q.reshape(-1)) + torch.dot(t_own.view(-1), s_own.view(-1))
                loss += _softmax_parts_(s_own, s_q).sum() - cross  # s_own, s_q now hold softmax(student)
                if grad is not None:
                    delta = s_q.sub_(t_q)  # softmax(student) - target, queue part
                    g = grad[start:stop]
                    torch.mm(delta, queue, out=g)  # (rows, K) @ (K, D)
                    g.addcmul_(s_own - t_own, key_rows[start:stop])
            loss /= rows
        if grad is not None:
            grad.mul_(inv_tau / rows)
            ctx.save_for_backward(grad.view(n_patches, b, dim))
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None, None


def pbsd_loss(
    patch_teacher: Tensor,
    patch_student: Tensor,
    key: Tensor,
    queue: Tensor,
    *,
    temperature: float = 0.07,
) -> Tensor:
    """Patch-based self distillation loss (paper Sec. 3.3, supp. Alg. 2; METHOD.md A.7).

    For patch j and image i: ``target = softmax([c.k_i, c.queue] / tau)`` (own key first, then the
    K queue entries), ``student = log_softmax([s.k_i, s.queue] / tau)``, and the loss is the mean
    over L and B of ``-sum target * student``. Labels are not used.

    Args:
        patch_teacher: (L, B, D) normalised ROI features from the global view; detached here.
        patch_student: (L, B, D) normalised features of the cropped patches (receive the gradient).
        key: (B, D) momentum-encoder features of the batch; detached here.
        queue: (K, D) filled queue entries (K may be 0, the loss is then 0); detached here.
        temperature: tau > 0, shared by teacher and student.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).

    Raises:
        ValueError: on bad shapes or temperature (the message names the argument).
    """
    _check_temperature(temperature)
    _check_pbsd_inputs(patch_teacher, patch_student, key, queue)
    dtype = _compute_dtype(patch_teacher, patch_student, key, queue)
    with torch.autocast(device_type=patch_student.device.type, enabled=False):
        return _PatchDistill.apply(
            patch_student.to(dtype),
            patch_teacher.detach().to(dtype),
            key.detach().to(dtype),
            queue.detach().to(dtype),
            float(temperature),
            torch.is_grad_enabled() and patch_student.requires_grad,
        )


# --------------------------------------------------------------------------------------------------
# Dense references (the plain equations; used by tests, benchmarks and the gradient analysis)
# --------------------------------------------------------------------------------------------------


class DenseContrast(NamedTuple):
    """The official ``DSCLLoss`` computation (METHOD.md A.6 "Official implementation"), every term dense.

    Columns are ``features = cat(query, key, queue)``: ``[queries (B) | keys (B) | queue (K)]``, N = 2B + K.
    Float masks have the features' dtype.

    Attributes:
        features: ``(N, D)``; the queries keep their gradient, keys and queue are detached.
        logits_mask: ``(B, N)`` 0 in the self column (out of numerator and denominator), 1 elsewhere.
        mask: ``(B, N)`` 1 where the column has the anchor's label, self column excluded (own key included).
        own_key: ``(B, N)`` 1 in the own-key column ``k_i``.
        log_prob: ``(B, N)`` ``log p(t|i)`` over the contrast set (the self column holds no probability).
        weights: ``(B, N)`` 1 on ``k_i``, ``beta/|P_i|`` on each t in ``P_i`` (1 each for SupCon), 0 elsewhere.
    """

    features: Tensor
    logits_mask: Tensor
    mask: Tensor
    own_key: Tensor
    log_prob: Tensor
    weights: Tensor


def dense_contrast(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    *,
    beta: float | None,
    temperature: float,
) -> DenseContrast:
    """Logits, masks and weights of the official ``DSCLLoss``, dense over ``cat(q, k, queue)`` (METHOD.md A.6).

    The reference form: no validation, no dtype handling, B x (2B+K) buffers throughout.

    Args:
        query, key, labels, queue, queue_labels: as for :func:`dscl_loss` (labels of one integer dtype).
        beta: the official ``weighted_beta`` (``alpha = 1/(1+beta)``); None gives SupCon's uniform
            weights (the official form with ``beta_i = |P_i|``, METHOD.md G 4).
        temperature: tau.
    """
    b = query.shape[0]
    features = torch.cat([query, key.detach(), queue.detach()])  # (N, D), N = 2B + K
    all_labels = torch.cat([labels, labels, queue_labels])
    rows = torch.arange(b, device=query.device)
    logits_mask = torch.ones(b, features.shape[0], dtype=query.dtype, device=query.device)
    logits_mask[rows, rows] = 0  # the self column
    mask = (labels[:, None] == all_labels[None, :]).to(query.dtype) * logits_mask  # (B, N)
    own_key = torch.zeros_like(mask)
    own_key[rows, b + rows] = 1
    logits = query @ features.T / temperature  # (B, N)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    if beta is None:
        weights = mask
    else:
        n_others = mask.sum(1, keepdim=True) - 1  # |P_i|
        weights = own_key + (mask - own_key) * beta / (n_others + 1e-12)
    return DenseContrast(features, logits_mask, mask, own_key, log_prob, weights)


def dscl_loss_dense(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    *,
    beta: float | None = 8.0,
    temperature: float = 0.07,
) -> Tensor:
    """Reference DSCL: the official ``DSCLLoss`` written out densely (METHOD.md A.6); not used in training.

    ``loss = mean_i -(sum_t w_it log p(t|i)) / sum_t w_it`` with :func:`dense_contrast`'s weights: equals
    :func:`dscl_loss` with ``alpha = 1/(1+beta)`` (METHOD.md G 1), and :func:`supcon_loss` for
    ``beta=None``. Keys and queue are detached; autograd differentiates everything else.
    """
    dense = dense_contrast(query, key, labels, queue, queue_labels, beta=beta, temperature=temperature)
    mean_log_prob = (dense.weights * dense.log_prob).sum(1) / dense.weights.sum(1)
    return -mean_log_prob.mean()


def pbsd_loss_dense(
    patch_teacher: Tensor, patch_student: Tensor, key: Tensor, queue: Tensor, *, temperature: float = 0.07
) -> Tensor:
    """Reference PBSD as the official code computes it (METHOD.md A.7); not used in training.

    One patch slot at a time: (B, K+1) teacher and student logits over ``[own key, queue]``, target =
    ``softmax(teacher).detach()``, cross-entropy with ``log_softmax(student)``, mean over the batch; then
    the mean over the L slots. Equals :func:`pbsd_loss`.
    """
    key, queue = key.detach(), queue.detach()
    total = patch_student.new_zeros(())
    for teacher, student in zip(patch_teacher, patch_student, strict=True):
        t_logits = torch.cat([(teacher * key).sum(1, keepdim=True), teacher @ queue.T], 1) / temperature
        target = torch.softmax(t_logits, dim=1).detach()
        s_logits = torch.cat([(student * key).sum(1, keepdim=True), student @ queue.T], 1) / temperature
        total = total + (-(target * torch.log_softmax(s_logits, dim=1)).sum(1)).mean()
    return total / patch_student.shape[0]


# --------------------------------------------------------------------------------------------------
# nn.Module wrappers (hyperparameters only)
# --------------------------------------------------------------------------------------------------


class DSCLLoss(nn.Module):
    """Module form of :func:`dscl_loss`; holds only ``alpha``, ``temperature`` (and ``num_classes``)."""

    def __init__(self, alpha: float = 1 / 9, temperature: float = 0.07, num_classes: int | None = None) -> None:
        super().__init__()
        _check_alpha(alpha)
        _check_temperature(temperature)
        self.alpha = alpha
        self.temperature = temperature
        self.num_classes = num_classes

    def forward(
        self, query: Tensor, key: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor
    ) -> Tensor:
        return dscl_loss(
            query, key, labels, queue, queue_labels, alpha=self.alpha, temperature=self.temperature,
            num_classes=self.num_classes,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, num_classes={self.num_classes}"


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss`; holds only ``temperature`` (and ``num_classes``)."""

    def __init__(self, temperature: float = 0.07, num_classes: int | None = None) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.num_classes = num_classes

    def forward(
        self, query: Tensor, key: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor
    ) -> Tensor:
        return supcon_loss(
            query, key, labels, queue, queue_labels, temperature=self.temperature, num_classes=self.num_classes
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, num_classes={self.num_classes}"


class PBSDLoss(nn.Module):
    """Module form of :func:`pbsd_loss`; holds only ``temperature``."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(self, patch_teacher: Tensor, patch_student: Tensor, key: Tensor, queue: Tensor) -> Tensor:
        return pbsd_loss(patch_teacher, patch_student, key, queue, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
