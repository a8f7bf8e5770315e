"""dscl.data.inputs: the files given to `dscl predict` / `embed` / `evaluate DATA` (folders, labelled lists)
and streaming them decoded, with unreadable files as error entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dscl.data import DataError
from dscl.data.inputs import collect_inputs, iter_files, read_labelled_list
from dscl.data.preprocess import ImageTransform, Preprocess


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


def test_labelled_lists_by_name_index_tab_or_quotes(tmp_path: Path) -> None:
    """Issue #21: a list may label by class name (plain, tab-separated with spaces, quoted) or by index;
    indices on a run with class names get a note naming the mapping; a label that is neither is refused."""
    names = ["sea urchin", "ant", "bee"]
    listing = tmp_path / "l.txt"
    listing.write_text("# comment\n\na.png ant\nb c.png\tsea urchin\n\"d e.png\" \"bee\"\nf.png 2\n"
                       "g h.png\n'/abs/i.png'\n")
    got = read_labelled_list(listing, tmp_path, names)
    assert got.paths == [str(tmp_path / n) for n in ("a.png", "b c.png", "d e.png", "f.png", "g h.png")] + [
        "/abs/i.png"]
    assert got.labels == [1, 0, 2, 2, None, None]
    assert len(got.notes) == 1 and "0 = sea urchin, 1 = ant, 2 = bee" in got.notes[0]
    assert read_labelled_list(listing, tmp_path, ["0", "1", "2", "ant", "bee", "sea urchin"]).notes == []
    listing.write_text("a.png 7\n")
    with pytest.raises(DataError, match=r"line 1: label '7' is neither a class of the run \(sea urchin, ant, bee\)"):
        read_labelled_list(listing, tmp_path, names)
    listing.write_text('"a.png ant\n')
    with pytest.raises(DataError, match="line 1"):
        read_labelled_list(listing, tmp_path, names)


def test_iter_files_streams_batches_and_keeps_going_past_bad_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(5):
        path = tmp_path / f"{k}.png"
        if k == 2:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (12 + k, 10, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    transform = ImageTransform(Preprocess(8, (0.5,) * 3, (0.25,) * 3, grey=False))
    batches = list(iter_files(transform, paths, batch_size=2))
    assert [b.indices for b in batches] == [[0, 1], [2, 3], [4]]
    assert [b.paths for b in batches] == [paths[0:2], paths[2:4], paths[4:]]
    assert batches[1].errors[0] is not None and "2.png" in batches[1].errors[0] and batches[1].errors[1] is None
    assert [len(b.images) for b in batches] == [2, 1, 1]
    assert torch.equal(batches[1].images[0], transform(paths[3]))  # the readable files, in order
    only_bad = list(iter_files(transform, [paths[2]]))
    assert only_bad[0].images.shape == (0, 3, 8, 8)  # the conversion's empty batch


def test_file_errors_say_what_is_wrong_without_a_hint_for_another_command(tmp_path: Path) -> None:
    # issue 28 item 14: the hint to run `dscl data --check` (the training data's check) does not apply to the
    # files given to predict / evaluate DATA; each caller adds the one hint that fits, once
    (tmp_path / "bad.png").write_bytes(b"not an image")
    transform = ImageTransform(Preprocess(8, (0.5,) * 3, (0.25,) * 3, grey=False))
    errors = next(iter_files(transform, [str(tmp_path / "gone.png"), str(tmp_path / "bad.png")])).errors
    assert errors[0] == f"image file {tmp_path / 'gone.png'} does not exist"
    assert errors[1].startswith(f"cannot read image file {tmp_path / 'bad.png'}: ")
    assert not any("dscl data" in e or "\n" in e for e in errors)


def test_a_list_label_may_be_the_folder_safe_spelling_of_a_class(tmp_path: Path) -> None:
    # issue 28 item 12: lists written from a folder tree name "T-shirt/top" as T-shirt_top; read like the folders
    listing = tmp_path / "l.txt"
    listing.write_text("a.png T-shirt_top\nb.png Trouser\n")
    got = read_labelled_list(listing, tmp_path, ["T-shirt/top", "Trouser"])
    assert got.labels == [0, 1]
    assert got.notes == [f"{listing}: labels written as the folder-safe spelling of a class: T-shirt_top = "
                         "T-shirt/top"]
