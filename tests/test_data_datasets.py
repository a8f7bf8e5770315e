"""dscl.data.datasets (build_datasets): the IMBALANCECIFAR selection, Fashion-MNIST-LT, split lists, folders,
validation carving, where the data was read from, label errors. Readers: tests/test_data_readers.py;
LTDataset and the profiles: tests/test_data_core.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_fmnist as needs_any_fmnist
from conftest import write_tiny_fmnist
from dscl.config import ConfigError, DataConfig, load_config
from dscl.data import (
    DataError,
    LTDataset,
    build_datasets,
    check_images,
    long_tailed_counts,
    summarize_dataset,
)
from dscl.data.datasets import held_out_indices
from dscl.data.readers import FMNIST_FILES, FMNIST_SYSTEM_DIR

# ------------------------------------------------------------------------------------------------ CIFAR


def _write_fake_cifar10(root: Path, per_class: int = 12) -> np.ndarray:
    """The real pickle layout (5 data batches + test batch, 'data' N x 3072 uint8, 'labels'); returns labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    data = np.zeros((len(labels), 3072), dtype=np.uint8)
    data[:, 0] = np.arange(len(labels)) % 256  # pixel (c=0, y=0, x=0) encodes the original index
    data[:, 1] = np.arange(len(labels)) // 256
    for k, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        with open(folder / f"data_batch_{k}", "wb") as fh:
            pickle.dump({"data": data[part], "labels": labels[part].tolist(), "batch_label": "x"}, fh, protocol=2)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": data[:30], "labels": labels[:30].tolist()}, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh, protocol=2)
    return labels


def test_cifar_selection_matches_imbalancecifar_rule(tmp_path):
    labels = _write_fake_cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10-lt", data_root=str(tmp_path), n_max=12, imbalance_factor=4, subset_seed=3)
    splits = build_datasets(cfg)
    counts = long_tailed_counts(10, 12, 4, "exp")
    # hand-computed IMBALANCECIFAR selection: global seed once, shuffle per class in label order
    np.random.seed(3)
    expected = []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected += idx[:n_c].tolist()
    got = [int(splits.train.load(i)[0, 0, 0]) + 256 * int(splits.train.load(i)[0, 0, 1])
           for i in range(len(splits.train))]
    assert got == expected
    assert splits.train_counts == counts and splits.train.class_counts() == counts
    assert splits.train.targets == labels[expected].tolist()
    assert len(splits.test) == 30 and splits.class_names[3] == "c3"
    assert splits.train.load(0).shape == (3, 32, 32) and splits.train.load(0).dtype == torch.uint8
    # the folder itself may be given as the root, and the global numpy RNG is left alone
    state = np.random.get_state()[1].copy()
    again = build_datasets(DataConfig(dataset="cifar10-lt", data_root=str(tmp_path / "cifar-10-batches-py"),
                                      n_max=12, imbalance_factor=4, subset_seed=3))
    assert again.train.targets == splits.train.targets
    assert np.array_equal(np.random.get_state()[1], state)
    other = build_datasets(DataConfig(dataset="cifar10-lt", data_root=str(tmp_path), n_max=12,
                                      imbalance_factor=4, subset_seed=4))
    assert [other.train.load(i)[0, 0, 0].item() for i in range(12)] != got[:12]


# ---------------------------------------------------------------------------------------- Fashion-MNIST

needs_fmnist = pytest.mark.skipif(
    not all((Path(FMNIST_SYSTEM_DIR) / f).is_file() for f in FMNIST_FILES),
    reason=f"{FMNIST_SYSTEM_DIR} absent (sudo apt-get install dataset-fashion-mnist; CI installs it)",
)


