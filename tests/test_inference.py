"""dscl.inference: load_run -> Predictor, the input conversion, inputs of `dscl predict`, ensembles."""

from __future__ import annotations

import csv
import dataclasses
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
from dscl.checkpoint import load_checkpoint, save_checkpoint
from dscl.config import load_config
from dscl.data import DataError, EvalTransform, build_datasets
from dscl.data.readers import FMNIST_CLASSES
from dscl.evaluation import chance_warning
from dscl.inference import Preprocess, collect_inputs
from dscl.rundir import RunDirError

# ----------------------------------------------------------------------------------------------
# the input conversion (no dataset needed)


@pytest.mark.parametrize("size", [28, 32, 160])
def test_preprocess_equals_the_evaluation_transform_bit_for_bit(size: int) -> None:
    # The one conversion shared by evaluate / predict / export must be EvalTransform exactly (uint8 resize
    # kernel with its rounding, centre crop for >= 128 px, normalisation), or runs would change numbers.
    gen = torch.Generator().manual_seed(size)
    mean, std = (0.2, 0.4, 0.6), (0.3, 0.2, 0.25)
    pre = Preprocess(size, mean, std, grey=False)
    for h, w in ((size, size), (28, 28), (41, 33), (300, 199), (17, 250)):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        expected = EvalTransform(size, mean, std)(img)
        got = pre(img.permute(1, 2, 0).unsqueeze(0))[0]
        assert got.shape == (3, size, size)
        assert torch.equal(got, expected), (h, w, (got - expected).abs().max())


