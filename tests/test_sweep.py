"""`dscl sweep`: parsing, the per-point config, selection on the validation split, resume, errors."""

import json

import pytest

from conftest import needs_fmnist, run_cli
from dscl.config import load_config
from dscl.data.core import long_tailed_counts
from dscl.sweep import SweepError, format_markdown, parse_param, point_config, split_values


def test_split_values_respects_brackets():
    assert split_values("0.05,0.1, 0.2") == ["0.05", "0.1", "0.2"]
    assert split_values("[0.05,0.3],[0.1, 0.6]") == ["[0.05,0.3]", "[0.1, 0.6]"]
    with pytest.raises(SweepError, match="unbalanced"):
        split_values("[0.05,0.3")
    with pytest.raises(SweepError, match="unbalanced"):
        split_values("0.05],0.3")


def test_parse_param_aliases_and_errors():
    assert parse_param("alpha=0.05,0.1") == ("loss.alpha", ["0.05", "0.1"])
    assert parse_param("lambda=0,1.5") == ("loss.pbsd_weight", ["0", "1.5"])
    assert parse_param("views.patch_size=7,14,21") == ("views.patch_size", ["7", "14", "21"])
    assert parse_param("patch_scale=[0.05,0.3],[0.1,0.6]")[1] == ["[0.05,0.3]", "[0.1,0.6]"]
    for bad, msg in [("alpha", "NAME=V1"), ("alpha=0.1", "at least two"), ("alpha=0.1,,0.2", "at least two"),
                     ("alpha=0.1,0.1", "twice"), ("beta=1,2", "short name")]:
        with pytest.raises(SweepError, match=msg):
            parse_param(bad)


def test_point_config_sets_the_value_after_the_method():
    base = load_config("smoke")
    cfg = point_config(base, "loss.pbsd_weight", "0", "dscl+pbsd", seed=3)
    assert cfg.loss.pbsd_weight == 0.0 and cfg.loss.loss == "dscl" and cfg.optim.seed == 3
    cfg = point_config(base, "loss.alpha", "0.25", "scl", seed=0)
    assert cfg.loss.alpha == 0.25 and cfg.loss.loss == "scl" and cfg.loss.pbsd_weight == 0.0
    assert base.loss.alpha != 0.25  # the base is not modified


def test_markdown_marks_the_chosen_value():
    m = {"mean": 50.0, "std": 0.0, "runs": [50.0]}
    point = {"val": {k: m for k in ("all", "balanced", "many", "medium", "few")},
             "test": {k: m for k in ("all", "many", "medium", "few")}}
    result = {"dataset": "d", "method": "dscl", "param": "loss.alpha", "preset": "p", "seeds": [0],
              "val_fraction": 0.1, "chosen": "0.2", "command": "dscl sweep", "wall_seconds": 60,
              "points": [{"value": "0.1", **point}, {"value": "0.2", **point}]}
    text = format_markdown(result)
    assert "| 0.2 **(chosen)** |" in text and "| 0.1 |" in text


@needs_fmnist
def test_sweep_end_to_end_selects_on_validation_and_resumes(tmp_path):
    out = tmp_path / "sw"
    args = ("sweep", "--preset", "smoke", "--method", "dscl", "--param", "alpha=0.1,0.5", "--seeds", "0",
            "--val-fraction", "0.2", "--out", str(out), "--no-progress", "optim.epochs=1", "classifier.epochs=1")
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "sweep.json").read_text())
    assert result["param"] == "loss.alpha" and result["values"] == ["0.1", "0.5"] and result["val_fraction"] == 0.2
    balanced = []
    for point in result["points"]:
        run = out / "runs" / f"loss.alpha={point['value']}-seed0"
        test = json.loads((run / "report.json").read_text())
        val = json.loads((run / "val" / "report.json").read_text())
        assert test["split"] == "test" and val["split"] == "val"
        assert "classifier.select=last" in test["selection"]  # stage 2 keeps its last epoch in a sweep
        assert point["test"]["all"]["runs"] == [test["top1"]]
        assert point["val"]["balanced"]["runs"] == [val["top1_macro"]]
        cfg = (run / "config.yaml").read_text()
        assert f"alpha: {point['value']}" in cfg and "val_fraction: 0.2" in cfg
        balanced.append(val["top1_macro"])
    # chosen by the validation split only
    assert result["chosen"] == result["values"][balanced.index(max(balanced))]
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "(chosen)" in (out / "sweep.md").read_text()
    # the validation images are carved out of the training set: per class, train + val = the LT count
    val_report = json.loads((out / "runs" / "loss.alpha=0.1-seed0" / "val" / "report.json").read_text())
    full = long_tailed_counts(10, 60, 10)
    for c, row in enumerate(val_report["per_class"]):
        assert row["test_count"] >= 1 and row["train_count"] + row["test_count"] == full[c]
    # resume: a finished point is reused untouched
    kept = (out / "runs" / "loss.alpha=0.1-seed0" / "report.json").stat().st_mtime_ns
    (out / "runs" / "loss.alpha=0.5-seed0" / "val" / "report.json").unlink()
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert (out / "runs" / "loss.alpha=0.1-seed0" / "report.json").stat().st_mtime_ns == kept
    assert json.loads((out / "sweep.json").read_text())["points"] == result["points"]


@pytest.mark.parametrize("param, message", [
    ("loss.nope=1,2", "valid keys of loss"),
    ("alpha=0.1,x", "alpha=x"),
    ("alpha=0.1,2", "alpha"),
    ("patches=3", "at least two"),
])
def test_sweep_bad_param_fails_before_training(tmp_path, param, message):
    res = run_cli("sweep", "--preset", "smoke", "--param", param, "--out", str(tmp_path / "s"))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "s" / "runs").exists()


def test_sweep_needs_one_method_and_a_validation_split(tmp_path):
    res = run_cli("sweep", "--preset", "smoke", "--param", "alpha=0.1,0.2", "--method", "scl,dscl",
                  "--out", str(tmp_path / "s"))
    assert res.returncode == 2 and "one method" in res.stderr
    res = run_cli("sweep", "--preset", "smoke", "--param", "alpha=0.1,0.2", "--val-fraction", "0",
                  "--out", str(tmp_path / "s"))
    assert res.returncode == 2 and "validation split" in res.stderr


def test_plan_check_tolerates_new_config_keys_but_not_changed_values(tmp_path):
    """A folder written before a config key existed continues; a changed value is refused."""
    import copy

    import yaml

    from dscl.compare import CompareError, check_plan

    cfg = load_config("smoke")
    plan = {"preset": "smoke", "config": cfg.to_dict()}
    old = copy.deepcopy(plan)
    del old["config"]["classifier"]["select"]  # a key added later, at its default
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(old))
    check_plan(tmp_path, "plan.yaml", plan, "comparison")
    changed = copy.deepcopy(plan)
    changed["config"]["loss"]["alpha"] = 0.5
    with pytest.raises(CompareError, match="different configuration"):
        check_plan(tmp_path, "plan.yaml", changed, "comparison")
