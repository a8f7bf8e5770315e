"""cli/experiments.py: ``dscl compare | sweep | analyze`` — what each command hands to its library
function, its argument errors (in-process), and a real two-method, two-seed comparison."""

import json

import pytest

from conftest import needs_fmnist, run_cli
from dscl.cli import main


@pytest.mark.parametrize("args", [("analyze",), ("sweep",), ("analyze", "gradient-ratio")])
def test_incomplete_analysis_commands_fail_with_usage(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "usage:" in err and "required" in err


@needs_fmnist
@pytest.mark.slow  # trains 4 runs, then one again, in subprocesses
def test_compare_two_methods_two_seeds_and_resume(tmp_path):
    out = tmp_path / "cmp"
    args = ("compare", "--preset", "smoke", "--methods", "scl,dscl+pbsd", "--seeds", "0,1", "--out", str(out),
            "--no-progress", "optim.epochs=1", "classifier.epochs=1")
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "compare.json").read_text())
    assert set(result) >= {"dataset", "seeds", "methods", "command", "wall_seconds"}
    assert result["seeds"] == [0, 1] and list(result["methods"]) == ["scl", "dscl+pbsd"]
    for method, metrics in result["methods"].items():
        report0 = json.loads((out / "runs" / f"{method}-seed0" / "report.json").read_text())
        report1 = json.loads((out / "runs" / f"{method}-seed1" / "report.json").read_text())
        assert metrics["all"]["runs"] == [report0["top1"], report1["top1"]]
        assert metrics["all"]["mean"] == pytest.approx((report0["top1"] + report1["top1"]) / 2, abs=0.01)
        assert metrics["many"]["mean"] is None  # the smoke subset has no Many class
    assert json.loads((out / "runs" / "scl-seed0" / "report.json").read_text())["method"] == "scl"
    assert "± " in (out / "compare.md").read_text()
    # a killed comparison continues: delete one report, the rest are reused untouched
    (out / "runs" / "scl-seed1" / "report.json").unlink()
    kept = (out / "runs" / "dscl+pbsd-seed0" / "report.json").stat().st_mtime_ns
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert (out / "runs" / "scl-seed1" / "report.json").is_file()
    assert (out / "runs" / "dscl+pbsd-seed0" / "report.json").stat().st_mtime_ns == kept
    # a different configuration into the same folder is refused
    res = run_cli(*args[:-1], "classifier.epochs=2")
    assert res.returncode == 2 and "different configuration" in res.stderr


def test_compare_rejects_bad_lists(tmp_path, capsys):
    assert main(["compare", "--methods", "dscl,moco", "--out", str(tmp_path / "c")]) == 2
    assert "valid methods" in capsys.readouterr().err
    assert main(["compare", "--seeds", "0,x", "--out", str(tmp_path / "c")]) == 2
    assert "integers" in capsys.readouterr().err


def test_compare_command_hands_over_what_it_parsed(tmp_path, monkeypatch, capsys):
    import dscl.compare

    seen = {}

    def compare(cfg, methods, seeds, out, *, command, device, progress, launch):
        seen.update(preset=cfg.preset, epochs=cfg.optim.epochs, methods=methods, seeds=seeds, out=out,
                    command=command, device=device, progress=progress, launch=launch)
        return {"fake": True}

    monkeypatch.setattr(dscl.compare, "compare", compare)
    monkeypatch.setattr(dscl.compare, "format_markdown", lambda result: f"TABLE {result}")
    out = str(tmp_path / "c")
    assert main(["compare", "--preset", "smoke", "--methods", "ce, dscl+pbsd", "--seeds", "3,1", "--out", out,
                 "optim.epochs=2", "--no-progress", "--device", "cpu"]) == 0
    assert seen == {"preset": "smoke", "epochs": 2, "methods": ["ce", "dscl+pbsd"], "seeds": [3, 1], "out": out,
                    "command": f"dscl compare --preset smoke --methods 'ce, dscl+pbsd' --seeds 3,1 --out {out} "
                               "optim.epochs=2 --no-progress --device cpu",
                    "device": "cpu", "progress": False, "launch": None}
    stdout = capsys.readouterr().out
    assert "TABLE {'fake': True}" in stdout and f"wrote {tmp_path / 'c' / 'compare.json'}" in stdout


