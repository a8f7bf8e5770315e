"""Two CPU processes with gloo under torchrun: queue contents, identical weights, fp16 overflow handling,
BatchNorm statistics, resuming with another world size, the CLI path. Launched like SLURM's `srun` (no
torchrun): the environment parsing with faked variables, and two gloo processes and the CLI started that way."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
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
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)  # not a task of a multi-task srun step either
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



# ----------------------------------------------------------------------------------------------
# SLURM: `srun python -m dscl ...`, one task per process, no torchrun

#: What srun gives task 3 (the second on node 1) of a 4-task step over two nodes, as far as dscl reads it.
SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
              "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]"}


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("localhost", ["localhost"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node[8-10]", ["node8", "node9", "node10"]),  # no padding: the width of the range's first number
    ("node[08-10]", ["node08", "node09", "node10"]),  # zero padding kept, also past a new digit
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("x[7,01-02]", ["x7", "x01", "x02"]),  # the list's order, not sorted
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),  # several bracket groups
    ("a[1-2]b,c[3]", ["a1b", "a2b", "c3"]),  # text after a group, a one-number group
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
    ("gpu-a100-01,gpu-h100-[1,3]", ["gpu-a100-01", "gpu-h100-1", "gpu-h100-3"]),
])
def test_hostnames_expand_slurm_hostlists(nodelist, hosts):
    from dscl import dist

    assert list(dist.hostnames(nodelist)) == hosts
    assert dist.first_host(nodelist) == hosts[0]


def test_first_host_does_not_expand_the_rest():
    from dscl import dist

    assert dist.first_host("big[0000-9999999999],other[1-99999999]") == "big0000"


@pytest.mark.parametrize(("nodelist", "why"), [
    ("", "an empty name"), ("a,,b", "an empty name"), ("a,", "an empty name"), ("a[1-2", "without its ']'"),
    ("a1-2]", "without its '['"), ("a[[1]]", "without its ']'"), ("a[3-1]", "runs backwards"),
    ("a[x]", "'x' in brackets"), ("a[]", "in brackets is not N or N-M"), ("a b", "a space"),
])
def test_malformed_hostlists_are_refused_naming_the_variable(nodelist, why):
    from dscl import dist

    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST=.*is not a SLURM host list") as exc:
        dist.first_host(nodelist, variable="SLURM_STEP_NODELIST")
    assert why in str(exc.value)


def test_tasks_per_node():
    from dscl import dist

    assert dist.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert dist.tasks_per_node("4") == [4] and dist.tasks_per_node("1,2(x1)") == [1, 2]
    with pytest.raises(ValueError, match="tasks-per-node"):
        dist.tasks_per_node("2(3)")


def test_slurm_environment_of_a_task():
    """The torchrun variables of task 3 (node 1, local task 1) of a 4-task, 2-node step."""
    from dscl import dist

    assert dist.slurm_environment(SLURM_TASK) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(10000 + 4242 % 20000)}


def test_slurm_rendezvous_choices():
    from dscl import dist

    # the step's node list first (srun --preserve-env leaves SLURM_NODELIST at the job's), then the others
    env = {**SLURM_TASK, "SLURM_STEP_NODELIST": "b[2-3]", "SLURM_NODELIST": "a[1-4]", "SLURM_JOB_NODELIST": "c1"}
    assert dist.slurm_environment(env)["MASTER_ADDR"] == "b2"
    env = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}
    assert dist.slurm_environment(env)["MASTER_ADDR"] == "a1"
    env.pop("SLURM_NODELIST")
    assert dist.slurm_environment(env)["MASTER_ADDR"] == "c1"
    # MASTER_ADDR / MASTER_PORT set by the user are kept
    got = dist.slurm_environment({**SLURM_TASK, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "23456"})
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("10.0.0.5", "23456")
    # the port: the same for every task of a job, in [10000, 30000), SLURM_JOBID as the older name
    assert dist.slurm_port(4242) == 14242 and dist.slurm_port(20000) == 10000 and dist.slurm_port(39999) == 29999
    assert all(10000 <= dist.slurm_port(j) < 30000 for j in (0, 1, 19999, 123456789))
    env = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_JOB_ID"}
    assert dist.slurm_environment({**env, "SLURM_JOBID": "7"})["MASTER_PORT"] == "10007"
    # tasks on this node unknown: LOCAL_WORLD_SIZE left out (dscl then counts every process as local)
    env = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_NODEID"}
    assert "LOCAL_WORLD_SIZE" not in dist.slurm_environment(env)
    assert dist.slurm_environment({**SLURM_TASK, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1",
                                   "SLURM_LOCALID": "0"})["LOCAL_WORLD_SIZE"] == "1"


@pytest.mark.parametrize("name", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_torchrun_variables_win_over_slurm(name):
    """torchrun started by an sbatch script (or inside an srun step) sets these: SLURM's are then ignored."""
    from dscl import dist

    assert dist.slurm_environment({**SLURM_TASK, name: "0"}) is None


