"""`dscl compare`'s manifest of config keys that differ between the compared methods."""

import pytest

from dscl.compare import config_differences, format_differences, format_markdown, method_config
from dscl.config import load_config


def test_manifest_lists_only_the_objective_for_a_fair_comparison():
    base = load_config("smoke")
    diff = config_differences({m: method_config(base, m, seed=0) for m in ("ce", "dscl", "dscl+pbsd")})
    assert set(diff) == {"loss.loss", "loss.pbsd_weight"}
    assert diff["loss.loss"] == {"ce": "ce", "dscl": "dscl", "dscl+pbsd": "dscl"}
    assert diff["loss.pbsd_weight"]["dscl+pbsd"] == base.loss.pbsd_weight > 0


def test_manifest_catches_an_unfair_difference_and_ignores_the_seed():
    a = method_config(load_config("smoke"), "scl", seed=0)
    b = method_config(load_config("smoke", overrides=["optim.epochs=5", "views.global_scale=[0.3,1.0]"]), "dscl",
                      seed=1)
    diff = config_differences({"scl": a, "dscl": b})
    assert {"optim.epochs", "views.global_scale", "loss.loss"} <= set(diff) and "optim.seed" not in diff
    text = format_differences(diff)
    assert "`optim.epochs`: scl = 2, dscl = 5" in text
    assert "same for all" in format_differences({})
    md = format_markdown({"dataset": "d", "preset": "p", "seeds": [0], "methods": {}, "differences": diff,
                          "command": "dscl compare", "wall_seconds": 60})
    assert "`views.global_scale`" in md


def test_compare_aggregates_the_test_agnostic_columns():
    """Issue #21: `dscl compare` shows forward / uniform / backward accuracy per method (mean ± std);
    reports written before the key existed count as missing."""
    from dscl.compare import FIELDS, TEST_AGNOSTIC_FIELDS, aggregate
    from dscl.metrics import accuracy_under_distributions

    def report(acc: list[float]) -> dict:
        return {"top1": 1.0, "many": None, "medium": 2.0, "few": 3.0,
                "test_agnostic": accuracy_under_distributions(acc, [100, 5])}

    reports = {"dscl": [report([90.0, 30.0]), report([80.0, 40.0])], "old": [{"top1": 1.0, "many": None,
                                                                            "medium": 2.0, "few": 3.0}]}
    ta = aggregate(reports, TEST_AGNOSTIC_FIELDS)
    assert ta["dscl"]["uniform"]["mean"] == 60.0 and ta["dscl"]["uniform"]["std"] == 0.0
    assert ta["dscl"]["forward-50"]["runs"][0] == pytest.approx((50 * 90 + 30) / 51, abs=1e-3)
    assert ta["old"]["uniform"]["mean"] is None
    md = format_markdown({"dataset": "d", "preset": "p", "seeds": [0, 1], "methods": aggregate(reports, FIELDS),
                          "test_agnostic": ta, "command": "dscl compare", "wall_seconds": 60})
    assert "| method | forward-50 |" in md and "backward-50 |" in md and "60.0 ± 0.0" in md


def test_markdown_names_the_configs_shot_thresholds():
    """The Many / Medium / Few sentence follows eval.many_threshold / eval.few_threshold (the rule of
    dscl.metrics.shot_groups); a compare.json written before the thresholds were recorded reads as the defaults."""
    from dscl.compare import shot_thresholds

    base = {"dataset": "d", "preset": "p", "seeds": [0], "methods": {}, "command": "dscl compare", "wall_seconds": 60}
    assert "classes with > 100 / 20–100 / < 20 training images" in format_markdown(base)
    cfg = load_config("smoke", overrides=["eval.many_threshold=50", "eval.few_threshold=5"])
    md = format_markdown({**base, "shot_thresholds": shot_thresholds(cfg)})
    assert "classes with > 50 / 5–50 / < 5 training images" in md


@pytest.mark.slow
def test_run_one_continues_an_unfinished_stage1_instead_of_restarting(tmp_path):
    """A compare interrupted inside stage 1 resumes that stage (epochs done are kept), then classifies."""
    import json

    import torch

    from conftest import HAS_FMNIST

    if not HAS_FMNIST:
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist or set DSCL_DATA")
    from dscl.compare import run_one
    from dscl.pretrain import pretrain
    from dscl.run import MetricsLog, load_stage1, stage1_summary

    cfg = load_config("smoke", overrides=["optim.epochs=2", "classifier.epochs=1"])
    run = tmp_path / "dscl-seed0"
    pretrain(cfg, run, device="cpu", progress=False, max_epochs=1)  # what an interrupted compare leaves
    assert not stage1_summary(run).finished
    first_epoch = load_stage1(run).model
    report = run_one(cfg, run, device="cpu", progress=False)
    log = MetricsLog(run / "metrics.jsonl")
    assert [r["epoch"] for r in log.read("pretrain_epoch")] == [1, 2]  # epoch 1 not trained again
    assert [r["epoch"] for r in log.read("resume")] == [1]
    assert stage1_summary(run).finished and stage1_summary(run).epoch == 2
    assert not all(torch.equal(v, first_epoch[k])  # epoch 2 trained on top of epoch 1
                   for k, v in load_stage1(run).model.items() if k.startswith("online.backbone."))
    assert report == json.loads((run / "report.json").read_text())
    assert run_one(cfg, run, device="cpu", progress=False) == report  # a finished run is read, not re-run


def test_one_seed_has_no_spread():
    """Issue 28: with one seed the spread is unknown: compare.json's std is null and the tables print no ± (they
    printed ``± 0.0``); a seed whose report lacks a metric leaves one value, so no spread either."""
    from dscl.compare import FIELDS, TEST_AGNOSTIC_FIELDS, aggregate
    from dscl.metrics import accuracy_under_distributions

    report = {"top1": 71.25, "many": 80.0, "medium": None, "few": 60.0,
              "test_agnostic": accuracy_under_distributions([90.0, 30.0], [100, 5])}
    one = aggregate({"dscl": [report]})
    assert one["dscl"]["all"] == {"mean": 71.25, "std": None, "runs": [71.25]}
    assert one["dscl"]["medium"] == {"mean": None, "std": None, "runs": [None]}
    assert aggregate({"dscl": [report, {**report, "few": None}]})["dscl"]["few"]["std"] is None
    assert aggregate({"dscl": [report, {**report, "top1": 73.25}]})["dscl"]["all"]["std"] == pytest.approx(1.41)
    md = format_markdown({"dataset": "d", "preset": "p", "seeds": [0], "methods": one,
                          "test_agnostic": aggregate({"dscl": [report]}, TEST_AGNOSTIC_FIELDS),
                          "command": "dscl compare", "wall_seconds": 60})
    assert "±" not in md, md
    assert "| dscl | 71.2 | 80.0 | — | 60.0 |" in md and "one seed" in md
    # a compare.json written before this change (std 0.0 for one seed) reads the same way
    old = {"dscl": {m: {**v, "std": 0.0 if v["mean"] is not None else None} for m, v in one["dscl"].items()}}
    assert "±" not in format_markdown({"dataset": "d", "preset": "p", "seeds": [0], "methods": old,
                                       "command": "dscl compare", "wall_seconds": 60})
    two = aggregate({"dscl": [report, {**report, "top1": 73.25}]}, FIELDS)
    assert "| dscl | 72.2 ± 1.4 | 80.0 ± 0.0 |" in format_markdown(
        {"dataset": "d", "preset": "p", "seeds": [0, 1], "methods": two, "command": "dscl compare", "wall_seconds": 60})
