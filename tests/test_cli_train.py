"""cli/train.py: ``dscl pretrain | classify | evaluate | run`` — their argument checks and errors
(in-process), the stage-2 estimate, and real runs on a file dataset and with the official profile."""

import csv
import json

import pytest
import torch
import yaml

from conftest import check_report, needs_fmnist, run_cli, write_png_dataset
from dscl.cli import main
from dscl.cli.train import stage2_estimate, stage2_forward_images, warn_missing_classes
from dscl.config import dump_config, load_config


def test_failed_start_leaves_no_directory_behind(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "imagenet-lt", "--out", str(out), "--data-root", str(tmp_path)]) == 2
    assert "ImageNet_LT_train.txt" in capsys.readouterr().err
    assert not out.exists()  # the corrected retry is not blocked by a half-made run directory


def test_stage2_without_stage1_names_the_missing_file(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("data:\n  dataset: fmnist-lt\n")
    assert main(["classify", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "does not exist" in err
    assert main(["evaluate", "--run", str(tmp_path / "nothing")]) == 2
    assert "config.yaml" in capsys.readouterr().err


@pytest.mark.slow  # trains stage 1 and 2 in a subprocess
def test_run_on_split_file_png_dataset(tmp_path):
    root = tmp_path / "data"
    write_png_dataset(root)
    out = tmp_path / "run"
    res = run_cli("run", "--preset", "smoke", "--out", str(out), "--no-progress", "--data-root", str(root),
                  "data.dataset=split", f"data.train_list={root / 'train.txt'}",
                  f"data.test_list={root / 'test.txt'}", "data.image_size=32", "optim.batch_size=8",
                  "views.patch_size=16", "data.val_fraction=0.2")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    check_report(report, 3)
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


def test_stage2_estimate_counts_the_forward_passes():
    cfg = load_config("smoke")  # cached, update_bn, 1 augmented copy, select=val
    assert stage2_forward_images(cfg, 240, 200, 10000) == 240 * 3 + 200 + 10000
    cfg.classifier.protocol, cfg.classifier.select = "official", "last"
    assert stage2_forward_images(cfg, 240, 200, 10000) == 240 * cfg.classifier.epochs + 240 + 10000


@needs_fmnist
@pytest.mark.slow  # trains stage 1 and 2 in a subprocess
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
                                     "classifier_protocol": "official", "classifier_standardize": False,
                                     "augmentation": {"views": "none", "classifier": "none"}}
    md = (out / "report.md").read_text()
    assert "Profile official: patch BatchNorm per-slot, roi_align aligned=False" in md
    assert "Augmentation policy: stage 1 none; stage 2 none" in md
    res = run_cli("pretrain", "--out", str(out), "--resume", "--profile", "default", "--no-progress")
    assert res.returncode == 2 and "trained with profile official" in res.stderr


@needs_fmnist
@pytest.mark.slow  # trains stage 2 and evaluates twice
def test_classify_and_evaluate_take_overrides_but_not_stage1_keys(smoke_run, tmp_path, capsys):
    """Issue #21: `classify` / `evaluate` take section.key=value overrides and --data-root; keys that
    describe stage 1 (or, for evaluate, the trained classifier) are refused before anything changes."""
    import shutil

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
@pytest.mark.slow  # trains stage 2 and evaluates
def test_a_run_trained_in_fp16_is_classified_and_evaluated_on_a_cpu(smoke_run, tmp_path, capsys):
    """Issue #22 item 5: stage 2, evaluation and predict pick the precision of the device they run on
    (float32 on a CPU), never refusing because stage 1 trained with fp16 / bf16 on a GPU; evaluation and
    predict agree."""
    import shutil

    from dscl.runtime import frozen_dtype

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = (run / "config.yaml").read_text()
    assert "amp: none" in cfg
    (run / "config.yaml").write_text(cfg.replace("amp: none", "amp: fp16"))  # as a GPU run writes it
    summary = json.loads((run / "checkpoints" / "last.json").read_text())
    summary["config"]["optim"]["amp"] = "fp16"  # and as its checkpoint records it (config.yaml must agree)
    (run / "checkpoints" / "last.json").write_text(json.dumps(summary))
    assert main(["classify", "--run", str(run), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--device", "cpu", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] > 10
    assert frozen_dtype("fp16", torch.device("cpu")) is None and frozen_dtype("bf16", torch.device("cpu")) is None
    assert frozen_dtype("none", torch.device("cuda")) is None
    assert frozen_dtype("fp16", torch.device("cuda")) is torch.float16


# ----------------------------------------------------------------------------------------------
# argument checks of the commands, before anything is loaded


def test_resume_without_out_is_refused(capsys):
    assert main(["run", "--preset", "smoke", "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # pretrain always needs --out
        main(["pretrain", "--preset", "smoke"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_evaluate_checks_data_out_and_split_before_loading_the_run(tmp_path, capsys):
    run = str(tmp_path / "no-run")  # nothing is read: each check comes first
    assert main(["evaluate", "--run", run, str(tmp_path / "new-data")]) == 2
    assert "needs --out DIR" in capsys.readouterr().err
    assert main(["evaluate", "--run", run, str(tmp_path / "new-data"), "--out", str(tmp_path / "o"),
                 "--split", "val"]) == 2
    assert "--split chooses a split of the run's own dataset" in capsys.readouterr().err
    assert main(["evaluate", "--run", run, "--out", str(tmp_path / "o")]) == 2
    assert "--out goes with DATA" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--run", run, "--split", "train"])
    assert exc.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_takes_an_override_where_data_would_stand(tmp_path, monkeypatch, capsys):
    """`dscl evaluate --run R eval.few_threshold=5`: argparse puts the override into DATA; it is an override."""
    import dscl.evaluation

    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config("smoke"), run / "config.yaml")
    seen = {}

    def evaluate(run_dir, *, split, cfg, device, progress):
        seen.update(run_dir=run_dir, split=split, few=cfg.eval.few_threshold, many=cfg.eval.many_threshold)
        return {"split": split, "top1": 50.0}

    monkeypatch.setattr(dscl.evaluation, "evaluate", evaluate)
    assert main(["evaluate", "--run", str(run), "eval.few_threshold=5", "--split", "val", "--json",
                 "eval.many_threshold=50"]) == 0
    assert seen == {"run_dir": str(run), "split": "val", "few": 5, "many": 50}
    assert json.loads(capsys.readouterr().out) == {"split": "val", "top1": 50.0}


def test_missing_classes_are_named_on_stdout_or_with_json_on_stderr(capsys):
    report = {"split": "test", "missing_classes": [{"class": "eel", "group": "few"}],
              "shot_classes": {"many": 0, "medium": 1, "few": 2}, "shot_classes_evaluated": {"many": 0, "medium": 1,
                                                                                             "few": 1}}
    warn_missing_classes(report)
    out, err = capsys.readouterr()
    assert "warning: 1 class has no image in the test split" in out and "eel" in out and err == ""
    warn_missing_classes(report, to_stderr=True)
    out, err = capsys.readouterr()
    assert out == "" and "eel" in err
    warn_missing_classes({"split": "test", "missing_classes": []})
    assert capsys.readouterr() == ("", "")


def test_stage2_estimate_from_stage1_speed(tmp_path):
    from types import SimpleNamespace

    cfg = load_config("smoke")  # cached protocol, validation split used for selection
    splits = SimpleNamespace(train=range(21), val=range(5), test=range(12))
    run = tmp_path / "run"
    run.mkdir()
    assert stage2_estimate(cfg, run, splits) is None  # no metrics.jsonl yet
    (run / "metrics.jsonl").write_text(json.dumps({"stage": "pretrain_epoch", "epoch": 1}) + "\n")
    assert stage2_estimate(cfg, run, splits) is None  # no speed measured
    rates = [1000.0] * 5 + [10.0] * 10 + [30.0] * 10  # only the last 20 count: median 20
    lines = [{"stage": "pretrain", "img_per_s": r} for r in rates] + [{"stage": "classify", "img_per_s": 5.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    images = stage2_forward_images(cfg, 21, 5, 12)
    assert images == 21 * (int(cfg.classifier.update_bn) + 1 + cfg.classifier.augmented_copies) + 5 + 12
    assert stage2_estimate(cfg, run, splits) == pytest.approx(images / (4 * 20.0))
    no_val = SimpleNamespace(train=range(21), val=None, test=range(12))
    assert stage2_estimate(cfg, run, no_val) == pytest.approx(stage2_forward_images(cfg, 21, 0, 12) / 80.0)


# ----------------------------------------------------------------------------------------------
# issue 28 item 7: the first job of a cluster user writes its log into --out before dscl starts


@needs_fmnist
def test_resume_auto_starts_a_run_beside_files_that_are_not_a_run_and_keeps_them(tmp_path, monkeypatch, capsys):
    import dscl.pretrain as pre

    out = tmp_path / "run"
    out.mkdir()
    (out / "slurm-4242.out").write_text("the job's log so far\n")
    trained = []
    monkeypatch.setattr(pre, "_train", lambda run, *a, **k: trained.append(run.out) or run.out / "checkpoints")
    args = ["pretrain", "--preset", "smoke", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main([*args, "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert trained == [out] and (out / "config.yaml").is_file()
    assert (out / "slurm-4242.out").read_text() == "the job's log so far\n"  # kept, untouched
    (line,) = [x for x in err.splitlines() if "slurm-4242.out" in x]
    assert "no dscl run" in line and "starting a new run" in line and "kept" in line


def test_resume_into_a_folder_of_other_files_says_how_to_start_there(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "slurm-4242.out").write_text("log\n")
    for flags in (["--resume"], []):
        assert main(["pretrain", "--preset", "smoke", "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds no dscl run" in err and "slurm-4242.out" in err and "--resume auto" in err, err
        assert "not a dscl run directory" not in err and "pass --resume to continue" not in err
    assert sorted(p.name for p in out.iterdir()) == ["slurm-4242.out"]


# ---------------------------------------------------------------------------------------------------------------
# timm / open_clip backbones through the commands (issue 29)

VIT_ARGS = "model.backbone_args={depth: 2, embed_dim: 64, num_heads: 2}"  # a ViT-tiny shrunk to seconds on a CPU


def _timm_vit_file(path, **args) -> str:
    """Random timm ViT weights in timm's own layout (its ImageNet head included), as a .safetensors file."""
    timm = pytest.importorskip("timm", reason="the optional timm extra is not installed")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **args)
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@needs_fmnist
def test_pretrain_refuses_pretrained_weights_of_the_wrong_shape_naming_the_key(tmp_path, capsys):
    weights = _timm_vit_file(tmp_path / "vit.safetensors", depth=2, embed_dim=48, num_heads=2)
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "smoke", "--out", str(out), "model.backbone=timm:vit_tiny_patch16_224",
                 VIT_ARGS, f"model.pretrained={weights}", "data.image_size=64", "views.patch_size=32"]) == 2
    err = capsys.readouterr().err
    assert f"pretrained weights {weights} do not fit backbone timm:vit_tiny_patch16_224" in err
    assert "blocks.0.attn.proj.weight (48, 48) vs model (64, 64)" in err and "a timm ViT" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@needs_fmnist
@pytest.mark.slow  # two stages and four commands of a ViT (about a minute on 2 CPU cores)
def test_vit_tiny_from_a_local_safetensors_file_trains_classifies_evaluates_predicts_and_exports(tmp_path, capsys):
    """The README's ViT command: timm's ViT-tiny (shrunk) from a local file, Fashion-MNIST upsampled to 64 px;
    the TorchScript export gives the Predictor's logits on uint8 images."""
    from dscl import load_run

    weights = _timm_vit_file(tmp_path / "vit_tiny.safetensors", depth=2, embed_dim=64, num_heads=2)
    run = tmp_path / "vit"
    overrides = ["model.backbone=timm:vit_tiny_patch16_224", VIT_ARGS, f"model.pretrained={weights}",
                 "data.image_size=64", "views.patch_size=32"]
    assert main(["pretrain", "--preset", "smoke", "--out", str(run), "--no-progress", *overrides]) == 0
    assert main(["classify", "--run", str(run), "--no-progress"]) == 0
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    report = json.loads((run / "report.json").read_text())
    spec = report["backbone"]
    assert (spec["family"], spec["name"], spec["args"]) == ("timm", "vit_tiny_patch16_224",
                                                            {"depth": 2, "embed_dim": 64, "num_heads": 2})
    assert spec["input_source"] == "pretrained" and spec["interpolation"] == "bicubic"  # timm's config for it
    assert 0 <= report["top1"] <= 100 and sum(r["test_count"] for r in report["per_class"]) == 10000
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (3, 45, 38, 3), dtype=torch.uint8, generator=g)
    from PIL import Image

    for i, img in enumerate(batch):
        Image.fromarray(img.numpy()).save(images / f"{i}.png")
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(images), "--out", str(tmp_path / "pred.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 3
    assert main(["export", "--run", str(run), "--format", "torchscript", "--out", str(tmp_path / "vit.pt")]) == 0
    assert "bicubic" in capsys.readouterr().out  # the recipe says how the export resizes
    module = torch.jit.load(str(tmp_path / "vit.pt"))
    p = load_run(run)
    with torch.no_grad():
        torch.testing.assert_close(module(batch), p.logits(batch), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(module(batch), p.logits(sorted(images.iterdir())), rtol=1e-4, atol=1e-4)
