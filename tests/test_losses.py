"""Tests for dscl.losses against slow loops written from METHOD.md A.5-A.7 and the checklist G 1-12."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dscl.losses import (
    DSCLLoss,
    PBSDLoss,
    SupConLoss,
    dscl_loss,
    dscl_loss_dense,
    pbsd_loss,
    pbsd_loss_dense,
    supcon_loss,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------------
# Slow references, straight from the equations
# --------------------------------------------------------------------------------------------------


def contrast_entries(query, key, labels, queue, queue_labels, i):
    """Contrast set of anchor i as a list of (feature, label, is_own_key) (METHOD.md A.6)."""
    entries = []
    for j in range(query.shape[0]):
        if j != i:
            entries.append((query[j], int(labels[j]), False))
    for j in range(key.shape[0]):
        entries.append((key[j], int(labels[j]), j == i))
    for m in range(queue.shape[0]):
        entries.append((queue[m], int(queue_labels[m]), False))
    return entries


def ref_anchor_loss(query, key, labels, queue, queue_labels, i, alpha_fn, tau):
    """loss_i = -[a log p(k_i) + (1-a)/|P_i| sum_{t in P_i} log p(t)]; -log p(k_i) if P_i is empty.

    ``alpha_fn(|P_i|)`` gives a (DSCL: constant; SCL: 1/(|P_i|+1)).
    """
    entries = contrast_entries(query, key, labels, queue, queue_labels, i)
    logits = torch.stack([torch.dot(query[i], f) / tau for f, _, _ in entries])
    log_p = logits - torch.logsumexp(logits, 0)
    own = [n for n, (_, _, is_key) in enumerate(entries) if is_key]
    pos = [n for n, (_, y, is_key) in enumerate(entries) if y == int(labels[i]) and not is_key]
    assert len(own) == 1
    if not pos:
        return -log_p[own[0]]
    a = alpha_fn(len(pos))
    return -(a * log_p[own[0]] + (1 - a) / len(pos) * sum(log_p[t] for t in pos))


def ref_contrastive(query, key, labels, queue, queue_labels, alpha_fn, tau):
    b = query.shape[0]
    return sum(ref_anchor_loss(query, key, labels, queue, queue_labels, i, alpha_fn, tau) for i in range(b)) / b


def ref_dscl(query, key, labels, queue, queue_labels, alpha, tau):
    return ref_contrastive(query, key, labels, queue, queue_labels, lambda n: alpha, tau)


def ref_supcon(query, key, labels, queue, queue_labels, tau):
    return ref_contrastive(query, key, labels, queue, queue_labels, lambda n: 1.0 / (n + 1), tau)


def ref_pbsd(teacher, student, key, queue, tau):
    n_patches, b, _ = student.shape
    total = 0.0
    for j in range(n_patches):
        for i in range(b):
            feats = [key[i]] + [queue[m] for m in range(queue.shape[0])]
            t_logits = torch.stack([torch.dot(teacher[j, i], f) / tau for f in feats])
            s_logits = torch.stack([torch.dot(student[j, i], f) / tau for f in feats])
            target = torch.softmax(t_logits, 0)
            total = total - (target * torch.log_softmax(s_logits, 0)).sum()
    return total / (n_patches * b)


def ref_teacher_entropy(teacher, key, queue, tau):
    n_patches, b, _ = teacher.shape
    total = 0.0
    for j in range(n_patches):
        for i in range(b):
            logits = torch.cat([(teacher[j, i] @ key[i])[None], queue @ teacher[j, i]]) / tau
            p = torch.softmax(logits, 0)
            total = total - (p * torch.log(p)).sum()
    return total / (n_patches * b)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def unit(*shape, dtype=F64, gen=None):
    return F.normalize(torch.randn(*shape, dtype=dtype, generator=gen), dim=-1)


def make_inputs(b, k, d, n_classes, seed, dtype=F64, label_dtype=torch.int64, distinct=False):
    gen = torch.Generator().manual_seed(seed)
    query, key, queue = (
        unit(b, d, dtype=dtype, gen=gen),
        unit(b, d, dtype=dtype, gen=gen),
        unit(k, d, dtype=dtype, gen=gen),
    )
    if distinct:  # every label unique: no anchor has a positive besides its own key
        labels, queue_labels = torch.arange(b), torch.arange(b, b + k)
    else:
        labels = torch.randint(0, n_classes, (b,), generator=gen)
        queue_labels = torch.randint(0, n_classes, (k,), generator=gen)
    return query, key, labels.to(label_dtype), queue, queue_labels.to(label_dtype)


# (B, K, D, n_classes, distinct): K=0, B=1, all-distinct labels, few classes, varying D.
CASES = [
    (1, 0, 3, 1, False),
    (1, 7, 4, 2, False),
    (2, 0, 5, 1, False),
    (5, 0, 8, 2, False),
    (4, 9, 3, 1, False),
    (6, 11, 6, 3, False),
    (7, 20, 16, 4, False),
    (8, 13, 5, 1000, False),
    (5, 10, 7, 0, True),
    (3, 25, 2, 2, False),
    (9, 4, 10, 5, False),
    (10, 30, 12, 3, False),
]


def case_id(case):
    return "B{}-K{}-D{}-C{}{}".format(*case[:4], "-distinct" if case[4] else "")


# --------------------------------------------------------------------------------------------------
# Equality with the loops (float64 and float32), forward and gradient
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("kind", ["dscl", "supcon"])
def test_matches_reference_float64(case, kind):
    b, k, d, c, distinct = case
    query, key, labels, queue, queue_labels = make_inputs(b, k, d, c, seed=b * 100 + k, distinct=distinct)
    tau, alpha = 0.2, 0.3
    q_ours = query.clone().requires_grad_()
    q_ref = query.clone().requires_grad_()
    if kind == "dscl":
        ours = dscl_loss(q_ours, key, labels, queue, queue_labels, alpha=alpha, temperature=tau)
        ref = ref_dscl(q_ref, key, labels, queue, queue_labels, alpha, tau)
    else:
        ours = supcon_loss(q_ours, key, labels, queue, queue_labels, temperature=tau)
        ref = ref_supcon(q_ref, key, labels, queue, queue_labels, tau)
    assert ours.dtype == F64 and ours.dim() == 0
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(q_ours.grad, q_ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference_float32(case):
    b, k, d, c, distinct = case
    query, key, labels, queue, queue_labels = make_inputs(b, k, d, c, seed=7 + b + k, distinct=distinct)
    args32 = [t.float() if t.is_floating_point() else t for t in (query, key, labels, queue, queue_labels)]
    ours = dscl_loss(*args32)  # defaults alpha = 1/9, tau = 0.07
    assert ours.dtype == torch.float32
    ref = ref_dscl(query, key, labels, queue, queue_labels, 1 / 9, 0.07)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)
    ours_scl = supcon_loss(*args32)
    torch.testing.assert_close(
        ours_scl.double(), ref_supcon(query, key, labels, queue, queue_labels, 0.07), rtol=1e-4, atol=1e-6
    )


def test_int32_and_negative_labels():
    query, key, labels, queue, queue_labels = make_inputs(6, 12, 5, 3, seed=3)
    ref = ref_dscl(query, key, labels, queue, queue_labels, 0.25, 0.1)
    shifted = dscl_loss(query, key, (labels - 1).int(), queue, (queue_labels - 1).int(), alpha=0.25, temperature=0.1)
    torch.testing.assert_close(shifted, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_pbsd_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n_patches, b, d, k = [(1, 1, 3, 0), (2, 3, 4, 5), (5, 4, 6, 9), (3, 2, 8, 17)][seed]
    teacher, student = unit(n_patches, b, d, gen=gen), unit(n_patches, b, d, gen=gen)
    key, queue = unit(b, d, gen=gen), unit(k, d, gen=gen)
    s_ours, s_ref = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = pbsd_loss(teacher, s_ours, key, queue, temperature=0.2)
    ref = ref_pbsd(teacher, s_ref, key, queue, 0.2)
    torch.testing.assert_close(ours, torch.as_tensor(ref, dtype=F64), rtol=1e-9, atol=1e-12)
    ours.backward()
    if k:
        ref.backward()
        torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-9, atol=1e-12)
    else:  # a single-entry distribution: loss 0, no gradient signal
        assert ours.item() == 0.0 and torch.count_nonzero(s_ours.grad) == 0
    ours32 = pbsd_loss(teacher.float(), student.float(), key.float(), queue.float())
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(
        ours32.double(),
        torch.as_tensor(ref_pbsd(teacher, student, key, queue, 0.07), dtype=F64),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dense_references_match_the_loops(case):
    """The shipped dense references (official form, used by benchmarks and the gradient analysis) equal
    the loops: DSCL with beta = (1 - alpha)/alpha, SupCon for beta=None, PBSD; values and gradients."""
    b, k, d, c, distinct = case
    query, key, labels, queue, queue_labels = make_inputs(b, k, d, c, seed=31 + b * k, distinct=distinct)
    tau, alpha = 0.2, 0.3
    for beta, ref_fn in (((1 - alpha) / alpha, lambda q: ref_dscl(q, key, labels, queue, queue_labels, alpha, tau)),
                         (None, lambda q: ref_supcon(q, key, labels, queue, queue_labels, tau))):
        q_dense, q_ref = query.clone().requires_grad_(), query.clone().requires_grad_()
        dense = dscl_loss_dense(q_dense, key, labels, queue, queue_labels, beta=beta, temperature=tau)
        ref = ref_fn(q_ref)
        torch.testing.assert_close(dense, ref, rtol=1e-9, atol=1e-12)
        dense.backward()
        ref.backward()
        torch.testing.assert_close(q_dense.grad, q_ref.grad, rtol=1e-9, atol=1e-12)
    gen = torch.Generator().manual_seed(b + k)
    teacher, student = unit(3, b, d, gen=gen), unit(3, b, d, gen=gen)
    s_dense, s_ref = student.clone().requires_grad_(), student.clone().requires_grad_()
    dense = pbsd_loss_dense(teacher, s_dense, key, queue, temperature=tau)
    ref = ref_pbsd(teacher, s_ref, key, queue, tau)
    torch.testing.assert_close(dense, torch.as_tensor(ref, dtype=F64), rtol=1e-9, atol=1e-12)
    if k:
        dense.backward()
        ref.backward()
        torch.testing.assert_close(s_dense.grad, s_ref.grad, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# METHOD.md G 1-9 (DSCL / SCL)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [8.0, 6.0])
@pytest.mark.parametrize("seed", range(3))
def test_alpha_beta_mapping_official_form(beta, seed):
    """G 1, G 9: the official beta-weighted form equals DSCL with alpha = 1/(1+beta)."""
    query, key, labels, queue, queue_labels = make_inputs(8, 24, 6, [2, 4, 50][seed], seed=seed)
    official = dscl_loss_dense(query, key, labels, queue, queue_labels, beta=beta, temperature=0.07)
    ours = dscl_loss(query, key, labels, queue, queue_labels, alpha=1 / (1 + beta))
    torch.testing.assert_close(ours, official, rtol=1e-9, atol=1e-12)


def test_no_positive_is_instance_discrimination():
    """G 2: |P_i| = 0 gives -log p(k_i), for any alpha, and is finite."""
    query, key, labels, queue, queue_labels = make_inputs(6, 10, 5, 0, seed=11, distinct=True)
    expected = []
    for i in range(6):
        entries = contrast_entries(query, key, labels, queue, queue_labels, i)
        logits = torch.stack([query[i] @ f / 0.07 for f, _, _ in entries])
        own = next(n for n, e in enumerate(entries) if e[2])
        expected.append(-(logits[own] - torch.logsumexp(logits, 0)))
    expected = torch.stack(expected).mean()
    for alpha in (1 / 9, 0.5, 1.0):
        loss = dscl_loss(query, key, labels, queue, queue_labels, alpha=alpha)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(supcon_loss(query, key, labels, queue, queue_labels), expected, rtol=1e-9, atol=1e-12)
    loss32 = dscl_loss(query.float(), key.float(), labels, queue.float(), queue_labels)
    assert torch.isfinite(loss32)


def test_alpha_one_ignores_labels():
    """G 3: alpha = 1 is instance discrimination: permuting or replacing labels changes nothing."""
    query, key, labels, queue, queue_labels = make_inputs(8, 16, 6, 3, seed=5)
    base = dscl_loss(query, key, labels, queue, queue_labels, alpha=1.0)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    same_labels = torch.zeros_like(labels), torch.zeros_like(queue_labels)
    for lab, qlab in [
        (labels[perm], queue_labels.flip(0)),
        same_labels,
        (torch.arange(8), torch.arange(8, 24)),
    ]:
        torch.testing.assert_close(dscl_loss(query, key, lab, queue, qlab, alpha=1.0), base, rtol=1e-12, atol=0)
    # and alpha < 1 does depend on them (the check above could otherwise pass vacuously)
    assert not torch.isclose(
        dscl_loss(query, key, labels, queue, queue_labels, alpha=0.5),
        dscl_loss(query, key, same_labels[0], queue, same_labels[1], alpha=0.5),
    )


def test_supcon_is_per_anchor_alpha_dscl():
    """G 4: SCL = DSCL with alpha_i = 1/(|P_i|+1), anchor by anchor."""
    query, key, labels, queue, queue_labels = make_inputs(7, 15, 5, 2, seed=9)
    per_anchor = []
    for i in range(7):
        entries = contrast_entries(query, key, labels, queue, queue_labels, i)
        n_pos = sum(1 for _, y, own in entries if y == int(labels[i]) and not own)
        # one-anchor DSCL with that anchor's alpha: anchor i alone, its contrast set rebuilt exactly
        per_anchor.append(
            ref_anchor_loss(query, key, labels, queue, queue_labels, i, lambda n, m=n_pos: 1 / (m + 1), 0.07)
        )
    torch.testing.assert_close(
        supcon_loss(query, key, labels, queue, queue_labels),
        torch.stack(per_anchor).mean(),
        rtol=1e-9,
        atol=0,
    )
    # also a batch where every anchor has the same |P_i|: supcon == dscl with that alpha
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])[:6]
    q6, k6 = query[:6], key[:6]
    empty, empty_labels = queue[:0], queue_labels[:0]
    # |P_i| = 2 (other query + other key of the pair)
    torch.testing.assert_close(
        supcon_loss(q6, k6, labels, empty, empty_labels),
        dscl_loss(q6, k6, labels, empty, empty_labels, alpha=1 / 3),
        rtol=1e-12,
        atol=0,
    )


def test_anchor_gradient_formula():
    """G 5: dloss_i/dq_i = (1/tau) sum_j (p_j - w_j) f_j with the other queries held constant,
    and the total gradient of the implementation = anchor terms + contrast-column terms."""
    tau, alpha = 0.1, 0.2
    b = 6
    query, key, labels, queue, queue_labels = make_inputs(b, 9, 5, 2, seed=21)
    anchor_terms, contrast_terms = torch.zeros_like(query), torch.zeros_like(query)
    for i in range(b):
        entries = contrast_entries(query, key, labels, queue, queue_labels, i)
        feats = torch.stack([f for f, _, _ in entries])
        p = torch.softmax(feats @ query[i] / tau, 0)
        n_pos = sum(1 for _, y, own in entries if y == int(labels[i]) and not own)
        w = torch.zeros_like(p)
        for n, (_, y, own) in enumerate(entries):
            if own:
                w[n] = alpha if n_pos else 1.0
            elif y == int(labels[i]):
                w[n] = (1 - alpha) / n_pos
        assert math.isclose(float(w.sum()), 1.0)
        formula = ((p - w)[:, None] * feats).sum(0) / tau
        anchor_terms[i] = formula
        # loss_i contributes (p_j - w_j) q_i / tau to each other query q_j (its column in row i)
        col = 0
        for j in range(b):
            if j != i:
                contrast_terms[j] += (p[col] - w[col]) * query[i] / tau
                col += 1
    # anchor gradient alone, other queries detached inside the reference
    for i in range(b):
        qi = query[i].clone().requires_grad_()
        q_mixed = torch.cat([query[:i].detach(), qi[None], query[i + 1 :].detach()])
        ref_anchor_loss(q_mixed, key, labels, queue, queue_labels, i, lambda n: alpha, tau).backward()
        torch.testing.assert_close(qi.grad, anchor_terms[i], rtol=1e-9, atol=1e-12)
    q = query.clone().requires_grad_()
    dscl_loss(q, key, labels, queue, queue_labels, alpha=alpha, temperature=tau).backward()
    torch.testing.assert_close(q.grad * b, anchor_terms + contrast_terms, rtol=1e-9, atol=1e-12)


def _orthonormal_single_anchor(n_queue, n_same, dtype=F64):
    """One anchor e_0 whose contrast features (own key, queue) are orthonormal: all logits exactly 0
    and the gradient's coordinate on f_t is (p_t - w_t)/tau."""
    d = n_queue + 2
    eye = torch.eye(d, dtype=dtype)
    query, key, queue = eye[:1], eye[1:2], eye[2:]
    labels = torch.tensor([0])
    queue_labels = torch.tensor([0] * n_same + [1] * (n_queue - n_same))
    return query, key, labels, queue, queue_labels


