"""Stage 2: the class-balanced linear classifier and its epoch selection."""

import pytest
import torch

from conftest import needs_fmnist
from dscl.config import load_config
from dscl.run import load_checkpoint


def test_class_balanced_linear_classifier_on_separable_long_tailed_features():
    """Stage 2 on cached features: a long-tailed but separable problem gets high balanced accuracy."""
    from dscl.classify import balanced_accuracy, train_linear_cached

    g = torch.Generator().manual_seed(0)
    counts = [400, 100, 25, 6, 3]
    centres = torch.eye(5, 16) * 4
    feats = torch.cat([centres[c] + 0.5 * torch.randn(n, 16, generator=g) for c, n in enumerate(counts)])
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    cfg = load_config("smoke", overrides=["classifier.epochs=20", "classifier.lr=0.5", "classifier.batch_size=64",
                                          "classifier.milestones=[15]"])
    fc, chosen, history = train_linear_cached(feats, labels, 5, cfg, epoch_size=len(labels), val=None, progress=False)
    assert chosen == 20 and len(history) == 20
    test = torch.cat([centres[c] + 0.5 * torch.randn(50, 16, generator=g) for c in range(5)])
    test_y = torch.arange(5).repeat_interleave(50)
    with torch.no_grad():
        assert balanced_accuracy(fc(test), test_y, 5) > 95
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_validation_selection_picks_the_best_val_epoch():
    from dscl.classify import train_linear_cached

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(60, 4, generator=g)
    labels = torch.arange(3).repeat(20)
    cfg = load_config("smoke", overrides=["classifier.epochs=6", "classifier.lr=0.1"])
    val = (torch.randn(30, 4, generator=g), torch.arange(3).repeat(10))
    fc, chosen, history = train_linear_cached(feats, labels, 3, cfg, epoch_size=60, val=val, progress=False)
    best = max(range(6), key=lambda i: (history[i]["val_balanced_top1"], -i))
    assert chosen == best + 1


@needs_fmnist
def test_classifier_select_last_ignores_the_validation_split(smoke_run, tmp_path):
    """classifier.select=last keeps the last epoch even with a validation split; val picks by it."""
    import shutil

    from dscl.classify import classify

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    chosen = {}
    for select in ("last", "val"):
        cfg = load_config("smoke", overrides=["data.val_per_class=0", "data.val_fraction=0.3", "classifier.epochs=4",
                                              f"classifier.select={select}"])
        state = load_checkpoint(classify(run, cfg=cfg, device="cpu", progress=False))
        chosen[select] = state
    last, val = chosen["last"], chosen["val"]
    assert last["selected_epoch"] == 4 and "classifier.select=last" in last["selection"]
    assert all("val_balanced_top1" not in h for h in last["history"])
    assert all("val_balanced_top1" in h for h in val["history"]) and "validation split carved" in val["selection"]
    best = max(range(4), key=lambda e: (val["history"][e]["val_balanced_top1"], -e))
    assert val["selected_epoch"] == best + 1


def test_standardisation_is_folded_into_an_equivalent_layer():
    from dscl.classify import feature_stats, fold_standardization, standardize

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 6, generator=g) * torch.tensor([0.01, 1, 10, 100, 3, 0.5]) + 4
    feats[:, 5] = 2.0  # a constant dimension must not divide by zero
    stats = feature_stats(feats)
    z = standardize(feats, stats)
    torch.testing.assert_close(z[:, :5].mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, :5].std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    assert torch.all(z[:, 5] == 0)
    fc = torch.nn.Linear(6, 3)
    folded = fold_standardization(fc, stats)
    with torch.no_grad():
        torch.testing.assert_close(folded(feats), fc(z), atol=1e-4, rtol=1e-4)


def test_standardize_is_refused_with_the_official_protocol():
    from dscl.config import ConfigError

    with pytest.raises(ConfigError, match="standardize"):
        load_config("smoke", overrides=["classifier.standardize=true", "classifier.protocol=official"])
