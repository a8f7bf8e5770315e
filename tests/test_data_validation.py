"""Validation splits: held out from the unused training images of generated LT sets, carved, or listed."""

import numpy as np
import pytest

from conftest import needs_fmnist
from dscl.config import load_config
from dscl.data import build_datasets
from dscl.data.datasets import held_out_indices
from dscl.sweep import SweepError, _validation_plan


def test_held_out_indices_are_balanced_disjoint_and_seeded():
    targets = np.repeat(np.arange(4), 50)  # 50 images per class
    used = np.concatenate([np.flatnonzero(targets == c)[: n] for c, n in enumerate([50, 30, 10, 5])])
    idx = held_out_indices(targets, used, per_class=15, seed=0)
    assert not set(idx) & set(used)
    counts = np.bincount(targets[idx], minlength=4)
    assert counts.tolist() == [0, 15, 15, 15]  # class 0 has no unused image left
    assert np.array_equal(idx, np.sort(idx))
    assert np.array_equal(idx, held_out_indices(targets, used, 15, seed=0))
    assert not np.array_equal(idx, held_out_indices(targets, used, 15, seed=1))
    # fewer unused images than asked: all of them
    assert np.bincount(targets[held_out_indices(targets, used, 45, 0)], minlength=4).tolist() == [0, 20, 40, 45]


@needs_fmnist
def test_fmnist_lt_has_a_balanced_held_out_split_that_costs_no_training_data():
    cfg = load_config("fmnist-lt")
    splits = build_datasets(cfg.data)
    assert splits.val_source == "held-out" and not splits.val_is_carved
    assert splits.val.class_counts() == [200] * 10
    assert splits.train_counts == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]  # the LT subset is unchanged
    assert not set(splits.train.identities()) & set(splits.val.identities())
    assert "held out" in splits.val_description()
    # the subset seed fixes it; the training seed does not move it
    again = build_datasets(cfg.data, seed=7)
    assert again.val.identities() == splits.val.identities()
    cfg.data.subset_seed = 1
    assert build_datasets(cfg.data).val.identities() != splits.val.identities()
    # val_per_class=0 turns it off; then val_fraction carves from train as before
    cfg = load_config("fmnist-lt", overrides=["data.val_per_class=0"])
    assert build_datasets(cfg.data).val is None
    cfg = load_config("fmnist-lt", overrides=["data.val_per_class=0", "data.val_fraction=0.1"])
    carved = build_datasets(cfg.data)
    assert carved.val_source == "carved" and sum(carved.train_counts) + len(carved.val) == 2478


def test_val_per_class_must_not_be_negative():
    from dscl.config import ConfigError

    with pytest.raises(ConfigError, match="val_per_class"):
        load_config("smoke", overrides=["data.val_per_class=-1"])


@needs_fmnist
def test_sweep_uses_the_held_out_split_unless_asked_to_carve():
    base = load_config("smoke")
    fraction, words = _validation_plan(base, None)
    assert fraction == 0.0 and "held out" in words and "(200 images)" in words
    fraction, words = _validation_plan(base, 0.2)
    assert fraction == 0.2 and "carved" in words
    fraction, words = _validation_plan(load_config("smoke", overrides=["data.val_per_class=0"]), None)
    assert fraction == 0.1 and "no validation split" in words
    with pytest.raises(SweepError, match="val-fraction"):
        _validation_plan(base, 0.0)