@needs_fmnist
def test_real_fmnist_lt_counts(monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    splits = build_datasets(DataConfig())
    assert splits.train_counts == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert len(splits.train) == 2478 and len(splits.test) == 10000
    assert splits.val_source == "held-out" and splits.val.class_counts() == [200] * 10  # unused train images
    assert splits.test.class_counts() == [1000] * 10
    assert splits.class_names[0] == "T-shirt/top" and splits.class_names[9] == "Ankle boot"
    image = splits.train.load(0)
    assert image.shape == (3, 28, 28) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey replicated
    summary = summarize_dataset(splits)
    assert summary["shot_classes"] == {"many": 5, "medium": 3, "few": 2}
    assert summary["num_train"] == 2478 and summary["num_val"] == 2000 and summary["num_test"] == 10000
    assert summary["val_counts"] == [200] * 10 and summary["val_train_overlap"] == 0
    assert check_images(splits.train) == []
    assert build_datasets(DataConfig()).train.targets == splits.train.targets  # deterministic


@needs_fmnist
def test_data_classes_keeps_and_relabels_a_subset_of_the_source_classes(monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    full = build_datasets(DataConfig(imbalance_factor=1, n_max=6000, val_per_class=0))
    splits = build_datasets(DataConfig(classes=(9, 5, 7), imbalance_factor=10, n_max=300))
    assert splits.num_classes == 3 and splits.class_names == ["Ankle boot", "Sandal", "Sneaker"]
    assert splits.train_counts == splits.train.class_counts() == long_tailed_counts(3, 300, 10) == [300, 94, 30]
    assert splits.test.class_counts() == [1000] * 3 and splits.val.class_counts() == [200] * 3
    # every kept image is an image of its source class: compare with the unfiltered set's images of that class
    source = {c: {full.train.load(i).numpy().tobytes() for i in range(len(full.train)) if full.train.targets[i] == c}
              for c in (9, 5, 7)}
    for i in range(0, len(splits.train), 25):
        assert splits.train.load(i).numpy().tobytes() in source[(9, 5, 7)[splits.train.targets[i]]]
    train_ids = {splits.train._index[i] for i in range(len(splits.train))}
    assert not train_ids & {splits.val._index[i] for i in range(len(splits.val))}
    with pytest.raises(DataError, match=r"data.classes lists 10, but the source has 10 classes \(ids 0-9\)"):
        build_datasets(DataConfig(classes=(3, 10)))


def test_data_classes_bad_values_are_config_errors():
    for bad, needle in [("[3]", "at least two different"), ("[1, 1]", "at least two different"),
                        ("[-1, 2]", "at least two different")]:
        with pytest.raises(ConfigError, match=needle):
            load_config("smoke", overrides=[f"data.classes={bad}"])
    with pytest.raises(ConfigError, match="data.classes picks classes of a generated long-tailed set"):
        load_config("smoke", overrides=["data.classes=[1, 2]", "data.dataset=folder"])


@needs_fmnist
def test_fmnist_val_carving(monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    # carving happens only without a held-out split (val_per_class=0)
    splits = build_datasets(DataConfig(val_fraction=0.1, val_per_class=0), seed=1)
    assert splits.val_is_carved and splits.val is not None
    val_counts = splits.val.class_counts()
    assert val_counts == [100, 60, 36, 22, 13, 8, 5, 3, 2, 1]
    totals = [a + b for a, b in zip(splits.train_counts, val_counts, strict=True)]
    assert totals == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert splits.train_counts == splits.train.class_counts()
    # disjoint, and the same seed gives the same carving
    train_ids = {splits.train._index[i] for i in range(len(splits.train))}
    assert not train_ids & {splits.val._index[i] for i in range(len(splits.val))}
    again = build_datasets(DataConfig(val_fraction=0.1, val_per_class=0), seed=1)
    assert np.array_equal(again.val._index, splits.val._index)


# ------------------------------------------------------------------------------------------ split lists


def _images(root: Path, names: list[str]) -> None:
    for k, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 5, 3), 10 * k, dtype=np.uint8)).save(path)


def test_txt_lists_with_relative_roots(tmp_path):
    root, lists = tmp_path / "imgs", tmp_path / "lists"
    lists.mkdir()
    _images(root, ["a/0.png", "a/1.png", "b/with space.png", "c/3.png", "t/4.png", "t/5.png"])
    (lists / "train.txt").write_text("a/0.png 0\na/1.png 0\n\nb/with space.png 1\nc/3.png\t2\n")
    (lists / "val.txt").write_text("t/4.png 2\n")
    (lists / "test.txt").write_text("t/4.png 1\nt/5.png 0\n")
    cfg = DataConfig(dataset="split", data_root=str(root), list_dir=str(lists), train_list="train.txt",
                     val_list="val.txt", test_list="test.txt", val_fraction=0.5)
    splits = build_datasets(cfg)
    assert splits.num_classes == 3 and splits.train_counts == [2, 1, 1]
    assert splits.train.path(2) == str(root / "b/with space.png")
    assert splits.val is not None and not splits.val_is_carved and splits.test.targets == [1, 0]
    image = splits.train.load(1)
    assert image.shape == (3, 6, 5) and int(image[0, 0, 0]) == 10
    assert splits.train[1][1] == 0 and torch.equal(splits.train[1][0], image)
    assert check_images(splits.train, progress=False) == []


