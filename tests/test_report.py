"""Tests for dscl.report: report.json keys, markdown, plots, atomic writes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dscl import io as dscl_io
from dscl import report as ev
from dscl.metrics import confusion_matrix, logit_adjust, summarize
from dscl.report import build_report, format_table, report_rows, variant_row, write_report

DESIGN_KEYS = {
    "dataset", "method", "top1", "top5", "many", "medium", "few",
    "shot_classes", "per_class", "seed", "epochs", "wall_seconds",
}


def one_hot_logits(preds: list[int], num_classes: int) -> np.ndarray:
    out = np.zeros((len(preds), num_classes))
    out[np.arange(len(preds)), preds] = 1.0
    return out


def _toy_report(num_classes: int = 10, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = np.array([int(1000 * 0.01 ** (i / (num_classes - 1))) for i in range(num_classes)])
    targets = np.repeat(np.arange(num_classes), 20)
    logits = rng.normal(size=(targets.size, num_classes))
    logits[np.arange(targets.size), targets] += np.linspace(3.0, 0.0, num_classes)[targets]
    names = [f"class {i}" for i in range(num_classes)]
    s = summarize(logits, targets, counts, class_names=names)
    la = summarize(logit_adjust(torch.tensor(logits), counts), targets, counts)
    report = build_report(
        s, dataset="toy-lt", method="DSCL", seed=3, epochs=7, wall_seconds=12.345, split="test",
        selection="last stage-2 epoch; no selection on the test set",
        variants=[variant_row("+ logit adjustment", la)],
    )
    return report, confusion_matrix(logits.argmax(1), targets, num_classes)


def test_build_report_keys_types_and_ranges():
    report, _ = _toy_report()
    assert set(report) >= DESIGN_KEYS
    assert set(report) == DESIGN_KEYS | {"top1_macro", "split", "selection", "variants", "train_counts",
                                         "shot_classes_evaluated", "missing_classes", "test_agnostic",
                                         "worst_class", "harmonic_mean", "geometric_mean", "calibration"}
    assert report["calibration"] is None  # no logits given (issue 31: dscl.evaluation.calibration_section)
    assert isinstance(report["dataset"], str) and isinstance(report["method"], str)
    for key in ("top1", "top5", "top1_macro", "many", "medium", "few"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 100.0, key
    assert report["shot_classes"] == {"many": 5, "medium": 3, "few": 2}
    assert all(isinstance(v, int) for v in report["shot_classes"].values())
    assert len(report["per_class"]) == 10
    for row in report["per_class"]:
        assert set(row) == {"class", "train_count", "test_count", "accuracy"}
        assert isinstance(row["class"], str) and isinstance(row["train_count"], int)
        assert row["test_count"] == 20 and 0.0 <= row["accuracy"] <= 100.0
    assert report["seed"] == 3 and report["epochs"] == 7 and report["wall_seconds"] == 12.35
    assert report["split"] == "test"
    (var,) = report["variants"]
    assert set(var) == {"method", "top1", "top5", "top1_macro", "many", "medium", "few", "worst_class",
                        "harmonic_mean", "geometric_mean", "calibration"}
    json.dumps(report, allow_nan=False)  # strictly valid JSON (no NaN)


def test_build_report_rejects_bad_split_and_summary():
    report, _ = _toy_report()
    with pytest.raises(ValueError, match="split"):
        build_report(report, dataset="d", method="m", seed=0, epochs=1, wall_seconds=1.0,
                     split="train", selection="x")
    with pytest.raises(ValueError, match="summarize"):
        build_report({"top1": 1.0}, dataset="d", method="m", seed=0, epochs=1, wall_seconds=1.0,
                     split="val", selection="x")


def test_build_report_none_group_survives_json():
    s = summarize(one_hot_logits([0, 1], 2), [0, 1], [500, 300])
    report = build_report(s, dataset="d", method="m", seed=0, epochs={"pretrain": 2, "classify": 1},
                          wall_seconds=1, split="val", selection="best val top-1")
    loaded = json.loads(json.dumps(report))
    assert loaded["medium"] is None and loaded["few"] is None
    assert loaded["epochs"] == {"pretrain": 2, "classify": 1}


def _assert_png_not_blank(path: Path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert w > 200 and h > 200
        arr = np.asarray(img.convert("L"))
    assert arr.std() > 5  # not a single flat colour
    assert (arr < 128).mean() > 0.001  # some dark ink (text, points)


def test_write_report_files(tmp_path):
    report, cm = _toy_report()
    paths = write_report(tmp_path / "run", report, confusion=cm)
    run = tmp_path / "run"
    expected = {run / "report.json", run / "report.md", run / "plots" / "per_class_accuracy.png",
                run / "plots" / "confusion_matrix.png", run / "per_class.csv", run / "confusion.csv",
                run / "plots" / "test_agnostic.png"}
    assert set(paths) == expected
    assert json.loads((run / "report.json").read_text()) == report
    md = (run / "report.md").read_text()
    assert "| Method | All (top-1) | Many | Medium | Few | Top-5 | macro |" in md
    main_row = f"| DSCL | {report['top1']:.1f} | {report['many']:.1f} | {report['medium']:.1f} |"
    assert main_row in md
    assert "| + logit adjustment |" in md
    assert "Split: test" in md and "Selection: last stage-2 epoch" in md
    assert "Many 5, Medium 3, Few 2" in md
    assert "| class 9 | Few | 10 | 20 |" in md
    _assert_png_not_blank(run / "plots" / "per_class_accuracy.png")
    _assert_png_not_blank(run / "plots" / "confusion_matrix.png")


def test_write_report_markdown_dash_for_empty_group(tmp_path):
    s = summarize(one_hot_logits([0, 1], 2), [0, 1], [500, 300])
    report = build_report(s, dataset="d", method="m", seed=0, epochs=1, wall_seconds=1,
                          split="val", selection="last epoch")
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "| m | 100.0 | 100.0 | — | — | 100.0 | 100.0 |" in md
    assert not (tmp_path / "plots" / "confusion_matrix.png").exists()


def test_write_report_skips_confusion_plot_above_100_classes(tmp_path):
    c = 101
    s = summarize(np.eye(c), np.arange(c), np.full(c, 50))
    report = build_report(s, dataset="d", method="m", seed=0, epochs=1, wall_seconds=1,
                          split="test", selection="last epoch")
    paths = write_report(tmp_path, report, confusion=np.eye(c, dtype=int))
    assert not (tmp_path / "plots" / "confusion_matrix.png").exists()
    assert tmp_path / "plots" / "per_class_accuracy.png" in paths


def test_write_report_is_atomic(tmp_path, monkeypatch):
    report, cm = _toy_report()
    write_report(tmp_path, report, confusion=cm)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []
    before = (tmp_path / "report.json").read_bytes()

    # A crash in the middle of a write leaves the previous file intact and no temp file behind.
    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(dscl_io.os, "replace", crash)
    new_report = dict(report, top1=1.0)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, new_report)
    monkeypatch.undo()
    assert (tmp_path / "report.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["confusion.csv", "per_class.csv", "plots", "report.json", "report.md"]
    assert sorted(os.listdir(tmp_path / "plots")) == ["confusion_matrix.png", "per_class_accuracy.png",
                                                      "test_agnostic.png"]


def test_format_table_alignment():
    report, _ = _toy_report()
    rows = report_rows(report) + [{"method": "NCM", "top1": 50.0, "many": None, "medium": 1.25, "few": 0}]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split("|")[0].strip() == "Method"
    assert [c.strip() for c in lines[0].split("|")] == ["Method", "All", "Many", "Medium", "Few"]
    assert len({len(line) for line in lines}) == 1  # all lines equally wide
    assert [c.strip() for c in lines[-1].split("|")] == ["NCM", "50.0", "—", "1.2", "0.0"]
    assert lines[2].startswith("DSCL ") and f"{report['top1']:.1f}" in lines[2]


# ----------------------------------------------------------------------------------------------
# issue #12 item 7: classes without test images are counted and named


def test_report_counts_evaluated_classes_and_names_the_missing_ones(tmp_path):
    # 4 classes: one Many (500), one Medium (50), two Few (10, 5); the last has no test image
    targets = [0, 0, 1, 1, 2, 2]
    s = summarize(one_hot_logits([0, 1, 1, 1, 2, 0], 4), targets, [500, 50, 10, 5],
                  class_names=["cat", "dog", "owl", "yak"])
    report = build_report(s, dataset="d", method="m", seed=0, epochs=1, wall_seconds=1, split="test",
                          selection="last epoch")
    assert report["shot_classes"] == {"many": 1, "medium": 1, "few": 2}
    assert report["shot_classes_evaluated"] == {"many": 1, "medium": 1, "few": 1}
    assert report["missing_classes"] == [{"class": "yak", "group": "few"}]
    assert report["few"] == 50.0  # the mean over the one Few class that has test images
    assert report["train_counts"] == [500, 50, 10, 5]
    warning = ev.missing_classes_warning(report)
    assert warning is not None and "yak" in warning and "Few" in warning and "over 1 of 2 classes" in warning
    write_report(tmp_path, report)
    assert warning in (tmp_path / "report.md").read_text()
    complete = build_report(summarize(one_hot_logits([0, 1], 2), [0, 1], [500, 300]), dataset="d", method="m",
                            seed=0, epochs=1, wall_seconds=1, split="test", selection="x")
    assert complete["missing_classes"] == [] and ev.missing_classes_warning(complete) is None


def test_report_groups_follow_the_thresholds_and_run_info():
    s = summarize(one_hot_logits([0, 1, 2], 3), [0, 1, 2], [60, 30, 5], many_threshold=50, few_threshold=10)
    report = build_report(s, dataset="d", method="m", seed=0, epochs=1, wall_seconds=1, split="val",
                          selection="x", many_threshold=50, few_threshold=10,
                          run_info={"precision": "bf16", "world_size": 2, "train_fingerprint": "0123456789ab"})
    assert report["shot_classes_evaluated"] == {"many": 1, "medium": 1, "few": 1}
    assert report["precision"] == "bf16" and report["world_size"] == 2
    with pytest.raises(ValueError, match="top1"):
        build_report(s, dataset="d", method="m", seed=0, epochs=1, wall_seconds=1, split="val", selection="x",
                     run_info={"top1": 100.0})


def test_report_shows_the_backbone_spec_and_its_input_settings(tmp_path):
    from dscl.backbones import BackboneSpec

    spec = BackboneSpec("timm", "vit_tiny_patch16_224", {"depth": 2}, image_size=64, mean=(0.5,) * 3,
                        std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.9, input_source="pretrained")
    s = summarize(one_hot_logits([0, 1], 2), [0, 1], [500, 300])
    report = build_report(s, dataset="d", method="m", seed=0, epochs=1, wall_seconds=1, split="test",
                          selection="x", run_info={"backbone": spec.to_dict()})
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["backbone"] == spec.to_dict()
    md = (tmp_path / "report.md").read_text()
    assert ("- Backbone: timm:vit_tiny_patch16_224 {'depth': 2}, pool avg; inputs: shorter side resized to 71 px, "
            "centre 64 x 64 crop (bicubic, antialiased), normalised with the pretrained weights' mean (0.5, 0.5, 0.5) "
            "and std (0.5, 0.5, 0.5)") in md


# ----------------------------------------------------------------------------------------------
# per_class.csv, confusion.csv, predictions.csv


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_per_class_and_confusion_csv(tmp_path):
    report, cm = _toy_report()
    write_report(tmp_path, report, confusion=cm)
    rows = _read_csv(tmp_path / "per_class.csv")
    assert rows[0] == ["class_index", "class", "group", "train_count", "test_count", "accuracy"]
    assert rows[1][:5] == ["0", "class 0", "many", "1000", "20"]
    assert rows[-1][:5] == ["9", "class 9", "few", "10", "20"]
    assert [float(r[5]) for r in rows[1:]] == [r["accuracy"] for r in report["per_class"]]
    conf = _read_csv(tmp_path / "confusion.csv")
    assert conf[0] == ["true \\ predicted", *(f"class {i}" for i in range(10))]
    assert np.array_equal(np.array([[int(v) for v in r[1:]] for r in conf[1:]]), cm)


def test_confusion_csv_lists_cells_above_the_dense_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "DENSE_CONFUSION_MAX", 2)
    cm = np.array([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
    ev.write_confusion_csv(tmp_path / "confusion.csv", cm, ["a", "b, with comma", "c"])
    assert _read_csv(tmp_path / "confusion.csv") == [
        ["true", "predicted", "count"], ["a", "a", "3"], ["a", "c", "1"], ["b, with comma", "b, with comma", "2"]]


def test_write_predictions(tmp_path):
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    path = ev.write_predictions(tmp_path / "predictions.csv", logits, torch.tensor([2, 1]), ["a", "b", "c"],
                                paths=["/d/x.png", None], k=5)
    rows = _read_csv(path)
    assert rows[0] == ["index", "path", "label", "label_name", "prediction", "prediction_name", "correct",
                       "confidence", "top5"]
    assert rows[1][:7] == ["0", "/d/x.png", "2", "c", "0", "a", "0"] and rows[1][8] == "a;c;b"
    assert rows[2][:7] == ["1", "", "1", "b", "1", "b", "1"]
    assert float(rows[1][7]) == pytest.approx(float(logits[0].softmax(0)[0]), abs=1e-4)
    with pytest.raises(ValueError, match="class names"):
        ev.write_predictions(tmp_path / "p.csv", logits, torch.tensor([2, 1]), ["a", "b"])
    assert not (tmp_path / "p.csv").exists()


# ----------------------------------------------------------------------------------------------
# issue #14 section 4: the training set's fingerprint


# ----------------------------------------------------------------------------------------------
# issue #12 item 8: retrieval.png's title fits the figure