@pytest.mark.parametrize("n_same", [1, 3, 20])
def test_pull_ratio_at_uniform_logits(n_same):
    """G 6: |p - w| on k_i over the total on P_i is alpha/(1-alpha) (DSCL) and 1/|P_i| (SCL)
    as the contrast set grows; exact finite-N values checked too."""
    alpha, tau = 1 / 9, 0.07
    for n_queue, tol in [(200, None), (4000, 0.02)]:
        query, key, labels, queue, queue_labels = _orthonormal_single_anchor(n_queue, n_same)
        n = n_queue + 1  # contrast set size: own key + queue (B = 1)
        for name, fn, a in [("dscl", dscl_loss, alpha), ("scl", supcon_loss, 1 / (n_same + 1))]:
            q = query.clone().requires_grad_()
            kwargs = {"alpha": alpha} if name == "dscl" else {}
            fn(q, key, labels, queue, queue_labels, temperature=tau, **kwargs).backward()
            coord = q.grad[0] * tau  # p_t - w_t per contrast feature (orthonormal basis)
            pull_key = coord[1].abs()
            pull_pos = coord[2 : 2 + n_same].abs().sum()
            exact = abs(1 / n - a) / (n_same * abs(1 / n - (1 - a) / n_same))
            torch.testing.assert_close(pull_key / pull_pos, torch.tensor(exact, dtype=F64), rtol=1e-9, atol=1e-12)
            if tol is not None:
                limit = alpha / (1 - alpha) if name == "dscl" else 1 / n_same
                assert abs(float(pull_key / pull_pos) - limit) < tol * limit


