"""Two CPU processes with gloo under torchrun: queue contents, identical weights, fp16 overflow handling,
BatchNorm statistics, resuming with another world size, the CLI path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_FMNIST, needs_fmnist

HERE = Path(__file__).parent


def _torchrun(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Every 2-process scenario of tests/ddp_worker.py in one torchrun launch (each launch costs seconds)."""
    out = tmp_path_factory.mktemp("ddp") / "ddp.pt"
    names = ["queue", "gather", "fp16", "bn", "shuffle"] + (["official_bn"] if HAS_FMNIST else [])
    res = _torchrun(str(HERE / "ddp_worker.py"), str(out), *names)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _ok(results: dict, name: str) -> dict:
    assert "error" not in results[name], results[name].get("error")
    return results[name]


def test_two_process_queue_and_weights(two_ranks):
    state = _ok(two_ranks, "queue")
    # after the first step the queue holds both ranks' labels, rank 0's first
    expected = torch.cat(state["first_labels"])
    assert torch.equal(state["queue_after_first"], expected)
    assert state["queue_len"] == 3 * 12
    # gradients are averaged, so the weights stay identical on both ranks
    assert torch.equal(state["params"][0], state["params"][1])
    assert torch.equal(state["momentum"][0], state["momentum"][1])


def test_equal_size_gather_matches_the_general_one(two_ranks):
    """Issue #15: the no-size-exchange gather used in the step gives the same tensor."""
    state = _ok(two_ranks, "gather")
    assert state["equal"].shape == (10, 3)
    assert torch.equal(state["equal"], state["general"])


def test_fp16_inf_on_one_rank_skips_on_every_rank(two_ranks):
    """Issue #11 item 1: an inf gradient on rank 0 only. Every rank skips the step, the scales stay
    equal and the weights finite and identical; the next (finite) step is taken by every rank."""
    state = _ok(two_ranks, "fp16")
    assert state["skipped"] == [True, True], state
    assert state["finite"] == [True, True], state
    assert state["scale"][0] == state["scale"][1] == 65536.0 / 2, state
    assert state["stepped"] == [True, True] and state["scale_next"][0] == state["scale_next"][1]
    assert torch.equal(state["params"][0], state["params"][1])


def test_batchnorm_statistics_are_pooled(two_ranks):
    state = _ok(two_ranks, "bn")
    before, after = state["before"], state["after"]
    for prefix in ("1.", "2."):
        means = torch.stack(before[prefix + "running_mean"]).double()
        variances = torch.stack(before[prefix + "running_var"]).double()
        pooled_mean = means.mean(0)
        pooled_var = (variances + means**2).mean(0) - pooled_mean**2  # variance of the 2-rank mixture
        for rank in range(2):
            torch.testing.assert_close(after[prefix + "running_mean"][rank].double(), pooled_mean)
            torch.testing.assert_close(after[prefix + "running_var"][rank].double(), pooled_var)
            assert after[prefix + "num_batches_tracked"][rank] == 11
    for key in ("0.weight", "0.bias", "1.weight"):  # parameters are not touched
        assert torch.equal(after[key][0], before[key][0]) and torch.equal(after[key][1], before[key][1])


def _own_keys(keys: torch.Tensor, trial: dict) -> bool:
    """Each query's key comes from its own image: row i is the key of the rank's image i (its number in
    column 0, and the whole key equal to the one computed from that image without a shuffle)."""
    return (torch.equal(keys[:, 0], trial["images"][:, 0, 0, 0].round())
            and torch.equal(keys, trial["expected"]))


def test_shuffled_forward_gives_every_query_its_own_key(two_ranks):
    """MoCo's shuffle-BN (dist.shuffled_forward): the momentum encoder runs on a cross-rank permutation
    of the global batch, and the keys must come back unshuffled, in the queries' order, on every rank.

    The forward is per-sample and its output names its input image. The images each rank's forward
    saw reveal the permutation; from it the test also computes what a wrong unshuffle (the permutation
    used in place of its inverse, or no unshuffle) would have returned, and checks that the assertion
    rejects those: the test can fail."""
    trials = _ok(two_ranks, "shuffle")["trials"]  # [rank][trial]
    world, b = len(trials), trials[0][0]["images"].shape[0]
    assert world == 2
    for t, name in enumerate(("seed0", "seed1", "shift")):
        ranks = [trials[r][t] for r in range(world)]
        assert all(tr["name"] == name for tr in ranks)
        for tr in ranks:
            assert _own_keys(tr["keys"], tr), (name, tr["keys"], tr["expected"])
        # the permutation the forward ran on: global image numbers, rank-major
        perm = torch.cat([tr["seen"][:, 0, 0, 0].round().long() for tr in ranks])
        assert sorted(perm.tolist()) == list(range(world * b))  # every image encoded exactly once
        assert not torch.equal(perm, torch.arange(world * b)), name  # a real shuffle
        assert any(not set(perm[r * b:(r + 1) * b].tolist()) <= set(range(r * b, (r + 1) * b))
                   for r in range(world)), name  # images crossed ranks
        # control: the keys as gathered from every rank's forward, unshuffled three ways
        gathered = torch.cat([tr["computed"] for tr in ranks])
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        wrong_inverse_ok, no_unshuffle_ok = [], []
        for r, tr in enumerate(ranks):
            assert _own_keys(gathered[inverse[r * b:(r + 1) * b]], tr)  # the right unshuffle passes
            wrong_inverse_ok.append(_own_keys(gathered[perm[r * b:(r + 1) * b]], tr))
            no_unshuffle_ok.append(_own_keys(gathered[r * b:(r + 1) * b], tr))
        assert not all(no_unshuffle_ok), name  # keys left in the shuffled order fail the check
        if not torch.equal(perm[perm], torch.arange(world * b)):  # perm is not its own inverse
            assert not all(wrong_inverse_ok), name  # perm used in place of its inverse fails too
    shift = torch.cat([trials[r][2]["seen"][:, 0, 0, 0].round().long() for r in range(world)])
    assert shift.tolist() == [7, 0, 1, 2, 3, 4, 5, 6]  # the fixed trial: a shift, not an involution


