"""scripts/gpu_check.sh, the prepared device check (issue #22): its CPU dry run works, so the script is
ready whenever a GPU machine is lent."""

import subprocess
from pathlib import Path

import pytest

ROOT_DIR = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # the script's CPU dry run trains stage 1 three times (per-slot, joint, a resume)
def test_device_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    res = subprocess.run(["bash", str(ROOT_DIR / "scripts" / "gpu_check.sh"), "--dry-run", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "FAILED" not in summary
    for name in ("cuda-tests", "gpu-speed", "finetune-step", "data", "stage1-per-slot", "stage1-joint", "resume",
                 "augment-speed"):
        assert f"== {name}:" in summary and (out / f"{name}.log").is_file(), name
    assert (out / "gpu_speed.json").is_file()
    assert (out / "finetune_cost.json").is_file()
    assert (out / "augment_speed.json").is_file()
    for bn in ("per-slot", "joint"):
        assert (out / f"stage1-{bn}" / "report.json").is_file()
        assert f"stage 1 {bn}: median" in summary
    assert "epoch 3/3" in (out / "resume.log").read_text()


def test_gpu_speed_times_the_step_training_runs(monkeypatch) -> None:
    """Issue #22 item 6: benchmarks/gpu_speed.py passes num_classes like training, so it does not time a
    torch.unique (a host sync per step) that real training does not have."""
    import sys

    import torch

    monkeypatch.syspath_prepend(str(ROOT_DIR / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["gpu_speed.py"])
    import gpu_speed

    def no_unique(*args, **kwargs):
        raise AssertionError("torch.unique called inside the timed step")

    monkeypatch.setattr(torch, "unique", no_unique)
    result = gpu_speed.main(["--device", "cpu", "--backbone", "resnet18", "--image-size", "32", "--patch-size", "16",
                             "--patches", "2", "--batch", "2", "--queue", "4", "--classes", "3", "--steps", "1",
                             "--out", ""])
    assert {r["variant"] for r in result["results"]} >= {"dscl fp32", "straightforward fp32"}
