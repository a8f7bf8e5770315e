"""Run directories: refuse, overwrite (only dscl's files), resume."""

import pytest

from dscl.rundir import RunDirError, prepare_run_dir


def test_run_dir_rules(tmp_path):
    out = tmp_path / "run"
    assert prepare_run_dir(out, resume=False, overwrite=False) == out
    (out / "config.yaml").write_text("x")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="--overwrite"):
        prepare_run_dir(out, resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="cannot resume"):
        prepare_run_dir(out, resume=True, overwrite=False)
    prepare_run_dir(out, resume=False, overwrite=True)
    assert not (out / "config.yaml").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not a dscl file: never deleted
    with pytest.raises(RunDirError, match="contradict"):
        prepare_run_dir(out, resume=True, overwrite=True)
