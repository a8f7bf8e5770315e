"""Run directories: refuse, overwrite (only dscl's files), failed starts, resume, torchrun."""

import copy
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import needs_fmnist, run_cli
from dscl.config import dump_config, load_config
from dscl.rundir import RUN_FILES, RunDirError, load_run_config, prepare_run_dir

# Names added with the failed-start and resume rules are imported inside the tests that use them, so
# this file also runs (and fails where it should) against the code before them.


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


# ----------------------------------------------------------------------------------------------
# issue #12 item 4: a start that failed before its first checkpoint blocks nothing


def test_failed_start_is_replaced_without_overwrite(tmp_path):
    from dscl.rundir import failed_start

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("x")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "checkpoints" / ".last.pt.abc.tmp").write_bytes(b"half")  # an interrupted first save
    assert failed_start(out)
    with pytest.raises(RunDirError, match="without --resume"):
        prepare_run_dir(out, resume=True, overwrite=False)
    assert prepare_run_dir(out, resume=False, overwrite=False, check_only=True) == out
    assert (out / "config.yaml").exists()  # check_only deletes nothing
    prepare_run_dir(out, resume=False, overwrite=False)
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("extra", ["report.json", "notes.txt", "checkpoints/last.pt"])
def test_a_directory_with_more_than_a_failed_start_is_still_refused(tmp_path, extra):
    from dscl.rundir import failed_start

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("x")
    (out / extra).write_text("keep me")
    assert not failed_start(out)
    with pytest.raises(RunDirError, match="--overwrite"):
        prepare_run_dir(out, resume=False, overwrite=False)
    assert (out / extra).read_text() == "keep me"


@needs_fmnist
def test_failure_in_the_first_epoch_does_not_block_the_same_call(tmp_path, monkeypatch):
    """A missing image found while training the first epoch: the corrected retry needs no --overwrite."""
    from dscl.data import DataError, LTDataset
    from dscl.pretrain import pretrain

    cfg = load_config("smoke", overrides=["optim.epochs=1"])
    out = tmp_path / "run"

    def missing(self, i):
        raise DataError("image file /data/x.png does not exist")

    monkeypatch.setattr(LTDataset, "load", missing)
    with pytest.raises(DataError, match="x.png"):
        pretrain(cfg, out, device="cpu", progress=False)
    assert (out / "config.yaml").is_file() and not (out / "checkpoints" / "last.pt").exists()
    monkeypatch.undo()
    path = pretrain(cfg, out, device="cpu", progress=False)  # the same call, no overwrite
    assert path.is_file()


@needs_fmnist
def test_config_only_directory_hint_is_a_command_that_works(tmp_path):
    """issue #12 item 8: classify on a run with config.yaml but no last.pt suggests a command that is accepted."""
    out = tmp_path / "run"
    out.mkdir()
    dump_config(load_config("smoke", overrides=["optim.epochs=1"]), out / "config.yaml")
    before = yaml.safe_load((out / "config.yaml").read_text())
    res = run_cli("classify", "--run", str(out))
    assert res.returncode == 2 and "last.pt does not exist" in res.stderr
    hint = res.stderr.split("run stage 1 first (", 1)[1].rsplit(")", 1)[0]
    argv = shlex.split(hint)
    assert argv[:2] == ["dscl", "pretrain"]
    res = run_cli(*argv[1:], "--no-progress")
    assert res.returncode == 0, res.stderr
    assert (out / "checkpoints" / "last.pt").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text()) == before  # the saved configuration was trained


# ----------------------------------------------------------------------------------------------
# issue #12 item 6: --overwrite removes every file dscl wrote, and only those


