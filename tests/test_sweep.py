"""`dscl sweep`: parsing, the per-point config, selection on the validation split, resume, errors."""

import json

import pytest

from conftest import needs_fmnist, run_cli
from dscl.cli import main
from dscl.config import load_config
from dscl.data.core import long_tailed_counts
from dscl.sweep import (
    SweepError,
    _validation_plan,
    format_markdown,
    parse_param,
    point_config,
    share_stage1,
    split_values,
    stage1_identity,
    sweep,
)


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


def test_markdown_and_plot_without_a_spread(tmp_path):
    """Issue 28: dscl.compare.aggregate gives std None where fewer than two seeds have a metric."""
    from dscl.sweep import plot_sweep

    lone = {"mean": 50.0, "std": None, "runs": [50.0, None]}
    both = {"mean": 50.0, "std": 1.0, "runs": [49.0, 51.0]}
    point = {"val": {k: both for k in ("all", "balanced", "many", "medium", "few")},
             "test": {k: (lone if k == "few" else both) for k in ("all", "many", "medium", "few")}}
    result = {"dataset": "d", "method": "dscl", "param": "loss.alpha", "preset": "p", "seeds": [0, 1],
              "val_fraction": 0.1, "values": ["0.1", "0.2"], "chosen": "0.2", "command": "dscl sweep",
              "wall_seconds": 60, "points": [{"value": "0.1", **point}, {"value": "0.2", **point}]}
    assert "| 50.0 ± 1.0 | 50.0 |" in format_markdown(result)
    assert plot_sweep(result, tmp_path / "sweep.png").is_file()


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


@needs_fmnist
@pytest.mark.slow
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
def test_sweep_bad_param_fails_before_training(tmp_path, capsys, param, message):
    assert main(["sweep", "--preset", "smoke", "--param", param, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s" / "runs").exists()


def test_sweep_needs_one_method_and_a_validation_split(tmp_path, capsys):
    assert main(["sweep", "--preset", "smoke", "--param", "alpha=0.1,0.2", "--method", "scl,dscl",
                 "--out", str(tmp_path / "s")]) == 2
    assert "one method" in capsys.readouterr().err
    assert main(["sweep", "--preset", "smoke", "--param", "alpha=0.1,0.2", "--val-fraction", "0",
                 "--out", str(tmp_path / "s")]) == 2
    assert "validation split" in capsys.readouterr().err


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


# ----------------------------------------------------------------------------------------------
# points that differ only in stage 2 share one stage 1 (share_stage1)


def _saved_config(run):
    import yaml

    from dscl.config import config_from_dict

    return config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))


def _stage1(run, text: str = "stage 1") -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(text.encode())


def test_share_stage1_links_the_checkpoint_and_writes_the_points_config(tmp_path):
    src, run = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    _stage1(src, "the finished stage 1 of a")
    cfg = point_config(load_config("smoke"), "classifier.epochs", "7", "dscl", seed=0)
    share_stage1(src, run, cfg)
    source, target = src / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt"
    assert target.read_bytes() == b"the finished stage 1 of a"
    assert source.stat().st_ino == target.stat().st_ino and source.stat().st_nlink == 2  # a hard link, no copy
    saved = _saved_config(run)  # the point's own configuration, not the source's
    assert saved.classifier.epochs == 7 and saved.to_dict() == cfg.to_dict()
    assert not (src / "config.yaml").exists()  # the source run is not touched


def test_share_stage1_copies_across_file_systems(tmp_path, monkeypatch):
    import os

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    src, run = tmp_path / "a", tmp_path / "b"
    _stage1(src, "bytes of a")
    monkeypatch.setattr(os, "link", no_link)
    share_stage1(src, run, load_config("smoke"))
    target = run / "checkpoints" / "last.pt"
    assert target.read_bytes() == b"bytes of a"
    assert target.stat().st_ino != (src / "checkpoints" / "last.pt").stat().st_ino  # a copy
    assert (run / "config.yaml").is_file()


def test_share_stage1_leaves_a_run_with_a_checkpoint_alone(tmp_path):
    src, run = tmp_path / "a", tmp_path / "b"
    _stage1(src, "a")
    _stage1(run, "b, resumed or finished on its own")
    share_stage1(src, run, load_config("smoke"))
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"b, resumed or finished on its own"
    assert not (run / "config.yaml").exists()


