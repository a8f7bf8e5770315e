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
  (one ``index_add_`` over the batch and the queue). The only B x (2B+K) buffer is the logits matrix,
  which is turned into the softmax in place and kept for the analytic backward.
* Both contrastive cores are ``torch.autograd.Function`` s with analytic backwards (first-order
  only; double backward is not supported). Large fresh allocations are expensive on CPUs (first
  touch of mmap-ed pages), so the big buffers are written in place: PBSD keeps at most two
  (L*B) x (K+1) buffers alive and saves one (softmax(student) - target) for the backward.
* Losses are computed in float32 even under ``torch.autocast`` (the fp16 guards of the official code
  overflow, METHOD.md C.2 item 5); float64 inputs stay float64.
* Keys, queue and the PBSD teacher are detached: no gradient ever reaches them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["DSCLLoss", "PBSDLoss", "SupConLoss", "dscl_loss", "pbsd_loss", "supcon_loss"]

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_BLOCK_ELEMENTS = 1 << 20  # PBSD row-block size (elements of one buffer): 4 MiB in float32

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


def _softmax_rows_(logits: Tensor) -> Tensor:
    """Turn ``logits`` (R, N) into its row softmax in place; return the row log-sum-exp (R,).

    In place on purpose: a fresh (R, N) buffer costs as much as the exp itself on a CPU.
    """
    row_max = logits.amax(dim=1, keepdim=True)
    logits.sub_(row_max).exp_()
    row_sum = logits.sum(dim=1, keepdim=True)
    logits.div_(row_sum)
    return (row_max + row_sum.log()).squeeze(1)


def _class_ids(labels: Tensor, queue_labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """Compress labels to 0..C-1 over the classes present in the batch.

    Returns (batch ids (B,), queue ids (K,), C). Queue entries whose class is not in the batch are
    never positives for any anchor and get the spare id C.
    """
    labels, queue_labels = labels.long(), queue_labels.long()
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

    Columns of the logits buffer: [queries (B) | keys (B) | queue (K)]; the self column (diagonal of
    the query block) is -inf, so it is absent from numerator and denominator. Gradient (G 5):
    ``dloss_i/dl_it = p_it - w_it``, with ``w = a_i`` on ``k_i`` and ``c_i`` on each t in P_i.
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
        prob = query.new_empty(b, 2 * b + k_len)
        torch.mm(scaled, query.t(), out=prob[:, :b])  # (B, B): q_i . q_j / tau
        torch.mm(scaled, key.t(), out=prob[:, b : 2 * b])  # (B, B): q_i . k_j / tau
        if k_len:
            torch.mm(scaled, queue.t(), out=prob[:, 2 * b :])  # (B, K): q_i . queue_m / tau
        prob[:, :b].diagonal().fill_(-math.inf)
        own_key = prob[:, b : 2 * b].diagonal().clone()  # (B,): l_{i,k_i}

        # S_c: sum of all contrast features of class c (row C collects queue entries of other classes).
        class_sum = query.new_zeros(n_classes + 1, query.shape[1])
        class_sum.index_add_(0, batch_ids, query).index_add_(0, batch_ids, key)
        if k_len:
            class_sum.index_add_(0, queue_ids, queue)
        others = class_sum[batch_ids] - query - key  # (B, D): sum_{t in P_i} f_t
        pos_sum = (scaled * others).sum(dim=1)  # (B,): sum_{t in P_i} l_it

        lse = _softmax_rows_(prob)
        loss = (lse - key_weight * own_key - pos_weight * pos_sum).mean()

        ctx.save_for_backward(prob, query, key, queue, batch_ids, key_weight, pos_weight, others)
        ctx.n_classes = n_classes
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        prob, query, key, queue, batch_ids, key_weight, pos_weight, others = ctx.saved_tensors
        b = query.shape[0]
        with torch.autocast(device_type=query.device.type, enabled=False):
            # Anchor side: sum_t (p_it - w_it) f_t.
            grad = prob[:, :b] @ query  # (B, B) @ (B, D)
            grad.addmm_(prob[:, b : 2 * b], key)  # (B, B) @ (B, D)
            if queue.shape[0]:
                grad.addmm_(prob[:, 2 * b :], queue)  # (B, K) @ (K, D)
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


def _weighted_contrastive_loss(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    weight_fn: _WeightFn,
    temperature: float,
) -> Tensor:
    _check_temperature(temperature)
    _check_contrastive_inputs(query, key, labels, queue, queue_labels)
    dtype = _compute_dtype(query, key, queue)
    with torch.autocast(device_type=query.device.type, enabled=False):
        query = query.to(dtype)
        key = key.detach().to(dtype)
        queue = queue.detach().to(dtype)
        batch_ids, queue_ids, n_classes = _class_ids(labels, queue_labels)
        # Class sizes within the contrast set: each batch image contributes its query and its key.
        counts = 2 * torch.bincount(batch_ids, minlength=n_classes)
        if queue_ids.numel():
            counts += torch.bincount(queue_ids, minlength=n_classes + 1)[:n_classes]
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

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).

    Raises:
        ValueError: on bad shapes, dtypes or hyperparameters (the message names the argument).
    """
    _check_alpha(alpha)
    return _weighted_contrastive_loss(
        query, key, labels, queue, queue_labels, _dscl_weights(float(alpha)), temperature
    )


def supcon_loss(
    query: Tensor,
    key: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    *,
    temperature: float = 0.07,
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

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).

    Raises:
        ValueError: on bad shapes, dtypes or temperature (the message names the argument).
    """
    return _weighted_contrastive_loss(query, key, labels, queue, queue_labels, _supcon_weights, temperature)


