"""dscl.evaluation: the checks before a run is scored, the rows of a report (plain classifier and its
post-hoc variants), new labelled data to evaluate on, the chance-level warning."""

import dataclasses
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
from dscl.report import variant_row

NAMES = ["dog", "cat", "eel"]  # the run's class order (not alphabetical)


def _predictor(**kw) -> SimpleNamespace:
    values = {"run_dir": Path("runs/r"), "source": "runs/r/checkpoints/classifier.pt", "class_names": list(NAMES),
              "num_classes": 3, "train_counts": [120, 30, 5], "temperature": None,
              "temperature_note": lambda: "no temperature"}
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
    calibration = summary.pop("calibration")  # issue 31: the plain classifier's calibration rides along
    assert summary == expected
    assert calibration["ece"] is not None and calibration["temperature"] is None
    assert calibration["temperature_note"] == "no temperature"
    assert [v["method"] for v in variants] == ["+ logit adjustment (tau=0.5)", "+ tau-normalisation (tau=2)",
                                               "nearest class mean"]
    for row, variant in zip(variants, ("logit-adjust", "tau-norm", "ncm"), strict=True):
        s = summarize(outputs[variant], labels, [120, 30, 5], many_threshold=cfg.eval.many_threshold,
                      few_threshold=cfg.eval.few_threshold)
        keys = ("method", "top1", "top5", "top1_macro", "many", "medium", "few")
        assert {k: row[k] for k in keys} == {k: variant_row(row["method"], s)[k] for k in keys}  # 4 decimals
        assert set(row["calibration"]) >= {"ece", "adaptive_ece", "classwise_ece", "nll", "brier", "overconfidence",
                                           "underconfidence", "groups"}
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
    stage1 = Stage1Summary(epoch=200, epochs=200, finished=True, wall_seconds=1.0,
                           facts=RunFacts(method="dscl+pbsd", backbone="resnet50", num_classes=1000), data=None)
    unchanged = run_facts(stage1, splits, load_config("imagenet-lt", overrides=["data.data_root=/data"]))
    assert unchanged["expected"]["top1"] == 57.7
    assert run_facts(stage1, splits, load_config("imagenet-lt", overrides=["loss.alpha=0.2"]))["expected"] is None
    # the epochs stage 1 trained decide, not config.yaml's optim.epochs (issue 28 item 3)
    ninety = dataclasses.replace(stage1, epoch=90, epochs=90)
    assert run_facts(ninety, splits, load_config("imagenet-lt"))["expected"] is None
    assert run_facts(stage1, splits, load_config("imagenet-lt", overrides=["optim.epochs=90"]))["expected"]
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


# ------------------------------------------------------------------------------------ issue 28 item 3


def _edited_copy(smoke_run: Path, tmp_path: Path, section: str, key: str, value) -> Path:
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return run


def test_reports_take_the_epochs_from_the_checkpoint_not_the_config(smoke_run, tmp_path, capsys):
    import json

    from dscl.evaluation import evaluate

    run = _edited_copy(smoke_run, tmp_path, "optim", "epochs", 50)
    report = evaluate(run, device="cpu", progress=False)
    assert report["epochs"] == 2 and json.loads((run / "report.json").read_text())["epochs"] == 2
    assert "epochs: 2;" in (run / "report.md").read_text()
    err = capsys.readouterr().err
    assert "optim.epochs=50" in err and "trained 2" in err


def test_evaluate_refuses_a_config_that_changes_the_image_size_and_keeps_the_report(smoke_run, tmp_path):
    from dscl.config import ConfigError
    from dscl.evaluation import evaluate

    run = _edited_copy(smoke_run, tmp_path, "data", "image_size", 32)
    before = (run / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"data.image_size is 32 there but stage 1 was trained with 28"):
        evaluate(run, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="data.image_size"):  # a config handed over is checked the same way
        evaluate(smoke_run, cfg=load_config("smoke", overrides=["data.image_size=32"]), device="cpu", progress=False)
    assert (run / "report.md").read_text() == before


def test_report_conventions_come_from_the_classifier_checkpoint():
    from dscl.evaluation import run_facts
    from dscl.run import ClassifierRecord, RunFacts, Stage1Summary

    stage1 = Stage1Summary(epoch=2, epochs=2, finished=True, wall_seconds=1.0,
                           facts=RunFacts(method="dscl+pbsd", backbone="convnet", num_classes=10), data=None)
    cfg = load_config("smoke", overrides=["classifier.protocol=official"])  # config.yaml edited after stage 2
    record = ClassifierRecord(protocol="cached", backbone_name="convnet", num_classes=10)
    facts = run_facts(stage1, None, cfg, classifier=record, standardized=True)
    assert facts["conventions"]["classifier_protocol"] == "cached"
    assert facts["conventions"]["classifier_standardize"] is True
    assert run_facts(stage1, None, cfg)["conventions"]["classifier_protocol"] == "official"  # no record: config


