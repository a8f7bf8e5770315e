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


def test_report_prints_the_published_numbers_only_for_the_unchanged_preset(tmp_path):
    from types import SimpleNamespace

    from dscl.evaluation import run_facts
    from dscl.report import build_report, format_table, report_rows, write_report

    splits = SimpleNamespace(train=SimpleNamespace(fingerprint=lambda: "abc123"), data_root="/data")
    unchanged = run_facts({}, splits, load_config("imagenet-lt", overrides=["data.data_root=/data"]))
    assert unchanged["expected"]["top1"] == 57.7
    assert run_facts({}, splits, load_config("imagenet-lt", overrides=["optim.epochs=90"]))["expected"] is None
    assert run_facts({}, splits, load_config("fmnist-lt"))["expected"] is None

    summary = {"top1": 55.0, "top5": 80.0, "top1_macro": 55.0, "many": 66.0, "medium": 52.0, "few": 36.0,
               "shot_classes": {"many": 1, "medium": 1, "few": 1},
               "per_class": [{"class": c, "train_count": n, "test_count": 50, "accuracy": 55.0}
                             for c, n in (("a", 500), ("b", 50), ("c", 5))]}
    report = build_report(summary, dataset="imagenet-lt", method="dscl+pbsd", seed=0, epochs=1, wall_seconds=1.0,
                          split="test", selection="last epoch", run_info=unchanged)
    rows = report_rows(report)
    assert rows[-1]["top1"] == 57.7 and rows[-1]["few"] is None and "paper" in rows[-1]["method"]
    assert "57.7" in format_table(rows)
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "| paper (published, see source) | 57.7 |" in md and "supplementary Table 2" in md
    report_changed = build_report(summary, dataset="imagenet-lt", method="dscl+pbsd", seed=0, epochs=1,
                                  wall_seconds=1.0, split="test", selection="last epoch",
                                  run_info={"expected": None})
    assert all("paper" not in r["method"] for r in report_rows(report_changed))
