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
from dscl.cli import main
from dscl.data.core import decode_image
from dscl.data.readers import FMNIST_CLASSES
from dscl.run import load_checkpoint, save_checkpoint
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
    assert list(rows[0]) == ["path", "label", "class_1", "index_1", "prob_1", "class_2", "index_2", "prob_2", "error"]
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
    assert len(records) == 3 and all(r["error"] is None for r in records)
    assert all(r[f"class_{i}"] == CLASSES[r[f"index_{i}"]] for r in records for i in (1, 2, 3))
    assert main(["predict", "--run", str(folder_run), str(_test_dir(folder_run)), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(folder_run, bare)
    (bare / "checkpoints" / "classifier.pt").unlink()
    assert main(["predict", "--run", str(bare), str(_test_dir(folder_run))]) == 2
    assert "dscl classify --run" in capsys.readouterr().err


def test_predict_files_are_whole_or_absent(folder_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Issue #21: CSV and JSONL hold the same columns (class indices, --all-probs); an unknown extension is
    refused; an interrupted or failed predict leaves nothing under the final name, so the rerun works."""
    images = str(_test_dir(folder_run))
    csv_out, jsonl_out = tmp_path / "p.csv", tmp_path / "p.jsonl"
    for out in (csv_out, jsonl_out):
        assert main(["predict", "--run", str(folder_run), images, "--out", str(out), "--all-probs", "--logits",
                     "--top-k", "2", "--no-progress"]) == 0
    rows = list(csv.DictReader(csv_out.open()))
    records = [json.loads(line) for line in jsonl_out.read_text().splitlines()]
    assert list(rows[0]) == list(records[0]) and len(rows) == len(records) == 9
    assert [f"prob:{c}" for c in CLASSES] == [c for c in rows[0] if c.startswith("prob:")]
    for row, rec in zip(rows, records, strict=True):
        assert row["path"] == rec["path"] and int(row["index_1"]) == rec["index_1"]
        assert sum(rec[f"prob:{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-6)
        assert rec[f"prob:{rec['class_1']}"] == pytest.approx(rec["prob_1"])
    bad = tmp_path / "p.json"
    assert main(["predict", "--run", str(folder_run), images, "--out", str(bad), "--no-progress"]) == 2
    assert "CSV (.csv) or JSON lines (.jsonl)" in capsys.readouterr().err and not bad.exists()

    import dscl.data.inputs as inputs  # where `dscl predict` looks it up at call time

    real = inputs.iter_files

    def interrupted(*args, **kwargs):
        for n, batch in enumerate(real(*args, **kwargs)):
            if n:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(inputs, "iter_files", interrupted)
    out = tmp_path / "interrupted.csv"
    assert main(["predict", "--run", str(folder_run), images, "--out", str(out), "--batch-size", "2",
                 "--no-progress"]) == 130
    assert not out.exists() and not list(tmp_path.glob(".interrupted.csv.*"))  # no partial file, no temp left
    monkeypatch.setattr(inputs, "iter_files", real)
    assert main(["predict", "--run", str(folder_run), images, "--out", str(out), "--no-progress"]) == 0
    assert len(list(csv.DictReader(out.open()))) == 9

    no_means = tmp_path / "no_means"  # an imported classifier has no class means: ncm fails
    shutil.copytree(folder_run, no_means)
    state = load_checkpoint(no_means / "checkpoints" / "classifier.pt")
    save_checkpoint(no_means / "checkpoints" / "classifier.pt", {**state, "class_means": None})
    ncm = tmp_path / "ncm.csv"
    assert main(["predict", "--run", str(no_means), images, "--out", str(ncm), "--variant", "ncm",
                 "--no-progress"]) == 2
    assert "class means" in capsys.readouterr().err and not ncm.exists()


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
            # float32 agreement: a few units in the last place of logits up to ~50 in size (the CSV keeps 8 digits)
            expected = float(logits[names.index(row[f"class_{i}"])])
            assert float(row[f"logit_{i}"]) == pytest.approx(expected, rel=1e-6, abs=1e-5)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@needs_fmnist
def test_an_ensemble_predicts_like_its_averaged_members(smoke_run: Path, tmp_path: Path, capsys) -> None:
    """Issue #21: `dscl predict --run ENSEMBLE` gives the members' averaged softmax; embed / export say why
    an ensemble cannot."""
    from dscl.classify import classify
    from dscl.inference import load_model, load_run
    from dscl.run import load_run_config

    other = tmp_path / "other"
    shutil.copytree(smoke_run, other)
    cfg = load_run_config(other)
    cfg.classifier.epochs, cfg.classifier.milestones = 1, (1,)
    classify(other, cfg=cfg, device="cpu", progress=False)
    ens = tmp_path / "ens"
    assert main(["ensemble", "--runs", str(smoke_run), str(other), "--out", str(ens), "--no-progress"]) == 0
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(7)
    for k in range(5):
        _save(images / str(k), k, k % 3, rng)
    files = sorted(str(f) for f in images.iterdir())
    members = [load_run(r) for r in (smoke_run, other)]
    want = (members[0].predict(files) + members[1].predict(files)) / 2
    assert not torch.allclose(members[0].predict(files), members[1].predict(files), atol=1e-3)
    model = load_model(ens)
    torch.testing.assert_close(model.predict(files), want, rtol=1e-5, atol=1e-6)
    out = tmp_path / "ens.csv"
    assert main(["predict", "--run", str(ens), str(images), "--out", str(out), "--all-probs", "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    got = torch.tensor([[float(r[f"prob:{c}"]) for c in FMNIST_CLASSES] for r in rows])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert main(["embed", "--run", str(ens), str(images), "--out", str(tmp_path / "e.npz")]) == 2
    assert "an ensemble of runs" in capsys.readouterr().err
    assert main(["export", "--run", str(ens), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    assert "an ensemble of runs" in capsys.readouterr().err


@needs_fmnist
def test_export_errors_exit_2(smoke_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", "--run", str(smoke_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'dscl-lt[export]'" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
@needs_fmnist
def test_state_dict_export_imports_back(smoke_run: Path, tmp_path: Path) -> None:
    """Issue #21: `dscl export --format state-dict` -> `dscl import` is a run with the same predictions and
    the same report rows (tau-norm of a standardised classifier included); its report names the source
    and claims no method, epochs or precision it does not know."""
    from dscl.classify import classify
    from dscl.run import load_run_config

    run = tmp_path / "standardised"
    shutil.copytree(smoke_run, run)
    cfg = load_run_config(run)
    cfg.classifier.standardize = True
    classify(run, cfg=cfg, device="cpu", progress=False)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("standardize: false",
                                                                               "standardize: true"))
    sd = tmp_path / "sd.pt"
    assert main(["export", "--run", str(run), "--format", "state-dict", "--out", str(sd)]) == 0
    back = tmp_path / "back"
    assert main(["import", "--checkpoint", str(sd), "--out", str(back), "--preset", "smoke"]) == 0
    assert load_checkpoint(back / "checkpoints" / "classifier.pt")["protocol"] == "imported"
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(5)
    for k in range(4):
        _save(images / str(k), k, k % 3, rng)
    rows = {}
    for r in (run, back):
        out = tmp_path / f"{r.name}.csv"
        assert main(["predict", "--run", str(r), str(images), "--out", str(out), "--logits", "--no-progress"]) == 0
        rows[r.name] = list(csv.DictReader(out.open()))
    for a, b in zip(rows[run.name], rows["back"], strict=True):
        assert a["class_1"] == b["class_1"] and float(a["logit_1"]) == pytest.approx(float(b["logit_1"]), abs=1e-5)
    reports = {}
    for r in (run, back):
        assert main(["evaluate", "--run", str(r), "--no-progress"]) == 0
        reports[r.name] = json.loads((r / "report.json").read_text())
    mine, imported = reports[run.name], reports["back"]
    assert imported["top1"] == pytest.approx(mine["top1"])
    tau = [v for v in imported["variants"] if v["method"].startswith("+ tau")]
    assert tau and tau[0]["top1"] == pytest.approx(next(v for v in mine["variants"]
                                                        if v["method"].startswith("+ tau"))["top1"])
    assert imported["method"] == "imported dscl checkpoint" and imported["epochs"] is None
    assert imported["precision"] is None and imported["imported"]["from"] == str(sd.resolve())
    assert "conventions" not in imported and imported["expected"] is None
    text = (back / "report.md").read_text()
    assert f"Imported from {sd.resolve()}" in text and "epochs: unknown" in text


def test_evaluate_new_labelled_data(folder_run: Path, tmp_path: Path, capsys) -> None:
    """Issue #21: `dscl evaluate --run RUN DATA --out DIR` on a class-folder tree or a labelled list (names or
    indices): the usual report files, groups from the run's training counts, missing classes reported,
    unknown classes refused by name, nothing written on errors."""
    test = _test_dir(folder_run)
    own = json.loads((folder_run / "report.json").read_text())
    out = tmp_path / "tree"
    assert main(["evaluate", "--run", str(folder_run), str(test), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["top1"] == pytest.approx(own["top1"]) and report["split"] == "data"
    assert [r["train_count"] for r in report["per_class"]] == [12, 6, 3]
    for name in ("report.md", "per_class.csv", "confusion.csv", "predictions.csv", "plots/per_class_accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    assert report["data_source"] == str(test.resolve()) and "expected" in report and report["expected"] is None
    assert len(list(csv.DictReader((out / "predictions.csv").open()))) == 9

    names = tmp_path / "names.txt"  # class names, and only two classes: the third is missing
    names.write_text("".join(f"{p.relative_to(test)}\t{p.parent.name}\n" for p in sorted(test.rglob("*.*"))
                             if p.parent.name != "cats"))
    out2 = tmp_path / "names"
    assert main(["evaluate", "--run", str(folder_run), str(names), "--data-root", str(test), "--out", str(out2),
                 "--no-progress"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert [m["class"] for m in rep2["missing_classes"]] == ["cats"]
    assert "cats" in capsys.readouterr().out
    indices = tmp_path / "idx.txt"
    indices.write_text("".join(f"{p.relative_to(test)} {CLASSES.index(p.parent.name)}\n"
                               for p in sorted(test.rglob("*.*"))))
    out3 = tmp_path / "idx"
    assert main(["evaluate", "--run", str(folder_run), str(indices), "--data-root", str(test), "--out", str(out3),
                 "--no-progress"]) == 0
    assert json.loads((out3 / "report.json").read_text())["top1"] == pytest.approx(own["top1"])
    assert "0 = ants, 1 = bees, 2 = cats" in capsys.readouterr().err

    bad = tmp_path / "bad"
    shutil.copytree(test, bad)
    (bad / "dogs").mkdir()
    out4 = tmp_path / "bad_out"
    assert main(["evaluate", "--run", str(folder_run), str(bad), "--out", str(out4), "--no-progress"]) == 2
    assert "class folder(s) dogs are not classes of the run" in capsys.readouterr().err and not out4.exists()
    shutil.rmtree(bad / "dogs")
    (bad / "ants" / "broken.png").write_bytes(b"no image")
    assert main(["evaluate", "--run", str(folder_run), str(bad), "--out", str(out4), "--no-progress"]) == 2
    assert "broken.png" in capsys.readouterr().err and not out4.exists()
    assert main(["evaluate", "--run", str(folder_run), str(test), "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(folder_run), str(test), "--no-progress"]) == 2
    assert "needs --out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- issue 28 items 12-15


def _fmnist_class_folders(root: Path) -> Path:
    """Two 28 x 28 images per class of the default dataset, in folders named like its classes; T-shirt/top,
    whose name cannot be a folder's, in its folder-safe spelling T-shirt_top."""
    rng = np.random.default_rng(3)
    for name in FMNIST_CLASSES:
        folder = root / name.replace("/", "_")
        folder.mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{k}.png")
    return root


@needs_fmnist
def test_evaluate_an_ensemble_folder_on_a_default_dataset_folder_tree(smoke_run: Path, tmp_path: Path,
                                                                       capsys) -> None:
    """Items 12 and 13: `dscl evaluate --run ENSEMBLE DATA` works like a run (it said config.yaml does not
    exist), on a class-folder tree of Fashion-MNIST (T-shirt/top read from T-shirt_top, the mapping printed)."""
    tree = _fmnist_class_folders(tmp_path / "tree")
    twin = tmp_path / "twin"
    shutil.copytree(smoke_run, twin)
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "ensemble.json").write_text(json.dumps({"format": "dscl-ensemble", "weights": "equal softmax average",
                                                   "members": [str(smoke_run.resolve()), str(twin.resolve())]}))
    out = tmp_path / "out"
    assert main(["evaluate", "--run", str(ens), str(tree), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "T-shirt_top = T-shirt/top" in captured.err and "ensemble of 2 runs" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "ensemble of 2 runs" and sum(r["test_count"] for r in report["per_class"]) == 20
    single = tmp_path / "single"
    assert main(["evaluate", "--run", str(smoke_run), str(tree), "--out", str(single), "--no-progress"]) == 0
    assert report["top1"] == pytest.approx(json.loads((single / "report.json").read_text())["top1"])
    # without DATA, or with overrides, an ensemble folder says what it can do
    capsys.readouterr()
    assert main(["evaluate", "--run", str(ens), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ensemble folder" in err and "DATA" in err and "config.yaml does not exist" not in err
    assert main(["evaluate", "--run", str(ens), str(tree), "--out", str(tmp_path / "o2"), "eval.few_threshold=5",
                 "--no-progress"]) == 2
    assert "ensemble folder" in capsys.readouterr().err and not (tmp_path / "o2").exists()


@needs_fmnist
def test_every_out_under_a_file_or_onto_a_file_is_one_line(smoke_run: Path, tmp_path: Path, capsys) -> None:
    """Item 14: --out under a file, or onto a file with --overwrite, was a NotADirectoryError /
    FileExistsError traceback; now every command says so in one line, exits 2 and leaves the file alone."""
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    tree = _fmnist_class_folders(tmp_path / "tree")
    under, onto = str(blocker / "sub"), str(blocker)
    smoke, ckpt = str(smoke_run), str(smoke_run / "checkpoints" / "last.pt")
    twin = shutil.copytree(smoke_run, tmp_path / "twin")
    commands = [
        ["pretrain", "--preset", "smoke", "--out", under],
        ["pretrain", "--preset", "smoke", "--out", onto, "--overwrite"],
        ["run", "--preset", "smoke", "--out", under],
        ["evaluate", "--run", smoke, str(tree), "--out", under],
        ["evaluate", "--run", smoke, str(tree), "--out", onto, "--overwrite"],
        ["ensemble", "--runs", smoke, str(twin), "--out", under],
        ["ensemble", "--runs", smoke, str(twin), "--out", onto, "--overwrite"],
        ["compare", "--preset", "smoke", "--methods", "ce", "--seeds", "0", "--out", under],
        ["compare", "--preset", "smoke", "--methods", "ce", "--seeds", "0", "--out", onto],
        ["sweep", "--preset", "smoke", "--param", "alpha=0.1,0.2", "--out", onto],
        ["analyze", "retrieval", "--run", smoke, "--out", under],
        ["analyze", "gradient-ratio", "--run", smoke, "--out", onto],
        ["predict", "--run", smoke, str(tree), "--out", under + ".csv"],
        ["embed", "--run", smoke, str(tree), "--out", under + ".npz"],
        ["export", "--run", smoke, "--format", "torchscript", "--out", under + ".pt"],
        ["import", "--checkpoint", ckpt, "--preset", "smoke", "--out", under],
        ["import", "--checkpoint", ckpt, "--preset", "smoke", "--out", onto, "--overwrite"],
    ]
    for argv in commands:
        assert main([*argv, "--no-progress"] if argv[0] != "export" else argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Errno" not in err and "internal error" not in err, (argv, err)
        assert f"{blocker} is a file, not a folder" in err, (argv, err)
        assert blocker.read_text() == "keep"