def test_a_single_task_or_no_step_is_one_process(monkeypatch):
    from dscl import dist

    assert dist.slurm_environment({}) is None
    assert dist.slurm_environment({**SLURM_TASK, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}) is None
    # the batch script's own shell: SLURM_NTASKS describes the allocation, but it is no task of an srun step
    batch = {k: v for k, v in SLURM_TASK.items() if not k.startswith("SLURM_STEP_")}
    assert dist.slurm_environment({**batch, "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) is None
    assert dist.slurm_environment({**SLURM_TASK, "DSCL_SLURM": "0"}) is None  # independent runs, one per task
    assert dist.slurm_environment({**SLURM_TASK, "DSCL_SLURM": "1"}) is not None
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "DSCL_SLURM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**SLURM_TASK, "SLURM_STEP_NUM_TASKS": "1"}.items():
        monkeypatch.setenv(name, value)
    assert not dist.launched_distributed()
    assert dist.init("cpu") == torch.device("cpu") and not torch.distributed.is_initialized()
    assert "RANK" not in os.environ  # nothing exported: exactly the single-process path
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert dist.launched_distributed() and not dist.launched_by_torchrun()


@pytest.mark.parametrize(("change", "message"), [
    ({"SLURM_PROCID": None}, "SLURM_PROCID is not set, but SLURM_STEP_NUM_TASKS=4 says"),
    ({"SLURM_PROCID": "one"}, "SLURM_PROCID is 'one', not a non-negative integer"),
    ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is not below SLURM_STEP_NUM_TASKS=4"),
    ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not set"),
    ({"SLURM_STEP_NUM_TASKS": "x"}, "SLURM_STEP_NUM_TASKS is 'x'"),
    ({"SLURM_STEP_NODELIST": None, "SLURM_NODELIST": None, "SLURM_JOB_NODELIST": None}, "set MASTER_ADDR yourself"),
    ({"SLURM_STEP_NODELIST": "gpu[1-"}, r"SLURM_STEP_NODELIST='gpu\[1-' is not a SLURM host list"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set: .* set MASTER_PORT yourself"),
    ({"SLURM_JOB_ID": "12_3"}, "SLURM_JOB_ID is '12_3'"),
])
def test_missing_or_malformed_slurm_variables_are_clear_errors(change, message):
    from dscl import dist

    env = {k: v for k, v in {**SLURM_TASK, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        dist.slurm_environment(env)


def test_cuda_index_is_the_local_rank_or_the_only_visible_gpu(monkeypatch):
    from dscl import dist

    assert dist.cuda_index(3, 4) == 3 and dist.cuda_index(0, 8) == 0
    assert dist.cuda_index(3, 1) == 0  # --gpus-per-task=1: the one GPU this task sees is its own
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=2 but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\)"):
        dist.cuda_index(2, 2)


@pytest.fixture
def restore_environ():
    """dist.init writes the variables it derived into os.environ (as torchrun would have): undo that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(("visible", "gpu"), [(4, 1), (1, 0)])
def test_init_under_slurm_joins_with_torchruns_variables(monkeypatch, restore_environ, visible, gpu):
    """Simulated (CUDA and the process group recorded): a multi-task srun step's task exports torchrun's
    variables, drives GPU LOCAL_RANK (or the only one it sees) with nccl, and prints the rendezvous once."""
    from dscl import dist

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DSCL_SLURM"):
        os.environ.pop(name, None)
    os.environ.update(SLURM_TASK)
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(("init", kw["backend"])))
    assert dist.init("auto") == torch.device("cuda", gpu)
    assert calls == [("set_device", gpu), ("init", "nccl")]
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                       "MASTER_PORT")} == dist.slurm_environment({**SLURM_TASK})
    assert dist.slurm_environment(os.environ) is None and dist.launched_by_torchrun()  # one scheme from now on
    calls.clear()
    assert dist.init("cpu") == torch.device("cpu") and calls == [("init", "gloo")]


def _free_port() -> int:
    """A port in the range dist.slurm_port maps job ids to, free on this machine right now."""
    for _ in range(200):
        port = random.randrange(10000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 10000-29999")


def _srun_start(args: list[str], *, nodelist: str, tasks_per_node: str, nodes: list[int], local: list[int],
                job: int | None = None) -> tuple[int, list[subprocess.Popen]]:
    """Start one plain `python` process per task with the variables srun gives its tasks, and no torchrun
    ones; returns the job id and the processes. Without ``job``, one is chosen so that dscl's port for it
    (10000 + id % 20000) is free here."""
    job = 20000 * 50 + _free_port() - 10000 if job is None else job
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                        "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "DSCL_SLURM")}
    n = len(nodes)
    base.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": "0",
                 "SLURM_STEP_NUM_TASKS": str(n), "SLURM_NTASKS": str(n), "SLURM_STEP_NODELIST": nodelist,
                 "SLURM_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": tasks_per_node})
    return job, [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**base, "SLURM_PROCID": str(r), "SLURM_NODEID": str(nodes[r]),
                                       "SLURM_LOCALID": str(local[r])}) for r in range(n)]


def _srun_wait(procs: list[subprocess.Popen], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Every task's result; all are killed if they do not end within ``timeout`` seconds."""
    out = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def test_two_processes_launched_like_srun_without_torchrun(tmp_path):
    """Two plain python processes with faked SLURM variables (two "nodes" 127.0.0.[1-2], one task each, no
    MASTER_ADDR / MASTER_PORT): dist.init derives torchrun's variables, joins a gloo group at the first
    host and the job's port, and the collectives see both processes."""
    out = tmp_path / "slurm.pt"
    job, procs = _srun_start([str(HERE / "ddp_worker.py"), str(out), "slurm"], nodelist="127.0.0.[1-2]",
                             tasks_per_node="1(x2)", nodes=[0, 1], local=[0, 0])
    res = _srun_wait(procs)
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    state = _ok(torch.load(out, weights_only=False), "slurm")
    job_port = str(10000 + job % 20000)
    for rank, env in enumerate(state["env"]):
        assert env == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": job_port}
    assert state["rank_world"] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert state["sum"] == [3.0, 3.0]  # 1 + 2, on both
    assert state["gathered"].tolist() == [0, 1, 10, 11]
    assert state["processes_per_node"] == [1, 1]  # one task on each "node"
    assert res[0].stderr.count("dscl: 2 processes from SLURM's variables (srun), rendezvous at 127.0.0.1:") == 1
    assert "from SLURM's variables" not in res[1].stderr  # rank 0 only


@needs_fmnist
@pytest.mark.slow  # two 2-process stage-1 launches of the CLI (about 25 s on 2 cores)
def test_cli_launched_like_srun_is_preempted_and_continues(tmp_path):
    """`srun python -m dscl pretrain ... --resume auto` as pretrain_srun.sbatch runs it, two tasks on one node:
    SLURM's signal reaches every task (SIGUSR1, as `--signal=USR1@120`), both finish the step and exit 3 after
    rank 0 saved; the identical command (what a requeued job runs) continues and finishes the run."""
    out = tmp_path / "run"
    cmd = ["-m", "dscl", "pretrain", "--preset", "smoke", "--out", str(out), "--resume", "auto", "--no-progress",
           "optim.epochs=3", "optim.log_every=1"]
    shape = {"nodelist": "localhost", "tasks_per_node": "2", "nodes": [0, 0], "local": [0, 1]}
    job, procs = _srun_start(cmd, **shape)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):  # the first step is logged: training
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, _srun_wait(procs, 5)
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    first = _srun_wait(procs)
    assert [r.returncode for r in first] == [3, 3], [r.stderr[-2000:] for r in first]
    assert first[0].stderr.count("dscl: 2 processes from SLURM's variables (srun), rendezvous at localhost:") == 1
    assert "stopped on SIGUSR1" in first[0].stderr and "--resume auto" in first[0].stderr
    assert "stopped on SIGUSR1" not in first[1].stderr  # rank 0 reports, every rank exits 3

    _, procs = _srun_start(cmd, job=job, **shape)  # the requeued job: same id, same command line
    second = _srun_wait(procs)
    assert [r.returncode for r in second] == [0, 0], [r.stderr[-2000:] for r in second]
    assert "resuming" in second[0].stderr
    from dscl.run import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["finished"] and state["epoch"] == 3 and len(state["rng"]) == 2
    steps = [step for _, step, _ in _schedule(out)]
    assert steps == list(range(1, 3 * 7 + 1))  # every global step trained and logged exactly once
