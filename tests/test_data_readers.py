"""dscl.data.readers: finding and reading Fashion-MNIST idx files and CIFAR pickles, the data folder the
user named (``--data-root`` / ``DSCL_DATA``), split lists (OLTR txt, BBN json) and class folders."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_idx, write_tiny_fmnist
from dscl.config import DataConfig
from dscl.data import DataError, build_datasets, long_tailed_counts
from dscl.data.readers import (
    FMNIST_FILES,
    FMNIST_SYSTEM_DIR,
    find_cifar,
    find_fmnist,
    image_files,
    read_cifar,
    read_folder_split,
    read_idx,
    read_list,
    resolve_list_file,
    user_data_root,
)


def _images(root: Path, names: list[str]) -> None:
    for k, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 5, 3), 10 * k, dtype=np.uint8)).save(path)


# ----------------------------------------------------------------------------------------- Fashion-MNIST


def test_fmnist_missing_names_places_and_commands(tmp_path, monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(data_root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "DSCL_DATA" in msg and "--data-root" in msg


def test_fmnist_from_data_root_with_tiny_idx_files(tmp_path):

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


def test_idx_files_gzipped_or_plain_and_their_errors(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b", array, compress=False)
    for name in ("a.gz", "b"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, array) and not got.flags.writeable
    (tmp_path / "magic").write_bytes(bytes([0, 0, 9, 1, 0, 0, 0, 1, 7]))  # not unsigned bytes
    with pytest.raises(DataError, match="magic.* is not an unsigned-byte idx file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3]))
    with pytest.raises(DataError, match=r"short is truncated or corrupt: header says \(2, 2\) \(4 bytes\), found 3"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read idx file .*bad.gz"):
        read_idx(tmp_path / "bad.gz")
    # a file replaced in place is read again, not served from the cache
    write_idx(tmp_path / "b", array[:1], compress=False)
    os.utime(tmp_path / "b", ns=(1, 1))
    assert read_idx(tmp_path / "b").shape == (1, 3, 4)


def test_find_fmnist_looks_in_the_named_folder_and_its_usual_subfolders(tmp_path, monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    for sub in ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"):
        root = tmp_path / sub.replace("/", "_")
        write_tiny_fmnist(root / sub)
        assert find_fmnist(str(root)) == root / sub
    plain = tmp_path / "plain"  # uncompressed files in the folder itself
    plain.mkdir()
    for name in FMNIST_FILES:
        write_idx(plain / name[: -len(".gz")], np.zeros((1,), np.uint8), compress=False)
    assert find_fmnist(str(plain)) == plain
    partial = tmp_path / "partial"
    partial.mkdir()
    write_idx(partial / FMNIST_FILES[0], np.zeros((1,), np.uint8))
    with pytest.raises(DataError, match="none of these folders holds all four files") as err:
        find_fmnist(str(partial))
    assert f"  {partial / 'fashion-mnist'}" in str(err.value)  # every place searched is listed
    assert "the folder given by --data-root (data.data_root)" in str(err.value)


def test_user_data_root_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    assert user_data_root(None) is None
    monkeypatch.setenv("DSCL_DATA", "")
    assert user_data_root(None) is None  # empty = unset
    monkeypatch.setenv("DSCL_DATA", str(tmp_path))
    assert user_data_root(None) == (tmp_path, "the environment variable DSCL_DATA")
    (tmp_path / "mine").mkdir()
    assert user_data_root(str(tmp_path / "mine")) == (tmp_path / "mine", "--data-root (data.data_root)")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_data_root("~/mine")[0] == tmp_path / "mine"  # ~ is expanded
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"file, given by --data-root \(data.data_root\), does not exist or is not a "
                                        r"folder.*Fix: get the data"):
        user_data_root(str(tmp_path / "file"), "Fix: get the data")


# ------------------------------------------------------------------------------------------------ CIFAR


def test_cifar_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"cifar-100-python.*tar xzf"):
        build_datasets(DataConfig(dataset="cifar100-lt", data_root=str(tmp_path)))


def _fake_cifar100(folder: Path, *, meta: bool = True) -> None:
    folder.mkdir(parents=True)
    data = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072) % 256
    for name, rows, labels in (("train", slice(0, 3), [5, 99, 0]), ("test", slice(3, 4), [7])):
        with open(folder / name, "wb") as fh:  # bytes keys, as the Python 2 pickles have
            pickle.dump({b"data": data[rows].astype(np.uint8), b"fine_labels": labels}, fh)
    if meta:
        with open(folder / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"n{i}" for i in range(100)]}, fh)


def test_read_cifar100_pickles_from_the_folder_or_its_parent(tmp_path, monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    _fake_cifar100(tmp_path / "cifar-100-python")
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        assert find_cifar("cifar100-lt", str(root)) == tmp_path / "cifar-100-python"
    x_train, y_train, x_test, y_test, names, folder = read_cifar("cifar100-lt", str(tmp_path))
    assert x_train.shape == (3, 3, 32, 32) and x_train.dtype == np.uint8 and y_train.tolist() == [5, 99, 0]
    assert x_test.shape == (1, 3, 32, 32) and y_test.tolist() == [7]
    assert int(x_train[1, 0, 0, 0]) == 3072 % 256  # row-major channels first, as the pickles store them
    assert names[0] == "n0" and len(names) == 100 and folder == tmp_path / "cifar-100-python"
    (folder / "meta").unlink()
    assert read_cifar("cifar100-lt", str(tmp_path))[4][:3] == ["0", "1", "2"]  # no meta: class indices


def test_cifar_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    with pytest.raises(DataError, match=r"data.data_root and DSCL_DATA are unset"):
        find_cifar("cifar10-lt", None)
    folder = tmp_path / "cifar-100-python"
    _fake_cifar100(folder)
    (folder / "train").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot unpickle CIFAR file .*train"):
        read_cifar("cifar100-lt", str(tmp_path))
    with open(folder / "train", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8)}, fh)
    with pytest.raises(DataError, match=r"train: missing key 'data' or 'fine_labels'"):
        read_cifar("cifar100-lt", str(tmp_path))
    with open(folder / "train", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, fh)
    with pytest.raises(DataError, match=r"are not CIFAR batches"):
        read_cifar("cifar100-lt", str(tmp_path))


# ------------------------------------------------------------------------------------------ split lists


def test_txt_list_paths_labels_and_lines(tmp_path):
    (tmp_path / "l.txt").write_text("# a comment\n\na/with space.png 3\n  /abs/b.png\t0  \nc.png -1\n")
    split = read_list(tmp_path / "l.txt", tmp_path / "root")
    assert split.paths == [str(tmp_path / "root" / "a/with space.png"), "/abs/b.png", str(tmp_path / "root" / "c.png")]
    assert split.labels == [3, 0, -1] and split.num_classes is None  # the range is checked by build_datasets
    assert split.where == [f"{tmp_path / 'l.txt'}, line {n}" for n in (3, 4, 5)]
    (tmp_path / "bad.txt").write_text("a.png 1\nb.png 1.5\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2: label '1\.5' is not an integer"):
        read_list(tmp_path / "bad.txt", tmp_path)


def test_json_list_detected_by_content_and_its_errors(tmp_path):
    ann = {"annotations": [{"fpath": "x/0.jpg", "category_id": 1}, {"fpath": "/abs/1.jpg", "category_id": "0"}],
           "num_classes": 2}
    (tmp_path / "train.lst").write_text("  " + json.dumps(ann))  # no .json suffix: detected by the brace
    split = read_list(tmp_path / "train.lst", tmp_path)
    assert split.paths == [str(tmp_path / "x/0.jpg"), "/abs/1.jpg"] and split.labels == [1, 0]
    assert split.num_classes == 2 and split.where[1] == f"{tmp_path / 'train.lst'}, annotation 2"
    cases = [
        ('{"annotations": [', r"bad\.json, line 1: invalid JSON"),
        ('{"images": []}', "expected a BBN-style JSON object"),
        ('{"annotations": [{"fpath": "a.jpg"}]}', r"annotation 1: each annotation needs 'fpath' and 'category_id'"),
        ('{"annotations": [{"fpath": "a.jpg", "category_id": true}]}', r"annotation 1: category_id True is not"),
        ('{"annotations": [{"fpath": "a.jpg", "category_id": "x"}]}', r"annotation 1: category_id 'x' is not"),
        ('{"annotations": [{"fpath": "a.jpg", "category_id": 0}], "num_classes": 0}', "num_classes must be a positive"),
        ('{"annotations": []}', "the split is empty"),
    ]
    for text, needle in cases:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=needle):
            read_list(tmp_path / "bad.json", tmp_path)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9.png 0\n")
    with pytest.raises(DataError, match="cannot read list file"):
        read_list(tmp_path / "latin.txt", tmp_path)


def test_list_files_resolve_against_the_list_folder(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("a.png 0\n")
    assert resolve_list_file("train.txt", str(tmp_path / "lists"), "train") == tmp_path / "lists" / "train.txt"
    absolute = str(tmp_path / "lists" / "train.txt")
    assert resolve_list_file(absolute, str(tmp_path / "elsewhere"), "train") == Path(absolute)
    with pytest.raises(DataError, match=r"val list file .*val\.txt does not exist \(resolved against "
                                        r"data\.list_dir=.*lists\); check data\.val_list"):
        resolve_list_file("val.txt", str(tmp_path / "lists"), "val")


# ---------------------------------------------------------------------------------------------- folders


def test_image_files_by_extension_in_any_case_recursively_sorted(tmp_path):
    for name in ("b.PNG", "a.jpeg", "sub/c.TIFF", "sub/deeper/d.webp", "notes.txt", "e.png.bak", ".f.png"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()  # a folder named like an image is not a file
    found = [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)]
    assert found == ["a.jpeg", "b.PNG", "sub/c.TIFF", "sub/deeper/d.webp"]


def test_read_folder_split_with_the_runs_class_order(tmp_path):
    _images(tmp_path, ["dog/1.png", "cat/2.png", "cat/x/3.png"])
    paths, labels, names = read_folder_split(tmp_path, None)
    assert names == ["cat", "dog"] and labels == [0, 0, 1]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["cat/2.png", "cat/x/3.png", "dog/1.png"]
    # given class names fix the labels (a class without a folder has no image); unknown folders are refused
    paths, labels, names = read_folder_split(tmp_path, ["dog", "eel", "cat"])
    assert names == ["dog", "eel", "cat"] and labels == [0, 2, 2]
    with pytest.raises(DataError, match=r"class folders \['cat'\] do not exist in the train split"):
        read_folder_split(tmp_path, ["dog"])


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


# --------------------------------------------------------------- the data folder the user named (issue #12)


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
    write_tiny_fmnist(tmp_path / "mine" / "fashion-mnist")
    splits = build_datasets(DataConfig(data_root=str(tmp_path / "mine"), n_max=5, imbalance_factor=5,
                                       val_per_class=0))
    assert splits.data_root == str(tmp_path / "mine" / "fashion-mnist")


# ------------------------------------------------ class names that cannot be folder names (issue 28 item 12)


def test_folder_safe_spelling_of_class_names():
    from dscl.data.readers import folder_safe_name

    assert folder_safe_name("T-shirt/top") == "T-shirt_top"
    assert folder_safe_name('a\\b:c*d?e"f<g>h|i\tj') == "a_b_c_d_e_f_g_h_i_j"
    assert folder_safe_name("Ankle boot") == "Ankle boot"  # spaces are legal in folder names


def test_class_folders_match_a_class_by_name_or_by_its_folder_safe_spelling(tmp_path):
    from dscl.data.readers import FMNIST_CLASSES, match_class_folders

    _images(tmp_path, ["T-shirt_top/1.png", "Trouser/2.png", "Ankle boot/3.png", "cat/4.png"])
    mapping, unknown, notes = match_class_folders(tmp_path, FMNIST_CLASSES)
    assert mapping == {"T-shirt_top": 0, "Trouser": 1, "Ankle boot": 9} and unknown == ["cat"]
    assert notes == [f"{tmp_path}: class folders named by the folder-safe spelling of a class (characters a folder "
                     f"name cannot hold, such as /, written as _): T-shirt_top = T-shirt/top"]
    # the folder datasets and `dscl evaluate DATA` read the same folders with the same labels
    paths, labels, _ = read_folder_split(tmp_path, [*FMNIST_CLASSES, "cat"])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["T-shirt_top/1.png", "Trouser/2.png",
                                                                         "Ankle boot/3.png", "cat/4.png"]
    assert labels == [0, 1, 9, 10]


def test_folder_safe_spelling_only_when_unambiguous(tmp_path):
    from dscl.data.readers import match_class_folders

    # an exact name wins over another class's folder-safe spelling
    _images(tmp_path / "a", ["x_y/1.png"])
    mapping, unknown, notes = match_class_folders(tmp_path / "a", ["x/y", "x_y"])
    assert mapping == {"x_y": 1} and unknown == [] and notes == []
    # one spelling for two classes: refused, naming them
    _images(tmp_path / "b", ["x_y/1.png"])
    with pytest.raises(DataError, match=r"b: class folder x_y is the folder-safe spelling of several classes "
                                        r"\(x/y, x:y\), so it cannot say which; .*labelled list"):
        match_class_folders(tmp_path / "b", ["x/y", "x:y"])
    # two folders for one class (the exact name, legal here, and its folder-safe spelling): refused
    _images(tmp_path / "c", ["x:y/1.png", "x_y/2.png"])
    with pytest.raises(DataError, match=r"c: class folders x:y and x_y both hold class x:y; keep one"):
        match_class_folders(tmp_path / "c", ["x:y"])


class _Planted:
    """A pickle payload that would create a marker file when unpickled (a harmless stand-in for os.system)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_are_read_without_running_code(tmp_path, monkeypatch, protocol):
    monkeypatch.delenv("DSCL_DATA", raising=False)
    folder = tmp_path / "cifar-100-python"
    _fake_cifar100(folder)
    for name in ("train", "test"):  # real arrays load under every protocol numpy writes
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, fh, protocol=protocol)
    assert read_cifar("cifar100-lt", str(tmp_path))[0].shape == (2, 3, 32, 32)
    marker = tmp_path / "code-ran"
    with open(folder / "train", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1], b"x": _Planted(str(marker))},
                    fh, protocol=protocol)
    refused = r"cannot unpickle CIFAR file .*train: it refers to (__builtin__|builtins).exec"
    with pytest.raises(DataError, match=refused):
        read_cifar("cifar100-lt", str(tmp_path))
    assert not marker.exists()
