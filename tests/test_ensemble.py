"""dscl.ensemble: which runs may be ensembled, and the equal-weight average of their softmax outputs."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dscl.ensemble
from conftest import needs_fmnist
from dscl.config import load_config
from dscl.data import DatasetSplits, LTDataset, build_datasets
from dscl.ensemble import EnsembleError, check_same_data, class_list_difference, ensemble
from dscl.metrics import summarize
from dscl.run import RunDirError

NAMES = ["ant", "bee", "cat"]


def _splits(name: str = "toy", *, test_labels=(0, 1, 2, 0), val: bool = True, names=NAMES) -> DatasetSplits:
    """Hand-made splits: 6 training images (counts 3, 2, 1), a test set and optionally a validation set."""
    images = np.arange(16 * 2 * 2, dtype=np.uint8).reshape(16, 2, 2)
    train = LTDataset([0, 0, 0, 1, 1, 2], 3, names, images=images, index=np.arange(6))
    test = LTDataset(list(test_labels), 3, names, images=images, index=np.arange(6, 6 + len(test_labels)))
    val_set = LTDataset([0, 1, 2], 3, names, images=images, index=np.arange(13, 16)) if val else None
    return DatasetSplits(name, train, val_set, test, 3, list(names), train.class_counts(), (0.5,) * 3, (0.5,) * 3)


# ------------------------------------------------------------------------------------------ what may be ensembled


def test_class_list_difference_names_what_differs():
    assert class_list_difference(["a", "b", "c"], ["a", "b", "d"]) == "only in the first: c; only in the second: d"
    assert class_list_difference(["a", "b", "c"], ["a", "b"]) == "only in the first: c; only in the second: none"
    many = [f"x{i}" for i in range(13)]
    assert class_list_difference(many, ["y"]) == (
        f"only in the first: {', '.join(many[:10])} (+3 more); only in the second: y")
    assert class_list_difference(["a", "b", "c"], ["a", "c", "b"]) == (
        "the same 3 classes in another order (class 1 is 'b' vs 'c')")


def test_check_same_data_on_the_test_or_validation_split():
    runs = [Path("r1"), Path("r2"), Path("r3")]
    check_same_data(runs, [_splits(), _splits(), _splits()], "test")
    check_same_data(runs, [_splits(), _splits(), _splits()], "val")
    with pytest.raises(EnsembleError, match="r3 and r1 were trained on different datasets .other vs toy."):
        check_same_data(runs, [_splits(), _splits(), _splits("other")], "test")
    with pytest.raises(EnsembleError, match="r2 and r1 have different class lists: the same 3 classes in another"):
        check_same_data(runs[:2], [_splits(), _splits(names=["bee", "ant", "cat"])], "test")
    with pytest.raises(EnsembleError, match="r2 and r1 have different test sets .4 vs 4 images, fingerprints"):
        check_same_data(runs[:2], [_splits(), _splits(test_labels=(0, 1, 2, 1))], "test")  # same size, other labels
    check_same_data(runs[:2], [_splits(), _splits(test_labels=(0, 1, 2, 1))], "val")  # val is the same
    other_val = _splits()
    other_val = dataclasses.replace(other_val, val=other_val.val.subset([2, 1, 0]))
    with pytest.raises(EnsembleError, match="different val sets"):
        check_same_data(runs[:2], [_splits(), other_val], "val")
    with pytest.raises(ValueError, match="has no validation split; use --split test"):
        check_same_data(runs[:2], [_splits(), _splits(val=False)], "val")
    with pytest.raises(ValueError, match="--split must be test or val"):
        check_same_data(runs[:2], [_splits(), _splits()], "train")


def test_ensemble_refuses_one_run_or_the_same_run_spelled_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EnsembleError, match="at least two runs"):
        ensemble(["a"], tmp_path / "out", device="cpu", progress=False)
    with pytest.raises(EnsembleError, match="lists the same run twice"):
        ensemble(["a", str(tmp_path / "a"), "b"], tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the average


def _probs(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_ensemble_averages_the_members_softmax_outputs(tmp_path, monkeypatch):
    """Two members whose averaged probabilities are right where each member alone is wrong: the report is
    the average's, with one row per member, and the member list is saved for `dscl predict`."""
    labels = torch.tensor([0, 1, 2, 0])
    member_probs = {
        "r1": _probs([[0.9, 0.1, 0.0], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]]),  # right: 0, 2
        "r2": _probs([[0.4, 0.6, 0.0], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.5, 0.1, 0.4]]),  # right: 1, 3
    }  # the average is right on images 0, 1 and 2
    cfg = load_config("smoke")
    splits = _splits()

    def load_run(path, *, device):
        return SimpleNamespace(run_dir=Path(path), cfg=cfg, source=f"{path}/classifier.pt", class_names=NAMES,
                               num_classes=3, train_counts=splits.train_counts, backbone=torch.nn.Identity())

    monkeypatch.setattr(dscl.ensemble, "load_run", load_run)
    monkeypatch.setattr(dscl.ensemble, "build_datasets", lambda data_cfg, seed: splits)
    monkeypatch.setattr(dscl.ensemble, "_probabilities",
                        lambda p, dataset, dev, progress, desc: (member_probs[p.run_dir.name], labels))
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    out = tmp_path / "ens"
    report = ensemble([tmp_path / "r1", tmp_path / "r2"], out, device="cpu", progress=False)

    average = (member_probs["r1"] + member_probs["r2"]) / 2
    expected = summarize(average, labels, splits.train_counts, many_threshold=cfg.eval.many_threshold,
                         few_threshold=cfg.eval.few_threshold)
    assert report["top1"] == pytest.approx(expected["top1"]) == pytest.approx(75.0)
    assert report["method"] == "ensemble of 2 runs" and report["split"] == "test"
    members = [summarize(member_probs[r], labels, splits.train_counts)["top1"] for r in ("r1", "r2")]
    assert members == [50.0, 50.0]  # each member alone: 2 of 4
    assert [m["top1"] for m in report["members"]] == pytest.approx(members)
    assert [m["run"] for m in report["members"]] == [str(tmp_path / "r1"), str(tmp_path / "r2")]
    assert [row["method"].split(":")[0] for row in report["variants"]] == ["member 1", "member 2"]
    assert json.loads((out / "report.json").read_text())["top1"] == pytest.approx(report["top1"])
    specs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    (spec,) = [s for s in specs if s.get("format") == "dscl-ensemble"]
    assert spec["members"] == [str((tmp_path / r).resolve()) for r in ("r1", "r2")] and spec["split"] == "test"
    # the folder now holds an ensemble: refused without --overwrite, replaced with it
    with pytest.raises(ValueError, match="--overwrite"):
        ensemble([tmp_path / "r1", tmp_path / "r2"], out, device="cpu", progress=False)
    ensemble([tmp_path / "r2", tmp_path / "r1"], out, device="cpu", progress=False, overwrite=True)


@needs_fmnist
def test_ensemble_refuses_bad_arguments_before_any_work(smoke_run: Path, tmp_path: Path) -> None:
    from dscl.ensemble import EnsembleError, ensemble

    with pytest.raises(EnsembleError, match="at least two"):
        ensemble([smoke_run], tmp_path / "one", device="cpu", progress=False)
    with pytest.raises(EnsembleError, match="same run twice"):
        ensemble([smoke_run, smoke_run], tmp_path / "two", device="cpu", progress=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty|other files") as err:
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