def test_launcher_options_are_handed_over_with_the_files_values_under_the_command_lines(tmp_path, monkeypatch):
    import dscl.sweep
    from dscl.launch import LaunchOptions, Resources

    seen = {}
    monkeypatch.setattr(dscl.sweep, "sweep", lambda *a, launch, **k: seen.update(launch=launch) or {})
    monkeypatch.setattr(dscl.sweep, "format_markdown", lambda result: "SWEEP TABLE")
    res = tmp_path / "res.yaml"
    res.write_text("partition: gpu\ngpus_per_node: 8\ntime: '2-00:00:00'\nsetup: [module load cuda]\n")
    assert main(["sweep", "--preset", "smoke", "--param", "alpha=0.1,0.2", "--out", str(tmp_path / "s"),
                 "--launcher", "slurm", "--resources", str(res), "--partition", "debug", "--setup", "source env",
                 "--wait", "--poll-seconds", "30"]) == 0
    assert seen["launch"] == LaunchOptions("slurm", Resources(partition="debug", gpus_per_node=8, time=2880,
                                                              setup=["source env"]),
                                           wait=True, resubmit_failed=False, poll_seconds=30.0)


def test_sweep_command_hands_over_what_it_parsed(tmp_path, monkeypatch, capsys):
    import dscl.sweep

    seen = {}

    def sweep(cfg, key, values, *, method, seeds, out, val_fraction, command, device, progress, launch):
        seen.update(key=key, values=values, method=method, seeds=seeds, val_fraction=val_fraction,
                    alpha=cfg.loss.alpha, command=command, progress=progress, launch=launch)
        return {}

    monkeypatch.setattr(dscl.sweep, "sweep", sweep)
    monkeypatch.setattr(dscl.sweep, "format_markdown", lambda result: "SWEEP TABLE")
    out = str(tmp_path / "s")
    assert main(["sweep", "--preset", "smoke", "--param", "patch_scale=[0.05,0.3],[0.1,0.6]", "--method", "scl",
                 "--seeds", "0,2", "--val-fraction", "0.25", "--out", out, "loss.alpha=0.3"]) == 0
    assert seen == {"key": "views.patch_scale", "values": ["[0.05,0.3]", "[0.1,0.6]"], "method": "scl",
                    "seeds": [0, 2], "val_fraction": 0.25, "alpha": 0.3, "progress": True, "launch": None,
                    "command": "dscl sweep --preset smoke --param 'patch_scale=[0.05,0.3],[0.1,0.6]' --method scl "
                               f"--seeds 0,2 --val-fraction 0.25 --out {out} loss.alpha=0.3"}
    assert "SWEEP TABLE" in capsys.readouterr().out
    assert main(["sweep", "--param", "alpha=0.1,0.2", "--out", out]) == 0
    assert seen["method"] == "dscl+pbsd" and seen["seeds"] == [0] and seen["val_fraction"] is None  # defaults


@pytest.mark.parametrize(("argv", "module", "function", "expected"), [
    (["gradient-ratio", "--run", "R", "--batches", "2"], "gradient", "gradient_ratio",
     {"args": ("R",), "batches": 2, "out": None, "device": "auto", "progress": True}),
    (["retrieval", "--run", "R", "--compare-run", "R2", "--classes", "tail", "--k", "3", "--out", "O",
      "--no-progress"], "retrieval", "retrieval",
     {"args": ("R",), "compare_run": "R2", "classes": "tail", "k": 3, "queries_per_class": 1, "out": "O",
      "device": "auto", "progress": False}),
    (["patch-retrieval", "--run", "R", "--query", "7", "--box", "1,2,10,12", "--device", "cpu"], "retrieval",
     "patch_retrieval",
     {"args": ("R",), "query": 7, "box": "1,2,10,12", "k": 5, "out": None, "device": "cpu", "progress": True}),
])
def test_analyze_runs_the_named_analysis_with_its_options(monkeypatch, capsys, argv, module, function, expected):
    import importlib

    mod = importlib.import_module(f"dscl.analysis.{module}")
    formats = {"gradient_ratio": "format_summary", "retrieval": "format_retrieval",
               "patch_retrieval": "format_patch_retrieval"}
    seen = {}

    def analysis(*args, **kwargs):
        seen.update(args=args, **kwargs)
        return {"result": function}

    monkeypatch.setattr(mod, function, analysis)
    monkeypatch.setattr(mod, formats[function], lambda result: f"SUMMARY of {result['result']}")
    assert main(["analyze", *argv]) == 0
    assert seen == expected
    assert capsys.readouterr().out.strip() == f"SUMMARY of {function}"