@pytest.mark.parametrize("n_same", [1, 4])
def test_stationary_point(n_same):
    """G 7: minimising over free logits gives p(k_i) = alpha, p(t) = (1-alpha)/|P_i|, p(neg) -> 0.

    With one anchor and orthonormal contrast features, the unnormalised query *is* the free logit
    vector (times tau), so optimising it through the implementation optimises the logits."""
    alpha, tau = 0.3, 1.0
    for n_neg in (0, 3):
        query, key, labels, queue, queue_labels = _orthonormal_single_anchor(n_same + n_neg, n_same)
        for name, fn, a in [("dscl", dscl_loss, alpha), ("scl", supcon_loss, 1 / (n_same + 1))]:
            q = torch.zeros_like(query, requires_grad=True)
            opt = torch.optim.SGD([q], lr=2.0)  # lr * max Hessian eigenvalue (<= 1/2) < 2
            kwargs = {"alpha": alpha} if name == "dscl" else {}
            for _ in range(400):
                opt.zero_grad()
                fn(q, key, labels, queue, queue_labels, temperature=tau, **kwargs).backward()
                opt.step()
            p = torch.softmax(q.detach()[0, 1:] / tau, 0)  # [own key, queue...]
            if n_neg == 0:
                torch.testing.assert_close(p[0], torch.tensor(a, dtype=F64), rtol=1e-6, atol=1e-8)
                torch.testing.assert_close(
                    p[1:], torch.full((n_same,), (1 - a) / n_same, dtype=F64), rtol=1e-6, atol=1e-8
                )
            else:
                neg = p[1 + n_same :].sum()
                assert neg < 5e-3
                pos_mass = p[: 1 + n_same].sum()
                torch.testing.assert_close(p[0] / pos_mass, torch.tensor(a, dtype=F64), rtol=2e-2, atol=0)
                torch.testing.assert_close(
                    p[1 : 1 + n_same] / pos_mass,
                    torch.full((n_same,), (1 - a) / n_same, dtype=F64),
                    rtol=2e-2,
                    atol=0,
                )


