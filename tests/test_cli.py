"""End-to-end tests of the command line: real subprocesses on the smoke preset."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import needs_fmnist, run_cli

REPORT_KEYS = {"dataset", "method", "top1", "top5", "many", "medium", "few", "shot_classes", "per_class",
               "seed", "epochs", "wall_seconds"}


def test_help_lists_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0
    for cmd in ("pretrain", "classify", "evaluate", "run", "data", "compare", "sweep", "analyze"):
        assert cmd in res.stdout
    res = run_cli()
    assert res.returncode == 2 and "dscl run" in res.stderr


@pytest.mark.parametrize("args", [("analyze",), ("sweep",), ("analyze", "gradient-ratio")])
def test_incomplete_analysis_commands_fail_with_usage(args):
    res = run_cli(*args)
    assert res.returncode == 2
    assert "usage:" in res.stderr and "required" in res.stderr


def test_unknown_preset_and_key_fail_clearly(tmp_path):
    res = run_cli("pretrain", "--preset", "nope", "--out", str(tmp_path / "a"))
    assert res.returncode == 2 and "valid presets" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("pretrain", "--preset", "smoke", "--out", str(tmp_path / "b"), "optim.epoch=1")
    assert res.returncode == 2 and "valid keys of optim" in res.stderr
    assert not (tmp_path / "b").exists()


def test_failed_start_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "run"
    res = run_cli("run", "--preset", "imagenet-lt", "--out", str(out), "--data-root", str(tmp_path))
    assert res.returncode == 2 and "ImageNet_LT_train.txt" in res.stderr
    assert not out.exists()  # the corrected retry is not blocked by a half-made run directory


def test_stage2_without_stage1_names_the_missing_file(tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  dataset: fmnist-lt\n")
    res = run_cli("classify", "--run", str(tmp_path))
    assert res.returncode == 2
    assert "last.pt" in res.stderr and "does not exist" in res.stderr
    res = run_cli("evaluate", "--run", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "config.yaml" in res.stderr


def _check_report(report: dict, num_classes: int) -> None:
    assert set(report) >= REPORT_KEYS
    for key in ("top1", "top5"):
        assert 0 <= report[key] <= 100
    for key in ("many", "medium", "few"):
        assert report[key] is None or 0 <= report[key] <= 100
    assert len(report["per_class"]) == num_classes
    for row in report["per_class"]:
        assert set(row) >= {"class", "train_count", "test_count", "accuracy"}
    assert sum(report["shot_classes"].values()) == num_classes
    assert report["wall_seconds"] > 0


@needs_fmnist
def test_run_smoke_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = run_cli("run", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "Many" in res.stdout and "report:" in res.stdout
    report = json.loads((out / "report.json").read_text())
    _check_report(report, 10)
    assert report["dataset"] == "fmnist-lt" and report["method"] == "dscl+pbsd"
    assert report["shot_classes"] == {"many": 0, "medium": 5, "few": 5}
    assert report["many"] is None  # no class has > 100 images in the smoke subset
    assert len(report["variants"]) == 3
    assert (out / "report.md").stat().st_size > 0
    assert (out / "plots" / "per_class_accuracy.png").stat().st_size > 0
    assert (out / "plots" / "confusion_matrix.png").stat().st_size > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} >= {"pretrain", "pretrain_epoch", "classify"}
    assert all(np.isfinite(x["loss"]) for x in lines if x["stage"] == "pretrain")

    # the run directory is refused without --resume/--overwrite, and nothing in it is touched
    before = (out / "report.json").read_bytes()
    res = run_cli("run", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (out / "report.json").read_bytes() == before

    # evaluate again; --split val on a dataset without one is refused
    res = run_cli("evaluate", "--run", str(out), "--json", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["top1"] == pytest.approx(report["top1"])
    res = run_cli("evaluate", "--run", str(out), "--split", "val", "--no-progress")
    assert res.returncode == 2 and "no validation split" in res.stderr

    # a config that no longer matches the checkpoint is refused, and the classifier is not replaced
    cls_before = (out / "checkpoints" / "classifier.pt").read_bytes()
    cfg_text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(cfg_text.replace("backbone: convnet", "backbone: resnet32"))
    res = run_cli("classify", "--run", str(out), "--no-progress")
    assert res.returncode == 2 and "convnet" in res.stderr and "resnet32" in res.stderr
    assert (out / "checkpoints" / "classifier.pt").read_bytes() == cls_before


def _write_png_dataset(root, num_classes=3, train_counts=(12, 6, 3), test_per_class=4):
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for split, counts in (("train", train_counts), ("test", [test_per_class] * num_classes)):
        for c, n in enumerate(counts):
            folder = root / "images" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
                img[:, :, c] += 150  # one bright channel per class: separable
                Image.fromarray(img).save(folder / f"{i}.png")
                lines[split].append(f"images/{split}/class{c}/{i}.png {c}")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")


def test_run_on_split_file_png_dataset(tmp_path):
    root = tmp_path / "data"
    _write_png_dataset(root)
    out = tmp_path / "run"
    res = run_cli("run", "--preset", "smoke", "--out", str(out), "--no-progress", "--data-root", str(root),
                  "data.dataset=split", f"data.train_list={root / 'train.txt'}",
                  f"data.test_list={root / 'test.txt'}", "data.image_size=32", "optim.batch_size=8",
                  "views.patch_size=16", "data.val_fraction=0.2")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    _check_report(report, 3)
    assert report["shot_classes"] == {"many": 0, "medium": 0, "few": 3}
    assert "carved from the training set" in report["selection"]
    # 20% of each class is held out for validation: 12 -> 10, 6 -> 5, 3 -> 2 (at least one, never the last)
    assert [r["train_count"] for r in report["per_class"]] == [10, 5, 2]
    res = run_cli("evaluate", "--run", str(out), "--split", "val", "--json", "--no-progress")
    assert res.returncode == 0, res.stderr
    val = json.loads((out / "val" / "report.json").read_text())
    assert val["split"] == "val" and sum(r["test_count"] for r in val["per_class"]) == 4
    assert [r["test_count"] for r in report["per_class"]] == [4, 4, 4]


def test_data_command_names_bad_line(tmp_path):
    root = tmp_path / "data"
    _write_png_dataset(root)
    with open(root / "train.txt", "a") as fh:
        fh.write("images/train/class0/0.png notanumber\n")
    res = run_cli("data", "--dataset", "split", "--data-root", str(root), "--train-list",
                  str(root / "train.txt"), "--test-list", str(root / "test.txt"))
    assert res.returncode == 2
    assert "train.txt" in res.stderr and "22" in res.stderr  # 21 good lines, the bad one is line 22


@needs_fmnist
def test_data_command_fmnist_json():
    res = run_cli("data", "--dataset", "fmnist-lt", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["train_counts"] == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert summary["num_train"] == 2478 and summary["num_test"] == 10000 and summary["num_classes"] == 10
    assert summary["shot_classes"] == {"many": 5, "medium": 3, "few": 2}


@needs_fmnist
def test_compare_two_methods_two_seeds_and_resume(tmp_path):
    out = tmp_path / "cmp"
    args = ("compare", "--preset", "smoke", "--methods", "scl,dscl+pbsd", "--seeds", "0,1", "--out", str(out),
            "--no-progress", "optim.epochs=1", "classifier.epochs=1")
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "compare.json").read_text())
    assert set(result) >= {"dataset", "seeds", "methods", "command", "wall_seconds"}
    assert result["seeds"] == [0, 1] and list(result["methods"]) == ["scl", "dscl+pbsd"]
    for method, metrics in result["methods"].items():
        report0 = json.loads((out / "runs" / f"{method}-seed0" / "report.json").read_text())
        report1 = json.loads((out / "runs" / f"{method}-seed1" / "report.json").read_text())
        assert metrics["all"]["runs"] == [report0["top1"], report1["top1"]]
        assert metrics["all"]["mean"] == pytest.approx((report0["top1"] + report1["top1"]) / 2, abs=0.01)
        assert metrics["many"]["mean"] is None  # the smoke subset has no Many class
    assert json.loads((out / "runs" / "scl-seed0" / "report.json").read_text())["method"] == "scl"
    assert "± " in (out / "compare.md").read_text()
    # a killed comparison continues: delete one report, the rest are reused untouched
    (out / "runs" / "scl-seed1" / "report.json").unlink()
    kept = (out / "runs" / "dscl+pbsd-seed0" / "report.json").stat().st_mtime_ns
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert (out / "runs" / "scl-seed1" / "report.json").is_file()
    assert (out / "runs" / "dscl+pbsd-seed0" / "report.json").stat().st_mtime_ns == kept
    # a different configuration into the same folder is refused
    res = run_cli(*args[:-1], "classifier.epochs=2")
    assert res.returncode == 2 and "different configuration" in res.stderr


def test_compare_rejects_bad_lists(tmp_path):
    res = run_cli("compare", "--methods", "dscl,moco", "--out", str(tmp_path / "c"))
    assert res.returncode == 2 and "valid methods" in res.stderr
    res = run_cli("compare", "--seeds", "0,x", "--out", str(tmp_path / "c"))
    assert res.returncode == 2 and "integers" in res.stderr
