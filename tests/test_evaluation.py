"""dscl.evaluation: the checks before a run is scored, the rows of a report (plain classifier and its
post-hoc variants), new labelled data to evaluate on, the chance-level warning."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dscl.config import load_config
from dscl.data import DataError
from dscl.evaluation import chance_warning, check_run_matches_data, labelled_data, score
from dscl.metrics import summarize

NAMES = ["dog", "cat", "eel"]  # the run's class order (not alphabetical)


def _predictor(**kw) -> SimpleNamespace:
    values = {"run_dir": Path("runs/r"), "source": "runs/r/checkpoints/classifier.pt", "class_names": list(NAMES),
              "num_classes": 3, "train_counts": [120, 30, 5]}
    values.update(kw)
    return SimpleNamespace(**values)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


# ------------------------------------------------------------------------------------ the run and the data


def test_check_run_matches_data_refuses_other_classes_or_counts():
    splits = SimpleNamespace(class_names=list(NAMES), num_classes=3, train_counts=[120, 30, 5])
    check_run_matches_data(_predictor(), splits)
    other = SimpleNamespace(class_names=["dog", "cat", "fox", "owl"], num_classes=4, train_counts=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"runs/r/checkpoints/classifier.pt was trained on 3 classes \(dog, cat, "
                                         r"eel\.\.\.\) but the dataset now has 4 \(dog, cat, fox, owl\.\.\.\)"):
        check_run_matches_data(_predictor(), other)
    fewer = SimpleNamespace(class_names=list(NAMES), num_classes=3, train_counts=[120, 30, 4])
    with pytest.raises(ValueError, match=r"other per-class training counts .*\(155 vs 154 images\); the data "
                                         r"changed"):
        check_run_matches_data(_predictor(), fewer)


# ------------------------------------------------------------------------------------------ report rows


def test_score_gives_the_plain_row_and_one_row_per_post_hoc_variant():
    cfg = load_config("smoke", overrides=["classifier.logit_adjust_tau=0.5", "classifier.tau_norm=2"])
    feats = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    rng = torch.Generator().manual_seed(1)
    outputs = {variant: torch.randn(8, 3, generator=rng) for variant in ("plain", "logit-adjust", "tau-norm", "ncm")}
    calls = []

    def logits_from_features(f, variant="plain"):
        assert f is feats
        calls.append(variant)
        return outputs[variant]

    predictor = _predictor(cfg=cfg, logits_from_features=logits_from_features, class_means=torch.zeros(3, 4))
    logits, summary, variants = score(predictor, feats, labels)
    assert torch.equal(logits, outputs["plain"])
    expected = summarize(outputs["plain"], labels, [120, 30, 5], class_names=NAMES,
                         many_threshold=cfg.eval.many_threshold, few_threshold=cfg.eval.few_threshold)
    assert summary == expected
    assert [v["method"] for v in variants] == ["+ logit adjustment (tau=0.5)", "+ tau-normalisation (tau=2)",
                                               "nearest class mean"]
    for row, variant in zip(variants, ("logit-adjust", "tau-norm", "ncm"), strict=True):
        s = summarize(outputs[variant], labels, [120, 30, 5], many_threshold=cfg.eval.many_threshold,
                      few_threshold=cfg.eval.few_threshold)
        assert row == {"method": row["method"], **{k: s[k] for k in ("top1", "top5", "top1_macro", "many", "medium",
                                                                      "few")}}
    # a run without class means (an imported classifier) has no nearest-class-mean row
    calls.clear()
    _, _, variants = score(_predictor(cfg=cfg, logits_from_features=logits_from_features, class_means=None),
                           feats, labels)
    assert [v["method"] for v in variants][-1] == "+ tau-normalisation (tau=2)" and "ncm" not in calls


def test_chance_warning_at_one_and_a_half_times_chance():
    assert chance_warning(15.0, 10) is not None  # exactly 1.5 x chance still warns
    assert "within 1.5x of chance (10.0% for 10 classes)" in chance_warning(12.0, 10)
    assert chance_warning(75.1, 2) is None and chance_warning(75.0, 2) is not None
    assert chance_warning(0.0, 1) is None  # one class: no chance level to compare with


# ------------------------------------------------------------------------------------------ new data


def test_labelled_data_from_class_folders_in_the_runs_order(tmp_path):
    for name in ("cat/1.png", "cat/sub/2.png", "dog/3.png", ".ipynb_checkpoints/4.png", "cat/notes.txt"):
        if name.endswith(".png"):
            _png(tmp_path / name)
        else:
            (tmp_path / name).write_text("x")
    inputs = labelled_data(tmp_path, _predictor())
    assert [Path(p).relative_to(tmp_path).as_posix() for p in inputs.paths] == ["dog/3.png", "cat/1.png",
                                                                                "cat/sub/2.png"]
    assert inputs.labels == [0, 1, 1]  # dog is class 0 of the run, cat class 1; eel has no folder


def test_labelled_data_refuses_what_it_cannot_label(tmp_path):
    _png(tmp_path / "data" / "fox" / "1.png")
    _png(tmp_path / "data" / "dog" / "2.png")
    with pytest.raises(DataError, match=r"class folder\(s\) fox are not classes of the run runs/r \(dog, cat, eel\)"):
        labelled_data(tmp_path / "data", _predictor())
    (tmp_path / "empty" / "dog").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no image in class folders"):
        labelled_data(tmp_path / "empty", _predictor())
    with pytest.raises(DataError, match="does not exist"):
        labelled_data(tmp_path / "nowhere", _predictor())
    with pytest.raises(DataError, match="not one file"):
        labelled_data(tmp_path / "data" / "dog" / "2.png", _predictor())
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "half.txt").write_text("a.png cat\nb.png\n")
    with pytest.raises(DataError, match=r"half\.txt: 1 entr\(y/ies\) have no label .*b\.png"):
        labelled_data(tmp_path / "half.txt", _predictor())


def test_labelled_data_from_a_list_by_name_or_index(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    (tmp_path / "l.txt").write_text("# names and indices\nimgs/a.png eel\nimgs/b.png 1\n")
    inputs = labelled_data(tmp_path / "l.txt", _predictor())
    assert inputs.paths == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.png")]
    assert inputs.labels == [2, 1]
    (tmp_path / "rel.txt").write_text("a.png dog\n")
    inputs = labelled_data(tmp_path / "rel.txt", _predictor(), data_root=tmp_path / "imgs")
    assert inputs.paths == [str(tmp_path / "imgs" / "a.png")] and inputs.labels == [0]


def test_chance_warning() -> None:
    assert chance_warning(14.9, 10) is not None and "WARNING" in chance_warning(14.9, 10)  # type: ignore[operator]
    assert chance_warning(15.1, 10) is None
    assert chance_warning(0.14, 1000) is not None and chance_warning(0.16, 1000) is None
    assert chance_warning(None, 10) is None


def test_report_prints_the_published_numbers_only_for_the_unchanged_preset(tmp_path):
    from types import SimpleNamespace

    from dscl.evaluation import run_facts
    from dscl.report import build_report, format_table, report_rows, write_report
    from dscl.run import RunFacts, Stage1Summary

    splits = SimpleNamespace(train=SimpleNamespace(fingerprint=lambda: "abc123"), data_root="/data")
    stage1 = Stage1Summary(epoch=1, epochs=1, finished=True, wall_seconds=1.0,
                           facts=RunFacts(method="dscl+pbsd", backbone="resnet50", num_classes=1000), data=None)
    unchanged = run_facts(stage1, splits, load_config("imagenet-lt", overrides=["data.data_root=/data"]))
    assert unchanged["expected"]["top1"] == 57.7
    assert run_facts(stage1, splits, load_config("imagenet-lt", overrides=["optim.epochs=90"]))["expected"] is None
    assert run_facts(stage1, splits, load_config("fmnist-lt"))["expected"] is None

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
