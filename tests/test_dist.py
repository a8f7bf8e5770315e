"""Two CPU processes with gloo under torchrun: queue contents, identical weights, the CLI path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import needs_fmnist

HERE = Path(__file__).parent


def _torchrun(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_process_queue_and_weights(tmp_path):
    out = tmp_path / "ddp.pt"
    res = _torchrun(str(HERE / "ddp_worker.py"), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(out)
    # after the first step the queue holds both ranks' labels, rank 0's first
    expected = torch.cat(state["first_labels"])
    assert torch.equal(state["queue_after_first"], expected)
    assert state["queue_len"] == 3 * 12
    # gradients are averaged, so the weights stay identical on both ranks
    assert torch.equal(state["params"][0], state["params"][1])
    assert torch.equal(state["momentum"][0], state["momentum"][1])


@needs_fmnist
def test_torchrun_cli_run(tmp_path):
    """The whole main job under torchrun: stage 1, stage 2 and the report, written once."""
    out = tmp_path / "ddp-run"
    res = _torchrun("-m", "dscl", "run", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    from dscl.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["finished"] and len(state["rng"]) == 2
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert res.stdout.count("report:") == 1  # only rank 0 prints
    report = json.loads((out / "report.json").read_text())
    assert sum(r["test_count"] for r in report["per_class"]) == 10000  # both ranks' shards gathered