# --------------------------------------------------------------------------------------------------
# PBSD
# --------------------------------------------------------------------------------------------------


class _PatchDistill(torch.autograd.Function):
    """Mean over L*B rows of ``CE(softmax(teacher logits), log_softmax(student logits))``.

    Row r = (patch j, image b); columns = [own key k_b | queue (K)]. The gradient w.r.t. the
    student logits is ``(softmax(student) - target) / (L*B)`` (METHOD.md G 11); it is computed in
    the forward and is the only (L*B) x (K+1) buffer saved (two exist during the forward).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, student: Tensor, teacher: Tensor, key: Tensor, queue: Tensor, temperature: float
    ) -> Tensor:
        n_patches, b, dim = student.shape
        rows, k_len = n_patches * b, queue.shape[0]

        def logits(feats: Tensor) -> Tensor:
            scaled = feats * (1.0 / temperature)  # (L, B, D)
            out = feats.new_empty(rows, k_len + 1)
            out[:, 0] = torch.einsum("lbd,bd->lb", scaled, key).reshape(rows)  # (L, B): c . k_b / tau
            if k_len:
                torch.mm(scaled.reshape(rows, dim), queue.t(), out=out[:, 1:])  # (L*B, K)
            return out

        target = logits(teacher)
        delta = logits(student)
        loss = delta.new_zeros(())
        # Row blocks of ~4 MiB so the elementwise passes below run in cache rather than streaming
        # the two (L*B, K+1) buffers from memory a dozen times.
        block = max(1, _BLOCK_ELEMENTS // (k_len + 1))
        for start in range(0, rows, block):
            t_blk, s_blk = target[start : start + block], delta[start : start + block]
            _softmax_rows_(t_blk)  # teacher probabilities
            cross = (t_blk * s_blk).sum(dim=1)  # sum_t target_t * student logit_t
            lse = _softmax_rows_(s_blk)  # s_blk now holds softmax(student)
            loss += (lse - cross).sum()
            s_blk.sub_(t_blk)  # softmax(student) - target
        loss /= rows
        del target

        ctx.save_for_backward(delta, key, queue)
        ctx.shape = (n_patches, b, dim)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        delta, key, queue = ctx.saved_tensors
        n_patches, b, dim = ctx.shape
        with torch.autocast(device_type=key.device.type, enabled=False):
            grad = delta[:, :1].reshape(n_patches, b, 1) * key  # (L, B, D): own-key column
            if queue.shape[0]:
                grad = grad.reshape(n_patches * b, dim).addmm_(delta[:, 1:], queue)  # (L*B, K) @ (K, D)
            grad = grad.reshape(n_patches, b, dim).mul_(grad_out / (n_patches * b * ctx.temperature))
        return grad, None, None, None, None


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
        )


# --------------------------------------------------------------------------------------------------
# nn.Module wrappers (hyperparameters only)
# --------------------------------------------------------------------------------------------------


class DSCLLoss(nn.Module):
    """Module form of :func:`dscl_loss`; holds only ``alpha`` and ``temperature``."""

    def __init__(self, alpha: float = 1 / 9, temperature: float = 0.07) -> None:
        super().__init__()
        _check_alpha(alpha)
        _check_temperature(temperature)
        self.alpha = alpha
        self.temperature = temperature

    def forward(
        self, query: Tensor, key: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor
    ) -> Tensor:
        return dscl_loss(
            query, key, labels, queue, queue_labels, alpha=self.alpha, temperature=self.temperature
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}"


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss`; holds only ``temperature``."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(
        self, query: Tensor, key: Tensor, labels: Tensor, queue: Tensor, queue_labels: Tensor
    ) -> Tensor:
        return supcon_loss(query, key, labels, queue, queue_labels, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


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
