"""``dscl predict | embed | export | import | ensemble`` end to end: one subprocess per command, on the
smoke run and on a tiny class-folder dataset whose images come in every PIL mode users feed."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_fmnist, run_cli
from dscl.checkpoint import load_checkpoint
from dscl.cli import main
from dscl.data.core import decode_image
from dscl.data.readers import FMNIST_CLASSES
from test_interop import official_from_dscl

CLASSES = ("ants", "bees", "cats")
MODES = ("L", "RGB", "RGBA", "P", "I;16", "EXIF")


def _save(path: Path, k: int, cls: int, rng: np.random.Generator) -> None:
    """Image k of class ``cls`` (its colour channel brighter) in mode MODES[k % 6]."""
    base = rng.integers(0, 60, (24, 20, 3)).astype(np.uint8)
    base[..., cls] += 150
    mode = MODES[k % len(MODES)]
    if mode == "L":
        Image.fromarray(base).convert("L").save(path.with_suffix(".png"))
    elif mode == "RGB":
        Image.fromarray(base).save(path.with_suffix(".png"))
    elif mode == "RGBA":
        Image.fromarray(np.dstack([base, np.full(base.shape[:2], 200, np.uint8)])).save(path.with_suffix(".png"))
    elif mode == "P":
        Image.fromarray(base).convert("P").save(path.with_suffix(".gif"))
    elif mode == "I;16":
        Image.fromarray(base[..., cls].astype(np.uint16) * 257).save(path.with_suffix(".png"))
    else:
        exif = Image.Exif()
        exif[0x0112] = 6  # displayed rotated by 90 degrees
        Image.fromarray(base).save(path.with_suffix(".jpg"), exif=exif)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    """A finished run on a 3-class folder dataset (train 12/6/3 images, test 3 per class), all modes mixed."""
    from dscl.classify import classify
    from dscl.config import load_config
    from dscl.evaluation import evaluate
    from dscl.pretrain import pretrain

    base = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, counts in (("train", (12, 6, 3)), ("test", (3, 3, 3))):
        for cls, name in enumerate(CLASSES):
            (base / "data" / split / name).mkdir(parents=True)
            for k in range(counts[cls]):
                _save(base / "data" / split / name / str(k), k, cls, rng)
    cfg = load_config("smoke", overrides=[
        "data.dataset=folder", f"data.data_root={base / 'data'}", "data.image_size=16", "views.patch_size=8",
        "optim.batch_size=8", "model.queue_size=16", "optim.epochs=1", "classifier.batch_size=16",
        "classifier.epochs=2", "classifier.milestones=[1]"])
    run = base / "run"
    pretrain(cfg, run, device="cpu", progress=False)
    classify(run, cfg=cfg, device="cpu", progress=False)
    evaluate(run, cfg=cfg, device="cpu", progress=False)
    return run


def _test_dir(run: Path) -> Path:
    return run.parent / "data" / "test"


def _labelled_list(run: Path, tmp_path: Path) -> Path:
    lines = [f"{p.relative_to(_test_dir(run))} {CLASSES.index(p.parent.name)}"
             for p in sorted(_test_dir(run).rglob("*.*"))]
    path = tmp_path / "test_list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_predict_on_a_folder_run_with_mixed_image_modes(folder_run: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    listing = _labelled_list(folder_run, tmp_path)
    out = tmp_path / "preds.csv"
    res = run_cli("predict", "--run", str(folder_run), str(_test_dir(folder_run)), str(tmp_path / "broken.png"),
                  str(listing), "--data-root", str(_test_dir(folder_run)), "--top-k", "2", "--out", str(out),
                  "--no-progress")
    assert res.returncode == 2, res.stderr  # one unreadable file: an error row, a count, a non-zero exit
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 9 + 1 + 9
    assert list(rows[0]) == ["path", "label", "class_1", "prob_1", "class_2", "prob_2", "error"]
    broken = [r for r in rows if r["error"]]
    assert [Path(r["path"]).name for r in broken] == ["broken.png"] and "cannot read" in broken[0]["error"]
    good = [r for r in rows if not r["error"]]
    assert all(r["class_1"] in CLASSES and 0 <= float(r["prob_1"]) <= 1 for r in good)
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in good)
    assert [r["label"] for r in rows[-9:]] == [name for name in CLASSES for _ in range(3)]
    assert "predicted 18 of 19 images" in res.stdout and "9 labelled images" in res.stdout
    assert "Medium" in res.stdout and "1 file(s) could not be read" in res.stdout
    assert "Traceback" not in res.stderr


def test_predict_jsonl_and_bad_input(folder_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--run", str(folder_run), str(_test_dir(folder_run) / "ants"), "--out", str(out),
                 "--top-k", "9", "--variant", "tau-norm", "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(len(r["top_k"]) == 3 and r["error"] is None for r in records)
    assert main(["predict", "--run", str(folder_run), str(_test_dir(folder_run)), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(folder_run, bare)
    (bare / "checkpoints" / "classifier.pt").unlink()
    assert main(["predict", "--run", str(bare), str(_test_dir(folder_run))]) == 2
    assert "dscl classify --run" in capsys.readouterr().err


def test_embed_writes_features_paths_and_labels(folder_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.npz"
    res = run_cli("embed", "--run", str(folder_run), str(_test_dir(folder_run) / "bees"),
                  str(_labelled_list(folder_run, tmp_path)), "--data-root", str(_test_dir(folder_run)),
                  "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    data = np.load(out)
    assert data["features"].shape == (12, 256)
    assert np.allclose(np.linalg.norm(data["features"], axis=1), 1, atol=1e-5)
    assert len(data["paths"]) == 12 and list(data["class_names"]) == list(CLASSES)
    assert list(data["labels"]) == [-1] * 3 + [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(data["failed_paths"]) == 0


@needs_fmnist
def test_torchscript_export_gives_the_logits_of_predict(smoke_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(3)
    for k in range(6):
        _save(images / str(k), k, k % 3, rng)
    preds = tmp_path / "p.csv"
    assert main(["predict", "--run", str(smoke_run), str(images), "--out", str(preds), "--logits", "--top-k", "10",
                 "--no-progress"]) == 0
    model_file = tmp_path / "model.pt"
    res = run_cli("export", "--run", str(smoke_run), "--format", "torchscript", "--out", str(model_file))
    assert res.returncode == 0, res.stderr
    module = torch.jit.load(str(model_file))
    names = list(FMNIST_CLASSES)
    for row in csv.DictReader(preds.open()):
        assert row["class_1"] in names
        with torch.no_grad():
            logits = module(decode_image(row["path"]).permute(1, 2, 0).unsqueeze(0))[0]
        for i in range(1, 11):
            assert float(row[f"logit_{i}"]) == pytest.approx(float(logits[names.index(row[f"class_{i}"])]), abs=1e-5)


@needs_fmnist
def test_import_official_layout_then_classify_and_evaluate(smoke_run: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save(official_from_dscl(load_checkpoint(smoke_run / "checkpoints" / "last.pt")["model"]), ckpt)
    run = tmp_path / "imported"
    res = run_cli("import", "--checkpoint", str(ckpt), "--preset", "smoke", "--out", str(run))
    assert res.returncode == 0, res.stderr
    assert "official format" in res.stdout and "not imported" in res.stdout and "dscl classify" in res.stdout
    assert main(["classify", "--run", str(run), "--no-progress", "--device", "cpu"]) == 0
    assert main(["evaluate", "--run", str(run), "--no-progress", "--device", "cpu"]) == 0
    got, ref = (json.loads((r / "report.json").read_text()) for r in (run, smoke_run))
    # the same weights, the same stage 2: the same numbers as the run the checkpoint came from
    assert got["top1"] == pytest.approx(ref["top1"], abs=0.02)
    res = run_cli("import", "--checkpoint", str(ckpt), "--preset", "smoke", "--out", str(tmp_path / "r18"),
                  "model.backbone=resnet18")
    assert res.returncode == 2 and "model.backbone=convnet" in res.stderr and "nothing was written" in res.stderr
    assert not (tmp_path / "r18").exists()


@needs_fmnist
def test_ensemble_of_two_runs_writes_a_report(smoke_run: Path, folder_run: Path, tmp_path: Path, capsys) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(smoke_run, twin)
    out = tmp_path / "ens"
    res = run_cli("ensemble", "--runs", str(smoke_run), str(twin), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "ensemble of 2 runs" in res.stdout and "member 2" in res.stdout
    report = json.loads((out / "report.json").read_text())
    single = json.loads((smoke_run / "report.json").read_text())
    # two identical runs average to the same probabilities: the ensemble is that run
    assert report["top1"] == pytest.approx(single["top1"], abs=1e-6)
    assert [m["top1"] for m in report["members"]] == pytest.approx([single["top1"]] * 2, abs=1e-6)
    assert len(report["variants"]) == 2 and (out / "report.md").is_file()
    assert main(["ensemble", "--runs", str(smoke_run), str(folder_run), "--out", str(tmp_path / "mixed"),
                 "--no-progress", "--device", "cpu"]) == 2
    assert "different datasets" in capsys.readouterr().err and not (tmp_path / "mixed").exists()


@needs_fmnist
def test_export_errors_exit_2(smoke_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", "--run", str(smoke_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'dscl[export]'" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
