"""Shipped presets: every one loads, and the paper's benchmarks carry their published numbers."""

import pytest

from dscl.config import load_config, preset_changes, preset_expected, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_is_its_own_configuration(name):
    cfg = load_config(name)
    assert cfg.preset == name and preset_changes(cfg) == []


def test_paper_presets_carry_expected_numbers_and_nothing_unverified():
    imagenet = preset_expected("imagenet-lt")
    assert imagenet["top1"] == 57.7 and "Table 2" in imagenet["source"]
    for name in ("inat2018", "places-lt"):
        expected = preset_expected(name)
        # the main-paper tables were not available: no number may be claimed for these presets
        assert expected is not None and all(expected[k] is None for k in ("top1", "many", "medium", "few"))
        assert "not verified" in expected["source"]
    assert preset_expected("fmnist-lt") is None and preset_expected("no-such-preset") is None


def test_preset_changes_ignore_where_the_data_lives_but_not_the_recipe():
    cfg = load_config("imagenet-lt", overrides=["data.data_root=/data/ILSVRC2012", "data.list_dir=/lists",
                                                "optim.seed=4", "data.num_workers=12"])
    assert preset_changes(cfg) == []
    cfg = load_config("imagenet-lt", overrides=["optim.epochs=90", "loss.alpha=0.2"])
    assert preset_changes(cfg) == ["loss.alpha", "optim.epochs"]
    cfg.preset = "gone"
    assert preset_changes(cfg) == ["preset"]