# ------------------------------------------------------------- new data: folders, ensembles, errors (issue 28)

FMNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                "Ankle boot"]


def _fmnist_tree(root: Path, per_class: int = 2) -> Path:
    """A folder of class folders for the default dataset's classes, ``T-shirt/top`` spelled ``T-shirt_top``."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(FMNIST_NAMES):
        for k in range(per_class):
            path = root / name.replace("/", "_") / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8) // (c + 1)).save(path)
    return root


def test_labelled_data_reads_a_class_folder_named_by_its_folder_safe_spelling(tmp_path):
    # item 12: "T-shirt/top" cannot be a folder name; its folder T-shirt_top is read as that class, and said so
    _png(tmp_path / "T-shirt_top" / "1.png")
    _png(tmp_path / "Trouser" / "2.png")
    inputs = labelled_data(tmp_path, _predictor(class_names=["T-shirt/top", "Trouser"], num_classes=2))
    assert inputs.labels == [0, 1]
    assert len(inputs.notes) == 1 and "T-shirt_top = T-shirt/top" in inputs.notes[0]
    with pytest.raises(DataError, match=r"class folder\(s\) Sandal are not classes of the run .* or their "
                                        r"folder-safe spellings"):
        _png(tmp_path / "Sandal" / "3.png")
        labelled_data(tmp_path, _predictor(class_names=["T-shirt/top", "Trouser"], num_classes=2))


def test_evaluate_data_of_an_ensemble_folder_reports_its_averaged_predictions(smoke_run, tmp_path, capsys):
    # item 13: an ensemble folder (dscl ensemble) is evaluated like a run; two copies of one run average to it
    import json
    import shutil

    from dscl.evaluation import evaluate_data
    from dscl.inference import ENSEMBLE_FILE

    tree = _fmnist_tree(tmp_path / "tree")
    single = evaluate_data(smoke_run, tree, tmp_path / "single", device="cpu", progress=False)
    assert "T-shirt_top = T-shirt/top" in capsys.readouterr().err  # the mapping used is printed
    copy = tmp_path / "copy"
    shutil.copytree(smoke_run, copy)
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / ENSEMBLE_FILE).write_text(json.dumps({"format": "dscl-ensemble", "weights": "equal softmax average",
                                                 "members": [str(smoke_run.resolve()), str(copy.resolve())]}))
    report = evaluate_data(ens, tree, tmp_path / "out", device="cpu", progress=False)
    assert report["method"] == "ensemble of 2 runs"
    assert report["top1"] == pytest.approx(single["top1"]) and report["many"] == single["many"]
    assert [r["accuracy"] for r in report["per_class"]] == pytest.approx([r["accuracy"] for r in single["per_class"]])
    members = [v for v in report["variants"] if v["method"].startswith("member")]
    assert len(members) == 2 and all(m["top1"] == pytest.approx(single["top1"]) for m in members)
    assert [m["run"] for m in report["members"]] == [str(smoke_run.resolve()), str(copy.resolve())]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["top1"] == report["top1"]
    assert (tmp_path / "out" / "predictions.csv").is_file()


def test_evaluate_data_names_missing_list_files_once_with_the_hint_that_fits(smoke_run, tmp_path):
    # item 14: one hint (where the list's paths are read from), not `dscl data --check` once per file
    from dscl.evaluation import evaluate_data

    _fmnist_tree(tmp_path / "tree", per_class=1)
    (tmp_path / "list.txt").write_text("tree/Trouser/0.png Trouser\n"
                                       + "".join(f"gone/{k}.png Trouser\n" for k in range(6)))
    with pytest.raises(DataError) as err:
        evaluate_data(smoke_run, tmp_path / "list.txt", tmp_path / "out", device="cpu", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "dscl data --check" not in msg
    assert msg.count("gone/0.png") == 1 and msg.count("relative to") == 1
    assert f"6 of the 7 image files listed in {tmp_path / 'list.txt'} do not exist" in msg
    assert f"read relative to {tmp_path} (the list's folder); pass --data-root" in msg and "nothing was written" in msg
    assert not (tmp_path / "out").exists()


def test_evaluate_data_refuses_an_out_under_or_onto_a_file_in_one_line(tmp_path):
    # item 14: NotADirectoryError / FileExistsError became tracebacks; now one RunDirError before any work
    from dscl.evaluation import evaluate_data
    from dscl.run import RunDirError

    (tmp_path / "file").write_text("keep")
    with pytest.raises(RunDirError, match=r"--out .*file/sub: .*file is a file, not a folder"):
        evaluate_data(tmp_path / "no-run", tmp_path, tmp_path / "file" / "sub", device="cpu")
    with pytest.raises(RunDirError, match=r"--out .*file is a file, not a folder"):
        evaluate_data(tmp_path / "no-run", tmp_path, tmp_path / "file", device="cpu", overwrite=True)
    assert (tmp_path / "file").read_text() == "keep"
