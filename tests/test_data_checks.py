"""File checks before training, the checks behind ``dscl data --check`` and its summary (issue #12, items
1, 4, 7, 8); the command's own output is tested in tests/test_cli_data.py.

The end-to-end test builds a class-folder dataset mixing 8-bit, 16-bit, palette, RGBA, grey+alpha and
EXIF-rotated files with a corrupt test image: ``dscl run`` must stop within seconds naming the file and
leave no run directory; after the file is fixed the same command trains on the right pixels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from dscl.config import DataConfig, load_config
from dscl.data import (
    DataError,
    LTDataset,
    build_datasets,
    check_files_before_training,
    find_bad_files,
    summarize_dataset,
)
from dscl.data.datasets import DatasetSplits


def _png(path: Path, value: int = 100, size: tuple[int, int] = (6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)


def _split_cfg(root: Path, train: str, test: str, val: str | None = None) -> DataConfig:
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    if val is not None:
        (root / "val.txt").write_text(val)
    return DataConfig(dataset="split", data_root=str(root), list_dir=str(root), train_list="train.txt",
                      test_list="test.txt", val_list="val.txt" if val is not None else None)


# ------------------------------------------------------------------------------- header check (item 4)


def test_header_check_finds_every_kind_of_bad_file_with_its_list_line(tmp_path):
    for name in ("a.png", "b.png", "t.png"):
        _png(tmp_path / name)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    splits = build_datasets(_split_cfg(
        tmp_path,
        "a.png 0\n# comment\nb.png 1\ngone.png 1\ntext.png 0\n",
        "t.png 0\nempty.jpg 1\n",
        val="folder.png 0\na.png 1\n",
    ))
    bad = {p.path: p for split in ("train", "val", "test")
           for p in find_bad_files(getattr(splits, split), split=split, full_decode=False, progress=False)}
    assert set(bad) == {str(tmp_path / n) for n in ("gone.png", "text.png", "empty.jpg", "folder.png")}
    gone = bad[str(tmp_path / "gone.png")]
    assert gone.error == "missing file" and gone.split == "train"
    assert gone.where == f"{tmp_path / 'train.txt'}, line 4"
    assert bad[str(tmp_path / "empty.jpg")].where == f"{tmp_path / 'test.txt'}, line 2"
    assert bad[str(tmp_path / "text.png")].error.startswith("not an image file (PIL cannot identify")
    assert bad[str(tmp_path / "folder.png")].split == "val" and "folder" in bad[str(tmp_path / "folder.png")].error
    assert str(gone) == f"train: {tmp_path / 'gone.png'} (listed at {tmp_path / 'train.txt'}, line 4): missing file"

    with pytest.raises(DataError) as err:
        check_files_before_training(splits, progress=False)
    msg = str(err.value)
    assert msg.startswith("4 of 8 image files of dataset 'split' cannot be used")  # 4 train + 2 val + 2 test
    for name in ("gone.png", "text.png", "empty.jpg", "folder.png"):
        assert str(tmp_path / name) in msg
    assert "train.txt, line 4" in msg and "test.txt, line 2" in msg
    assert "dscl data --check" in msg and "data.check_files=false" in msg
    check_files_before_training(splits, enabled=False)  # trusted data: no check, no error


def test_header_check_lists_ten_problems_and_the_count(tmp_path):
    _png(tmp_path / "ok.png")
    train = "ok.png 0\n" + "".join(f"missing{k:02d}.png 0\n" for k in range(25))
    splits = build_datasets(_split_cfg(tmp_path, train, "ok.png 0\n"))
    with pytest.raises(DataError) as err:
        check_files_before_training(splits, progress=False)
    msg = str(err.value)
    assert msg.startswith("25 of 27 image files")  # 26 train files + the test file (counted per split)
    assert msg.count("missing file") == 10 and "... and 15 more" in msg
    assert "missing09.png" in msg and "missing10.png" not in msg


def test_header_check_is_cheap_and_dscl_data_check_is_thorough(tmp_path):
    _png(tmp_path / "ok.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    data = (tmp_path / "noise.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # intact header, truncated pixels
    splits = build_datasets(_split_cfg(tmp_path, "ok.png 0\ncut.png 0\n", "ok.png 0\n"))
    check_files_before_training(splits, progress=False)  # the header opens: not found here
    full = find_bad_files(splits.train, full_decode=True, progress=False)
    assert [p.path for p in full] == [str(tmp_path / "cut.png")] and full[0].error.startswith("unreadable")
    assert full[0].where == f"{tmp_path / 'train.txt'}, line 2"


def test_in_memory_datasets_have_nothing_to_check():
    ds = LTDataset([0, 1], 2, ["a", "b"], images=np.zeros((2, 4, 4), np.uint8))
    splits = DatasetSplits("toy", ds, None, ds, 2, ["a", "b"], [1, 1], (0.5,) * 3, (0.5,) * 3)
    check_files_before_training(splits, progress=False)
    assert find_bad_files(ds) == []


def test_pretrain_stops_on_a_bad_test_file_before_creating_the_run(tmp_path):
    from dscl.pretrain import pretrain

    root = tmp_path / "data"
    for c in range(2):
        for i in range(4):
            _png(root / "train" / f"c{c}" / f"{i}.png", 40 + 100 * c)
        _png(root / "test" / f"c{c}" / "0.png", 40 + 100 * c)
    (root / "test" / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    cfg = load_config("smoke", None, ["data.dataset=folder", f"data.data_root={root}", "optim.batch_size=4"])
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"(?s)1 of 11 image files of dataset 'folder' .*test: .*broken\.png"):
        pretrain(cfg, out, device="cpu", progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------------- summary (items 7, 8)


def test_summary_names_classes_counts_per_split_and_empty_classes(tmp_path):
    for name in ("a/0.png", "a/1.png", "b/2.png", "c/3.png", "t/4.png", "t/5.png"):
        _png(tmp_path / name)
    splits = build_datasets(_split_cfg(tmp_path, "a/0.png 0\na/1.png 0\nb/2.png 1\nc/3.png 2\n",
                                       "t/4.png 0\nt/5.png 0\n", val="t/4.png 1\n"))
    summary = summarize_dataset(splits)
    assert summary["class_names"] == ["0", "1", "2"]
    assert summary["test_counts"] == [2, 0, 0] and summary["train_counts"] == [2, 1, 1]
    assert summary["classes"][1] == {"class": "1", "group": "few", "train": 1, "val": 1, "test": 0}
    assert summary["empty_classes"] == {"train": [], "val": ["0", "2"], "test": ["1", "2"]}
    assert summary["data_root"] == str(tmp_path)
    json.dumps(summary)  # `dscl data --json` prints it


# ---------------------------------------------------------------------------- end to end (items 1 + 4)


def _mixed_mode_folder(root: Path) -> dict[str, np.ndarray]:
    """Train/test class folders whose files use every common mode; returns path -> expected uint8 (H, W, 3)."""
    expected: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 counter-clockwise to display"
    for split, per_kind in (("train", 2), ("test", 1)):
        for c, name in enumerate(("ant", "bee")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_kind):
                base = rng.integers(0, 256, size=(12, 10), dtype=np.int64)
                stem = folder / f"{k}"
                # 8-bit RGB
                rgb = np.stack([base, 255 - base, np.full_like(base, 60 * c)], axis=2).astype(np.uint8)
                Image.fromarray(rgb).save(f"{stem}_rgb.png")
                expected[f"{stem}_rgb.png"] = rgb
                # 16-bit grey: round(v / 257)
                g16 = (base * 257 + 100 * c).astype(np.uint16)
                Image.fromarray(g16).save(f"{stem}_g16.png")
                expected[f"{stem}_g16.png"] = np.repeat(((g16.astype(np.int64) + 128) // 257)[..., None], 3, 2)
                # palette with a transparent entry (index 0 -> black)
                idx = (base % 4).astype(np.uint8)
                palette = [[0, 0, 0], [200, 10, 10], [10, 200, 10], [10, 10, 200]]
                pal = Image.fromarray(idx, mode="L").convert("P")
                pal.putpalette([v for rgb_ in palette for v in rgb_] + [0] * (256 - 4) * 3)
                pal.putdata(idx.reshape(-1).tolist())
                pal.save(f"{stem}_pal.png", transparency=0)
                lut = np.array(palette, dtype=np.uint8)
                lut[0] = 0
                expected[f"{stem}_pal.png"] = lut[idx]
                # RGBA over black
                alpha = rng.integers(0, 256, size=base.shape, dtype=np.int64)
                rgba = np.dstack([rgb.astype(np.int64), alpha]).astype(np.uint8)
                Image.fromarray(rgba, mode="RGBA").save(f"{stem}_rgba.png")
                expected[f"{stem}_rgba.png"] = ((rgb.astype(np.int64) * alpha[..., None] + 127) // 255).astype(np.uint8)
                # EXIF-rotated (lossless PNG: exact pixels), stored 12 x 10, displayed 10 x 12
                Image.fromarray(rgb).save(f"{stem}_exif.png", exif=exif)
                expected[f"{stem}_exif.png"] = np.rot90(rgb, 1)
    return expected


@pytest.mark.slow  # the retry trains stage 1 and 2 in a subprocess
def test_dscl_run_mixed_modes_bad_test_file_fails_fast_then_trains_on_the_right_pixels(tmp_path):
    root = tmp_path / "data"
    expected = _mixed_mode_folder(root)
    broken = root / "test" / "bee" / "9_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing usable
    out = tmp_path / "run"
    cmd = ("run", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--no-progress",
           "data.dataset=folder", "optim.epochs=1", "optim.batch_size=8", "classifier.epochs=1",
           "data.image_size=16", "views.patch_size=8")
    t0 = time.perf_counter()
    res = run_cli(*cmd)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr
    assert str(broken) in res.stderr and "dscl data --check" in res.stderr
    assert "stage 1:" not in res.stdout + res.stderr  # stopped before training started
    assert elapsed < 60  # python + torch start-up plus a 31-file header check (generous for a busy machine)
    assert not out.exists()  # nothing blocks the corrected retry

    broken.unlink()
    Image.fromarray(np.full((12, 10, 3), 77, dtype=np.uint8)).save(broken)
    expected[str(broken)] = np.full((12, 10, 3), 77, dtype=np.uint8)
    res = run_cli(*cmd)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["test_count"] for r in report["per_class"]] == [5, 6]

    # what the training transform receives for every file: LTDataset.load of the same dataset
    splits = build_datasets(DataConfig(dataset="folder", data_root=str(root)))
    seen = set()
    for ds in (splits.train, splits.test):
        for i in range(len(ds)):
            path = ds.path(i)
            got = ds.load(i).permute(1, 2, 0).numpy()
            assert got.shape == expected[path].shape and np.array_equal(got, expected[path]), path
            seen.add(path)
    assert seen == set(expected) and len(seen) == 31
