"""Issue 31: calibration and long-tail summaries in every report, temperature scaling in stage 2, calibrated
predictions, exports, ``dscl compare`` and the trackers — on the session's finished smoke run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_fmnist
from dscl.calibration import bin_index, calibration_report, fit_temperature, per_class_summary
from dscl.cli import main
from dscl.errors import CheckpointError, UsageError

SCALARS = {"ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "overconfidence", "underconfidence"}
CALIBRATION_KEYS = {"n_samples", *SCALARS, "n_bins", "bins", "groups", "temperature", "temperature_note"}


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _images(folder: Path, n: int = 5) -> Path:
    """``n`` grey 28 x 28 PNGs (any content: the tests compare two ways of scoring the same files)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{k}.png")
    return folder


def _split_logits(run: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain classifier's logits and labels on ``split`` of the run's dataset, as evaluation computes them."""
    from dscl.data import build_datasets
    from dscl.features import extract_features
    from dscl.inference import load_run

    p = load_run(run)
    splits = build_datasets(p.cfg.data, seed=p.cfg.optim.seed)
    dataset = splits.val if split == "val" else splits.test
    feats, labels = extract_features(p.backbone, dataset.with_transform(p.transform), batch_size=256,
                                     device=torch.device("cpu"), workers=0, progress=False, desc=split)
    return p.logits_from_features(feats), labels


# ------------------------------------------------------------------------------------------ report.json


@needs_fmnist
def test_report_json_has_calibration_with_every_key_group_and_row(smoke_run: Path) -> None:
    report = _report(smoke_run)
    cal = report["calibration"]
    assert set(cal) == CALIBRATION_KEYS
    assert cal["n_bins"] == 15 and len(cal["bins"]) == 15 and cal["n_samples"] == sum(
        r["test_count"] for r in report["per_class"])
    assert set(cal["groups"]) == {"many", "medium", "few"}
    for g, n in report["shot_classes"].items():
        entry = cal["groups"][g]
        if n == 0:
            assert entry is None  # the smoke preset has no Many class
            continue
        assert entry["n_classes"] == n and set(entry) >= SCALARS and len(entry["bins"]) == 15
        assert sum(b["count"] for b in entry["bins"]) == entry["n_samples"]
    assert cal["ece"] == pytest.approx(cal["overconfidence"] + cal["underconfidence"], abs=2e-4)
    # the long-tail summary of the main row is per_class_summary of its per-class accuracies
    lt = per_class_summary([r["accuracy"] for r in report["per_class"]])
    assert report["worst_class"] == pytest.approx(lt["worst"], abs=1e-4)
    assert report["harmonic_mean"] == pytest.approx(lt["harmonic_mean"], abs=1e-4)
    assert report["geometric_mean"] == pytest.approx(lt["geometric_mean"], abs=1e-4)
    # every post-hoc row: the long-tail summary and the scalar calibration metrics, per group too
    assert [v["method"].split(" (")[0] for v in report["variants"]] == [
        "+ logit adjustment", "+ tau-normalisation", "nearest class mean"]
    for row in report["variants"]:
        assert all(isinstance(row[k], float) for k in ("worst_class", "harmonic_mean", "geometric_mean"))
        assert set(row["calibration"]) >= SCALARS and "bins" not in row["calibration"]
        assert row["calibration"]["groups"]["few"]["ece"] is not None
    # the temperature-scaled row: same accuracies, other confidences
    temp = cal["temperature"]
    assert temp["method"].startswith("+ temperature scaling (T=")
    assert {k: temp[k] for k in ("top1", "many", "medium", "few")} == {k: report[k] for k in
                                                                       ("top1", "many", "medium", "few")}
    assert set(temp) >= SCALARS and temp["fit"]["split"] == "val"
    assert temp["nll"] <= cal["nll"]  # T minimises the NLL on val; on test it does not make it worse here


@needs_fmnist
def test_report_ece_equals_the_ece_recomputed_from_predictions_csv(smoke_run: Path) -> None:
    """predictions.csv's confidence (float64 softmax, 8 decimals) and correctness give the report's 15-bin ECE.

    Tolerance 2e-4 percentage points: report.json rounds the ECE to 4 decimals (5e-5) and each confidence in
    the CSV is within 5e-9 of the one the report binned (a change of at most 5e-7 points; no confidence of the
    smoke run lies within 5e-9 of a bin edge, where rounding could move it to the next bin)."""
    with (smoke_run / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    conf = np.array([float(r["confidence"]) for r in rows])
    correct = np.array([float(r["correct"]) for r in rows])
    idx = bin_index(conf, 15)
    ece = over = 0.0
    for b in range(15):
        sel = idx == b
        if sel.any():
            gap = conf[sel].mean() - correct[sel].mean()
            ece += sel.sum() / len(conf) * abs(gap)
            over += sel.sum() / len(conf) * max(gap, 0.0)
    cal = _report(smoke_run)["calibration"]
    assert 100 * ece == pytest.approx(cal["ece"], abs=2e-4)
    assert 100 * over == pytest.approx(cal["overconfidence"], abs=2e-4)
    assert [int((idx == b).sum()) for b in range(15)] == [b["count"] for b in cal["bins"]]
    assert 100 * correct.mean() == pytest.approx(_report(smoke_run)["top1"], abs=1e-4)


@needs_fmnist
def test_temperature_is_fitted_on_val_and_reported_on_test_with_the_same_top1(smoke_run: Path) -> None:
    from dscl.run import load_classifier

    state = load_classifier(smoke_run)
    t = state.temperature
    assert isinstance(t, float) and t > 0
    val_logits, val_labels = _split_logits(smoke_run, "val")
    assert t == pytest.approx(fit_temperature(val_logits, val_labels), rel=1e-4)  # never the test set
    assert state.temperature_fit["split"] == "val" and state.temperature_fit["n"] == len(val_labels)
    assert state.temperature_fit["nll_after"] <= state.temperature_fit["nll_before"]
    # the report's row after scaling is calibration_report(test logits / T); the argmax does not move
    test_logits, test_labels = _split_logits(smoke_run, "test")
    scaled = test_logits.double() / t
    assert torch.equal(scaled.argmax(1), test_logits.argmax(1))
    temp = _report(smoke_run)["calibration"]["temperature"]
    want = calibration_report(scaled, test_labels)
    assert temp["temperature"] == pytest.approx(t, abs=1e-6)
    for key in ("ece", "adaptive_ece", "classwise_ece", "brier", "nll"):
        assert temp[key] == pytest.approx(want[key], abs=1e-3), key


@needs_fmnist
def test_report_md_has_the_calibration_and_long_tail_tables_and_the_plots(smoke_run: Path) -> None:
    from test_report import _assert_png_not_blank

    md = (smoke_run / "report.md").read_text()
    report = _report(smoke_run)
    assert ("| Method | ECE | adaptive ECE | classwise ECE | NLL | Brier | over-conf. | under-conf. | ECE Many | "
            "ECE Medium | ECE Few |") in md
    assert f"| {report['method']} | {report['calibration']['ece']:.2f} |" in md
    assert f"| {report['calibration']['temperature']['method']} |" in md
    for row in report["variants"]:
        assert f"| {row['method']} | {row['calibration']['ece']:.2f} |" in md
    assert "15 equal-width bins" in md and "MiSLAS" in md and "percent" in md
    assert "Temperature scaling (same top-1, only the confidences change): T = " in md
    assert "| Method | Worst class | Harmonic mean | Geometric mean |" in md
    for name in ("reliability", "confidence_hist"):
        _assert_png_not_blank(smoke_run / "plots" / f"{name}.png")
        assert f"(plots/{name}.png)" in md


@needs_fmnist
def test_evaluate_on_the_val_split_says_the_temperature_row_is_in_sample(smoke_run: Path, tmp_path: Path) -> None:
    from dscl.evaluation import evaluate

    run = shutil.copytree(smoke_run, tmp_path / "run")
    report = evaluate(run, split="val", device="cpu", progress=False)
    assert report["split"] == "val" and report["calibration"]["temperature"]["top1"] == report["top1"]
    assert "in-sample" in report["calibration"]["temperature_note"]
    assert (run / "val" / "plots" / "reliability.png").is_file()


# ------------------------------------------------------------------------------------------ predictions


@needs_fmnist
def test_predictor_calibrated_probabilities_are_softmax_of_logits_over_t(smoke_run: Path, tmp_path: Path) -> None:
    from dscl.inference import load_run

    p = load_run(smoke_run)
    files = sorted(str(f) for f in _images(tmp_path / "imgs").iterdir())
    logits = p.logits(files)
    calibrated = p.predict(files, calibrated=True)
    assert p.temperature is not None
    assert torch.allclose(calibrated, torch.softmax(logits / p.temperature, dim=1), atol=1e-6)
    assert torch.allclose(p.logits(files, calibrated=True), logits / p.temperature)
    assert torch.equal(calibrated.argmax(1), p.predict(files).argmax(1))
    with pytest.raises(UsageError, match="plain classifier"):
        p.predict(files, variant="tau-norm", calibrated=True)


@needs_fmnist
def test_cli_predict_calibrated_writes_temperature_scaled_probabilities(smoke_run: Path, tmp_path: Path,
                                                                        capsys) -> None:
    from dscl.inference import load_run

    images = _images(tmp_path / "imgs")
    raw, cal = tmp_path / "raw.csv", tmp_path / "cal.csv"
    assert main(["predict", "--run", str(smoke_run), str(images), "--out", str(raw), "--logits", "--all-probs",
                 "--no-progress"]) == 0
    assert main(["predict", "--run", str(smoke_run), str(images), "--out", str(cal), "--logits", "--all-probs",
                 "--calibrated", "--no-progress"]) == 0
    t = load_run(smoke_run).temperature
    assert f"T = {t:.4g}" in capsys.readouterr().out
    names = load_run(smoke_run).class_names
    for a, b in zip(csv.DictReader(raw.open()), csv.DictReader(cal.open()), strict=True):
        assert a["path"] == b["path"] and a["class_1"] == b["class_1"] and a["logit_1"] == b["logit_1"]
        logits = torch.tensor([float(a[f"logit_{i}"]) for i in range(1, 6)])  # the raw top-5 logits
        probs = torch.tensor([float(b[f"prob:{n}"]) for n in names])
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
        # ratios of calibrated probabilities are exp((z_i - z_j) / T)
        assert float(b["prob_2"]) / float(b["prob_1"]) == pytest.approx(
            float(torch.exp((logits[1] - logits[0]) / t)), rel=1e-5)
    # refused with a variant the temperature was not fitted for
    assert main(["predict", "--run", str(smoke_run), str(images), "--calibrated", "--variant", "ncm",
                 "--no-progress"]) == 2
    assert "plain classifier" in capsys.readouterr().err


@needs_fmnist
def test_a_run_without_a_validation_split_has_no_temperature_and_says_why(smoke_run: Path, tmp_path: Path,
                                                                          capsys) -> None:
    from dscl.classify import classify
    from dscl.config import load_config
    from dscl.evaluation import evaluate
    from dscl.inference import load_run
    from dscl.run import load_classifier

    run = shutil.copytree(smoke_run, tmp_path / "run")
    classify(run, cfg=load_config("smoke", overrides=["data.val_per_class=0"]), device="cpu", progress=False)
    state = load_classifier(run)
    assert state.temperature is None and "no validation split" in state.temperature_fit["reason"]
    report = evaluate(run, device="cpu", progress=False)
    assert report["calibration"]["temperature"] is None and report["calibration"]["ece"] is not None
    assert "no validation split" in report["calibration"]["temperature_note"]
    md = (run / "report.md").read_text()
    assert "+ temperature scaling" not in md and "No temperature-scaled row: no temperature for" in md
    p = load_run(run)
    with pytest.raises(CheckpointError, match="no validation split.*re-run dscl classify"):
        p.predict(_images(tmp_path / "imgs"), calibrated=True)
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(tmp_path / "imgs"), "--calibrated", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "calibrated probabilities need a temperature" in err and str(run) in err and "data.val_fraction" in err


@needs_fmnist
def test_an_old_classifier_without_a_temperature_loads_and_explains(smoke_run: Path, tmp_path: Path) -> None:
    from dscl.inference import load_run
    from dscl.run import CHECKPOINT_VERSION, CLASSIFIER_FILE, ClassifierState, load_checkpoint, save_checkpoint

    run = shutil.copytree(smoke_run, tmp_path / "run")
    raw = load_checkpoint(run / CLASSIFIER_FILE)
    assert raw["version"] == CHECKPOINT_VERSION and isinstance(raw["temperature"], float)
    again = ClassifierState.from_dict(ClassifierState.from_dict(raw).to_dict())
    assert again.temperature == raw["temperature"] and again.temperature_fit == raw["temperature_fit"]
    for key in ("temperature", "temperature_fit", "version"):
        raw.pop(key)
    save_checkpoint(run / CLASSIFIER_FILE, raw)  # as dscl wrote it before issue 31
    p = load_run(run)
    assert p.temperature is None and p.record is not None and p.record.temperature_fit is None
    assert "written before dscl fitted temperatures" in p.temperature_note()
    with pytest.raises(CheckpointError, match=r"re-run `dscl classify --run .*run`"):
        p.logits(torch.zeros(1, 28, 28, 3, dtype=torch.uint8), calibrated=True)
    assert p.predict(torch.zeros(1, 28, 28, 3, dtype=torch.uint8)).shape == (1, 10)  # uncalibrated still works


# ------------------------------------------------------------------------------------------ ensembles, exports


@needs_fmnist
def test_ensembles_report_calibration_but_refuse_calibrated_predictions(smoke_run: Path, tmp_path: Path,
                                                                        capsys) -> None:
    from dscl.evaluation import evaluate_data
    from dscl.inference import ENSEMBLE_FILE
    from test_evaluation import _fmnist_tree

    twin = shutil.copytree(smoke_run, tmp_path / "twin")
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / ENSEMBLE_FILE).write_text(json.dumps({"format": "dscl-ensemble", "weights": "equal softmax average",
                                                 "members": [str(smoke_run.resolve()), str(twin.resolve())]}))
    report = evaluate_data(ens, _fmnist_tree(tmp_path / "tree"), tmp_path / "out", device="cpu", progress=False)
    assert report["calibration"]["temperature"] is None and "ensemble" in report["calibration"]["temperature_note"]
    assert all(v["calibration"]["ece"] is not None for v in report["variants"])
    assert (tmp_path / "out" / "plots" / "reliability.png").is_file()
    capsys.readouterr()
    assert main(["predict", "--run", str(ens), str(_images(tmp_path / "imgs")), "--calibrated",
                 "--no-progress"]) == 2
    assert "an ensemble has no fitted temperature" in capsys.readouterr().err


@needs_fmnist
def test_exports_carry_the_temperature_and_output_raw_logits(smoke_run: Path, tmp_path: Path, capsys) -> None:
    from dscl.inference import load_run
    from dscl.interop import export_meta

    p = load_run(smoke_run)
    meta = export_meta(p)
    assert meta["temperature"] == p.temperature
    assert "divide logits by temperature" in meta["temperature_note"] and "raw logits" in meta["temperature_note"]
    out = tmp_path / "sd.pt"
    assert main(["export", "--run", str(smoke_run), "--format", "state-dict", "--out", str(out)]) == 0
    assert "divide logits by temperature" in capsys.readouterr().out
    sd = torch.load(out, weights_only=True)
    assert sd["temperature"] == p.temperature and isinstance(sd["temperature_note"], str)


# ------------------------------------------------------------------------------------------ compare, trackers


@needs_fmnist
def test_compare_json_has_every_calibration_metric_as_mean_and_std(smoke_run: Path, tmp_path: Path) -> None:
    """Finished runs are read, not re-run: two copies of the smoke run stand for two seeds."""
    from dscl.compare import CALIBRATION_FIELDS, compare
    from dscl.config import load_config

    out = tmp_path / "cmp"
    for seed in (0, 1):
        shutil.copytree(smoke_run, out / "runs" / f"dscl+pbsd-seed{seed}")
    second = out / "runs" / "dscl+pbsd-seed1" / "report.json"
    edited = _report(smoke_run)
    edited["calibration"]["ece"] += 2.0
    second.write_text(json.dumps(edited))
    result = compare(load_config("smoke"), ["dscl+pbsd"], [0, 1], out, command="dscl compare", device="cpu",
                     progress=False)
    saved = json.loads((out / "compare.json").read_text())
    assert saved["calibration"] == result["calibration"]
    metrics = saved["calibration"]["dscl+pbsd"]
    assert set(metrics) == set(CALIBRATION_FIELDS)
    ece = _report(smoke_run)["calibration"]["ece"]
    assert metrics["ece"]["mean"] == pytest.approx(ece + 1.0, abs=1e-4)
    assert metrics["ece"]["std"] == pytest.approx(2 ** 0.5, abs=1e-4)
    for name in ("nll", "brier", "adaptive_ece", "classwise_ece", "temperature", "ece_few"):
        assert metrics[name]["mean"] is not None and metrics[name]["std"] == 0.0, name
    md = (out / "compare.md").read_text()
    assert "| method | All | Many | Medium | Few | ECE |" in md
    assert f"| {ece + 1.0:.1f} ± 1.4 |" in md


@needs_fmnist
def test_trackers_log_the_calibration_metrics_and_the_temperature(smoke_run: Path) -> None:
    from dscl.trackers import report_metrics

    report = _report(smoke_run)
    logged = report_metrics(report, "test")
    cal = report["calibration"]
    for key in SCALARS:
        assert logged[f"test/calibration/{key}"] == pytest.approx(cal[key])
        assert logged[f"test/calibration/temperature_scaled/{key}"] == pytest.approx(cal["temperature"][key])
    assert logged["test/calibration/temperature"] == pytest.approx(cal["temperature"]["temperature"])
    assert logged["test/calibration/few/ece"] == pytest.approx(cal["groups"]["few"]["ece"])
    assert "test/calibration/many/ece" not in logged  # no Many class: nothing logged, not a made-up 0
    assert logged["test/worst_class"] == pytest.approx(report["worst_class"])
    assert logged["test/nearest_class_mean/calibration/ece"] == pytest.approx(
        report["variants"][-1]["calibration"]["ece"])