def test_self_column_excluded_and_gradient_routing():
    """G 8: self column out of numerator and denominator; keys and queue get no gradient, other
    queries do."""
    query, key, labels, queue, queue_labels = make_inputs(4, 6, 5, 2, seed=2)
    ours = dscl_loss(query, key, labels, queue, queue_labels)
    ref = ref_dscl(query, key, labels, queue, queue_labels, 1 / 9, 0.07)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    # with the self column q_i.q_i = 1 (the largest logit) in the denominator the value would differ
    with_self = []
    for i in range(4):
        entries = contrast_entries(query, key, labels, queue, queue_labels, i)
        logits = torch.stack([query[i] @ f / 0.07 for f, _, _ in entries] + [query[i] @ query[i] / 0.07])
        log_p = logits - torch.logsumexp(logits, 0)
        own = next(n for n, e in enumerate(entries) if e[2])
        pos = [n for n, (_, y, o) in enumerate(entries) if y == int(labels[i]) and not o]
        a = 1 / 9 if pos else 1.0
        with_self.append(-(a * log_p[own] + sum((1 - a) / len(pos) * log_p[t] for t in pos)))
    assert abs(float(torch.stack(with_self).mean() - ours)) > 1e-3
    q = query.clone().requires_grad_()
    k = key.clone().requires_grad_()
    qu = queue.clone().requires_grad_()
    dscl_loss(q, k, labels, qu, queue_labels).backward()
    assert k.grad is None and qu.grad is None
    # every query gets gradient, including through its columns in the other anchors' rows (checked
    # term by term in test_anchor_gradient_formula)
    q2 = query.clone().requires_grad_()
    loss = dscl_loss(q2, key, torch.arange(4), queue, torch.arange(4, 10), alpha=1.0)
    loss.backward()
    assert torch.all(q2.grad.norm(dim=1) > 0)


