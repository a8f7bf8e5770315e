"""The one atomic writer and the small file helpers every module uses."""

import json
import os
import stat

import pytest

from dscl import io as dscl_io
from dscl.io import atomic_write, format_duration, save_figure, write_csv, write_json, write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "sub" / "a.bin"  # the folder is created
    assert atomic_write(path, lambda f: f.write(b"one")) == path
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two" and _leftovers(path.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.parametrize("failure", ["writer", "replace"])
def test_an_interrupted_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, failure):
    path = tmp_path / "report.json"
    write_text(path, "old")

    def broken_writer(f):
        f.write(b"half")
        raise KeyboardInterrupt

    def broken_replace(src, dst):
        raise OSError("disk full")

    if failure == "replace":
        monkeypatch.setattr(dscl_io.os, "replace", broken_replace)
        with pytest.raises(OSError, match="disk full"):
            write_text(path, "new")
    else:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(path, broken_writer)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_text_json_and_csv(tmp_path):
    write_text(tmp_path / "t.md", "naïve ✓")
    assert (tmp_path / "t.md").read_bytes() == "naïve ✓".encode()
    write_json(tmp_path / "r.json", {"a": [1, 2], "é": None}, ensure_ascii=False)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "é": None} and text.endswith("\n") and "é" in text
    with pytest.raises(ValueError):  # json.dumps arguments pass through
        write_json(tmp_path / "nan.json", {"x": float("nan")}, allow_nan=False)
    assert not (tmp_path / "nan.json").exists()
    write_csv(tmp_path / "c.csv", ["a", "b"], [(1, "x,y"), (2, "z")])
    assert (tmp_path / "c.csv").read_text() == 'a,b\n1,"x,y"\n2,z\n'


def test_save_figure_writes_a_png_and_closes_when_asked(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    save_figure(fig, tmp_path / "a.png")
    assert plt.fignum_exists(fig.number)  # kept open by default
    save_figure(fig, tmp_path / "b.png", close=True)
    assert not plt.fignum_exists(fig.number)
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_duration():
    assert format_duration(0) == "00:00" and format_duration(-3) == "00:00"
    assert format_duration(59.6) == "01:00" and format_duration(125) == "02:05"
    assert format_duration(3600) == "1:00:00" and format_duration(3 * 3600 + 62) == "3:01:02"


def test_read_json_names_the_file_and_line_of_a_damaged_file(tmp_path):
    from dscl.errors import DsclError
    from dscl.io import read_json

    write_json(tmp_path / "ok.json", {"a": [1, 2]})
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    bad = tmp_path / "report.json"
    bad.write_text('{\n  "top1": 80.3,\n  "many": \n}\n')
    with pytest.raises(DsclError, match=r"report\.json: not valid JSON \(line 4, column 1: Expecting value\)"):
        read_json(bad)
    with pytest.raises(DsclError, match="; rerun `dscl evaluate --run R`$"):
        read_json(bad, what="rerun `dscl evaluate --run R`")
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(DsclError, match="not valid JSON"):
        read_json(bad)
