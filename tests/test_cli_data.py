"""cli/data.py: ``dscl data`` — the summary, the per-class table, warnings about classes without
images, ``--check`` (exit code 2 with every unreadable file and its list line), ``--json``."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import needs_fmnist, write_png_dataset
from dscl.cli import main
from dscl.cli.data import _class_table, _empty_class_warnings


def _png(path: Path, value: int = 100, size: tuple[int, int] = (6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)


def test_data_command_names_bad_line(tmp_path, capsys):
    root = tmp_path / "data"
    write_png_dataset(root)
    with open(root / "train.txt", "a") as fh:
        fh.write("images/train/class0/0.png notanumber\n")
    assert main(["data", "--dataset", "split", "--data-root", str(root), "--train-list",
                 str(root / "train.txt"), "--test-list", str(root / "test.txt")]) == 2
    err = capsys.readouterr().err
    assert "train.txt" in err and "22" in err  # 21 good lines, the bad one is line 22


@needs_fmnist
def test_data_command_fmnist_json(capsys):
    assert main(["data", "--dataset", "fmnist-lt", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_counts"] == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert summary["num_train"] == 2478 and summary["num_test"] == 10000 and summary["num_classes"] == 10
    assert summary["shot_classes"] == {"many": 5, "medium": 3, "few": 2}


def test_dscl_data_check_lists_bad_files_classes_and_missing_test_classes(tmp_path, capsys):
    root = tmp_path / "data"
    for c, n in (("cat", 3), ("dog", 2), ("eel", 1)):
        for i in range(n):
            _png(root / "train" / c / f"{i}.png", 30 * i)
    _png(root / "test" / "cat" / "0.png")
    _png(root / "test" / "dog" / "0.png")
    (root / "test" / "dog" / "1.png").write_bytes(b"garbage")
    args = ("data", "--dataset", "folder", "--data-root", str(root), "--no-progress")
    code = main([*args, "--check"])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = out.splitlines()
    assert any(line.split() == ["eel", "few", "1", "0"] for line in lines), out
    assert any(line.split() == ["cat", "few", "3", "1"] for line in lines), out
    assert "warning: the test split has no image of 1 of 3 classes: 'eel' (few)" in err
    assert f"test: {root / 'test' / 'dog' / '1.png'}: unreadable" in out
    assert main([*args, "--check", "--json"]) == 2
    summary = json.loads(capsys.readouterr().out)
    assert summary["class_names"] == ["cat", "dog", "eel"] and summary["test_counts"] == [1, 2, 0]
    assert summary["empty_classes"]["test"] == ["eel"]
    assert [(u["split"], Path(u["path"]).name) for u in summary["unreadable"]] == [("test", "1.png")]


def test_dscl_data_check_names_the_list_line_of_a_bad_file(tmp_path, capsys):
    for name in ("a.png", "b.png", "t.png"):
        _png(tmp_path / name)
    (tmp_path / "train.txt").write_text("a.png 0\nb.png 1\nlost.png 1\n")
    (tmp_path / "test.txt").write_text("t.png 0\nt.png 1\n")
    assert main(["data", "--dataset", "split", "--data-root", str(tmp_path), "--train-list",
                 str(tmp_path / "train.txt"), "--test-list", str(tmp_path / "test.txt"), "--check",
                 "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert f"train: {tmp_path / 'lost.png'} (listed at {tmp_path / 'train.txt'}, line 3): missing file" in out


def _summary(rows, with_val, empty=None):
    return {"classes": rows, "num_val": 3 if with_val else None, "num_classes": len(rows),
            "empty_classes": empty or {"train": [], "val": [], "test": []}}


def test_class_table_columns_with_and_without_a_validation_split():
    rows = [{"class": "T-shirt/top", "group": "many", "train": 1000, "val": 2, "test": 1000},
            {"class": "eel", "group": "few", "train": 3, "val": 1, "test": 0}]
    lines = _class_table(_summary(rows, with_val=True)).splitlines()
    assert lines[0].split() == ["class", "group", "train", "val", "test"]
    assert lines[1].split() == ["T-shirt/top", "many", "1000", "2", "1000"]
    assert lines[2].split() == ["eel", "few", "3", "1", "0"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    lines = _class_table(_summary(rows, with_val=False)).splitlines()
    assert lines[0].split() == ["class", "group", "train", "test"] and lines[2].split() == ["eel", "few", "3", "0"]


def test_empty_class_warnings_per_split_and_at_most_twenty_names():
    rows = [{"class": f"c{i}", "group": "few" if i else "many", "train": 5, "val": 1, "test": 1} for i in range(30)]
    assert _empty_class_warnings(_summary(rows, True)) == []
    warnings = _empty_class_warnings(_summary(rows, True, {"train": ["c1"], "val": ["c0"],
                                                           "test": [f"c{i}" for i in range(25)]}))
    assert len(warnings) == 2  # val and test; an empty train class is another error, not this warning
    assert warnings[0].startswith("warning: the val split has no image of 1 of 30 classes: 'c0' (many).")
    assert "the test split has no image of 25 of 30 classes: 'c0' (many), 'c1' (few)" in warnings[1]
    assert "'c19' (few) and 5 more." in warnings[1] and "'c20'" not in warnings[1]