@needs_fmnist
def test_overwrite_removes_every_dscl_file_and_keeps_the_users(smoke_run, tmp_path):
    from dscl.analysis.gradient import gradient_ratio
    from dscl.evaluation import evaluate

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    gradient_ratio(run, batches=1, device="cpu", progress=False)
    evaluate(run, split="val", device="cpu", progress=False)
    (run / "notes.txt").write_text("mine")
    (run / "mine").mkdir()
    (run / "mine" / "config.yaml").write_text("a user's file in a user's folder")
    written = sorted(p.name for p in run.iterdir() if p.name not in ("notes.txt", "mine"))
    # every file and folder a smoke run + analyze + evaluate --split val writes is a known dscl file
    assert set(written) <= set(RUN_FILES), set(written) - set(RUN_FILES)
    assert {"analysis", "val", "per_class.csv", "confusion.csv", "predictions.csv"} <= set(written)
    prepare_run_dir(run, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["mine", "notes.txt"]
    assert (run / "mine" / "config.yaml").read_text() == "a user's file in a user's folder"


# ----------------------------------------------------------------------------------------------
# issue #11 item 2: --overwrite under torchrun decides once


def test_overwrite_under_torchrun_takes_one_decision(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"old")
    (out / "report.json").write_text("{}")  # only dscl files: after rank 0's deletion the folder is empty
    marker = tmp_path / "marker.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "rundir_worker.py"), str(out), str(marker)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the two ranks deadlocked in prepare_run_dir(overwrite=True)")
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.read_text() == ""  # the old run's files are gone, the folder exists


# ----------------------------------------------------------------------------------------------
# issue #12 item 5: what a resume may change


def test_resume_config_rules(tmp_path):
    from dscl.rundir import check_resume_config

    old = load_config("smoke")
    new = copy.deepcopy(old)
    new.optim.epochs = 5
    new.classifier.lr = 0.5
    new.data.num_workers = 2
    assert check_resume_config(old, new, tmp_path, epochs_done=2) == {
        "optim.epochs": (2, 5), "classifier.lr": (1.0, 0.5), "data.num_workers": (0, 2)}
    with pytest.raises(RunDirError, match="optim.epochs >= 3"):
        check_resume_config(old, dataclasses.replace(old, optim=dataclasses.replace(old.optim, epochs=2)),
                            tmp_path, epochs_done=3)
    for section, key, value in (("loss", "alpha", 0.2), ("optim", "base_lr", 0.5), ("model", "dim", 64),
                                ("data", "dataset", "folder"), ("optim", "seed", 1), ("views", "num_patches", 1)):
        bad = copy.deepcopy(old)
        setattr(getattr(bad, section), key, value)
        with pytest.raises(RunDirError, match=rf"{section}\.{key} \("):
            check_resume_config(old, bad, tmp_path)
    with pytest.raises(RunDirError, match="preset"):
        check_resume_config(old, dataclasses.replace(old, preset="fmnist-lt"), tmp_path)


def test_record_resume_writes_config_and_a_metrics_line(tmp_path):
    from dscl.rundir import record_resume

    old = load_config("smoke")
    dump_config(old, tmp_path / "config.yaml")
    new = copy.deepcopy(old)
    new.optim.epochs = 4
    assert record_resume(tmp_path, new, epochs_done=2) == {"optim.epochs": (2, 4)}
    assert load_run_config(tmp_path).optim.epochs == 4
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line == {"stage": "resume", "epoch": 2, "changes": {"optim.epochs": [2, 4]}}
    bad = copy.deepcopy(new)
    bad.loss.alpha = 0.3
    with pytest.raises(RunDirError, match="loss.alpha"):
        record_resume(tmp_path, bad, epochs_done=2)
    assert load_run_config(tmp_path).loss.alpha == old.loss.alpha  # nothing written on refusal


def test_stage2_config_changes_are_recorded_and_stage1_changes_refused(tmp_path):
    import json

    from dscl.config import dump_config, load_config
    from dscl.rundir import load_run_config, record_stage2_config

    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config("smoke"), run / "config.yaml")
    cfg = load_config("smoke", overrides=["classifier.protocol=official"])
    assert record_stage2_config(run, cfg) == {"classifier.protocol": ("cached", "official")}
    assert load_run_config(run).classifier.protocol == "official"  # config.yaml now tells the truth
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert line == {"stage": "config", "changes": {"classifier.protocol": ["cached", "official"]}}
    with pytest.raises(RunDirError, match="optim.epochs"):
        record_stage2_config(run, load_config("smoke", overrides=["classifier.protocol=official", "optim.epochs=9"]))