def test_share_stage1_needs_a_finished_source(tmp_path):
    from dscl.launch import LaunchError

    with pytest.raises(LaunchError, match=r"cannot share stage 1: .*a/checkpoints/last\.pt does not exist"):
        share_stage1(tmp_path / "a", tmp_path / "b", load_config("smoke"))
    assert not (tmp_path / "b").exists()


def test_stage1_identity_ignores_only_the_stage2_sections():
    base = load_config("smoke")
    same = [point_config(base, "classifier.epochs", v, "dscl", seed=0) for v in ("1", "2")]
    same.append(point_config(base, "eval.few_threshold", "5", "dscl", seed=0))
    assert len({stage1_identity(c) for c in same}) == 1
    assert stage1_identity(point_config(base, "loss.alpha", "0.3", "dscl", seed=0)) != stage1_identity(same[0])
    assert stage1_identity(point_config(base, "classifier.epochs", "1", "dscl", seed=1)) != stage1_identity(same[0])


def _fake_run_one(calls: list):
    """``compare.run_one`` without training: records whether the point already had a stage 1 (and which
    one) when it started, trains a "stage 1" only where none was there, and reports fixed numbers."""

    def run_one(cfg, run, *, device, progress):
        last = run / "checkpoints" / "last.pt"
        calls.append({"run": run.name, "had": last.read_bytes().decode() if last.exists() else None,
                      "inode": last.stat().st_ino if last.exists() else None,
                      "epochs": cfg.classifier.epochs, "alpha": cfg.loss.alpha})
        if not last.exists():
            _stage1(run, f"stage 1 trained in {run.name}")
        report = {"dataset": "fake", "top1": 50.0, "many": None, "medium": 40.0, "few": 30.0,
                  "top1_macro": 45.0 + cfg.classifier.epochs, "wall_seconds": 1.0}
        (run / "val").mkdir(exist_ok=True)
        (run / "val" / "report.json").write_text(json.dumps(report))
        (run / "report.json").write_text(json.dumps(report))
        return report

    return run_one


def _patch_run_one(monkeypatch, calls: list) -> None:
    """The fake ``run_one`` where the sweep's points call it (dscl.launch.run_spec), and its "stage 1" taken as
    finished when another point shares it."""
    import dscl.launch

    monkeypatch.setattr(dscl.launch, "run_one", _fake_run_one(calls))
    monkeypatch.setattr(dscl.launch, "stage1_finished", lambda run: (run / "checkpoints" / "last.pt").is_file())


def test_sweep_over_a_stage2_key_trains_stage1_once_per_seed(tmp_path, monkeypatch):
    calls: list = []
    _patch_run_one(monkeypatch, calls)
    result = sweep(load_config("smoke"), "classifier.epochs", ["1", "2", "3"], method="dscl", seeds=[0, 1],
                   out=tmp_path / "sw", val_fraction=0.2, command="test", device="cpu", progress=False)
    assert result["stage1_shared"] is True and result["chosen"] == "3"
    assert [c["run"] for c in calls] == [f"classifier.epochs={v}-seed{s}" for s in (0, 1) for v in (1, 2, 3)]
    assert [c["epochs"] for c in calls] == [1, 2, 3, 1, 2, 3]
    for s in (0, 1):
        first, *others = calls[3 * s: 3 * s + 3]
        assert first["had"] is None  # the first value of each seed trains stage 1
        owner = tmp_path / "sw" / "runs" / f"classifier.epochs=1-seed{s}" / "checkpoints" / "last.pt"
        for c in others:  # the others start from the first value's stage 1 of the same seed
            assert c["had"] == f"stage 1 trained in classifier.epochs=1-seed{s}"
            assert c["inode"] == owner.stat().st_ino
            assert _saved_config(tmp_path / "sw" / "runs" / c["run"]).classifier.epochs == c["epochs"]


def test_sweep_over_a_stage1_key_trains_every_point(tmp_path, monkeypatch):
    calls: list = []
    _patch_run_one(monkeypatch, calls)
    result = sweep(load_config("smoke"), "loss.alpha", ["0.1", "0.5"], method="dscl", seeds=[0],
                   out=tmp_path / "sw", val_fraction=0.2, command="test", device="cpu", progress=False)
    assert result["stage1_shared"] is False
    assert [(c["alpha"], c["had"]) for c in calls] == [(0.1, None), (0.5, None)]
