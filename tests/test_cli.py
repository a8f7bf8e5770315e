"""End-to-end tests of the command line: real subprocesses on the smoke preset."""

import csv
import json
import re

import numpy as np
import pytest
import torch
import yaml
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
    # issue #21: accuracy under forward / uniform / backward long-tailed test distributions
    ta = report["test_agnostic"]
    assert len(ta) == 11 and ta["uniform"] == pytest.approx(report["top1_macro"], abs=1e-3)
    assert (out / "plots" / "test_agnostic.png").stat().st_size > 0
    assert "## Under other test distributions" in (out / "report.md").read_text()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} >= {"pretrain", "pretrain_epoch", "classify"}
    assert all(np.isfinite(x["loss"]) for x in lines if x["stage"] == "pretrain")
    # the compute threads of every logged interval (the count drops while other jobs use the CPU)
    assert all(isinstance(x["threads"], int) and x["threads"] >= 1 for x in lines if x["stage"] == "pretrain")
    assert all(x["queue_rejected"] == 0 for x in lines if x["stage"] == "pretrain")  # non-finite keys kept out
    _check_run_facts_and_csvs(out, report, res)

    # the run directory is refused without --resume/--overwrite, and nothing in it is touched
    before = (out / "report.json").read_bytes()
    res = run_cli("run", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (out / "report.json").read_bytes() == before

    # evaluate again; --split val (smoke holds 20 images per class out of the unused training images)
    # writes the same files into val/
    res = run_cli("evaluate", "--run", str(out), "--json", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["top1"] == pytest.approx(report["top1"])
    res = run_cli("evaluate", "--run", str(out), "--split", "val", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "val" / "report.json").read_text())["split"] == "val"
    assert (out / "val" / "predictions.csv").read_text().count("\n") == 1 + 200

    # a config that no longer matches the checkpoint is refused, and the classifier is not replaced
    cls_before = (out / "checkpoints" / "classifier.pt").read_bytes()
    cfg_text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(cfg_text.replace("backbone: convnet", "backbone: resnet32"))
    res = run_cli("classify", "--run", str(out), "--no-progress")
    assert res.returncode == 2 and "convnet" in res.stderr and "resnet32" in res.stderr
    assert (out / "checkpoints" / "classifier.pt").read_bytes() == cls_before


def _check_run_facts_and_csvs(out, report: dict, res) -> None:
    """Run facts in report.json (issue #14 section 4), the ETA lines, and the per-class / confusion /
    prediction CSVs of a finished smoke run (10 classes, 10,000 in-memory test images)."""
    import torch

    assert re.search(r"epoch 1/2 .*ETA stage 1 \d\d:\d\d", res.stdout + res.stderr)
    assert "stage 2 + evaluation: roughly" in res.stderr and "stage 2 + evaluation took" in res.stderr
    assert report["precision"] == "fp32" and report["device"] == "cpu"
    assert report["torch_version"] == torch.__version__
    assert report["global_batch"] == 32 and report["world_size"] == 1
    assert report["lr"] == pytest.approx(0.1 * 32 / 256)
    assert re.fullmatch(r"[0-9a-f]{12}", report["train_fingerprint"])
    assert report["train_counts"] == [r["train_count"] for r in report["per_class"]]
    names = [r["class"] for r in report["per_class"]]
    with open(out / "per_class.csv", newline="") as fh:
        per_class = list(csv.DictReader(fh))
    assert [r["class"] for r in per_class] == names
    assert [float(r["accuracy"]) for r in per_class] == [r["accuracy"] for r in report["per_class"]]
    assert {r["group"] for r in per_class} == {"medium", "few"}
    with open(out / "confusion.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == names and [r[0] for r in rows[1:]] == names
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.sum() == 10000 and 100 * np.trace(counts) / 10000 == pytest.approx(report["top1"], abs=1e-3)
    with open(out / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 10000 and [p["index"] for p in preds[:3]] == ["0", "1", "2"]
    assert all(p["path"] == "" for p in preds)  # in-memory Fashion-MNIST: no file
    assert 100 * np.mean([p["correct"] == "1" for p in preds]) == pytest.approx(report["top1"], abs=1e-3)
    first = preds[0]
    assert first["label_name"] == names[int(first["label"])]
    assert first["top5"].split(";")[0] == first["prediction_name"] == names[int(first["prediction"])]
    assert len(first["top5"].split(";")) == 5


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
    with open(out / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 12 and preds[0]["path"].endswith("class0/0.png")  # file datasets: the image path

    # issue #12 item 7: a class with no test image is named, not silently dropped from its group's mean
    test_lines = (root / "test.txt").read_text().splitlines()
    (root / "test.txt").write_text("\n".join(x for x in test_lines if not x.endswith(" 2")) + "\n")
    res = run_cli("evaluate", "--run", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    missing = report["per_class"][2]["class"]
    assert "warning: 1 class has no image in the test split" in res.stdout and missing in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["shot_classes"]["few"] == 3 and report["shot_classes_evaluated"]["few"] == 2
    assert report["missing_classes"] == [{"class": missing, "group": "few"}]
    assert "over 2 of 3 classes" in (out / "report.md").read_text()


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


# ----------------------------------------------------------------------------------------------
# issue #12 item 2: overrides anywhere; the same configuration flags on every config-taking command


@needs_fmnist
def test_overrides_before_and_after_options():
    res = run_cli("data", "data.imbalance_factor=10", "--json", "--dataset", "fmnist-lt", "data.n_max=60",
                  "--no-progress", "data.n_max=50")
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout)["train_counts"]
    assert counts[0] == 50 and counts[-1] == 5  # the later n_max wins; IF 10 from before the options


def test_readme_dataset_command_parses_with_overrides_after_options(tmp_path):
    # README: dscl data --dataset cifar100-lt --data-root ~/data data.imbalance_factor=100
    res = run_cli("data", "--dataset", "cifar100-lt", "--data-root", str(tmp_path), "data.imbalance_factor=100")
    assert res.returncode == 2 and "unrecognized" not in res.stderr
    assert "cifar-100-python" in res.stderr  # it got as far as looking for the data


def test_dataset_flags_on_every_config_command(tmp_path):
    from dscl.cli import build_parser, parse

    flags = ["--dataset", "split", "--train-list", "a.txt", "--val-list", "b.txt", "--test-list", "c.txt",
             "optim.epochs=1"]
    for command in (["pretrain", "--out", "x"], ["run"], ["data"], ["compare", "--out", "x"],
                    ["sweep", "--param", "alpha=0.1", "--out", "x"]):
        args = parse(build_parser(), [command[0], "loss.alpha=0.2", *command[1:], *flags])
        assert (args.dataset, args.train_list, args.val_list, args.test_list) == ("split", "a.txt", "b.txt", "c.txt")
        assert args.overrides == ["loss.alpha=0.2", "optim.epochs=1"]
    root = tmp_path / "empty"
    root.mkdir()
    res = run_cli("run", "--dataset", "folder", "--data-root", str(root), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "unrecognized" not in res.stderr and str(root) in res.stderr
    assert not (tmp_path / "r").exists()
    res = run_cli("export", "--run", str(tmp_path), "--format", "onnx", "--out", "m.onnx", "optim.epochs=1")
    assert res.returncode == 2 and "takes no section.key=value overrides" in res.stderr


def test_skip_file_check_flag_sets_the_config_key():
    from dscl.cli import build_parser, parse
    from dscl.cli.common import config_overrides, load_cfg

    args = parse(build_parser(), ["run", "--preset", "smoke", "--skip-file-check"])
    assert "data.check_files=false" in config_overrides(args)
    assert load_cfg(args).data.check_files is False
    assert load_cfg(parse(build_parser(), ["run", "--preset", "smoke"])).data.check_files is True


# ----------------------------------------------------------------------------------------------
# issue #12 item 5: resume refuses what changes stage 1, records what it may change


@needs_fmnist
def test_resume_refuses_stage1_changes_and_records_allowed_ones(smoke_run, tmp_path):
    import shutil

    from dscl.checkpoint import load_checkpoint
    from dscl.rundir import load_run_config

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = (run / "config.yaml").read_text()
    res = run_cli("pretrain", "--out", str(run), "--resume", "optim.epochs=3", "loss.alpha=0.2")
    assert res.returncode == 2 and "loss.alpha (0.1111" in res.stderr and "optim.epochs" in res.stderr
    res = run_cli("pretrain", "--out", str(run), "--resume", "--preset", "fmnist-lt")
    assert res.returncode == 2 and "preset smoke" in res.stderr
    assert (run / "config.yaml").read_text() == before
    res = run_cli("pretrain", "--resume", "--out", str(run), "--no-progress", "optim.epochs=3", "classifier.epochs=2")
    assert res.returncode == 0, res.stderr
    cfg = load_run_config(run)
    assert cfg.optim.epochs == 3 and cfg.classifier.epochs == 2  # config.yaml tells what was trained
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"stage": "resume", "epoch": 2, "changes": {"classifier.epochs": [3, 2], "optim.epochs": [2, 3]}} in lines
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["finished"]


# ----------------------------------------------------------------------------------------------
# issue #12 item 8: --device, presets, interrupt messages


def test_bad_device_is_refused_with_the_valid_names(tmp_path):
    res = run_cli("run", "--device", "tpu", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "'tpu' is not a device" in res.stderr and "cuda:N" in res.stderr
    assert "xpu" not in res.stderr and "Traceback" not in res.stderr  # not torch's list of device types
    assert not (tmp_path / "r").exists()


def test_presets_lists_names_with_descriptions():
    from dscl.config import preset_names

    res = run_cli("presets")
    assert res.returncode == 0
    rows = dict(line.split(None, 1) for line in res.stdout.splitlines())
    assert sorted(rows) == preset_names()
    assert rows["smoke"].startswith("Seconds on a CPU") and rows["imagenet-lt"].startswith("ImageNet-LT")
    assert all(len(d) > 20 and d.endswith(".") for d in rows.values())


def test_interrupt_names_the_directory_and_what_was_saved(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import dscl.pretrain
    from dscl.cli import main

    monkeypatch.chdir(tmp_path)

    def before_first_checkpoint(cfg, out, **kwargs):
        Path(out).mkdir(parents=True)
        (Path(out) / "config.yaml").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(dscl.pretrain, "pretrain", before_first_checkpoint)
    assert main(["run", "--preset", "smoke"]) == 130  # no --out: the directory is made up
    err = capsys.readouterr().err
    (made,) = (tmp_path / "runs").iterdir()
    assert "nothing was saved" in err and f"--out runs/{made.name}" in err and "--resume" not in err

    def after_an_epoch(cfg, out, **kwargs):
        (Path(out) / "checkpoints").mkdir(parents=True)
        (Path(out) / "checkpoints" / "last.pt").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(dscl.pretrain, "pretrain", after_an_epoch)
    assert main(["run", "--preset", "smoke", "--out", "runs/b"]) == 130
    assert "continue with: dscl run --out runs/b --resume" in capsys.readouterr().err


def test_stage2_estimate_counts_the_forward_passes():
    from dscl.cli.train import stage2_forward_images
    from dscl.config import load_config

    cfg = load_config("smoke")  # cached, update_bn, 1 augmented copy, select=val
    assert stage2_forward_images(cfg, 240, 200, 10000) == 240 * 3 + 200 + 10000
    cfg.classifier.protocol, cfg.classifier.select = "official", "last"
    assert stage2_forward_images(cfg, 240, 200, 10000) == 240 * cfg.classifier.epochs + 240 + 10000


@needs_fmnist
def test_run_with_the_official_profile(tmp_path):
    """--profile official (issue #20): the official conventions in both stages, recorded in config.yaml
    and report.json / report.md; the queue starts full of random entries; a resume keeps the profile."""
    out = tmp_path / "run"
    res = run_cli("run", "--preset", "smoke", "--profile", "official", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["profile"] == "official"
    assert (cfg["model"]["patch_bn"], cfg["model"]["roi_aligned"], cfg["model"]["queue_init"]) == (
        "per-slot", False, "random")
    assert cfg["classifier"]["protocol"] == "official" and cfg["classifier"]["standardize"] is False
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert next(x for x in lines if x["stage"] == "pretrain")["queue_fill"] == 128  # full from step 1
    report = json.loads((out / "report.json").read_text())
    assert report["profile"] == "official"
    assert report["conventions"] == {"patch_bn": "per-slot", "roi_aligned": False, "queue_init": "random",
                                     "classifier_protocol": "official", "classifier_standardize": False}
    assert "Profile official: patch BatchNorm per-slot, roi_align aligned=False" in (out / "report.md").read_text()
    res = run_cli("pretrain", "--out", str(out), "--resume", "--profile", "default", "--no-progress")
    assert res.returncode == 2 and "trained with profile official" in res.stderr


@needs_fmnist
def test_classify_and_evaluate_take_overrides_but_not_stage1_keys(smoke_run, tmp_path, capsys):
    """Issue #21: `classify` / `evaluate` take section.key=value overrides and --data-root; keys that
    describe stage 1 (or, for evaluate, the trained classifier) are refused before anything changes."""
    import shutil

    from dscl.cli import main

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = (run / "config.yaml").read_text()
    assert main(["classify", "--run", str(run), "model.dim=64", "--no-progress"]) == 2
    assert "cannot change model.dim" in capsys.readouterr().err and (run / "config.yaml").read_text() == before
    assert main(["classify", "--run", str(run), "classifier.epochs=2", "classifier.milestones=[1]",
                 "--no-progress"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["classifier"]["epochs"] == 2 and cfg["classifier"]["milestones"] == [1]
    assert main(["evaluate", "--run", str(run), "classifier.epochs=5", "--no-progress"]) == 2
    assert "cannot change classifier.epochs" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run), "eval.few_threshold=10", "eval.many_threshold=30",
                 "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shot_classes"] == {"many": 3, "medium": 5, "few": 2}  # smoke counts 60 46 36 | 28 .. 10 | 7 6
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["many_threshold"] == 30


@needs_fmnist
def test_a_run_trained_in_fp16_is_classified_and_evaluated_on_a_cpu(smoke_run, tmp_path, capsys):
    """Issue #22 item 5: stage 2, evaluation and predict pick the precision of the device they run on
    (float32 on a CPU), never refusing because stage 1 trained with fp16 / bf16 on a GPU; evaluation and
    predict agree."""
    import shutil

    from dscl.cli import main
    from dscl.runtime import frozen_dtype

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = (run / "config.yaml").read_text()
    assert "amp: none" in cfg
    (run / "config.yaml").write_text(cfg.replace("amp: none", "amp: fp16"))  # as a GPU run writes it
    assert main(["classify", "--run", str(run), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--device", "cpu", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] > 10
    assert frozen_dtype("fp16", torch.device("cpu")) is None and frozen_dtype("bf16", torch.device("cpu")) is None
    assert frozen_dtype("none", torch.device("cuda")) is None
    assert frozen_dtype("fp16", torch.device("cuda")) is torch.float16