def test_shuffled_forward_in_one_process_is_the_plain_forward():
    from dscl import dist

    x = torch.randn(5, 3)
    calls = []
    out = dist.shuffled_forward(lambda t: calls.append(t) or t * 2, x)
    assert torch.equal(out, x * 2) and len(calls) == 1 and calls[0] is x


@needs_fmnist
def test_official_protocol_keeps_batchnorm_identical_across_ranks(two_ranks):
    """Issue #11 item 5: with update_bn each rank saw another shard; the statistics must still agree."""
    state = _ok(two_ranks, "official_bn")
    assert state["buffers"], "the backbone has no BatchNorm running statistics"
    for key, (r0, r1) in state["buffers"].items():
        assert torch.equal(r0, r1), key
    assert torch.equal(state["fc"][0], state["fc"][1])


def _schedule(run: Path) -> list[tuple[int, int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["step"], r["lr"]) for r in rows if r.get("stage") == "pretrain"]


def _queue_blocks(state: dict, batch: int) -> torch.Tensor:
    """The queue's labels, one row per global step's block of keys, sorted within the block."""
    return state["model"]["queue.labels"].view(-1, batch).sort(dim=1).values


@needs_fmnist
@pytest.mark.slow  # four stage-1 trainings, two of them under torchrun
def test_resume_with_another_world_size(tmp_path):
    """Issue #11 item 3: a 2-process stage 1 resumed as 1 process, and a 1-process one resumed as 2
    (through the CLI), continue the schedule, the step count and the queue of an uninterrupted run."""
    from dscl.config import load_config
    from dscl.pretrain import pretrain
    from dscl.run import load_checkpoint

    cfg = load_config("smoke", overrides=["optim.epochs=2"])
    pretrain(cfg, tmp_path / "ref", progress=False, device="cpu")
    res = _torchrun(str(HERE / "ddp_worker.py"), str(tmp_path / "w.pt"), f"pretrain_1_epoch={tmp_path / 'two_one'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "error" not in torch.load(tmp_path / "w.pt", weights_only=False)[f"pretrain_1_epoch={tmp_path / 'two_one'}"]
    pretrain(cfg, tmp_path / "two_one", resume=True, progress=False, device="cpu")
    pretrain(cfg, tmp_path / "one_two", progress=False, device="cpu", max_epochs=1)
    res = _torchrun("-m", "dscl", "pretrain", "--resume", "--out", str(tmp_path / "one_two"), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]

    # the rank that had no saved RNG state draws its own augmentations, not a copy of rank 0's stream
    rng = load_checkpoint(tmp_path / "one_two" / "checkpoints" / "last.pt")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    ref = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    for name, world in (("two_one", 1), ("one_two", 2)):
        state = load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")
        assert state["finished"] and state["epoch"] == 2 and len(state["rng"]) == world, name
        assert state["facts"]["steps_per_epoch"] == ref["facts"]["steps_per_epoch"]
        assert _schedule(tmp_path / name) == _schedule(tmp_path / "ref"), name  # same steps, same lr
        # each global step trained on the same images (their split over ranks differs): the queue
        # holds the same labels, block by block, and is filled to the same point
        assert state["model"]["queue.ptr"] == ref["model"]["queue.ptr"]
        assert torch.equal(_queue_blocks(state, cfg.optim.batch_size), _queue_blocks(ref, cfg.optim.batch_size)), name
    assert "resuming a 1-process run with 2 process(es)" in res.stderr  # and says what is not bit-exact


@needs_fmnist
@pytest.mark.slow  # the whole main job under torchrun; two_ranks keeps a 2-process test in the fast selection
def test_torchrun_cli_run(tmp_path):
    """The whole main job under torchrun: stage 1, stage 2 and the report, written once."""
    out = tmp_path / "ddp-run"
    res = _torchrun("-m", "dscl", "run", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    from dscl.run import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["finished"] and len(state["rng"]) == 2
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert res.stdout.count("report:") == 1  # only rank 0 prints
    report = json.loads((out / "report.json").read_text())
    assert sum(r["test_count"] for r in report["per_class"]) == 10000  # both ranks' shards gathered


def test_device_cuda_n_becomes_the_current_device(monkeypatch):
    """Issue #22 item 6: `--device cuda:N` without torchrun makes GPU N current (pinning, the CUDA RNG state
    of checkpoints and device="cuda" tensors then belong to it, not to GPU 0). Simulated: CUDA calls recorded."""
    from dscl import dist

    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    assert dist.init("cuda:1") == torch.device("cuda", 1) and calls == [1]
    assert dist.init("cuda") == torch.device("cuda") and calls == [1]  # the current device is left alone
    assert dist.init("cpu") == torch.device("cpu") and calls == [1]


def test_resolve_device_is_the_device_rule_of_every_command(monkeypatch):
    from dscl import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.resolve_device("auto") == torch.device("cpu") and dist.resolve_device() == torch.device("cpu")
    assert dist.resolve_device(torch.device("cpu")) == torch.device("cpu")
    for asked in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(RuntimeError, match="torch sees no CUDA GPU; use --device cpu"):
            dist.resolve_device(asked)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.resolve_device("auto") == torch.device("cuda")
    assert dist.resolve_device("cuda:1") == torch.device("cuda", 1) and dist.resolve_device("cpu").type == "cpu"

