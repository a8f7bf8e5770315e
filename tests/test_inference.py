"""dscl.inference: load_run -> Predictor (its input conversion: test_data_preprocess.py), ensembles."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import needs_fmnist
from dscl import Predictor, load_run
from dscl.data import DataError, EvalTransform, build_datasets
from dscl.data.readers import FMNIST_CLASSES
from dscl.run import RunDirError, load_checkpoint, save_checkpoint

# ----------------------------------------------------------------------------------------------
# no dataset needed


# ----------------------------------------------------------------------------------------------
# a finished run as a model


def _mixed_images(folder: Path) -> list[Path]:
    """One image per PIL mode users feed: L, RGB, RGBA, P, 16-bit, an EXIF-rotated JPEG; various sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB").save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).convert("P").save(folder / "palette.gif")
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(folder / "exif.jpg", exif=exif)
    return sorted(folder.iterdir())


@needs_fmnist
def test_predictor_api_on_the_smoke_run(smoke_run: Path, tmp_path: Path) -> None:
    p = load_run(smoke_run)
    assert isinstance(p, Predictor) and p.class_names == list(FMNIST_CLASSES) and p.input_mode == "L"
    report = json.loads((smoke_run / "report.json").read_text())
    assert p.train_counts == [row["train_count"] for row in report["per_class"]]
    files = _mixed_images(tmp_path / "imgs")
    probs = p.predict(files)
    assert probs.shape == (len(files), 10) and torch.allclose(probs.sum(1), torch.ones(len(files)))
    # paths, PIL images and uint8 tensors of the same pictures give the same answer
    pil = [Image.open(f) for f in files]
    assert torch.allclose(p.predict(pil), probs)
    from dscl.data.core import decode_image

    assert torch.allclose(p.predict([decode_image(f) for f in files]), probs)
    # a uint8 NHWC batch equals the list of its images; a float NCHW batch in [0, 1] is accepted too
    batch = torch.randint(0, 256, (5, 28, 28, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(p.logits(batch), p.logits([im.permute(2, 0, 1) for im in batch]), atol=1e-6)
    # every input type README lists: numpy uint8 (N, H, W, C) and float (N, C, H, W) batches, numpy images
    assert torch.equal(p.logits(batch.numpy()), p.logits(batch))
    assert torch.equal(p.logits(batch.permute(0, 3, 1, 2).float().numpy() / 255),
                       p.logits(batch.permute(0, 3, 1, 2).float() / 255))
    assert torch.allclose(p.logits([im.numpy() for im in batch]), p.logits(batch), atol=1e-6)
    grey = batch[..., :1]  # (uint8 colour is rounded to integer grey, float colour is not)
    assert torch.allclose(p.logits(grey.permute(0, 3, 1, 2).float() / 255), p.logits(grey), atol=1e-4)
    # ONE name for the input conversion: p.transform (one image, picklable) and p.transform.batch (many)
    assert torch.equal(p.transform(files[1]), p.transform.batch(files[1:2])[0])
    assert torch.equal(p.transform.batch(batch), p.transform.batch(list(batch.permute(0, 3, 1, 2))))
    assert p.transform.image_size == p.image_size == 28 and p.transform.preprocess.grey
    assert not any(hasattr(p, old) for old in ("prepare", "image_transform", "preprocess"))
    emb = p.embed(files)
    assert emb.shape == (len(files), p.num_features) and torch.allclose(emb.norm(dim=1), torch.ones(len(files)))
    for variant in ("plain", "logit-adjust", "tau-norm", "ncm"):
        assert p.predict(files[:2], variant=variant).shape == (2, 10)
    with pytest.raises(ValueError, match="--variant"):
        p.predict(files[:1], variant="nope")
    with pytest.raises(ValueError, match="a batch"):
        p.predict(torch.zeros(3, 28, 28, dtype=torch.uint8))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png"):
        p.predict([tmp_path / "text.png"])


@needs_fmnist
def test_predictor_gives_the_evaluation_predictions(smoke_run: Path) -> None:
    # evaluate and predict load the run the same way: the Predictor on raw test images (uint8, one grey
    # channel, as a user would pass them) reproduces evaluate's predictions.csv
    p = load_run(smoke_run)
    splits = build_datasets(p.cfg.data, seed=p.cfg.optim.seed)
    n = 1000
    images = torch.from_numpy(np.stack([splits.test.load(i)[0].numpy() for i in range(n)]))[..., None]
    probs = p.predict(images)
    with (smoke_run / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))[:n]
    assert [int(r["prediction"]) for r in rows] == probs.argmax(1).tolist()
    assert [float(r["confidence"]) for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-4)


@needs_fmnist
def test_a_copied_run_predicts_without_the_dataset(smoke_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "copied"
    shutil.copytree(smoke_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["data_root"] = str(tmp_path / "no-such-folder")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.delenv("DSCL_DATA", raising=False)
    p = load_run(run)
    with pytest.raises(DataError):
        build_datasets(p.cfg.data)  # the dataset really is out of reach
    assert p.class_names == list(FMNIST_CLASSES)
    files = _mixed_images(tmp_path / "imgs")
    assert torch.allclose(p.predict(files), load_run(smoke_run).predict(files))

    # a run written before the names were stored needs the dataset once, and says so
    state = load_checkpoint(run / "checkpoints" / "classifier.pt")
    state["data"] = None
    save_checkpoint(run / "checkpoints" / "classifier.pt", state)
    with pytest.raises(RunDirError, match="(?s)predates stored class names.*dscl classify"):
        load_run(run)
    cfg["data"]["data_root"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    old = load_run(run)
    assert old.class_names == p.class_names and old.train_counts == p.train_counts and old.mean == p.mean


@needs_fmnist
def test_runs_without_a_classifier(smoke_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "stage1"
    shutil.copytree(smoke_run, run)
    (run / "checkpoints" / "classifier.pt").unlink()
    with pytest.raises(RunDirError, match="dscl classify --run"):
        load_run(run)
    p = load_run(run, stage1_ok=True)  # the stage-1 backbone still embeds
    assert p.embed(torch.zeros(2, 28, 28, 1, dtype=torch.uint8)).shape == (2, p.num_features)
    with pytest.raises(RunDirError, match="no classifier"):
        p.predict(torch.zeros(2, 28, 28, 1, dtype=torch.uint8))
    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# ensembles


@needs_fmnist
def test_tau_norm_of_a_classifier_on_raw_features(smoke_run: Path) -> None:
    """Issue 28: the smoke run's classifier is trained on raw features (classifier.standardize=false), rows of
    norm ~11-28; tau-norm divided them but kept the full bias, which then decided (67 -> 36 % at n_max=400).
    Each bias now goes with its row: at tau = 1 a class's (row, bias) scaled by s > 0 predicts the same."""
    p = load_run(smoke_run)
    assert p.feature_stats is None and not p.cfg.classifier.standardize and p.cfg.classifier.tau_norm == 1.0
    splits = build_datasets(p.cfg.data, seed=p.cfg.optim.seed)
    idx = range(0, 10000, 20)
    images = torch.from_numpy(np.stack([splits.test.load(i)[0].numpy() for i in idx]))[..., None]
    labels = torch.tensor([splits.test.targets[i] for i in idx])
    feats = p.features_of(p.transform.batch(images))
    before = {v: p.logits_from_features(feats, v) for v in ("plain", "tau-norm")}
    acc = {v: float((out.argmax(1) == labels).float().mean()) for v, out in before.items()}
    assert acc["tau-norm"] > acc["plain"] - 0.1, acc
    c = int(before["plain"].argmax(1).mode().values)  # the most predicted class
    with torch.no_grad():  # its pair made 0.1 as long: the plain classifier changes, tau-norm does not
        p.fc.weight[c] *= 0.1
        p.fc.bias[c] *= 0.1
    assert not torch.equal(p.logits_from_features(feats, "plain").argmax(1), before["plain"].argmax(1))
    torch.testing.assert_close(p.logits_from_features(feats, "tau-norm"), before["tau-norm"], rtol=1e-5, atol=1e-5)


@needs_fmnist
def test_tau_norm_of_a_standardised_classifier(smoke_run: Path, tmp_path: Path) -> None:
    """Issue #21: classifier.standardize stores its statistics; tau-norm at tau = 0 then gives exactly the
    plain classifier's logits, and tau = 1 stays far from chance (it read ~chance before the fix)."""
    from dscl.classify import classify
    from dscl.run import load_run_config

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    cfg = load_run_config(run)
    cfg.classifier.standardize = True
    classify(run, cfg=cfg, device="cpu", progress=False)
    state = load_checkpoint(run / "checkpoints" / "classifier.pt")
    assert set(state["feature_stats"]) == {"mean", "std"}
    p = load_run(run, cfg=cfg)
    assert p.feature_stats is not None
    feats = torch.randn(40, p.num_features).abs() * 2
    plain = p.logits_from_features(feats, "plain")
    p.cfg.classifier.tau_norm = 0.0
    assert torch.equal(p.logits_from_features(feats, "tau-norm"), plain)
    splits = build_datasets(cfg.data, seed=cfg.optim.seed)
    images = torch.stack([splits.test.with_transform(EvalTransform(28, splits.mean, splits.std))[i][0]
                          for i in range(0, 10000, 25)])
    labels = torch.tensor([splits.test.targets[i] for i in range(0, 10000, 25)])
    test_feats = p.features_of(images)
    p.cfg.classifier.tau_norm = 1.0
    acc = {v: float((p.logits_from_features(test_feats, v).argmax(1) == labels).float().mean())
           for v in ("plain", "tau-norm")}
    assert acc["tau-norm"] > acc["plain"] - 0.15 and acc["tau-norm"] > 0.3, acc
