"""The command line as a whole (cli/__init__.py): ``dscl --help``, the dispatcher (parsing overrides
anywhere, exit codes, interrupts, ``dscl presets``) and the end-to-end ``dscl run`` in a real
subprocess on the smoke preset. Each command's own tests are in tests/test_cli_<module>.py."""

import csv
import json
import re

import numpy as np
import pytest

from conftest import check_report, needs_fmnist, run_cli
from dscl.cli import main


def test_help_lists_subcommands(capsys):
    res = run_cli("--help")  # the installed entry point, in a process of its own
    assert res.returncode == 0
    for cmd in ("pretrain", "classify", "evaluate", "run", "data", "compare", "sweep", "analyze"):
        assert cmd in res.stdout
    assert main([]) == 2 and "dscl run" in capsys.readouterr().err


@needs_fmnist
def test_run_smoke_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = run_cli("run", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "Many" in res.stdout and "report:" in res.stdout
    report = json.loads((out / "report.json").read_text())
    check_report(report, 10)
    assert report["dataset"] == "fmnist-lt" and report["method"] == "dscl+pbsd"
    assert report["shot_classes"] == {"many": 0, "medium": 5, "few": 5}
    assert report["many"] is None  # no class has > 100 images in the smoke subset
    assert len(report["variants"]) == 3
    assert (out / "report.md").stat().st_size > 0
    assert (out / "plots" / "per_class_accuracy.png").stat().st_size > 0
    assert (out / "plots" / "confusion_matrix.png").stat().st_size > 0
    # issue #21: accuracy under forward / uniform / backward long-tailed test distributions
    ta = report["test_agnostic"]
    assert len(ta) == 11 and ta["uniform"] == pytest.approx(report["top1_macro"], abs=1e-3)
    assert (out / "plots" / "test_agnostic.png").stat().st_size > 0
    assert "## Under other test distributions" in (out / "report.md").read_text()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} >= {"pretrain", "pretrain_epoch", "classify"}
    assert all(np.isfinite(x["loss"]) for x in lines if x["stage"] == "pretrain")
    # the compute threads of every logged interval (the count drops while other jobs use the CPU)
    assert all(isinstance(x["threads"], int) and x["threads"] >= 1 for x in lines if x["stage"] == "pretrain")
    assert all(x["queue_rejected"] == 0 for x in lines if x["stage"] == "pretrain")  # non-finite keys kept out
    _check_run_facts_and_csvs(out, report, res)

    # the run directory is refused without --resume/--overwrite, and nothing in it is touched
    before = (out / "report.json").read_bytes()
    res = run_cli("run", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (out / "report.json").read_bytes() == before

    # evaluate again; --split val (smoke holds 20 images per class out of the unused training images)
    # writes the same files into val/
    res = run_cli("evaluate", "--run", str(out), "--json", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["top1"] == pytest.approx(report["top1"])
    res = run_cli("evaluate", "--run", str(out), "--split", "val", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "val" / "report.json").read_text())["split"] == "val"
    assert (out / "val" / "predictions.csv").read_text().count("\n") == 1 + 200

    # a config that no longer matches the checkpoint is refused, and the classifier is not replaced
    cls_before = (out / "checkpoints" / "classifier.pt").read_bytes()
    cfg_text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(cfg_text.replace("backbone: convnet", "backbone: resnet32"))
    res = run_cli("classify", "--run", str(out), "--no-progress")
    assert res.returncode == 2 and "convnet" in res.stderr and "resnet32" in res.stderr
    assert (out / "checkpoints" / "classifier.pt").read_bytes() == cls_before


def _check_run_facts_and_csvs(out, report: dict, res) -> None:
    """Run facts in report.json (issue #14 section 4), the ETA lines, and the per-class / confusion /
    prediction CSVs of a finished smoke run (10 classes, 10,000 in-memory test images)."""
    import torch

    assert re.search(r"epoch 1/2 .*ETA stage 1 \d\d:\d\d", res.stdout + res.stderr)
    assert "stage 2 + evaluation: roughly" in res.stderr and "stage 2 + evaluation took" in res.stderr
    assert report["precision"] == "fp32" and report["device"] == "cpu"
    assert report["torch_version"] == torch.__version__
    assert report["global_batch"] == 32 and report["world_size"] == 1
    assert report["lr"] == pytest.approx(0.1 * 32 / 256)
    assert re.fullmatch(r"[0-9a-f]{12}", report["train_fingerprint"])
    assert report["train_counts"] == [r["train_count"] for r in report["per_class"]]
    names = [r["class"] for r in report["per_class"]]
    with open(out / "per_class.csv", newline="") as fh:
        per_class = list(csv.DictReader(fh))
    assert [r["class"] for r in per_class] == names
    assert [float(r["accuracy"]) for r in per_class] == [r["accuracy"] for r in report["per_class"]]
    assert {r["group"] for r in per_class} == {"medium", "few"}
    with open(out / "confusion.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == names and [r[0] for r in rows[1:]] == names
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.sum() == 10000 and 100 * np.trace(counts) / 10000 == pytest.approx(report["top1"], abs=1e-3)
    with open(out / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 10000 and [p["index"] for p in preds[:3]] == ["0", "1", "2"]
    assert all(p["path"] == "" for p in preds)  # in-memory Fashion-MNIST: no file
    assert 100 * np.mean([p["correct"] == "1" for p in preds]) == pytest.approx(report["top1"], abs=1e-3)
    first = preds[0]
    assert first["label_name"] == names[int(first["label"])]
    assert first["top5"].split(";")[0] == first["prediction_name"] == names[int(first["prediction"])]
    assert len(first["top5"].split(";")) == 5


# ----------------------------------------------------------------------------------------------
# issue #12 item 2: overrides anywhere on the command line


@needs_fmnist
def test_overrides_before_and_after_options(capsys):
    assert main(["data", "data.imbalance_factor=10", "--json", "--dataset", "fmnist-lt", "data.n_max=60",
                 "--no-progress", "data.n_max=50"]) == 0
    counts = json.loads(capsys.readouterr().out)["train_counts"]
    assert counts[0] == 50 and counts[-1] == 5  # the later n_max wins; IF 10 from before the options


def test_readme_dataset_command_parses_with_overrides_after_options(tmp_path, capsys):
    # README: dscl data --dataset cifar100-lt --data-root ~/data data.imbalance_factor=100
    assert main(["data", "--dataset", "cifar100-lt", "--data-root", str(tmp_path), "data.imbalance_factor=100"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized" not in err
    assert "cifar-100-python" in err  # it got as far as looking for the data


def test_parse_collects_overrides_in_order_and_refuses_other_leftovers(capsys):
    from dscl.cli import build_parser, parse

    args = parse(build_parser(), ["run", "a.b=1", "--seed", "3", "c.d=2", "--no-progress", "a.b=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "a.b=3"] and args.seed == 3 and args.no_progress
    with pytest.raises(SystemExit) as exc:
        parse(build_parser(), ["run", "a.b=1", "--seed", "3", "stray"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "dscl run: error: unrecognized arguments: stray" in err  # the command's own usage
    assert "usage: dscl run" in err


# ----------------------------------------------------------------------------------------------
# issue #12 item 8: presets, interrupt messages; how main maps errors to exit codes


def test_presets_lists_names_with_descriptions(capsys):
    from dscl.config import preset_names

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # a preset's row starts with its name; its weights and memory estimate follow, indented
    rows = dict(line.split(None, 1) for line in lines if line[:1].strip() and line.split()[0] in preset_names())
    assert sorted(rows) == preset_names()
    assert rows["smoke"].startswith("Seconds on a CPU") and rows["imagenet-lt"].startswith("ImageNet-LT")
    assert all(len(d) > 20 and d.endswith(".") for d in rows.values())


def test_interrupt_names_the_directory_and_what_was_saved(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import dscl.pretrain

    monkeypatch.chdir(tmp_path)

    def before_first_checkpoint(cfg, out, **kwargs):
        Path(out).mkdir(parents=True)
        (Path(out) / "config.yaml").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(dscl.pretrain, "pretrain", before_first_checkpoint)
    assert main(["run", "--preset", "smoke"]) == 130  # no --out: the directory is made up
    err = capsys.readouterr().err
    (made,) = (tmp_path / "runs").iterdir()
    assert "nothing was saved" in err and f"--out runs/{made.name}" in err and "--resume" not in err

    def after_an_epoch(cfg, out, **kwargs):
        (Path(out) / "checkpoints").mkdir(parents=True)
        (Path(out) / "checkpoints" / "last.pt").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(dscl.pretrain, "pretrain", after_an_epoch)
    assert main(["run", "--preset", "smoke", "--out", "runs/b"]) == 130
    assert "continue with: dscl run --out runs/b --resume" in capsys.readouterr().err


def test_main_maps_user_errors_to_exit_code_2_and_debug_shows_the_traceback(monkeypatch, capsys):
    import dscl.cli.data
    from dscl.data import DataError

    def fails(args):
        raise DataError("the data is wrong:\n  line 3 of a.txt")

    monkeypatch.setattr(dscl.cli.data, "cmd_data", fails)
    assert main(["data", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "dscl data: error: the data is wrong: line 3 of a.txt"  # one line, no traceback
    with pytest.raises(DataError, match="the data is wrong"):
        main(["data", "--preset", "smoke", "--debug"])

    def disk_full(args):
        raise OSError(28, "No space left on device", "/runs/a/report.json")

    monkeypatch.setattr(dscl.cli.data, "cmd_data", disk_full)  # the system refused: also the user's to fix
    assert main(["data", "--preset", "smoke"]) == 2
    assert "error: [Errno 28] No space left on device: '/runs/a/report.json'" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [ValueError("bad shape (3, 4)"), RuntimeError("mat1 and mat2"), KeyError("fc"),
                                 FloatingPointError("inf"), TypeError("x")])
def test_anything_else_is_an_internal_error_not_bad_input(monkeypatch, capsys, exc):
    import dscl.cli.data

    def bug(args):
        raise exc

    monkeypatch.setattr(dscl.cli.data, "cmd_data", bug)
    monkeypatch.delenv("DSCL_DEBUG", raising=False)
    assert main(["data", "--preset", "smoke"]) == 1  # Python's own code for an uncaught exception
    err = capsys.readouterr().err
    assert err.startswith(f"dscl data: internal error: {type(exc).__name__}: ")
    assert "This is a bug in dscl, not in your input" in err and "--debug (or DSCL_DEBUG=1)" in err
    assert "test_cli.py:" in err  # where it happened
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    with pytest.raises(type(exc)):
        main(["data", "--preset", "smoke", "--debug"])
    monkeypatch.setenv("DSCL_DEBUG", "1")  # commands without --debug (presets, ensemble) take the variable
    with pytest.raises(type(exc)):
        main(["data", "--preset", "smoke"])


def test_interrupt_of_a_command_without_a_checkpoint(monkeypatch, capsys):
    import dscl.cli.data

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dscl.cli.data, "cmd_data", interrupted)
    assert main(["data"]) == 130
    assert "files already written are complete (every write is atomic); rerun the command" in capsys.readouterr().err


def test_a_stop_before_any_checkpoint_does_not_claim_one_was_saved(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import dscl.cli.data
    import dscl.pretrain
    from dscl.runtime import Preempted

    def stopped(*args, **kwargs):
        raise Preempted("SIGTERM received")

    monkeypatch.setattr(dscl.cli.data, "cmd_data", stopped)
    assert main(["data", "--preset", "smoke"]) == 3
    err = capsys.readouterr().err
    assert "checkpoint saved" not in err and "nothing was saved: the same line starts it again" in err
    monkeypatch.setattr(dscl.pretrain, "pretrain", stopped)  # stopped while loading data: no last.pt yet
    assert main(["pretrain", "--preset", "smoke", "--out", str(tmp_path / "a")]) == 3
    assert "nothing was saved" in capsys.readouterr().err

    def stopped_after_an_epoch(cfg, out, **kwargs):
        (Path(out) / "checkpoints").mkdir(parents=True)
        (Path(out) / "checkpoints" / "last.pt").write_bytes(b"x")
        raise Preempted("SIGTERM received")

    monkeypatch.setattr(dscl.pretrain, "pretrain", stopped_after_an_epoch)
    assert main(["pretrain", "--preset", "smoke", "--out", str(tmp_path / "b")]) == 3
    assert "exit code 3 = preempted, checkpoint saved" in capsys.readouterr().err
