"""cli/common.py: the configuration flags every config-taking command shares, how a command line becomes
a config (overrides, shortcut flags, --resume, a run's own config with allowed changes), --device."""

import argparse
import json

import pytest

from conftest import needs_fmnist, run_cli
from dscl.cli import build_parser, main, parse
from dscl.cli.common import (
    DEVICES,
    FLAG_KEYS,
    OVERRIDE,
    config_overrides,
    device_arg,
    load_cfg,
    resume_cfg,
    run_cfg_with_overrides,
)
from dscl.config import dump_config, load_config

# ----------------------------------------------------------------------------------------------
# issue #12 item 2: the same configuration flags on every config-taking command


def test_unknown_preset_and_key_fail_clearly(tmp_path, capsys):
    assert main(["pretrain", "--preset", "nope", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "valid presets" in err and "Traceback" not in err
    assert main(["pretrain", "--preset", "smoke", "--out", str(tmp_path / "b"), "optim.epoch=1"]) == 2
    assert "valid keys of optim" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_dataset_flags_on_every_config_command(tmp_path, capsys):
    flags = ["--dataset", "split", "--train-list", "a.txt", "--val-list", "b.txt", "--test-list", "c.txt",
             "optim.epochs=1"]
    for command in (["pretrain", "--out", "x"], ["run"], ["data"], ["compare", "--out", "x"],
                    ["sweep", "--param", "alpha=0.1", "--out", "x"]):
        args = parse(build_parser(), [command[0], "loss.alpha=0.2", *command[1:], *flags])
        assert (args.dataset, args.train_list, args.val_list, args.test_list) == ("split", "a.txt", "b.txt", "c.txt")
        assert args.overrides == ["loss.alpha=0.2", "optim.epochs=1"]
    root = tmp_path / "empty"
    root.mkdir()
    assert main(["run", "--dataset", "folder", "--data-root", str(root), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unrecognized" not in err and str(root) in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exc:
        main(["export", "--run", str(tmp_path), "--format", "onnx", "--out", "m.onnx", "optim.epochs=1"])
    assert exc.value.code == 2 and "takes no section.key=value overrides" in capsys.readouterr().err


def test_skip_file_check_flag_sets_the_config_key():
    args = parse(build_parser(), ["run", "--preset", "smoke", "--skip-file-check"])
    assert "data.check_files=false" in config_overrides(args)
    assert load_cfg(args).data.check_files is False
    assert load_cfg(parse(build_parser(), ["run", "--preset", "smoke"])).data.check_files is True


# ----------------------------------------------------------------------------------------------
# issue #12 item 8: --device


def test_bad_device_is_refused_with_the_valid_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--device", "tpu", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'tpu' is not a device" in err and "cuda:N" in err
    assert "xpu" not in err and "Traceback" not in err  # not torch's list of device types
    assert not (tmp_path / "r").exists()


def test_device_names():
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert device_arg(name) == name
    for bad in ("tpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "cuda 0", "xpu"):
        with pytest.raises(argparse.ArgumentTypeError) as exc:
            device_arg(bad)
        assert repr(bad) in str(exc.value) and DEVICES in str(exc.value)


def test_override_pattern():
    for item in ("optim.epochs=5", "loss.alpha=", "data.data_root=/a=b", "_x._y=1", "model.backbone=resnet18"):
        assert OVERRIDE.match(item), item
    for item in ("epochs=5", "a.b.c=1", "1a.b=2", "--optim.epochs=5", "path/to/file.txt", "a.b", "a.b =1"):
        assert not OVERRIDE.match(item), item


def _namespace(**kw) -> argparse.Namespace:
    values = {flag: None for flag, _ in FLAG_KEYS}
    values.update(overrides=[], preset=None, config=None, profile=None)
    values.update(kw)
    return argparse.Namespace(**values)


def test_config_overrides_put_the_flags_after_the_overrides():
    args = _namespace(overrides=["optim.seed=1", "loss.alpha=0.2"], seed=5, dataset="split", data_root="/d",
                      skip_file_check="false")
    assert config_overrides(args, ["optim.epochs=1"]) == [
        "optim.seed=1", "loss.alpha=0.2", "data.dataset=split", "data.data_root=/d", "optim.seed=5",
        "data.check_files=false", "optim.epochs=1"]
    # later ones win: --seed over an optim.seed override, the extra items over everything
    cfg = load_cfg(_namespace(preset="smoke", overrides=["optim.seed=1"], seed=5), ["optim.epochs=1"])
    assert cfg.optim.seed == 5 and cfg.optim.epochs == 1 and cfg.preset == "smoke"
    assert config_overrides(argparse.Namespace()) == []  # a command without the configuration group


def test_load_cfg_applies_preset_config_file_profile_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  epochs: 4\nloss:\n  alpha: 0.3\n")
    cfg = load_cfg(_namespace(preset="smoke", config=str(tmp_path / "c.yaml"), overrides=["loss.alpha=0.4"],
                              profile="official"))
    assert cfg.preset == "smoke" and cfg.optim.epochs == 4 and cfg.loss.alpha == 0.4  # the override wins
    assert cfg.profile == "official" and cfg.model.patch_bn == "per-slot"


# ----------------------------------------------------------------------------------------------
# a run's own config: --resume, and the changes classify / evaluate may make


def _run_dir(tmp_path, preset="smoke"):
    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config(preset), run / "config.yaml")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # --resume needs a stage-1 checkpoint to continue
    return run


def test_resume_cfg_starts_from_the_runs_config(tmp_path):
    run = _run_dir(tmp_path)
    (tmp_path / "more.yaml").write_text("optim:\n  log_every: 7\n")
    cfg = resume_cfg(_namespace(out=str(run), overrides=["optim.epochs=9"], config=str(tmp_path / "more.yaml")))
    assert cfg.preset == "smoke" and cfg.optim.epochs == 9 and cfg.optim.log_every == 7
    assert cfg.loss.alpha == load_config("smoke").loss.alpha  # the rest is the run's, not a default preset's


def test_resume_cfg_refuses_another_preset_profile_or_stage1_change(tmp_path):
    run = _run_dir(tmp_path)
    with pytest.raises(ValueError, match="--preset fmnist-lt on --resume: .* was trained with preset smoke"):
        resume_cfg(_namespace(out=str(run), preset="fmnist-lt"))
    with pytest.raises(ValueError, match="--profile official on --resume: .* was trained with profile default"):
        resume_cfg(_namespace(out=str(run), profile="official"))
    with pytest.raises(ValueError, match=r"cannot resume .*loss\.alpha"):
        resume_cfg(_namespace(out=str(run), overrides=["loss.alpha=0.5"]))
    with pytest.raises(ValueError, match=r"cannot resume .*model\.dim"):
        resume_cfg(_namespace(out=str(run), overrides=["model.dim=32"]))
    assert resume_cfg(_namespace(out=str(run), preset="smoke", profile="default")).preset == "smoke"


def test_run_cfg_with_overrides_allows_only_the_given_keys(tmp_path):
    run = _run_dir(tmp_path)
    saved = load_config("smoke")
    same = run_cfg_with_overrides(str(run), _namespace(), ("classifier.*",), "classify")
    assert same.to_dict() == saved.to_dict()
    cfg = run_cfg_with_overrides(str(run), _namespace(overrides=["classifier.epochs=3"]), ("classifier.*",),
                                 "classify", ["classifier.lr=0.5"])
    assert cfg.classifier.epochs == 3 and cfg.classifier.lr == 0.5
    with pytest.raises(ValueError, match=r"dscl classify cannot change model\.dim: .*it may change classifier\.\*"):
        run_cfg_with_overrides(str(run), _namespace(overrides=["model.dim=64"]), ("classifier.*",), "classify")
    # --data-root becomes data.data_root, unless the command gives it another meaning
    args = _namespace(data_root=str(tmp_path))
    cfg = run_cfg_with_overrides(str(run), args, ("data.data_root",), "evaluate")
    assert cfg.data.data_root == str(tmp_path)
    cfg = run_cfg_with_overrides(str(run), args, ("data.data_root",), "evaluate", data_root_key=False)
    assert cfg.data.data_root == saved.data.data_root
    with pytest.raises(ValueError, match="cannot change data.data_root"):
        run_cfg_with_overrides(str(run), args, ("classifier.*",), "classify")


@needs_fmnist
@pytest.mark.slow  # trains a third stage-1 epoch in a subprocess
def test_resume_refuses_stage1_changes_and_records_allowed_ones(smoke_run, tmp_path):
    import shutil

    from dscl.run import load_checkpoint, load_run_config

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = (run / "config.yaml").read_text()
    res = run_cli("pretrain", "--out", str(run), "--resume", "optim.epochs=3", "loss.alpha=0.2")
    assert res.returncode == 2 and "loss.alpha (0.1111" in res.stderr and "optim.epochs" in res.stderr
    res = run_cli("pretrain", "--out", str(run), "--resume", "--preset", "fmnist-lt")
    assert res.returncode == 2 and "preset smoke" in res.stderr
    assert (run / "config.yaml").read_text() == before
    res = run_cli("pretrain", "--resume", "--out", str(run), "--no-progress", "optim.epochs=3", "classifier.epochs=2")
    assert res.returncode == 0, res.stderr
    cfg = load_run_config(run)
    assert cfg.optim.epochs == 3 and cfg.classifier.epochs == 2  # config.yaml tells what was trained
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"stage": "resume", "epoch": 2, "changes": {"classifier.epochs": [3, 2], "optim.epochs": [2, 3]}} in lines
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 3 and state["finished"]


def test_resume_auto_is_one_option_and_the_continue_command_uses_it():
    import argparse

    from dscl.cli.common import RESUME_AUTO, continue_command, resume_auto_argv

    assert resume_auto_argv(["run", "--resume", "auto", "x.y=1"]) == ["run", RESUME_AUTO, "x.y=1"]
    assert resume_auto_argv(["run", "--resume=auto"]) == ["run", RESUME_AUTO]
    assert resume_auto_argv(["run", "--resume", "optim.epochs=3"]) == ["run", "--resume", "optim.epochs=3"]
    assert resume_auto_argv(["run", "--out", "auto"]) == ["run", "--out", "auto"]  # a folder named auto
    args = argparse.Namespace(argv=["pretrain", "--out", "r", "--overwrite", "optim.epochs=3"], out="r", resume=False)
    assert continue_command(args) == "dscl pretrain --out r optim.epochs=3 --resume auto"
    args = argparse.Namespace(argv=["run", "--resume", "auto"], out="runs/x", resume="auto")
    assert continue_command(args) == "dscl run --out runs/x --resume auto"  # the folder dscl run chose
    args = argparse.Namespace(argv=["classify", "--run", "r"], run="r")
    assert continue_command(args) == "dscl classify --run r"  # stage 2 simply runs again
    args = argparse.Namespace(argv=["job", "/o/jobs/specs/a.json", "--no-progress"], out="/o/runs/a")
    assert continue_command(args) == "dscl job /o/jobs/specs/a.json --no-progress"  # the same line continues


def test_resume_auto_parses_and_decides_by_the_checkpoint(tmp_path):
    from dscl.cli import build_parser, parse
    from dscl.cli.common import resuming

    args = parse(build_parser(), ["pretrain", "--out", str(tmp_path), "--resume", "auto", "optim.epochs=2"])
    assert args.resume == "auto" and args.overrides == ["optim.epochs=2"] and not resuming(args)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    assert resuming(args)
    assert parse(build_parser(), ["pretrain", "--out", str(tmp_path), "--resume"]).resume is True