def test_json_lists_and_autodetect(tmp_path):
    _images(tmp_path, ["x/0.jpg", "x/1.jpg", "y/2.jpg"])
    ann = [{"image_id": k, "fpath": p, "im_height": 6, "im_width": 5, "category_id": c}
           for k, (p, c) in enumerate([("x/0.jpg", 0), ("x/1.jpg", 1), ("y/2.jpg", 1)])]
    (tmp_path / "train.json").write_text(json.dumps({"annotations": ann, "num_classes": 2}))
    (tmp_path / "test.lst").write_text(json.dumps({"annotations": ann[:2], "num_classes": 2}))
    cfg = DataConfig(dataset="split", data_root=str(tmp_path), list_dir=str(tmp_path),
                     train_list="train.json", test_list="test.lst")
    splits = build_datasets(cfg)
    assert splits.num_classes == 2 and splits.train_counts == [1, 2] and len(splits.test) == 2
    assert splits.train.path(2) == str(tmp_path / "y/2.jpg")
    ann[2]["category_id"] = 5
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": ann, "num_classes": 2}))
    with pytest.raises(DataError, match=r"bad\.json, annotation 3: label 5 is outside \[0, 2\)"):
        build_datasets(DataConfig(dataset="split", data_root=str(tmp_path), list_dir=str(tmp_path),
                                  train_list="bad.json", test_list="test.lst"))


def _split_cfg(tmp_path: Path, train: str, test: str = "t.png 0\n", **kw) -> DataConfig:
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "test.txt").write_text(test)
    kw.setdefault("data_root", str(tmp_path))
    return DataConfig(dataset="split", list_dir=str(tmp_path), train_list="train.txt", test_list="test.txt", **kw)


@pytest.mark.parametrize(
    ("train", "test", "needle"),
    [
        ("a.png 0\nb.png\n", "t.png 0\n", r"train\.txt, line 2: expected 'relative/path label'"),
        ("a.png 0\n\nb.png one\n", "t.png 0\n", r"train\.txt, line 3: label 'one' is not an integer"),
        ("a.png 0\nb.png -1\n", "t.png 0\n", r"train\.txt, line 2: label -1"),
        ("a.png 0\nb.png 2\n", "t.png 0\n", r"2 classes have no training image \(classes 1\)|class"),
        ("a.png 0\nb.png 1\n", "t.png 0\nu.png 2\n", r"test\.txt, line 2: label 2 is outside \[0, 2\)"),
        ("a.png 0\n", "# nothing\n\n", r"test\.txt: the split is empty"),
        ("\n", "t.png 0\n", r"train\.txt: the split is empty"),
    ],
)
def test_split_bad_input(tmp_path, train, test, needle):
    with pytest.raises(DataError, match=needle):
        build_datasets(_split_cfg(tmp_path, train, test))


def test_split_class_without_training_image_is_named(tmp_path):
    with pytest.raises(DataError, match=r"1 of 3 classes have no training image \(classes 1\)"):
        build_datasets(_split_cfg(tmp_path, "a.png 0\nb.png 2\n"))


