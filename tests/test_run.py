"""The run on disk: directories (refuse, overwrite only dscl's files, failed starts, resume, torchrun),
checkpoint files (atomic, versioned) and the typed states (round trips, version-1 checkpoints)."""

import copy
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import needs_fmnist, run_cli
from dscl import run
from dscl.backbones import BackboneSpec
from dscl.config import dump_config, load_config
from dscl.run import (
    RUN_FILES,
    CheckpointError,
    RunDirError,
    load_checkpoint,
    load_run_config,
    prepare_run_dir,
    save_checkpoint,
)

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
    from dscl.run import failed_start

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
    from dscl.run import failed_start

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


@pytest.mark.slow
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


@pytest.mark.slow
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
    from dscl.run import check_resume_config

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
    from dscl.run import record_resume

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
    from dscl.run import load_run_config, record_stage2_config

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


# ----------------------------------------------------------------------------------------------
# checkpoint files


def test_roundtrip_and_version(tmp_path):
    path = tmp_path / "c" / "last.pt"
    save_checkpoint(path, {"epoch": 3, "w": torch.arange(4)})
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.arange(4))
    assert state["version"] == run.CHECKPOINT_VERSION


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "trunc.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"trunc.pt: it is not a file torch.save wrote, or it is damaged "
                                              r"\(\w+\); copy it again from where it was made$"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"version": 2, "w": torch.zeros(1000)}, tmp_path / "cut.pt")
    whole = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])  # a last.pt copied halfway
    with pytest.raises(CheckpointError, match=r"cut.pt: the file is incomplete \(\d+ bytes; its zip archive has no "
                                              r"end, as when a copy or download stopped early\); copy or download it "
                                              r"again$"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt: the file is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    torch.save({"a": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dscl checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"version": 999}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "future.pt")


# ----------------------------------------------------------------------------------------------
# typed states


def _stage1_state(finished: bool = True) -> run.Stage1State:
    facts = run.RunFacts(method="dscl+pbsd", backbone="convnet", num_classes=3, dim=16, precision="fp32",
                         device="cpu", torch_version="2.x", global_batch=32, world_size=2, lr=0.0125,
                         steps_per_epoch=7, train_fingerprint="abc123", imported=None)
    data = run.DataMeta.of(["a", "b", "c"], [50, 10, 2], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return run.Stage1State(epoch=2, epochs=2 if finished else 4, finished=finished, wall_seconds=12.5, facts=facts,
                           data=data, model={"online.backbone.w": torch.arange(3.0), "online.head.b": torch.ones(2),
                                             "momentum.backbone.w": torch.zeros(3)},
                           ce_head=None, optimizer={"state": {}, "param_groups": []}, scaler=None,
                           rng=[{"torch": torch.get_rng_state()}], view_rng=[torch.arange(4, dtype=torch.uint8)])


def _same_state(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict) and x and all(torch.is_tensor(v) for v in x.values()):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name
        elif f.name in ("rng", "view_rng", "class_means", "feature_stats"):
            assert repr(x) == repr(y), f.name  # tensors inside containers: compared by value
        else:
            assert x == y, f.name


def test_stage1_state_round_trip_and_summary_without_the_checkpoint(tmp_path, monkeypatch):
    state = _stage1_state()
    path = run.save_stage1(tmp_path, state)
    assert path == tmp_path / "checkpoints" / "last.pt"
    raw = load_checkpoint(path)
    assert raw["version"] == run.CHECKPOINT_VERSION == 4 and raw["stage"] == "pretrain"
    assert raw["facts"]["backbone"] == "convnet"  # the name lives in the facts, never next to weights
    _same_state(run.load_stage1(tmp_path), state)
    assert run.load_stage1(tmp_path).backbone_weights().keys() == {"w"}

    def no_checkpoint(*a, **k):
        raise AssertionError("the summary must not load last.pt")

    monkeypatch.setattr(run, "load_checkpoint", no_checkpoint)
    summary = run.stage1_summary(tmp_path)
    assert summary == state.summary() and summary.facts.lr == 0.0125 and summary.data.num_classes == 3


def test_stage1_summary_of_a_run_without_the_summary_file_reads_the_checkpoint(tmp_path):
    state = _stage1_state(finished=False)
    run.save_stage1(tmp_path, state)
    (tmp_path / "checkpoints" / "last.json").unlink()  # a run written before the summary existed
    assert run.stage1_summary(tmp_path) == state.summary()
    with pytest.raises(RunDirError, match="not finished"):
        run.load_finished_stage1(tmp_path)


def test_classifier_state_round_trip(tmp_path):
    data = run.DataMeta.of(["a", "b"], [5, 1], (0.5,) * 3, (0.2,) * 3)
    state = run.ClassifierState(protocol="cached", backbone_name="convnet", num_classes=2, selected_epoch=3,
                                selection="epoch 3", history=[{"epoch": 1, "val": 0.5}], wall_seconds=3.0,
                                data=data, backbone={"w": torch.ones(2)},
                                fc={"weight": torch.ones(2, 4), "bias": torch.zeros(2)}, class_means=torch.eye(2),
                                feature_stats=(torch.zeros(4), torch.ones(4)))
    run.save_classifier(tmp_path, state)
    raw = load_checkpoint(tmp_path / "checkpoints" / "classifier.pt")
    assert "backbone_state" in raw and "backbone" not in raw
    back = run.load_classifier(tmp_path)
    _same_state(back, state)
    assert back.record() == state.record() and back.stats_recorded


# Version 1 (every checkpoint written before the typed states): flat keys, "backbone" the name in
# last.pt and the weights in classifier.pt, no "data" entry, classifier.pt maybe without feature_stats.


def v1_stage1_dict(s: run.Stage1State) -> dict:
    f = s.facts
    return {"version": 1, "stage": "pretrain", "epoch": s.epoch, "epochs": s.epochs, "finished": s.finished,
            "backbone": f.backbone, "num_classes": f.num_classes, "dim": f.dim, "model": s.model,
            "ce_head": s.ce_head, "optimizer": s.optimizer, "scaler": s.scaler, "rng": s.rng, "view_rng": s.view_rng,
            "wall_seconds": s.wall_seconds, "method": f.method, "steps_per_epoch": f.steps_per_epoch,
            "global_batch": f.global_batch, "world_size": f.world_size, "lr": f.lr, "precision": f.precision,
            "device": f.device, "torch_version": f.torch_version, "train_fingerprint": f.train_fingerprint,
            **(s.data.to_dict() if s.data is not None else {})}


def v1_classifier_dict(c: run.ClassifierState) -> dict:
    stats = c.feature_stats
    return {"version": 1, "stage": "classify", "protocol": c.protocol, "backbone_name": c.backbone_name,
            "num_classes": c.num_classes, "backbone": c.backbone, "fc": c.fc, "class_means": c.class_means,
            "feature_stats": {"mean": stats[0], "std": stats[1]} if stats is not None else None,
            "selected_epoch": c.selected_epoch, "selection": c.selection, "history": c.history,
            "wall_seconds": c.wall_seconds, **(c.data.to_dict() if c.data is not None else {})}


def test_version_1_dicts_load_as_the_same_states():
    state = _stage1_state()
    _same_state(run.Stage1State.from_dict(v1_stage1_dict(state)), state)
    old = v1_stage1_dict(state)
    for key in ("class_names", "precision", "lr", "train_fingerprint", "steps_per_epoch"):  # oldest files
        old.pop(key)
    oldest = run.Stage1State.from_dict(old)
    assert oldest.data is None and oldest.facts.precision is None and oldest.facts.lr is None
    cls = run.ClassifierState(protocol="cached", backbone_name="convnet", num_classes=2, backbone={"w": torch.ones(2)},
                              fc={"weight": torch.ones(2, 4), "bias": torch.zeros(2)})
    d = v1_classifier_dict(cls)
    del d["feature_stats"]  # written before issue #21
    back = run.ClassifierState.from_dict(d)
    assert not back.stats_recorded and back.feature_stats is None and torch.equal(back.backbone["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="not a dscl"):
        run.state_from_dict({"model": {}})


@needs_fmnist
def test_a_run_written_with_version_1_checkpoints_evaluates_and_predicts_the_same(smoke_run, tmp_path):
    """A run directory of the code before the typed states: same predictions, same report numbers."""
    from dscl import load_run
    from dscl.evaluation import evaluate

    old = tmp_path / "v1"
    shutil.copytree(smoke_run, old)
    s1, cls = run.load_stage1(old), run.load_classifier(old)
    torch.save(v1_stage1_dict(s1), old / "checkpoints" / "last.pt")
    torch.save(v1_classifier_dict(cls), old / "checkpoints" / "classifier.pt")
    (old / "checkpoints" / "last.json").unlink()
    images = [torch.full((1, 28, 28), v, dtype=torch.uint8) for v in (0, 90, 200)]
    new_p, old_p = load_run(smoke_run), load_run(old)
    assert torch.equal(new_p.predict(images), old_p.predict(images))
    assert old_p.record.selection == new_p.record.selection
    report = evaluate(old, device="cpu", progress=False)
    reference = json.loads((smoke_run / "report.json").read_text())
    for key in ("top1", "top5", "many", "medium", "few", "variants", "precision", "device", "global_batch", "lr",
                "train_fingerprint", "selection", "method", "epochs", "conventions", "expected", "backbone"):
        assert report.get(key) == reference.get(key), key
    # v1 never held the config or the backbone spec (derived from the config: the same, as "backbone" shows)
    assert run.stage1_summary(old) == dataclasses.replace(s1.summary(), config=None, spec=None)


VIT_SPEC = BackboneSpec("timm", "vit_tiny_patch16_224", {"depth": 2, "img_size": [64, 64]}, image_size=64,
                        mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.9, grey_to_rgb=True,
                        input_source="pretrained")


def test_the_backbone_spec_is_stored_as_plain_containers_in_both_checkpoints_and_the_summary(tmp_path):
    state = dataclasses.replace(_stage1_state(), spec=VIT_SPEC)
    run.save_stage1(tmp_path, state)
    raw = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)  # nothing but plain containers
    assert raw["spec"] == VIT_SPEC.to_dict() and raw["spec"]["args"]["img_size"] == [64, 64]
    assert run.load_stage1(tmp_path).spec == VIT_SPEC and run.stage1_summary(tmp_path).spec == VIT_SPEC
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["spec"]["interpolation"] == "bicubic"
    cls = run.ClassifierState(protocol="cached", backbone_name=VIT_SPEC.qualified_name, num_classes=2, spec=VIT_SPEC,
                              backbone={"w": torch.ones(2)}, fc={"weight": torch.ones(2, 4), "bias": torch.zeros(2)})
    run.save_classifier(tmp_path, cls)
    assert run.load_classifier(tmp_path).spec == VIT_SPEC and run.load_classifier(tmp_path).record().spec == VIT_SPEC
    torch.save({**raw, "spec": {**raw["spec"], "colour": "red"}}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt: the checkpoint's backbone spec cannot be read: .*colour"):
        run.load_stage1(tmp_path)


def test_a_config_of_another_architecture_than_the_stored_spec_is_refused(tmp_path):
    summary = dataclasses.replace(_stage1_state().summary(), spec=VIT_SPEC)
    vit = ["model.backbone=timm:vit_tiny_patch16_224", "model.backbone_args={depth: 2, img_size: [64, 64]}"]
    run.check_compatible(summary, load_config("smoke", overrides=vit), 3, tmp_path / "last.pt")
    for other, words in (([vit[0], "model.backbone_args={depth: 4, img_size: [64, 64]}"], "{'depth': 4"),
                         ([*vit, "model.pool=cls"], "pool cls"), ([], "for convnet;")):
        with pytest.raises(CheckpointError, match=re.escape(
                f"{tmp_path / 'last.pt'} holds a timm:vit_tiny_patch16_224 {{'depth': 2, 'img_size': [64, 64]}} "
                "backbone but the config asks for")) as exc:
            run.check_compatible(summary, load_config("smoke", overrides=other), 3, tmp_path / "last.pt")
        assert words in str(exc.value)
    # a version-2 state (no spec) compares the built-in's name, as before
    old = _stage1_state().summary()
    run.check_compatible(old, load_config("smoke"), 3, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="holds a convnet backbone but the config asks for resnet32"):
        run.check_compatible(old, load_config("smoke", overrides=["model.backbone=resnet32"]), 3, tmp_path / "last.pt")


def test_a_resume_with_other_input_settings_is_refused(tmp_path):
    run.check_same_inputs(VIT_SPEC, VIT_SPEC, tmp_path / "last.pt")
    run.check_same_inputs(None, VIT_SPEC, tmp_path / "last.pt")  # version 1-2: nothing recorded to compare
    other = dataclasses.replace(VIT_SPEC, mean=(0.48, 0.46, 0.41))
    with pytest.raises(CheckpointError, match=r"last.pt: stage 1 started with inputs .*mean \(0.5, 0.5, 0.5\).* but "
                                              r"the config now gives .*mean \(0.48, 0.46, 0.41\)"):
        run.check_same_inputs(VIT_SPEC, other, tmp_path / "last.pt")


# Version 2 (issues #23-#28): the typed states' entries, no backbone spec; config.yaml and the recorded config
# without model.backbone_args / model.pool.


def v2_dict(state: run.Stage1State | run.ClassifierState) -> dict:
    d = {"version": 2, **state.to_dict()}
    del d["spec"]
    if isinstance(d.get("config"), dict):
        d["config"] = _v2_config(d["config"])
    return d


def _v2_config(config: dict) -> dict:
    model = {k: v for k, v in config["model"].items() if k not in ("backbone_args", "pool")}
    return {**config, "model": model}


@needs_fmnist
def test_a_run_written_with_version_2_checkpoints_evaluates_and_predicts_the_same(smoke_run, tmp_path):
    """A run directory of the code before backbone specs: the built-in spec is derived from its config and
    data, so it predicts and evaluates as a run of this code does."""
    from dscl import load_run
    from dscl.evaluation import evaluate

    old = tmp_path / "v2"
    shutil.copytree(smoke_run, old)
    s1, cls = run.load_stage1(old), run.load_classifier(old)
    torch.save(v2_dict(s1), old / "checkpoints" / "last.pt")
    torch.save(v2_dict(cls), old / "checkpoints" / "classifier.pt")
    summary = json.loads((old / "checkpoints" / "last.json").read_text())
    del summary["spec"]
    (old / "checkpoints" / "last.json").write_text(json.dumps({**summary, "version": 2,
                                                               "config": _v2_config(summary["config"])}))
    saved = yaml.safe_load((old / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump(_v2_config(saved), sort_keys=False))
    assert run.load_stage1(old).spec is None and run.load_classifier(old).spec is None
    images = [torch.full((1, 28, 28), v, dtype=torch.uint8) for v in (0, 90, 200)] + [
        torch.randint(0, 256, (3, 40, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))]
    new_p, old_p = load_run(smoke_run), load_run(old)
    assert old_p.spec == new_p.spec and old_p.spec.family == "builtin"
    assert torch.equal(new_p.predict(images), old_p.predict(images))
    assert torch.equal(new_p.embed(images), old_p.embed(images))
    report = evaluate(old, device="cpu", progress=False)
    reference = json.loads((smoke_run / "report.json").read_text())
    for key in ("top1", "top5", "many", "medium", "few", "variants", "per_class", "precision", "global_batch", "lr",
                "train_fingerprint", "selection", "method", "epochs", "conventions", "expected", "backbone"):
        assert report.get(key) == reference.get(key), key


def test_a_mid_epoch_stage1_state_keeps_its_position_and_epoch_state(tmp_path):
    state = dataclasses.replace(_stage1_state(finished=False), position=3, threads=1,
                                epoch_log={"sums": {"loss": 1.5}, "n": 2},
                                guard={"count": torch.tensor(0), "streak": torch.tensor(0), "worst": torch.tensor(0),
                                       "steps": 1})
    run.save_stage1(tmp_path, state)
    back = run.load_stage1(tmp_path)
    assert (back.position, back.threads, back.epoch_log) == (3, 1, {"sums": {"loss": 1.5}, "n": 2})
    assert back.guard["steps"] == 1 and run.stage1_summary(tmp_path).position == 3
    assert run.Stage1State.from_dict(v1_stage1_dict(state)).position == 0  # version 1: epoch ends only


# ----------------------------------------------------------------------------------------------
# issue 28 item 3: what the checkpoint records wins over a hand-edited config.yaml


@needs_fmnist
def test_stage1_checkpoints_record_the_resolved_config(smoke_run):
    saved = load_run_config(smoke_run).to_dict()
    assert run.stage1_summary(smoke_run).config == saved
    assert run.load_stage1(smoke_run).config == saved


def _recorded_run(tmp_path: Path, *, recorded: bool = True) -> Path:
    """A run folder whose config.yaml is the smoke preset and whose stage 1 recorded it (or, ``recorded``
    False, a checkpoint written before the config was recorded: only its facts)."""
    cfg = load_config("smoke")
    out = tmp_path / "r"
    out.mkdir()
    dump_config(cfg, out / "config.yaml")
    state = dataclasses.replace(_stage1_state(), epochs=cfg.optim.epochs, finished=True)
    if recorded:
        state = dataclasses.replace(state, config=cfg.to_dict())
    run.save_stage1(out, state)
    return out


def _edit(out: Path, section: str, key: str, value) -> None:
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved[section][key] = value
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


@pytest.mark.parametrize("section, key, value, trained", [
    ("data", "image_size", 32, 28), ("model", "backbone", "resnet18", "convnet"), ("model", "dim", 64, 128),
    ("loss", "alpha", 0.5, 1 / 9), ("optim", "seed", 3, 0), ("data", "dataset", "cifar10-lt", "fmnist-lt"),
    ("views", "num_patches", 0, 2)])
def test_a_config_yaml_that_contradicts_the_checkpoint_is_refused_by_name(tmp_path, section, key, value, trained):
    from dscl.config import ConfigError

    out = _recorded_run(tmp_path)
    _edit(out, section, key, value)
    with pytest.raises(ConfigError) as info:
        load_run_config(out)
    msg = str(info.value)
    assert f"{section}.{key}" in msg and repr(value) in msg and repr(trained) in msg and "\n" not in msg
    assert str(out / "config.yaml") in msg and "last.json" in msg


@pytest.mark.parametrize("section, key, value", [
    ("log", "project", "mine"), ("classifier", "epochs", 9), ("classifier", "tau_norm", 0.5),
    ("eval", "many_threshold", 40), ("data", "num_workers", 2), ("data", "data_root", "/elsewhere"),
    ("optim", "epochs", 50), ("model", "channels_last", False)])
def test_harmless_config_yaml_edits_are_accepted(tmp_path, section, key, value):
    out = _recorded_run(tmp_path)
    _edit(out, section, key, value)
    assert getattr(getattr(load_run_config(out), section), key) == value


def test_a_checkpoint_without_a_recorded_config_still_checks_its_facts(tmp_path):
    from dscl.config import ConfigError

    out = _recorded_run(tmp_path, recorded=False)  # facts: convnet, dim 16, dscl+pbsd, global batch 32
    _edit(out, "model", "dim", 16)
    assert load_run_config(out).model.dim == 16
    for section, key, value, needle in (("model", "backbone", "resnet18", "model.backbone"),
                                        ("loss", "loss", "ce", "dscl+pbsd"), ("optim", "batch_size", 64, "32")):
        before = (out / "config.yaml").read_text()
        _edit(out, section, key, value)
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_run_config(out)
        (out / "config.yaml").write_text(before)


def test_a_malformed_run_config_is_one_line_with_file_and_line(tmp_path):
    from dscl.config import ConfigError

    out = _recorded_run(tmp_path)
    text = (out / "config.yaml").read_text().replace("image_size: 28", "image_size: [28")
    (out / "config.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_run_config(out)
    assert str(info.value).startswith(f"{out / 'config.yaml'}: line ") and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# run files are data, never code (issue 28 item 16)


class _RunsCode:
    """Pickles as a call of ``exec``: loading it with a full unpickler creates ``marker`` (harmless stand-in
    for what a hostile file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _plant(path: Path, marker: Path, base: dict | None = None) -> None:
    """Write ``base`` (default: a minimal dscl checkpoint) plus a payload to ``path``, as a hostile copy would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(base or {"version": 2, "stage": "classify"}), "note": _RunsCode(marker)}, path)


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    for name in ("last.pt", "classifier.pt"):
        _plant(tmp_path / "checkpoints" / name, marker)
        with pytest.raises(CheckpointError, match=r"it holds Python objects \(builtins\.exec\).*weights_only=True"):
            load_checkpoint(tmp_path / "checkpoints" / name)
        assert not marker.exists()


@needs_fmnist
def test_new_run_files_hold_only_tensors_and_plain_data(smoke_run):
    """Nothing a run writes needs an allowlist: torch.load(weights_only=True) reads it as it is."""
    for name in ("last.pt", "classifier.pt"):
        path = smoke_run / "checkpoints" / name
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], name
        assert torch.load(path, weights_only=True)["version"] == run.CHECKPOINT_VERSION


def _numpy1_file(obj: dict, path: Path) -> None:
    """``obj`` saved the way numpy 1 pickles arrays (``numpy.core.multiarray``, not numpy 2's ``numpy._core``);
    the legacy torch format keeps the pickle as one uncompressed stream, so the module name can be rewritten."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def test_version_1_and_2_checkpoints_with_numpy_rng_states_still_load_and_restore(tmp_path):
    """Older checkpoints hold numpy's RNG state as a tuple with a uint32 array: exactly those numpy types are
    allowlisted (numpy 1 and 2 names), and the restored streams continue where they stopped."""
    import random

    import numpy as np

    from dscl.rng import set_rng_state

    np.random.standard_normal()
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(2))
    state = dataclasses.replace(_stage1_state(), rng=[old_rng])
    files = {"v2.pt": {"version": 2, **state.to_dict()}, "v1.pt": v1_stage1_dict(state)}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    _numpy1_file(files["v1.pt"], tmp_path / "v1-numpy1.pt")
    for name in ("v2.pt", "v1.pt", "v1-numpy1.pt"):
        back = run.Stage1State.from_dict(load_checkpoint(tmp_path / name))
        set_rng_state(back.rng[0])
        got = (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(2))
        assert got[:3] == expected[:3] and torch.equal(got[3], expected[3]), name


@needs_fmnist
def test_evaluate_predict_and_resume_refuse_a_run_file_that_would_run_code(smoke_run, tmp_path, capsys):
    """A run copied from someone else: its checkpoints are read as data, so a planted payload is refused with
    a one-line message and never runs, whichever command opens the file."""
    from PIL import Image

    from dscl.cli import main

    marker = tmp_path / "ran"
    bad = tmp_path / "bad"
    shutil.copytree(smoke_run, bad)
    _plant(bad / "checkpoints" / "classifier.pt", marker, load_checkpoint(smoke_run / "checkpoints" / "classifier.pt"))
    _plant(bad / "checkpoints" / "last.pt", marker, load_checkpoint(smoke_run / "checkpoints" / "last.pt"))
    (bad / "checkpoints" / "last.json").unlink()  # so that every command reads last.pt itself
    Image.new("L", (28, 28), 90).save(tmp_path / "x.png")
    for argv in (["evaluate", "--run", str(bad), "--no-progress"],
                 ["predict", "--run", str(bad), str(tmp_path / "x.png"), "--out", str(tmp_path / "p.csv")],
                 ["pretrain", "--out", str(bad), "--resume", "--no-progress"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "holds Python objects (builtins.exec)" in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not marker.exists(), argv


# ----------------------------------------------------------------------------------------------
# issue 28 item 6: a resumed stage 1 trains the steps after its checkpoint again; each is logged once


def _checkpoint_of(cfg, out: Path, *, epoch: int, position: int, steps_per_epoch: int) -> None:
    """A stage-1 checkpoint of ``cfg``'s run in ``out`` after ``epoch`` epochs and ``position`` more steps."""
    from dscl.config import method_name

    state = _stage1_state(finished=False)
    facts = dataclasses.replace(state.facts, method=method_name(cfg), backbone=cfg.model.backbone, dim=cfg.model.dim,
                                global_batch=cfg.optim.batch_size, steps_per_epoch=steps_per_epoch)
    run.save_stage1(out, dataclasses.replace(state, facts=facts, epoch=epoch, epochs=cfg.optim.epochs,
                                             position=position))


def test_a_resume_drops_the_records_logged_after_its_checkpoint(tmp_path):
    """Ctrl-C (back to the epoch's checkpoint) or kill -9 (back to the last optim.checkpoint_every_minutes
    save, maybe inside a record's write): metrics.jsonl keeps what the checkpoint has trained, so the
    steps logged again appear once."""
    from dscl.run import MetricsLog, record_resume

    cfg = load_config("smoke", overrides=["optim.epochs=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(stage="data", train_images=70)
    for step in range(1, 13):  # 7 steps per epoch: into epoch 2
        log.write(stage="pretrain", epoch=(step - 1) // 7 + 1, step=step, loss=1.0 / step)
        if step == 7:
            log.write(stage="pretrain_epoch", epoch=1, loss=0.5)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"stage": "pretrain", "epoch": 2, "st')  # killed inside the write
    assert len(log.read("pretrain")) == 12  # a torn last line is no record
    _checkpoint_of(cfg, tmp_path, epoch=1, position=2, steps_per_epoch=7)  # after global step 9
    record_resume(tmp_path, cfg, epochs_done=1)
    records = log.read()
    assert [r["step"] for r in records if r["stage"] == "pretrain"] == list(range(1, 10))
    assert [r["stage"] for r in records].count("pretrain_epoch") == 1 and records[0]["stage"] == "data"
    assert records[-1] == {"stage": "resume", "epoch": 1, "changes": {}}
    log.write(stage="pretrain", epoch=2, step=10, loss=0.1)  # the resumed run goes on
    assert [r["step"] for r in log.read("pretrain")][-2:] == [9, 10]
    # an epoch's checkpoint (position 0) keeps exactly its epochs' records
    _checkpoint_of(cfg, tmp_path, epoch=1, position=0, steps_per_epoch=7)
    record_resume(tmp_path, cfg, epochs_done=1)
    assert [r["step"] for r in log.read("pretrain")] == list(range(1, 8))


def test_an_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    from dscl.run import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(stage="pretrain", step=1, loss=1.0)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"stage": "pretrain", "st')
    log.write(stage="classify", epoch=1, train_loss=2.0)  # e.g. `dscl classify` after a killed stage 1
    assert log.read() == [{"stage": "pretrain", "step": 1, "loss": 1.0},
                          {"stage": "classify", "epoch": 1, "train_loss": 2.0}]


def test_a_recorded_config_this_dscl_cannot_read_falls_back_to_the_facts(tmp_path):
    from dscl.config import ConfigError

    out = _recorded_run(tmp_path)
    cfg = load_config("smoke")
    newer = {**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "key_of_a_newer_dscl": 1}}
    run.save_stage1(out, dataclasses.replace(run.load_stage1(out), config=newer, facts=dataclasses.replace(
        run.load_stage1(out).facts, dim=cfg.model.dim)))
    assert load_run_config(out).data.image_size == 28  # not a crash on the unknown key
    _edit(out, "model", "backbone", "resnet18")
    with pytest.raises(ConfigError, match="model.backbone is 'resnet18' there but stage 1 was trained with 'convnet'"):
        load_run_config(out)
