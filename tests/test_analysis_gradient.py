"""Tests for dscl.analysis.gradient: the per-anchor gradient decomposition (METHOD.md A.5, A.6, G 5-6)
against closed forms and autograd of dscl.losses, and ``dscl analyze gradient-ratio`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fmnist
from dscl.analysis.gradient import (
    anchor_terms,
    autograd_anchor_gradient,
    format_summary,
    gradient_ratio,
    uniform_pull_ratio,
)
from dscl.cli import main
from dscl.config import dump_config, load_config
from dscl.losses import dscl_loss, supcon_loss

F64 = torch.float64
ALPHA, TAU = 1 / 9, 0.07


def _weights(loss: str, n_pos: int, alpha: float = ALPHA) -> tuple[float, float]:
    """(w on k_i, w on each t in P_i), written from METHOD.md A.5 / A.6."""
    if loss == "scl":
        return 1 / (n_pos + 1), 1 / (n_pos + 1)
    return alpha, (1 - alpha) / n_pos


def _count_pos(labels: torch.Tensor, queue_labels: torch.Tensor, i: int) -> int:
    """|P_i| by counting: other same-label queries, other same-label keys, same-label queue entries."""
    y = int(labels[i])
    others = sum(1 for j in range(len(labels)) if j != i and int(labels[j]) == y)
    return 2 * others + int((queue_labels == y).sum())


def _identical_inputs(b_labels: list[int], queue_labels: list[int], dim: int = 3):
    """Every query, key and queue entry is the same unit vector: all logits equal, p = 1/|M|."""
    e = F.normalize(torch.arange(1.0, dim + 1, dtype=F64), dim=0)
    b, k = len(b_labels), len(queue_labels)
    return (e.expand(b, dim).clone(), e.expand(b, dim).clone(), torch.tensor(b_labels),
            e.expand(k, dim).clone(), torch.tensor(queue_labels, dtype=torch.long))


def _random_inputs(b: int, k: int, n_classes: int, dim: int, seed: int, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(b, dim, generator=gen, dtype=dtype), dim=1)
    key = F.normalize(torch.randn(b, dim, generator=gen, dtype=dtype), dim=1)
    queue = F.normalize(torch.randn(k, dim, generator=gen, dtype=dtype), dim=1)
    labels = torch.randint(0, n_classes, (b,), generator=gen)
    queue_labels = torch.randint(0, n_classes, (k,), generator=gen)
    return query, key, labels, queue, queue_labels


# --------------------------------------------------------------------------------------------------
# Closed forms at uniform p
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["scl", "dscl"])
def test_uniform_logits_exact_ratio(loss):
    """All features identical: both ratios = |1/M - w_k| / (|P| |1/M - w_t|) exactly, per anchor."""
    b_labels = [0, 0, 1, 1, 1, 2, 3]
    queue_labels = [0, 1, 1, 5, 5, 5, 5, 2, 2, 2, 7]
    query, key, labels, queue, q_labels = _identical_inputs(b_labels, queue_labels)
    terms = anchor_terms(query, key, labels, queue, q_labels, loss=loss, alpha=ALPHA, temperature=TAU)
    m = 2 * len(b_labels) - 1 + len(queue_labels)
    assert terms.n_contrast == m
    torch.testing.assert_close(terms.p_own, torch.full((len(b_labels),), 1 / m, dtype=F64))
    coef, vector = terms.coef_ratio(), terms.vector_ratio()
    for i in range(len(b_labels)):
        n_pos = _count_pos(labels, q_labels, i)
        assert int(terms.n_pos[i]) == n_pos
        if n_pos == 0:  # label 3: no other positive anywhere -> no ratio
            assert math.isnan(coef[i]) and math.isnan(vector[i])
            continue
        w_own, w_pos = _weights(loss, n_pos)
        expected = abs(1 / m - w_own) / (n_pos * abs(1 / m - w_pos))
        assert float(coef[i]) == pytest.approx(expected, rel=1e-6, abs=0)
        assert float(vector[i]) == pytest.approx(expected, rel=1e-6, abs=0)
    torch.testing.assert_close(uniform_pull_ratio(terms.n_pos, m, loss=loss, alpha=ALPHA), coef, equal_nan=True)


def test_uniform_ratio_tends_to_theory():
    """G 6: as the contrast set grows (more negatives), DSCL -> alpha/(1-alpha); SCL is 1/|P_i| throughout."""
    b_labels = [0, 0, 0, 1, 1]
    errors: dict[tuple[str, int], list[float]] = {}
    for n_neg in (10, 1_000, 100_000):
        queue_labels = [0, 1, 1, 1] + [9] * n_neg
        query, key, labels, queue, q_labels = _identical_inputs(b_labels, queue_labels)
        for loss in ("scl", "dscl"):
            coef = anchor_terms(query, key, labels, queue, q_labels, loss=loss, alpha=ALPHA, temperature=TAU)
            for i in (0, 3):
                n_pos = _count_pos(labels, q_labels, i)  # 5 for class 0, 5 for class 1
                limit = 1 / n_pos if loss == "scl" else ALPHA / (1 - ALPHA)
                errors.setdefault((loss, i), []).append(abs(float(coef.coef_ratio()[i]) / limit - 1))
                assert float(coef.vector_ratio()[i]) == pytest.approx(float(coef.coef_ratio()[i]), rel=1e-9)
    for (loss, i), errs in errors.items():
        if loss == "scl":  # w_k = w_t: |1/M - w| cancels, the ratio is exactly 1/|P_i| at any M
            assert max(errs) < 1e-9, (i, errs)
        else:
            assert errs[0] > errs[1] > errs[2], (i, errs)
            assert errs[2] < 1e-3, (i, errs)
            assert errs[0] > 1e-2, (i, errs)  # the finite-M correction is real at small M


# --------------------------------------------------------------------------------------------------
# Decomposition == autograd of our losses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["scl", "dscl"])
def test_decomposition_matches_autograd(loss):
    """own + positives + negatives (over tau) == autograd of loss_i w.r.t. q_i, for every anchor, and
    together with the contrast-column terms it reproduces the batch loss's full gradient."""
    b, k = 8, 13
    query, key, labels, queue, queue_labels = _random_inputs(b, k, n_classes=4, dim=6, seed=3)
    labels[-1] = 99  # an anchor with |P_i| = 0: pure instance discrimination, w = 1 on k_i
    alpha, tau = 0.2, 0.1
    terms = anchor_terms(query, key, labels, queue, queue_labels, loss=loss, alpha=alpha, temperature=tau)
    assert int(terms.n_pos[-1]) == 0 and bool(terms.valid[:-1].any())
    grads = terms.gradient()
    for i in range(b):
        auto = autograd_anchor_gradient(query, key, labels, queue, queue_labels, i, loss=loss, alpha=alpha,
                                        temperature=tau)
        torch.testing.assert_close(grads[i], auto, rtol=1e-10, atol=1e-12)
    # Independent of the batch-of-one rewrite: the batched loss itself. B * dL/dq_j = anchor term of j
    # + sum_i (p_ij - w_ij) q_i / tau over the rows i where q_j is a contrast column (METHOD.md G 8).
    q = query.clone().requires_grad_(True)
    if loss == "scl":
        supcon_loss(q, key, labels, queue, queue_labels, temperature=tau).backward()
    else:
        dscl_loss(q, key, labels, queue, queue_labels, alpha=alpha, temperature=tau).backward()
    contrast_side = terms.delta[:, :b].t() @ query / tau
    torch.testing.assert_close(q.grad * b, grads + contrast_side, rtol=1e-10, atol=1e-12)
    # the weights sum to 1 per anchor: sum_j (p_j - w_j) = 0
    torch.testing.assert_close(terms.delta.sum(dim=1), torch.zeros(b, dtype=F64), rtol=0, atol=1e-12)