def test_split_missing_root_and_lists(tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nope, given by --data-root \(data.data_root\), does not exist"):
        build_datasets(_split_cfg(tmp_path, "a.png 0\n", data_root=str(tmp_path / "nope")))
    cfg = DataConfig(dataset="split", data_root=str(tmp_path), list_dir=str(tmp_path),
                     train_list="missing.txt", test_list="test.txt")
    with pytest.raises(DataError, match=r"train list file .*missing\.txt does not exist"):
        build_datasets(cfg)
    with pytest.raises(DataError, match="needs data.train_list"):
        build_datasets(DataConfig(dataset="split", data_root=str(tmp_path)))


def test_missing_image_at_load_and_unreadable_in_check(tmp_path):
    _images(tmp_path, ["ok.png"])
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    splits = build_datasets(_split_cfg(tmp_path, "ok.png 0\nbroken.png 1\ngone.png 1\n", "ok.png 0\n"))
    with pytest.raises(DataError, match=r"gone\.png does not exist"):
        splits.train.load(2)
    with pytest.raises(DataError, match=r"cannot read image file .*broken\.png"):
        splits.train[1]
    bad = dict(check_images(splits.train, workers=2, progress=False))
    assert set(bad) == {str(tmp_path / "broken.png"), str(tmp_path / "gone.png")}
    assert bad[str(tmp_path / "gone.png")] == "missing file" and "unreadable" in bad[str(tmp_path / "broken.png")]


# ---------------------------------------------------------------------------------------------- folders


def test_folder_dataset(tmp_path):
    _images(tmp_path, ["train/cat/1.png", "train/cat/2.jpg", "train/dog/3.png", "test/dog/4.png",
                       "test/cat/5.png", "val/cat/6.png"])
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    splits = build_datasets(DataConfig(dataset="folder", data_root=str(tmp_path)))
    assert splits.class_names == ["cat", "dog"] and splits.train_counts == [2, 1]
    assert sorted(splits.test.targets) == [0, 1] and splits.val is not None and len(splits.val) == 1
    _images(tmp_path, ["test/bird/7.png"])
    with pytest.raises(DataError, match=r"\['bird'\] do not exist in the train split"):
        build_datasets(DataConfig(dataset="folder", data_root=str(tmp_path)))
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(DataConfig(dataset="folder", data_root=str(tmp_path / "none")))


# ----------------------------------------------------------------- the data folder actually used (item 3)


def test_data_root_records_the_folder_actually_read(tmp_path, monkeypatch):
    write_tiny_fmnist(tmp_path / "fm")
    monkeypatch.setenv("DSCL_DATA", str(tmp_path / "fm"))
    splits = build_datasets(DataConfig(n_max=5, imbalance_factor=5, val_per_class=0))
    assert splits.data_root == str(tmp_path / "fm")
    monkeypatch.delenv("DSCL_DATA")
    _write_fake_cifar10(tmp_path / "c")
    splits = build_datasets(DataConfig(dataset="cifar10-lt", data_root=str(tmp_path / "c"), n_max=12,
                                       imbalance_factor=4, val_per_class=0))
    assert splits.data_root == str(tmp_path / "c" / "cifar-10-batches-py")
    _images(tmp_path / "f", ["train/a/0.png", "test/a/1.png"])
    assert build_datasets(DataConfig(dataset="folder", data_root=str(tmp_path / "f"))).data_root == str(tmp_path / "f")
    # split lists without a named root: paths are relative to the train list's folder, recorded absolute
    _images(tmp_path / "s", ["x.png"])
    (tmp_path / "s" / "train.txt").write_text("x.png 0\n")
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(dataset="split", train_list="s/train.txt", test_list="s/train.txt")
    splits = build_datasets(cfg)
    assert splits.data_root == str(tmp_path / "s") and splits.train.path(0) == "s/x.png"


@needs_fmnist
def test_system_fmnist_is_recorded(monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    assert build_datasets(DataConfig(n_max=60, imbalance_factor=10)).data_root == FMNIST_SYSTEM_DIR
    monkeypatch.setenv("DSCL_DATA", "")  # empty = unset
    assert build_datasets(DataConfig(n_max=60, imbalance_factor=10)).data_root == FMNIST_SYSTEM_DIR


# ------------------------------------------------------------------------ label errors name file and line


def test_mistyped_train_label_names_its_line(tmp_path):
    # a label typed 12 instead of 2 used to give "9 of 13 classes have no training image" with no line
    with pytest.raises(DataError) as err:
        build_datasets(_split_cfg(tmp_path, "a.png 0\nb.png 1\nc.png 2\nd.png 12\ne.png 1\n"))
    msg = str(err.value)
    assert "9 of 13 classes have no training image (classes 3, 4, 5, 6, 7, 8, 9, 10, 11)" in msg
    assert f"label 12 is at {tmp_path / 'train.txt'}, line 4" in msg


def test_huge_train_label_is_reported_without_allocating_per_class_arrays(tmp_path):
    with pytest.raises(DataError, match=r"1000000000000 of 1000000000002 classes .*line 2"):
        build_datasets(_split_cfg(tmp_path, "a.png 0\nb.png 1000000000001\n"))


def test_json_label_errors_name_the_annotation(tmp_path):
    def write(name, labels, num_classes):
        ann = [{"fpath": f"{k}.png", "category_id": c} for k, c in enumerate(labels)]
        (tmp_path / name).write_text(json.dumps({"annotations": ann, "num_classes": num_classes}))

    write("train.json", [0, 1, 1], 2)
    write("test.json", [0, 1], 5)
    cfg = DataConfig(dataset="split", data_root=str(tmp_path), list_dir=str(tmp_path), train_list="train.json",
                     test_list="test.json")
    with pytest.raises(DataError, match=r"test\.json: num_classes is 5 but the train list .*train\.json has 2"):
        build_datasets(cfg)
    write("test.json", [0, 3], None)
    with pytest.raises(DataError, match=r"test\.json, annotation 2: label 3 is outside \[0, 2\)"):
        build_datasets(cfg)
    write("train.json", [0, 1, 4], 3)
    with pytest.raises(DataError, match=r"train\.json, annotation 3: label 4 is outside \[0, 3\)"):
        build_datasets(cfg)


def test_list_locations_follow_samples_through_subsets(tmp_path):
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    splits = build_datasets(_split_cfg(tmp_path, "a.png 0\n\n# note\nb.png 1\nc.png 1\n", "c.png 0\n"))
    assert [splits.train.location(i) for i in range(3)] == [
        f"{tmp_path / 'train.txt'}, line {n}" for n in (1, 4, 5)
    ]
    assert splits.train.subset([2, 0]).location(0) == f"{tmp_path / 'train.txt'}, line 5"
    assert splits.test.location(0) == f"{tmp_path / 'test.txt'}, line 1"
    folder = LTDataset([0], 1, ["a"], paths=[str(tmp_path / "a.png")])
    assert folder.location(0) is None
    with pytest.raises(ValueError, match="2 list locations for 1 paths"):
        LTDataset([0], 1, ["a"], paths=["x"], where=["l1", "l2"])


# ---------------------------------------------- validation splits: held out from unused training images, carved


def test_held_out_indices_are_balanced_disjoint_and_seeded():
    targets = np.repeat(np.arange(4), 50)  # 50 images per class
    used = np.concatenate([np.flatnonzero(targets == c)[: n] for c, n in enumerate([50, 30, 10, 5])])
    idx = held_out_indices(targets, used, per_class=15, seed=0)
    assert not set(idx) & set(used)
    counts = np.bincount(targets[idx], minlength=4)
    assert counts.tolist() == [0, 15, 15, 15]  # class 0 has no unused image left
    assert np.array_equal(idx, np.sort(idx))
    assert np.array_equal(idx, held_out_indices(targets, used, 15, seed=0))
    assert not np.array_equal(idx, held_out_indices(targets, used, 15, seed=1))
    # fewer unused images than asked: all of them
    assert np.bincount(targets[held_out_indices(targets, used, 45, 0)], minlength=4).tolist() == [0, 20, 40, 45]


@needs_any_fmnist
def test_fmnist_lt_has_a_balanced_held_out_split_that_costs_no_training_data():
    cfg = load_config("fmnist-lt")
    splits = build_datasets(cfg.data)
    assert splits.val_source == "held-out" and not splits.val_is_carved
    assert splits.val.class_counts() == [200] * 10
    assert splits.train_counts == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]  # the LT subset is unchanged
    assert not set(splits.train.identities()) & set(splits.val.identities())
    assert "held out" in splits.val_description()
    # the subset seed fixes it; the training seed does not move it
    again = build_datasets(cfg.data, seed=7)
    assert again.val.identities() == splits.val.identities()
    cfg.data.subset_seed = 1
    assert build_datasets(cfg.data).val.identities() != splits.val.identities()
    # val_per_class=0 turns it off; then val_fraction carves from train as before
    cfg = load_config("fmnist-lt", overrides=["data.val_per_class=0"])
    assert build_datasets(cfg.data).val is None
    cfg = load_config("fmnist-lt", overrides=["data.val_per_class=0", "data.val_fraction=0.1"])
    carved = build_datasets(cfg.data)
    assert carved.val_source == "carved" and sum(carved.train_counts) + len(carved.val) == 2478


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