# --------------------------------------------------------------------------------------------------
# PBSD (G 10-12)
# --------------------------------------------------------------------------------------------------


def test_pbsd_entropy_bound_and_equality():
    """G 11: PBSD >= mean teacher entropy, with equality (and zero gradient) when student == teacher."""
    gen = torch.Generator().manual_seed(4)
    teacher, student = unit(3, 4, 6, gen=gen), unit(3, 4, 6, gen=gen)
    key, queue = unit(4, 6, gen=gen), unit(12, 6, gen=gen)
    entropy = ref_teacher_entropy(teacher, key, queue, 0.1)
    assert pbsd_loss(teacher, student, key, queue, temperature=0.1) > entropy + 1e-6
    s = teacher.clone().requires_grad_()
    loss = pbsd_loss(teacher, s, key, queue, temperature=0.1)
    torch.testing.assert_close(loss, entropy, rtol=1e-9, atol=1e-12)
    loss.backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s), rtol=0, atol=1e-12)


def test_pbsd_no_gradient_to_teacher_key_queue():
    """G 12: the student receives all of the gradient."""
    gen = torch.Generator().manual_seed(8)
    teacher = unit(2, 3, 5, gen=gen).requires_grad_()
    student = unit(2, 3, 5, gen=gen).requires_grad_()
    key, queue = unit(3, 5, gen=gen).requires_grad_(), unit(7, 5, gen=gen).requires_grad_()
    pbsd_loss(teacher, student, key, queue).backward()
    assert teacher.grad is None and key.grad is None and queue.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", range(3))