def test_grey_runs_convert_colour_like_pil_and_grey_is_replicated() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    grey = np.array(Image.fromarray(rgb).convert("L"))
    out = Preprocess(11, (0.0,) * 3, (1.0,) * 3, grey=True)(torch.from_numpy(rgb)[None])  # no resize at 9x11 -> 11x11
    pre = Preprocess(11, (0.0,) * 3, (1.0,) * 3, grey=True)
    chans = pre._channels(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    assert torch.equal(chans[0, 0], torch.from_numpy(grey)) and torch.equal(chans[0, 0], chans[0, 2])
    assert out.shape == (1, 3, 11, 11) and torch.equal(out[0, 0], out[0, 1])
    # float input: the same weights, no rounding
    f = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(pre._channels(f)[0, 0] * 255, torch.from_numpy(grey).float(), atol=0.51)
    # colour runs keep colour; a grey image is replicated (PIL's convert("RGB"))
    colour = Preprocess(11, (0.0,) * 3, (1.0,) * 3, grey=False)
    assert torch.equal(colour._channels(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0],
                       torch.from_numpy(rgb).permute(2, 0, 1))
    one = torch.from_numpy(grey)[None, :, :, None]
    assert torch.equal(colour(one), colour(one.expand(-1, -1, -1, 3)))
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
        colour(torch.zeros(1, 5, 5, 4, dtype=torch.uint8))


def test_chance_warning() -> None:
    assert chance_warning(14.9, 10) is not None and "WARNING" in chance_warning(14.9, 10)  # type: ignore[operator]
    assert chance_warning(15.1, 10) is None
    assert chance_warning(0.14, 1000) is not None and chance_warning(0.16, 1000) is None
    assert chance_warning(None, 10) is None


def test_collect_inputs(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "deep" / ".hidden").mkdir(parents=True)
    for rel in ("imgs/b.png", "imgs/a.JPG", "imgs/deep/c.webp", "imgs/deep/.hidden/x.png", "imgs/notes.txt"):
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "list.txt").write_text("imgs/b.png 1\n# comment\nimgs/deep/c.webp 0\n")
    got = collect_inputs([str(tmp_path / "imgs"), str(tmp_path / "list.txt"), str(tmp_path / "missing.png")],
                         num_classes=2)
    assert got.paths == [str(tmp_path / p) for p in ("imgs/a.JPG", "imgs/b.png", "imgs/deep/c.webp",
                                                      "imgs/b.png", "imgs/deep/c.webp", "missing.png")]
    assert got.labels == [None, None, None, 1, 0, None] and got.labelled
    with pytest.raises(DataError, match=r"list.txt, line 1: label '1' is neither a class of the run .0. nor a "
                                        r"class index in \[0, 1\)"):
        collect_inputs([str(tmp_path / "list.txt")], num_classes=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        collect_inputs([str(tmp_path / "empty")], num_classes=2)


def test_split_lists_take_class_names_from_a_file(tmp_path: Path) -> None:
    for k in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
    (tmp_path / "train.txt").write_text("0.png 0\n1.png 1\n2.png 1\n")
    (tmp_path / "test.txt").write_text("3.png 0\n")
    (tmp_path / "names.txt").write_text("cat\ndog\n\n")
    data = {"dataset": "split", "list_dir": str(tmp_path), "train_list": "train.txt", "test_list": "test.txt"}
    overrides = [f"data.{k}={v}" for k, v in data.items()] + ["data.class_names_file=names.txt"]
    cfg = load_config("smoke", overrides=overrides)
    assert build_datasets(cfg.data).class_names == ["cat", "dog"]
    (tmp_path / "names.txt").write_text("cat\n")
    with pytest.raises(DataError, match="1 class names for the 2 classes"):
        build_datasets(cfg.data)
    (tmp_path / "names.txt").write_text("cat\ncat\n")
    with pytest.raises(DataError, match="unique"):
        build_datasets(cfg.data)
    cfg.data.class_names_file = None
    assert build_datasets(cfg.data).class_names == ["0", "1"]


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
    for key in ("class_names", "train_counts", "mean", "std"):
        state.pop(key)
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
def test_ensemble_refuses_bad_arguments_before_any_work(smoke_run: Path, tmp_path: Path) -> None:
    from dscl.ensemble import EnsembleError, ensemble

    with pytest.raises(EnsembleError, match="at least two"):
        ensemble([smoke_run], tmp_path / "one", device="cpu", progress=False)
    with pytest.raises(EnsembleError, match="same run twice"):
        ensemble([smoke_run, smoke_run], tmp_path / "two", device="cpu", progress=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty") as err:
        ensemble([smoke_run, tmp_path], tmp_path / "used", device="cpu", progress=False)
    assert "--resume" not in str(err.value) and "--overwrite" in str(err.value)  # ensemble has no --resume


@needs_fmnist
def test_ensemble_refuses_other_datasets_and_class_lists() -> None:
    from dscl.ensemble import EnsembleError, check_same_data

    cfg = load_config("smoke")
    a = build_datasets(cfg.data)
    cfg.data.imbalance_factor = 5
    b = build_datasets(cfg.data)
    runs = [Path("a"), Path("b")]
    with pytest.raises(EnsembleError, match="different training sets"):
        check_same_data(runs, [a, b], "test")
    renamed = dataclasses.replace(a, class_names=[*a.class_names[:-1], "Boot"])
    with pytest.raises(EnsembleError, match="different class lists: only in the first: Boot; only in the second: "
                                            "Ankle boot"):
        check_same_data(runs, [a, renamed], "test")
    swapped = dataclasses.replace(a, class_names=[a.class_names[1], a.class_names[0], *a.class_names[2:]])
    with pytest.raises(EnsembleError, match="same 10 classes in another order .class 0 is 'Trouser'"):
        check_same_data(runs, [a, swapped], "test")
    fewer = dataclasses.replace(a, test=a.test.subset(range(100)))
    with pytest.raises(EnsembleError, match="different test sets"):
        check_same_data(runs, [a, fewer], "test")
    check_same_data(runs, [a, build_datasets(load_config("smoke").data)], "test")


@needs_fmnist
def test_tau_norm_of_a_standardised_classifier(smoke_run: Path, tmp_path: Path) -> None:
    """Issue #21: classifier.standardize stores its statistics; tau-norm at tau = 0 then gives exactly the
    plain classifier's logits, and tau = 1 stays far from chance (it read ~chance before the fix)."""
    from dscl.classify import classify
    from dscl.rundir import load_run_config

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
