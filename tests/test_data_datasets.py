"""Datasets: long-tail profiles, the IMBALANCECIFAR selection rule, split lists, folders, checks, errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dscl.config import DataConfig
from dscl.data import (
    DataError,
    LTDataset,
    build_datasets,
    check_images,
    long_tailed_counts,
    summarize_dataset,
)
from dscl.data.readers import FMNIST_FILES, FMNIST_SYSTEM_DIR

# ------------------------------------------------------------------------------------------- profiles


@pytest.mark.parametrize(
    ("classes", "n_max", "imb", "expected_total", "expected_min"),
    [
        (100, 500, 100, 10847, 5),  # CIFAR-100-LT IF100 (FIELD.md 1.1)
        (100, 500, 50, 12608, 10),
        (100, 500, 10, 19573, 50),
        (10, 5000, 100, 12406, 50),  # CIFAR-10-LT IF100
    ],
)
def test_exp_profile_matches_published_totals(classes, n_max, imb, expected_total, expected_min):
    counts = long_tailed_counts(classes, n_max, imb, "exp")
    assert sum(counts) == expected_total
    assert counts[0] == n_max and counts[-1] == expected_min
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_exp_profile_formula_and_fmnist_default():
    assert long_tailed_counts(10, 1000, 100, "exp") == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    for imb in (10.0, 50.0, 200.0, 3.5):
        got = long_tailed_counts(7, 300, imb, "exp")
        assert got == [int(300 * (1 / imb) ** (i / 6)) for i in range(7)]
        assert got == long_tailed_counts(7, 300, imb, "exp")  # deterministic


@pytest.mark.parametrize("imb", [1, 10, 100, 200])
def test_step_profile(imb):
    counts = long_tailed_counts(10, 5000, imb, "step")
    assert counts == [5000] * 5 + [int(5000 / imb)] * 5
    assert long_tailed_counts(5, 100, 10, "step") == [100, 100, 10, 10, 10]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((10, 100, 0.5, "exp"), "imbalance_factor"),
        ((10, 0, 10, "exp"), "n_max"),
        ((10, 100, 10, "cosine"), "profile"),
        ((10, 10, 100, "exp"), "no image"),
    ],
)
def test_profile_errors(args, needle):
    with pytest.raises(DataError, match=needle):
        long_tailed_counts(*args)


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


def test_cifar_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"cifar-100-python.*tar xzf"):
        build_datasets(DataConfig(dataset="cifar100-lt", data_root=str(tmp_path)))


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


def test_fmnist_missing_names_places_and_commands(tmp_path, monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(data_root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "DSCL_DATA" in msg and "--data-root" in msg


def test_fmnist_from_data_root_with_tiny_idx_files(tmp_path):
    import gzip

    def idx(path, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as fh:
            fh.write(header + array.astype(np.uint8).tobytes())

    labels = np.repeat(np.arange(10), 5)
    images = np.arange(50 * 28 * 28).reshape(50, 28, 28) % 251
    for prefix in ("train", "t10k"):
        idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    splits = build_datasets(DataConfig(data_root=str(tmp_path), n_max=5, imbalance_factor=5))
    assert splits.train_counts == long_tailed_counts(10, 5, 5, "exp") == [5, 4, 3, 2, 2, 2, 1, 1, 1, 1]
    with pytest.raises(DataError, match="class 0 has 5 images"):
        build_datasets(DataConfig(data_root=str(tmp_path), n_max=6, imbalance_factor=5))


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


# -------------------------------------------------------------------------------------- dataset object


def test_ltdataset_subset_transform_and_summary():
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    ds = LTDataset([0, 0, 0, 1, 1, 2], 3, ["a", "b", "c"], images=images)
    sub = ds.subset([5, 3])
    assert sub.targets == [2, 1] and torch.equal(sub.load(0)[0], torch.from_numpy(images[5]))
    assert sub._images is ds._images and sub.path(0) is None
    shifted = sub.with_transform(lambda x: x.float() + 1)
    assert shifted[0][0].dtype == torch.float32 and sub.transform is None
    assert check_images(ds) == []
    from dscl.data import DatasetSplits

    splits = DatasetSplits("toy", ds, None, ds, 3, ["a", "b", "c"], [150, 100, 20], (0.5,) * 3, (0.5,) * 3)
    assert summarize_dataset(splits)["shot_classes"] == {"many": 1, "medium": 2, "few": 0}
    assert summarize_dataset(splits, 99, 21)["shot_classes"] == {"many": 2, "medium": 0, "few": 1}


# ----------------------------------------------------------------- the data folder actually used (item 3)


def _tiny_fmnist(folder: Path) -> None:
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), 5)
    images = np.arange(50 * 28 * 28).reshape(50, 28, 28) % 251
    for prefix in ("train", "t10k"):
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as fh:
                fh.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("dataset", ["fmnist-lt", "cifar10-lt", "split", "folder"])
def test_dscl_data_pointing_nowhere_fails_for_every_dataset(tmp_path, monkeypatch, dataset):
    # issue #12: DSCL_DATA pointing at a missing folder was ignored and the system Fashion-MNIST used
    monkeypatch.setenv("DSCL_DATA", str(tmp_path / "typo"))
    (tmp_path / "train.txt").write_text("a.png 0\n")
    cfg = DataConfig(dataset=dataset, list_dir=str(tmp_path), train_list="train.txt", test_list="train.txt")
    with pytest.raises(DataError) as err:
        build_datasets(cfg)
    msg = str(err.value)
    assert f"data folder {tmp_path / 'typo'}, given by the environment variable DSCL_DATA, does not exist" in msg
    assert "unset DSCL_DATA" in msg


def test_named_folder_without_fmnist_is_not_replaced_by_the_system_copy(tmp_path, monkeypatch):
    (tmp_path / "other").mkdir()
    monkeypatch.setenv("DSCL_DATA", str(tmp_path / "other"))
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig())
    msg = str(err.value)
    assert "Fashion-MNIST not found" in msg and str(tmp_path / "other") in msg
    assert FMNIST_SYSTEM_DIR not in msg.split("\n")[1:-1]  # only the named folder was searched
    assert "unset DSCL_DATA" in msg
    # an empty variable counts as unset; --data-root (data.data_root) wins over DSCL_DATA
    _tiny_fmnist(tmp_path / "mine" / "fashion-mnist")
    splits = build_datasets(DataConfig(data_root=str(tmp_path / "mine"), n_max=5, imbalance_factor=5,
                                       val_per_class=0))
    assert splits.data_root == str(tmp_path / "mine" / "fashion-mnist")


def test_data_root_records_the_folder_actually_read(tmp_path, monkeypatch):
    _tiny_fmnist(tmp_path / "fm")
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


# ------------------------------------------------------------------------------- hidden folders (item 8)


def test_folder_dataset_skips_hidden_folders_and_files(tmp_path):
    _images(tmp_path, ["train/cat/1.png", "train/dog/2.png", "test/cat/3.png", "test/dog/4.png",
                       "train/.ipynb_checkpoints/5.png", "train/.git/6.png", "train/cat/.hidden.png",
                       "train/cat/._1.png", "train/dog/.ipynb_checkpoints/2-checkpoint.png",
                       "test/.ipynb_checkpoints/7.png", "train/dog/sub/8.png"])
    splits = build_datasets(DataConfig(dataset="folder", data_root=str(tmp_path)))
    assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
    train = sorted(Path(splits.train.path(i)).relative_to(tmp_path).as_posix() for i in range(len(splits.train)))
    assert train == ["train/cat/1.png", "train/dog/2.png", "train/dog/sub/8.png"]
    assert len(splits.test) == 2