def test_queue_permutation_invariance(seed):
    gen = torch.Generator().manual_seed(seed)
    query, key, labels, queue, queue_labels = make_inputs(5, 14, 4, 3, seed=seed)
    perm = torch.randperm(14, generator=gen)
    for fn in (dscl_loss, supcon_loss):
        torch.testing.assert_close(
            fn(query, key, labels, queue[perm], queue_labels[perm]),
            fn(query, key, labels, queue, queue_labels),
            rtol=1e-12,
            atol=0,
        )
    teacher, student = unit(3, 5, 4, gen=gen), unit(3, 5, 4, gen=gen)
    torch.testing.assert_close(
        pbsd_loss(teacher, student, key, queue[perm]),
        pbsd_loss(teacher, student, key, queue),
        rtol=1e-12,
        atol=0,
    )


def test_gradcheck_all_losses():
    gen = torch.Generator().manual_seed(0)
    query, key, labels, queue, queue_labels = make_inputs(4, 5, 3, 2, seed=1)
    q = query.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: dscl_loss(x, key, labels, queue, queue_labels, alpha=0.3, temperature=0.5), (q,)
    )
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, key, labels, queue, queue_labels, temperature=0.5), (q,))
    assert torch.autograd.gradcheck(
        lambda x: dscl_loss(x, key, labels, queue[:0], queue_labels[:0], temperature=0.5), (q,)
    )
    teacher, student = unit(2, 4, 3, gen=gen), unit(2, 4, 3, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: pbsd_loss(teacher, s, key, queue, temperature=0.5), (student,))


# --------------------------------------------------------------------------------------------------
# dtype handling, wrappers, validation
# --------------------------------------------------------------------------------------------------


def test_autocast_bfloat16_computes_in_float32():
    query, key, labels, queue, queue_labels = make_inputs(8, 32, 16, 3, seed=6, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    teacher, student = (
        unit(2, 8, 16, dtype=torch.float32, gen=gen),
        unit(2, 8, 16, dtype=torch.float32, gen=gen),
    )
    expected = [
        dscl_loss(query, key, labels, queue, queue_labels),
        supcon_loss(query, key, labels, queue, queue_labels),
        pbsd_loss(teacher, student, key, queue),
    ]
    proj = torch.nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_bf16 = proj(query)  # bfloat16 under autocast, like a real projection head
        assert q_bf16.dtype == torch.bfloat16
        got = [
            dscl_loss(q_bf16, key, labels, queue, queue_labels),
            supcon_loss(q_bf16, key, labels, queue, queue_labels),
            pbsd_loss(teacher.bfloat16(), student.bfloat16(), key.bfloat16(), queue.bfloat16()),
        ]
        # plain fp32 inputs under autocast: identical to the no-autocast result
        exact = dscl_loss(query, key, labels, queue, queue_labels)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.05)
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact, expected[0], rtol=1e-6, atol=0)
    got[0].backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


def test_module_wrappers_forward():
    query, key, labels, queue, queue_labels = make_inputs(5, 6, 4, 2, seed=12)
    gen = torch.Generator().manual_seed(2)
    teacher, student = unit(2, 5, 4, gen=gen), unit(2, 5, 4, gen=gen)
    assert DSCLLoss(alpha=0.2, temperature=0.3)(query, key, labels, queue, queue_labels) == dscl_loss(
        query, key, labels, queue, queue_labels, alpha=0.2, temperature=0.3
    )
    assert SupConLoss(0.3)(query, key, labels, queue, queue_labels) == supcon_loss(
        query, key, labels, queue, queue_labels, temperature=0.3
    )
    assert PBSDLoss(0.3)(teacher, student, key, queue) == pbsd_loss(teacher, student, key, queue, temperature=0.3)
    module = DSCLLoss()
    assert module.alpha == pytest.approx(1 / 9) and module.temperature == 0.07
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert "alpha" in repr(module)


def _good():
    return make_inputs(4, 6, 3, 2, seed=0)


def _bad_contrastive_cases():
    q, k, y, qu, qy = _good()
    return [
        ("query", (q[0], k, y, qu, qy), {}),
        ("key", (q, k[None], y, qu, qy), {}),
        ("queue", (q, k, y, qu[0], qy), {}),
        ("key", (q, k[:3], y, qu, qy), {}),
        ("queue", (q, k, y, torch.zeros(6, 5, dtype=F64), qy), {}),
        ("labels", (q, k, y[:3], qu, qy), {}),
        ("queue_labels", (q, k, y, qu, qy[:5]), {}),
        ("labels", (q, k, y.double(), qu, qy), {}),
        ("queue_labels", (q, k, y, qu, qy.float()), {}),
        ("labels", (q, k, y.bool(), qu, qy), {}),
        ("query", (q[:0], k[:0], y[:0], qu, qy), {}),
        ("temperature", (q, k, y, qu, qy), {"temperature": 0.0}),
        ("temperature", (q, k, y, qu, qy), {"temperature": -1.0}),
    ]


