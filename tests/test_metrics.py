"""Tests for dscl.metrics: metrics against hand computations, post-hoc formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dscl.metrics import (
    class_means,
    confusion_matrix,
    logit_adjust,
    ncm_logits,
    per_class_accuracy,
    shot_group_bounds,
    shot_groups,
    summarize,
    tau_normalize,
    topk_correct,
)

DESIGN_KEYS = {
    "dataset", "method", "top1", "top5", "many", "medium", "few",
    "shot_classes", "per_class", "seed", "epochs", "wall_seconds",
}


def one_hot_logits(preds: list[int], num_classes: int) -> np.ndarray:
    out = np.zeros((len(preds), num_classes))
    out[np.arange(len(preds)), preds] = 1.0
    return out


# ---------------------------------------------------------------------------------- shot groups


def test_shot_group_boundaries():
    counts = [101, 100, 20, 19, 1000, 0, 21, 99]
    g = shot_groups(counts)
    assert g == {"many": [0, 4], "medium": [1, 2, 6, 7], "few": [3, 5]}


def test_shot_group_custom_thresholds_and_validation():
    assert shot_groups([5, 10, 50], many_threshold=10, few_threshold=5) == {
        "many": [2], "medium": [0, 1], "few": [],
    }
    with pytest.raises(ValueError, match="few_threshold"):
        shot_groups([1, 2], many_threshold=10, few_threshold=50)
    with pytest.raises(ValueError, match="non-negative"):
        shot_groups([3, -1])


def test_shot_group_bounds_describe_the_rule():
    """The words of shot_group_bounds match what shot_groups does at the boundaries (both bounds Medium)."""
    assert shot_group_bounds() == {"many": "> 100", "medium": "20–100", "few": "< 20"}
    assert shot_group_bounds(50, 5) == {"many": "> 50", "medium": "5–50", "few": "< 5"}
    assert shot_groups([51, 50, 5, 4], many_threshold=50, few_threshold=5) == {
        "many": [0], "medium": [1, 2], "few": [3],
    }


# ---------------------------------------------------------------------------------- metrics


def test_per_class_accuracy_hand_computed():
    # class 0: 3 samples, 2 right; class 1: 2 samples, 0 right; class 2: 1 sample, 1 right.
    targets = [0, 0, 0, 1, 1, 2]
    preds = [0, 1, 0, 0, 2, 2]
    acc = per_class_accuracy(preds, targets, 3)
    np.testing.assert_allclose(acc, [2 / 3, 0.0, 1.0])
    # torch inputs give the same answer
    np.testing.assert_allclose(per_class_accuracy(torch.tensor(preds), torch.tensor(targets), 3), acc)


def test_per_class_accuracy_class_without_test_samples_is_nan():
    acc = per_class_accuracy([0, 2], [0, 2], 4)
    assert acc[0] == 1.0 and acc[2] == 1.0
    assert math.isnan(acc[1]) and math.isnan(acc[3])


def test_per_class_accuracy_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="targets"):
        per_class_accuracy([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="same shape"):
        per_class_accuracy([0, 1, 1], [0, 1], 3)


def test_topk_correct_hand_computed_and_clipped():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    targets = np.array([2, 1, 0])
    np.testing.assert_array_equal(topk_correct(logits, targets, 1), [False, False, False])
    # sample 1: classes 1 and 2 tie below class 0; ties go to the lower index, so class 1 is 2nd.
    np.testing.assert_array_equal(topk_correct(logits, targets, 2), [True, True, False])
    # k=5 with 3 classes is clipped to 3: every sample is correct.
    assert topk_correct(torch.tensor(logits), torch.tensor(targets), 5).all()


def test_topk_k1_matches_argmax_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 3, size=(200, 7)).astype(float)  # many ties
    targets = rng.integers(0, 7, size=200)
    np.testing.assert_array_equal(topk_correct(logits, targets, 1), logits.argmax(1) == targets)
    # constant logits: only class 0 counts as the top-1 prediction
    assert topk_correct(np.zeros((3, 4)), np.array([0, 1, 3]), 1).tolist() == [True, False, False]


def test_confusion_matrix_rows_are_true_class():
    cm = confusion_matrix([0, 1, 0, 0, 2, 2], [0, 0, 0, 1, 1, 2], 3)
    expected = np.array([[2, 1, 0], [1, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 6


# ---------------------------------------------------------------------------------- summarize


def test_summarize_hand_computed():
    train_counts = [500, 50, 5]  # one class per group
    targets = [0, 0, 0, 0, 1, 1, 2, 2]
    preds = [0, 0, 0, 1, 1, 0, 0, 0]  # acc: class0 3/4, class1 1/2, class2 0/2
    s = summarize(torch.tensor(one_hot_logits(preds, 3)), torch.tensor(targets), train_counts,
                  class_names=["a", "b", "c"])
    assert s["top1"] == pytest.approx(100 * 4 / 8)
    assert s["top1_macro"] == pytest.approx(100 * (0.75 + 0.5 + 0.0) / 3)
    assert s["many"] == pytest.approx(75.0)
    assert s["medium"] == pytest.approx(50.0)
    assert s["few"] == pytest.approx(0.0)  # a real 0 stays 0 ...
    assert s["top5"] == pytest.approx(100.0)  # 3 classes: top-5 is top-3
    assert s["shot_classes"] == {"many": 1, "medium": 1, "few": 1}
    assert s["per_class"][0] == {"class": "a", "train_count": 500, "test_count": 4, "accuracy": 75.0}
    assert s["per_class"][2]["accuracy"] == 0.0


def test_summarize_empty_group_is_none_not_zero():
    # counts 101 (many), 100 and 20 (medium): no Few class at all
    train_counts = [101, 100, 20]
    targets = [0, 1, 2]
    s = summarize(one_hot_logits([0, 1, 0], 3), np.array(targets), train_counts)
    assert s["few"] is None
    assert s["shot_classes"] == {"many": 1, "medium": 2, "few": 0}
    assert s["medium"] == pytest.approx(50.0)
    # and 19 is Few
    s2 = summarize(one_hot_logits([0, 1], 2), [0, 1], [19, 101])
    assert s2["shot_classes"] == {"many": 1, "medium": 0, "few": 1}
    assert s2["medium"] is None and s2["few"] == pytest.approx(100.0)


def test_summarize_class_without_test_samples():
    # class 1 has training images but no test images: accuracy None, excluded from its group mean
    train_counts = [200, 150, 10]
    s = summarize(one_hot_logits([0, 0, 2], 3), [0, 0, 2], train_counts)
    assert s["per_class"][1]["test_count"] == 0
    assert s["per_class"][1]["accuracy"] is None
    assert s["many"] == pytest.approx(100.0)  # only class 0 counts, not (100 + 0) / 2
    assert s["top1_macro"] == pytest.approx(100.0)


def test_summarize_validates_shapes():
    with pytest.raises(ValueError, match="train_counts"):
        summarize(np.zeros((2, 3)), [0, 1], [1, 2])
    with pytest.raises(ValueError, match="2-D"):
        summarize(np.zeros(3), [0], [1, 2, 3])
    with pytest.raises(ValueError, match="class_names"):
        summarize(np.zeros((2, 2)), [0, 1], [1, 2], class_names=["x"])


# ---------------------------------------------------------------------------------- post-hoc


def test_logit_adjust_formula():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    counts = [30, 10]  # prior 0.75, 0.25
    out = logit_adjust(logits, counts, tau=1.0)
    expected = torch.tensor([[1.0 - math.log(0.75), 2.0 - math.log(0.25)],
                             [-math.log(0.75), -math.log(0.25)]])
    torch.testing.assert_close(out, expected)
    out_half = logit_adjust(logits, counts, tau=0.5)
    torch.testing.assert_close(out_half[1], torch.tensor([-0.5 * math.log(0.75), -0.5 * math.log(0.25)]))
    torch.testing.assert_close(logit_adjust(logits, counts, tau=0.0), logits)
    # the rare class gains: an equal-logit sample is now predicted as the tail class
    assert out[1].argmax().item() == 1
    with pytest.raises(ValueError, match="> 0"):
        logit_adjust(logits, [3, 0])


def test_tau_normalize_formula():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2
    torch.testing.assert_close(tau_normalize(w, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(
        tau_normalize(w, 0.5), torch.tensor([[3 / math.sqrt(5), 4 / math.sqrt(5)], [0.0, 2 / math.sqrt(2)]])
    )
    torch.testing.assert_close(tau_normalize(w, 0.0), w)


def test_ncm_toy_separable_problem_is_perfect():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 8) * 5.0  # 4 well-separated directions in 8-D
    labels = torch.arange(4).repeat_interleave(25)
    feats = centres[labels] + 0.3 * torch.randn(100, 8, generator=gen)
    means = class_means(feats, labels, 4)
    assert means.shape == (4, 8)
    torch.testing.assert_close(means.norm(dim=1), torch.ones(4))
    test_labels = torch.arange(4).repeat_interleave(10)
    test_feats = centres[test_labels] + 0.3 * torch.randn(40, 8, generator=gen)
    scores = ncm_logits(test_feats, means)
    assert scores.shape == (40, 4)
    assert scores.max() <= 1.0 + 1e-6
    s = summarize(scores, test_labels, [25, 25, 25, 25])
    assert s["top1"] == pytest.approx(100.0)


def test_class_means_hand_computed():
    feats = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    means = class_means(feats, labels, 3)
    s = 1 / math.sqrt(2)
    # normalised features (1,0) and (0,1) average to (0.5,0.5) -> renormalised (s,s); empty class -> 0
    torch.testing.assert_close(means, torch.tensor([[s, s], [0.0, 1.0], [0.0, 0.0]]))


def test_tau_norm_logits_in_the_trained_space():
    """Issue #21: tau = 0 is the plain classifier exactly (raw or standardised features); on a
    standardised classifier tau-norm acts on the trained weights and standardised features, each class's
    bias divided with its row (issue 28)."""
    from dscl.classify import fold_standardization
    from dscl.metrics import tau_norm_logits

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 6, generator=g) * torch.tensor([1, 5, 0.1, 2, 3, 0.5]) + 4
    trained = torch.nn.Linear(6, 3)
    mean, std = feats.mean(0), feats.std(0)
    folded = fold_standardization(trained, (mean, std))
    plain = folded(feats)
    torch.testing.assert_close(trained((feats - mean) / std), plain, rtol=1e-5, atol=1e-5)  # the fold itself
    exact = torch.nn.functional.linear(feats.double(), folded.weight.double(), folded.bias.double())
    for stats in (None, (mean, std)):
        assert torch.equal(tau_norm_logits(feats, folded.weight, folded.bias, 0.0, stats), plain)
        # and the unfolding path itself is the same classifier (tau -> 0), to float64 accuracy
        tiny = tau_norm_logits(feats, folded.weight, folded.bias, 1e-12, stats)
        torch.testing.assert_close(tiny.double(), exact, rtol=1e-5, atol=1e-5)
    z = (feats - mean) / std
    norms = trained.weight.norm(dim=1)  # (C,) of the trained rows
    want = (z @ trained.weight.T + trained.bias) / norms
    got = tau_norm_logits(feats, folded.weight, folded.bias, 1.0, (mean, std))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the issue-21 computation (folded weights, no bias, raw features) is a different classifier
    assert not torch.allclose(feats @ tau_normalize(folded.weight, 1.0).T, want)
    raw = tau_norm_logits(feats, trained.weight, trained.bias, 0.5, None)
    torch.testing.assert_close(raw, (feats @ trained.weight.T + trained.bias) / norms.sqrt())


def test_tau_norm_divides_each_bias_with_its_row():
    """Issue 28: at tau = 1 a class's (row, bias) pair is a direction only, so scaling it by s > 0 changes
    no logit, raw or standardised; keeping the full bias let it outvote rows divided by norms of 15-24."""
    from dscl.classify import fold_standardization
    from dscl.metrics import tau_norm_logits

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(40, 5, generator=g) * 3 + 2
    trained = torch.nn.Linear(5, 4)
    mean, std = feats.mean(0), feats.std(0)
    scaled = torch.nn.Linear(5, 4)
    with torch.no_grad():
        s = torch.tensor([20.0, 1.0, 0.05, 7.0])  # per class, like a head class trained to a long row
        scaled.weight.copy_(trained.weight * s[:, None])
        scaled.bias.copy_(trained.bias * s)
    for stats in (None, (mean, std)):
        a, b = (fold_standardization(m, stats) if stats is not None else m for m in (trained, scaled))
        torch.testing.assert_close(tau_norm_logits(feats, b.weight, b.bias, 1.0, stats),
                                   tau_norm_logits(feats, a.weight, a.bias, 1.0, stats), rtol=1e-5, atol=1e-5)
        # tau = 0 stays the plain classifier exactly
        assert torch.equal(tau_norm_logits(feats, b.weight, b.bias, 0.0, stats), b(feats))
    # without a bias the row alone is divided
    torch.testing.assert_close(tau_norm_logits(feats, scaled.weight, None, 1.0),
                               feats @ tau_normalize(scaled.weight, 1.0).T)
    # a zero row has no norm to divide by: its bias stays finite and unchanged
    with torch.no_grad():
        scaled.weight[2] = 0.0
    out = tau_norm_logits(feats, scaled.weight, scaled.bias, 1.0)
    assert torch.isfinite(out).all() and torch.equal(out[:, 2], scaled.bias[2].expand(40))


def test_lt_test_priors_follow_the_training_order():
    from dscl.metrics import lt_test_priors

    counts = [10, 500, 40, 500, 3]  # ranks by training images: 1, 3 (tie: index order), 2, 0, 4
    fwd = lt_test_priors(counts, 50, "forward")
    assert fwd.sum() == pytest.approx(1.0)
    assert fwd[1] == pytest.approx(50 * fwd[4]) and fwd[1] > fwd[3] > fwd[2] > fwd[0] > fwd[4]
    bwd = lt_test_priors(counts, 50, "backward")
    assert bwd[4] == pytest.approx(50 * bwd[1]) and list(np.argsort(bwd)) == list(np.argsort(-fwd))
    assert np.allclose(lt_test_priors(counts, 50, "uniform"), 0.2)
    assert np.allclose(lt_test_priors([7], 10, "forward"), [1.0])
    with pytest.raises(ValueError, match="direction"):
        lt_test_priors(counts, 2, "sideways")


def test_accuracy_under_distributions_is_the_prior_weighted_mean():
    """A head class at 90 %, a tail class at 30 %: forward-ρ weights them ρ:1, backward 1:ρ, uniform = the
    per-class mean; a class without test images drops out."""
    from dscl.metrics import TEST_AGNOSTIC_FACTORS, accuracy_under_distributions

    ta = accuracy_under_distributions([90.0, 30.0], [100, 5])
    assert list(ta) == (["forward-50", "forward-25", "forward-10", "forward-5", "forward-2", "uniform"]
                        + ["backward-2", "backward-5", "backward-10", "backward-25", "backward-50"])
    assert len(TEST_AGNOSTIC_FACTORS) == 5
    assert ta["uniform"] == pytest.approx(60.0)
    assert ta["forward-50"] == pytest.approx((50 * 90 + 30) / 51, abs=1e-4)
    assert ta["backward-50"] == pytest.approx((90 + 50 * 30) / 51, abs=1e-4)
    values = list(ta.values())
    assert values == sorted(values, reverse=True)  # head better than tail: accuracy falls forward -> backward
    missing = accuracy_under_distributions([90.0, None, 30.0], [100, 50, 5])
    assert missing["uniform"] == pytest.approx(60.0)
    assert set(accuracy_under_distributions([None], [4]).values()) == {None}