def test_anchor_terms_float32_inputs_and_errors():
    """float32 features are analysed in float64; bad arguments are refused with a clear message."""
    query, key, labels, queue, queue_labels = _random_inputs(4, 5, n_classes=2, dim=3, seed=1, dtype=torch.float32)
    terms = anchor_terms(query, key, labels, queue, queue_labels, loss="dscl")
    assert terms.own.dtype == F64 and terms.delta.shape == (4, 2 * 4 + 5)
    with pytest.raises(ValueError, match="loss must be one of"):
        anchor_terms(query, key, labels, queue, queue_labels, loss="supcon")
    with pytest.raises(ValueError, match="alpha"):
        anchor_terms(query, key, labels, queue, queue_labels, loss="dscl", alpha=0.0)
    with pytest.raises(ValueError, match="queue"):
        anchor_terms(query, key, labels, queue[:, :2], queue_labels, loss="dscl")


# --------------------------------------------------------------------------------------------------
# End to end on a real (smoke) run
# --------------------------------------------------------------------------------------------------


@needs_fmnist
def test_cli_gradient_ratio_end_to_end(smoke_run, tmp_path, capsys):
    rc = main(["analyze", "gradient-ratio", "--run", str(smoke_run), "--batches", "2", "--no-progress",
               "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "gradient_ratio.json").read_text())
    s = result["settings"]
    cfg = load_config("smoke")
    alpha = cfg.loss.alpha
    assert s["batches"] == 2 and s["batch_size"] == cfg.optim.batch_size and s["alpha"] == pytest.approx(alpha)
    assert s["anchors_measured"] == 2 * cfg.optim.batch_size
    assert s["queue_filled"] == {"final": cfg.model.queue_size, "init": cfg.model.queue_size}
    assert "batch statistics" in s["bn_mode"] and "FIFO" in s["init_queue_fill"]
    assert set(result["autograd_check"]) == {"scl", "dscl"}
    assert all(c["relative_diff"] < 1e-8 for c in result["autograd_check"].values())
    dscl_theory = alpha / (1 - alpha)
    assert result["theory"]["dscl"] == pytest.approx(dscl_theory)

    groups = {g: ids for g, ids in result["groups"].items() if ids}
    assert set(groups) >= {"medium", "few"}  # smoke counts 60..6: no class above 100 images
    for model in ("final", "init"):
        for loss in ("scl", "dscl"):
            block = result["models"][model][loss]
            rows = block["per_class"]
            assert [r["class"] for r in rows] == list(range(10))
            assert sum(r["n_anchors"] + r["n_skipped_no_positive"] for r in rows) == s["anchors_measured"]
            for r in rows:
                if r["n_anchors"]:
                    for field in ("vector_ratio", "coef_ratio", "mean_n_pos", "theory", "mean_p_own_key"):
                        assert math.isfinite(r[field]) and r[field] > 0, (model, loss, r)
                    expected = dscl_theory if loss == "dscl" else 1 / r["mean_n_pos"]
                    assert r["theory"] == pytest.approx(expected)
            for g in groups:
                entry = block["per_group"][g]
                assert entry["n_classes"] >= 1
                assert math.isfinite(entry["coef_ratio"]) and math.isfinite(entry["vector_ratio"])
            # a class's |P_i| grows with its size (more same-class entries in batch and queue)
            mean_pos = block["per_group"]
            assert mean_pos["medium"]["mean_n_pos"] > mean_pos["few"]["mean_n_pos"]

    init = result["models"]["init"]
    # at initialisation DSCL's pull ratio sits near alpha/(1-alpha) in every group, SCL's near 1/|P_i|
    for g in groups:
        assert 0.5 * dscl_theory < init["dscl"]["per_group"][g]["coef_ratio"] < 2 * dscl_theory, g
        scl = init["scl"]["per_group"][g]
        assert 0.5 * scl["theory"] < scl["coef_ratio"] < 2 * scl["theory"], g
    # SCL: the rarer the class, the larger the pull on the own view; DSCL is (nearly) class independent
    scl_spread = init["scl"]["per_group"]["few"]["coef_ratio"] / init["scl"]["per_group"]["medium"]["coef_ratio"]
    dscl_spread = init["dscl"]["per_group"]["few"]["coef_ratio"] / init["dscl"]["per_group"]["medium"]["coef_ratio"]
    assert scl_spread > 1.5
    assert abs(math.log(dscl_spread)) < abs(math.log(scl_spread)) / 3

    png = tmp_path / "gradient_ratio.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert result["outputs"] == {"json": str(tmp_path / "gradient_ratio.json"), "png": str(png)}
    assert printed.strip() == format_summary(result).strip()
    assert "Few" in printed and "DSCL" in printed and str(png) in printed


@needs_fmnist
def test_gradient_ratio_is_deterministic(smoke_run, tmp_path):
    """Same run, same settings -> the same numbers (seeded batches and augmentations)."""
    a = gradient_ratio(smoke_run, batches=1, out=tmp_path / "a", device="cpu", progress=False)
    b = gradient_ratio(smoke_run, batches=1, out=tmp_path / "b", device="cpu", progress=False)
    assert a["models"] == b["models"]
    coef = [r["coef_ratio"] for r in a["models"]["final"]["dscl"]["per_class"] if r["coef_ratio"] is not None]
    assert coef and np.all(np.isfinite(coef))


def test_batches_must_be_positive(tmp_path, capsys):
    rc = main(["analyze", "gradient-ratio", "--run", str(tmp_path), "--batches", "0", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--batches must be an integer >= 1" in err


def test_cli_run_without_checkpoint_exits_2(tmp_path: Path, capsys):
    """A run directory with a config but no stage-1 checkpoint -> exit 2 and one line saying how to fix it."""
    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config("smoke"), run / "config.yaml")
    assert main(["analyze", "gradient-ratio", "--run", str(run), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "dscl analyze: error:" in err
    assert str(run / "checkpoints" / "last.pt") in err and "does not exist" in err
    assert "dscl pretrain" in err  # says how to fix it
    assert "Traceback" not in err
    assert not (run / "analysis").exists()