@pytest.mark.parametrize("idx", range(13))
@pytest.mark.parametrize("fn", [dscl_loss, supcon_loss], ids=["dscl", "supcon"])
def test_bad_contrastive_input_raises(fn, idx):
    name, args, kwargs = _bad_contrastive_cases()[idx]
    with pytest.raises(ValueError, match=name):
        fn(*args, **kwargs)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_bad_alpha_raises(alpha):
    q, k, y, qu, qy = _good()
    with pytest.raises(ValueError, match="alpha"):
        dscl_loss(q, k, y, qu, qy, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        DSCLLoss(alpha=alpha)


def test_bad_shapes_message_names_shapes():
    q, k, y, qu, qy = _good()
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(4, 3\)"):
        dscl_loss(q, k[:3], y, qu, qy)


@pytest.mark.parametrize(
    "name,mutate",
    [
        ("patch_teacher", lambda t, s, k, q: (t[0], s, k, q)),
        ("patch_student", lambda t, s, k, q: (t, s[0], k, q)),
        ("patch_teacher", lambda t, s, k, q: (t[:1], s, k, q)),
        ("key", lambda t, s, k, q: (t, s, k[:, :2], q)),
        ("key", lambda t, s, k, q: (t, s, k[:2], q)),
        ("key", lambda t, s, k, q: (t, s, k[0], q)),
        ("queue", lambda t, s, k, q: (t, s, k, q[:, :2])),
        ("queue", lambda t, s, k, q: (t, s, k, q[0])),
        ("patch_student", lambda t, s, k, q: (t[:, :0], s[:, :0], k[:0], q)),
    ],
)
def test_bad_pbsd_input_raises(name, mutate):
    gen = torch.Generator().manual_seed(0)
    t, s, k, q = unit(2, 3, 4, gen=gen), unit(2, 3, 4, gen=gen), unit(3, 4, gen=gen), unit(5, 4, gen=gen)
    with pytest.raises(ValueError, match=name):
        pbsd_loss(*mutate(t, s, k, q))
    with pytest.raises(ValueError, match="temperature"):
        pbsd_loss(t, s, k, q, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        PBSDLoss(temperature=-1)


def test_pbsd_row_blocks_match_reference(monkeypatch):
    """The blocked elementwise pass of PBSD (several row blocks, a ragged last one) changes nothing."""
    import dscl.losses as losses

    monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", 2 * 8)  # K = 8 -> blocks of 2 rows over L*B = 9
    monkeypatch.setattr(losses, "_MIN_BLOCK_ROWS", 1)
    gen = torch.Generator().manual_seed(13)
    teacher, student = unit(3, 3, 5, gen=gen), unit(3, 3, 5, gen=gen)
    key, queue = unit(3, 5, gen=gen), unit(8, 5, gen=gen)
    s_ours, s_ref = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = pbsd_loss(teacher, s_ours, key, queue, temperature=0.3)
    ref = ref_pbsd(teacher, s_ref, key, queue, 0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Issue #15: num_classes (no host-device sync), PBSD memory, device-adapted blocking
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if not c[4]], ids=case_id)
@pytest.mark.parametrize("kind", ["dscl", "supcon"])
def test_num_classes_gives_the_same_loss_and_gradient(case, kind):
    b, k, d, c, _ = case
    query, key, labels, queue, queue_labels = make_inputs(b, k, d, c, seed=3 * b + k)
    fn = dscl_loss if kind == "dscl" else supcon_loss
    n_classes = c + 2  # classes absent from both the batch and the queue change nothing
    q_plain, q_known = query.clone().requires_grad_(), query.clone().requires_grad_()
    plain = fn(q_plain, key, labels, queue, queue_labels, temperature=0.2)
    known = fn(q_known, key, labels, queue, queue_labels, temperature=0.2, num_classes=n_classes)
    torch.testing.assert_close(known, plain, rtol=1e-12, atol=1e-12)
    plain.backward()
    known.backward()
    torch.testing.assert_close(q_known.grad, q_plain.grad, rtol=1e-12, atol=1e-12)


def test_num_classes_path_calls_no_syncing_op(monkeypatch):
    """torch.unique and bincount wait for the device; with num_classes neither runs."""
    query, key, labels, queue, queue_labels = make_inputs(6, 12, 5, 4, seed=1)
    expected = dscl_loss(query, key, labels, queue, queue_labels)

    def syncing(*args, **kwargs):
        raise AssertionError("a host-device synchronising op ran")

    monkeypatch.setattr(torch, "unique", syncing)
    monkeypatch.setattr(torch, "bincount", syncing)
    monkeypatch.setattr(torch.Tensor, "unique", syncing)
    monkeypatch.setattr(torch.Tensor, "bincount", syncing)
    got = dscl_loss(query, key, labels, queue, queue_labels, num_classes=4)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    supcon_loss(query, key, labels, queue, queue_labels, num_classes=4)
    assert DSCLLoss(num_classes=4)(query, key, labels, queue, queue_labels).isfinite()
    assert SupConLoss(num_classes=4)(query, key, labels, queue, queue_labels).isfinite()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_classes_raises(bad):
    query, key, labels, queue, queue_labels = make_inputs(4, 5, 3, 2, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        dscl_loss(query, key, labels, queue, queue_labels, num_classes=bad)


def test_label_outside_num_classes_raises_naming_the_argument():
    query, key, labels, queue, queue_labels = make_inputs(4, 5, 3, 3, seed=0)
    with pytest.raises(ValueError, match=r"queue_labels must lie in \[0, num_classes=2\)"):
        dscl_loss(query, key, labels % 2, queue, queue_labels + 2, num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        supcon_loss(query, key, labels - 1 - labels.max(), queue, queue_labels, num_classes=3)


class _FreshBuffers(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op output whose storage is new and at least ``min_bytes`` large (tensor-size
    tracking at the dispatcher: sees allocations inside autograd Functions, unlike tracemalloc)."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.seen: set[int] = set()
        self.big: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.seen:
                    self.seen.add(storage.data_ptr())
                    if storage.nbytes() >= self.min_bytes:
                        self.big.append((str(func), tuple(t.shape)))
        return out


def test_pbsd_allocates_no_full_size_buffer(monkeypatch):
    """Issue #15: PBSD held two (L*B) x (K+1) float32 buffers; now only row blocks exist."""
    import dscl.losses as losses

    n_patches, b, d, k = 5, 32, 16, 4095
    full = n_patches * b * (k + 1)
    monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", full // 8)  # blocks of 20 rows
    monkeypatch.setattr(losses, "_MIN_BLOCK_ROWS", 1)
    gen = torch.Generator().manual_seed(0)
    teacher, student = unit(n_patches, b, d, dtype=torch.float32, gen=gen), unit(
        n_patches, b, d, dtype=torch.float32, gen=gen).requires_grad_()
    key, queue = unit(b, d, dtype=torch.float32, gen=gen), unit(k, d, dtype=torch.float32, gen=gen)
    with _FreshBuffers(min_bytes=4 * full // 2) as tracker:
        loss = pbsd_loss(teacher, student, key, queue)
        loss.backward()
    assert tracker.big == []
    # and the blocked, gradient-in-forward result is still the loop's (float64 check at this size)
    s64 = student.detach().double().requires_grad_()
    ref = pbsd_loss(teacher.double(), s64, key.double(), queue.double())
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_pbsd_without_grad_skips_the_gradient_and_keeps_the_value():
    gen = torch.Generator().manual_seed(5)
    teacher, student = unit(3, 4, 6, gen=gen), unit(3, 4, 6, gen=gen)
    key, queue = unit(4, 6, gen=gen), unit(10, 6, gen=gen)
    with torch.no_grad():
        value = pbsd_loss(teacher, student.requires_grad_(), key, queue, temperature=0.3)
    assert not value.requires_grad
    torch.testing.assert_close(value, ref_pbsd(teacher, student.detach(), key, queue, 0.3), rtol=1e-9, atol=1e-12)


def test_pbsd_blocks_adapt_to_the_device():
    import dscl.losses as losses

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # ImageNet-LT size (L*B = 1280 rows, K = 65536): at most two blocks on a GPU, >= 128-row blocks on a CPU
    assert losses._pbsd_block_rows(cuda, 1280, 65536) >= 640
    assert 128 <= losses._pbsd_block_rows(cpu, 1280, 65536) < 640
    # the CPU size (L*B = 640, K = 16384): several blocks, never a whole (L*B) x K buffer
    assert 128 <= losses._pbsd_block_rows(cpu, 640, 16384) <= 320
    assert losses._pbsd_block_rows(cpu, 9, 5) == 9 and losses._pbsd_block_rows(cpu, 5, 0) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_with_num_classes_do_not_synchronise_on_cuda():
    query, key, labels, queue, queue_labels = (
        t.cuda() for t in make_inputs(16, 64, 8, 5, seed=2, dtype=torch.float32))
    gen = torch.Generator().manual_seed(0)
    teacher, student = (unit(3, 16, 8, dtype=torch.float32, gen=gen).cuda() for _ in range(2))
    query.requires_grad_()
    student.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = dscl_loss(query, key, labels, queue, queue_labels, num_classes=5)
        loss = loss + supcon_loss(query, key, labels, queue, queue_labels, num_classes=5)
        loss = loss + pbsd_loss(teacher, student, key, queue)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = dscl_loss(query.detach().cpu(), key.cpu(), labels.cpu(), queue.cpu(), queue_labels.cpu())
    torch.testing.assert_close(
        dscl_loss(query.detach(), key, labels, queue, queue_labels, num_classes=5).cpu(), cpu,
        rtol=1e-4, atol=1e-5)
