"""dscl.launch: `dscl compare` / `dscl sweep` as jobs (submitit), collected by rerunning the same command.

Local launcher: real processes (submitit's LocalExecutor). SLURM: stand-in sbatch / squeue / sacct / scontrol /
srun (tests/fake_slurm.py) that record their arguments; with FAKE_RUN=1 the stand-in sbatch runs the batch
scripts submitit wrote, as SLURM would.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_fmnist
from dscl import launch
from dscl.cli import main
from dscl.config import load_config
from dscl.launch import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    NEW,
    QUEUED,
    RUNNING,
    JobSpec,
    LaunchError,
    Resources,
    parse_minutes,
    read_resources,
    resources_from,
    run_state,
)

sys.path.insert(0, str(Path(__file__).parent))
import fake_slurm  # noqa: E402

SMOKE = ("--preset", "smoke", "--no-progress")
#: the same numbers in every process: one thread, no adaptation to the machine's load
FIXED_THREADS = {"DSCL_NUM_THREADS": "1", "DSCL_ADAPT_THREADS": "0"}


@pytest.fixture
def fixed_threads(monkeypatch):
    for k, v in FIXED_THREADS.items():
        monkeypatch.setenv(k, v)


# ----------------------------------------------------------------------------------------------
# resources


@pytest.mark.parametrize("text, minutes", [("90", 90), (90, 90), ("1:30:00", 90), ("01:30:30", 91), ("45:00", 45),
                                           ("2-00", 2880), ("1-12:00", 2160), ("1-00:00:01", 1441)])
def test_time_limits_as_slurm_spells_them(text, minutes):
    assert parse_minutes(text, "t") == minutes


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "0", "-5", "00:00:00"])
def test_bad_time_limits_are_refused(text):
    with pytest.raises(LaunchError, match="time limit|shorter than a minute"):
        parse_minutes(text, "--time")


def test_resources_from_a_file_and_the_command_line(tmp_path):
    path = tmp_path / "res.yaml"
    path.write_text("nodes: 2\ngpus_per_node: 8\ncpus_per_task: 12\ntime: '1-00:00:00'\npartition: gpu\n"
                    "account: lab\nqos: high\nconstraint: a100\nmem_gb: 480\nsetup: source .venv/bin/activate\n"
                    "sbatch: {mail-type: END, --mail-user: me@lab.org}\nmax_parallel: 4\n")
    res = read_resources(path)
    assert (res.nodes, res.gpus_per_node, res.cpus_per_task, res.time, res.partition, res.account, res.qos,
            res.constraint, res.mem_gb, res.setup, res.max_parallel) == (
        2, 8, 12, 1440, "gpu", "lab", "high", "a100", 480.0, ["source .venv/bin/activate"], 4)
    assert res.sbatch == {"mail-type": "END", "mail-user": "me@lab.org"}
    mixed = resources_from({"partition": "debug", "time": "30"}, "the command line", res)
    assert (mixed.partition, mixed.time, mixed.nodes) == ("debug", 30, 2) and res.partition == "gpu"


@pytest.mark.parametrize("text, match", [
    ("nodez: 2\n", "unknown key nodez; valid: nodes"),
    ("nodes: 0\n", "nodes must be a positive whole number"),
    ("gpus_per_node: -1\n", "gpus_per_node must be a non-negative"),
    ("cpus_per_task: 1.5\n", "cpus_per_task must be a positive whole number"),
    ("nodes: true\n", "nodes must be a positive"),
    ("time: soon\n", "not a time limit"),
    ("setup: {a: 1}\n", "setup must be a list"),
    ("sbatch: [x]\n", "sbatch must be a mapping"),
    ("- nodes\n", "must be a mapping"),
    ("nodes: [1\n", "not valid YAML"),
])
def test_bad_resource_files_name_the_key(tmp_path, text, match):
    path = tmp_path / "res.yaml"
    path.write_text(text)
    with pytest.raises(LaunchError, match=match):
        read_resources(path)


@pytest.mark.parametrize("argv, message", [
    (["--wait"], "--wait goes with --launcher local|slurm"),
    (["--partition", "gpu", "--resubmit-failed"], "--partition, --resubmit-failed go with --launcher"),
    (["--launcher", "local", "--nodes", "2"], "the local launcher runs each job on this machine"),
    (["--launcher", "slurm", "--time", "1h"], "is not a time limit"),
    (["--launcher", "local", "--poll-seconds", "0"], "--poll-seconds must be positive"),
    (["--launcher", "cluster"], "invalid choice"),
])
def test_launcher_options_are_checked_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "c"
    try:
        code = main(["compare", *SMOKE, "--methods", "scl", "--seeds", "0", "--out", str(out), *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (out / "runs").exists()


# ----------------------------------------------------------------------------------------------
# the state of a run


def _spec(tmp_path, name="scl-seed0", val=False) -> JobSpec:
    return JobSpec(name, tmp_path / "runs" / name, load_config("smoke"), val=val)


def _record(tmp_path, job_id="77", launcher="slurm", age_s=3600) -> dict:
    folder = tmp_path / "jobs" / "logs" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    submitted = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - age_s))
    return {"job_id": job_id, "launcher": launcher, "submitted": submitted, "folder": str(folder),
            "stdout": str(folder / f"{job_id}_0_log.out"), "stderr": str(folder / f"{job_id}_0_log.err")}


def _result(record: dict, outcome: str, value) -> None:
    with open(Path(record["folder"]) / f"{record['job_id']}_0_result.pkl", "wb") as fh:
        pickle.dump((outcome, value), fh)


def test_run_states_from_folder_record_and_scheduler(tmp_path):
    spec = _spec(tmp_path)
    assert run_state(spec, None, None).state == NEW
    rec = _record(tmp_path)
    assert run_state(spec, rec, ("PENDING", "")).state == QUEUED
    assert run_state(spec, rec, ("REQUEUED", "")).state == QUEUED
    assert run_state(spec, rec, ("RUNNING", "")).state == RUNNING
    # ended, and its folder is gone: trained again
    st = run_state(spec, rec, ("COMPLETED", "0:0"))
    assert st.state == NEW and "gone" in st.detail
    spec.run.mkdir(parents=True)
    assert run_state(spec, rec, ("CANCELLED", "0:15")).state == INTERRUPTED
    assert run_state(spec, rec, ("TIMEOUT", "0:0")).state == INTERRUPTED
    assert run_state(spec, rec, ("NODE_FAIL", "0:0")).state == INTERRUPTED
    assert run_state(spec, rec, ("FAILED", "3:0")).state == INTERRUPTED  # dscl preempted, not requeued
    assert run_state(spec, rec, None).state == INTERRUPTED  # nobody knows it: no result, so not failed
    failed = run_state(spec, rec, ("FAILED", "2:0"))
    assert failed.state == FAILED and failed.scheduler == "FAILED 2:0" and rec["stderr"] in failed.detail
    assert run_state(spec, rec, ("OUT_OF_MEMORY", "0:125")).state == FAILED
    _result(rec, "error", "Traceback ...\nRuntimeError: dscl job x exited with code 2\n")
    st = run_state(spec, rec, None)
    assert st.state == FAILED and "exited with code 2" in st.detail
    _result(rec, "success", 0)
    assert run_state(spec, rec, ("COMPLETED", "0:0")).state == NEW  # its report was deleted: completed again
    (spec.run / "report.json").write_text("{}")
    assert run_state(spec, rec, ("RUNNING", "")).state == FINISHED
    sweep_point = _spec(tmp_path, val=True)
    assert run_state(sweep_point, rec, None).state == NEW  # no validation report yet
    # a job just submitted that squeue does not show yet is queued, not lost
    fresh = _spec(tmp_path, "dscl-seed0")
    assert run_state(fresh, _record(tmp_path, "78", age_s=5), None).state == QUEUED
    assert run_state(fresh, _record(tmp_path, "78", age_s=5000), None).state == NEW


def test_array_ids_of_squeue_and_sacct_are_expanded():
    assert launch._expand_ids("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert launch._expand_ids("12_3") == ["12_3"] and launch._expand_ids("12") == ["12"]


def test_a_task_ends_without_result_on_preemption_and_ctrl_c(monkeypatch, tmp_path):
    """Exit codes 3 and 130 leave no result (the run is interrupted, continued by the next job); outside SLURM
    nothing is requeued; other codes raise (submitit records the error)."""
    from dscl import cli

    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: calling it would fail
    codes = iter([3, 130, 3, 2, 0])
    monkeypatch.setattr(cli, "main", lambda argv: next(codes))
    task = launch.DsclTask(["job", "x.json"])
    for expected in (3, 130):
        with pytest.raises(SystemExit) as exc:
            task()
        assert exc.value.code == expected
    # a local job started inside a SLURM allocation does not requeue that allocation
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    with pytest.raises(SystemExit):
        task()
    with pytest.raises(RuntimeError, match="exited with code 2"):
        task()
    assert task() == 0


# ----------------------------------------------------------------------------------------------
# SLURM through the stand-ins


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """Stand-in SLURM commands first on PATH; ``calls(tool)`` = the argument lists of each call."""
    fake = tmp_path / "fake"
    fake_slurm.install(fake / "bin")
    monkeypatch.setenv("PATH", f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(fake))
    monkeypatch.setenv("USER", "someone")

    class Cluster:
        dir = fake

        @staticmethod
        def calls(tool: str) -> list[list[str]]:
            log = fake / "calls.jsonl"
            lines = log.read_text().splitlines() if log.is_file() else []
            return [c[1:] for c in map(json.loads, lines) if c[0] == tool]

        @staticmethod
        def jobs() -> dict:
            path = fake / "jobs.json"
            return json.loads(path.read_text()) if path.is_file() else {}

        @staticmethod
        def set_state(job_id: str, state: str, exit_code: str = "0:0") -> None:
            jobs = Cluster.jobs()
            jobs[job_id].update(state=state, exit=exit_code)
            (fake / "jobs.json").write_text(json.dumps(jobs))

    return Cluster


def _script(slurm, n: int = -1) -> list[str]:
    return Path(slurm.calls("sbatch")[n][-1]).read_text().splitlines()


@needs_fmnist
def test_slurm_submits_one_array_and_never_twice(tmp_path, slurm, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *SMOKE, "--methods", "scl,dscl", "--seeds", "0,1", "--out", str(out), "--launcher", "slurm",
            "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "12", "--time", "1-00:00:00",
            "--partition", "gpu", "--account", "lab", "--qos", "high", "--constraint", "a100", "--mem-gb", "480",
            "--setup", "source .venv/bin/activate", "--max-parallel", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert len(slurm.calls("sbatch")) == 1
    lines = _script(slurm)
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12", "#SBATCH --time=1440",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --constraint=a100", "#SBATCH --mem=480G", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 "source .venv/bin/activate"):
        assert line in lines, line
    assert not any(line.startswith("#SBATCH --dependency") for line in lines)
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--cpu-bind=none" in srun and "--kill-on-bad-exit=0" in srun
    book = json.loads((out / "jobs.json").read_text())["jobs"]
    assert {n: r["job_id"] for n, r in book.items()} == {"scl-seed0": "1000_0", "dscl-seed0": "1000_1",
                                                          "scl-seed1": "1000_2", "dscl-seed1": "1000_3"}
    assert book["dscl-seed0"]["stdout"].endswith("jobs/logs/1000_1/1000_1_0_log.out")
    spec = json.loads((out / "jobs" / "specs" / "dscl-seed1.json").read_text())
    assert spec["config"]["loss"]["loss"] == "dscl" and spec["config"]["optim"]["seed"] == 1
    assert "4 queued" in printed and "compare.json not written yet" in printed
    assert not (out / "compare.json").exists()

    # queued / running: nothing is submitted again; the listing names job, state and log
    slurm.set_state("1000_0", "RUNNING")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert len(slurm.calls("sbatch")) == 1
    assert "1 running, 3 queued" in printed and "1000_0" in printed and book["scl-seed0"]["stdout"] in printed
    # a sequential command does not touch runs that are jobs
    assert main(["compare", *SMOKE, "--methods", "scl,dscl", "--seeds", "0,1", "--out", str(out)]) == 2
    assert "queued or running" in capsys.readouterr().err

    # 1000_0 failed (exit 2), 1000_1 was cancelled mid-way (its run exists), 1000_2 is still pending, the run of
    # 1000_3 was deleted after its job ended: a rerun submits the interrupted and the deleted ones (an array of 2)
    slurm.set_state("1000_0", "FAILED", "2:0")
    slurm.set_state("1000_1", "CANCELLED", "0:15")
    slurm.set_state("1000_3", "COMPLETED", "0:0")
    for name in ("scl-seed0", "dscl-seed0"):
        (out / "runs" / name).mkdir(parents=True)
    assert main(argv) == 2  # a failed run: exit code 2, with what to do
    printed = capsys.readouterr().out
    assert len(slurm.calls("sbatch")) == 2 and "#SBATCH --array=0-1%2" in _script(slurm)
    book = json.loads((out / "jobs.json").read_text())["jobs"]
    assert book["dscl-seed0"]["job_id"] == "1001_0" and book["dscl-seed0"]["previous"] == ["1000_1"]
    assert book["dscl-seed1"]["job_id"] == "1001_1" and book["scl-seed1"]["job_id"] == "1000_2"
    assert book["scl-seed0"]["job_id"] == "1000_0"
    assert "failed" in printed and "FAILED 2:0" in printed and "--resubmit-failed" in printed
    # sacct (accounting) not needed: squeue says what is live, the result files what ended
    # --resubmit-failed: only the failed one, as a single job
    assert main([*argv, "--resubmit-failed"]) == 0
    assert len(slurm.calls("sbatch")) == 3 and not any(line.startswith("#SBATCH --array") for line in _script(slurm))
    assert json.loads((out / "jobs.json").read_text())["jobs"]["scl-seed0"]["job_id"] == "1002"
    assert all(c[:2] == ["-h", "-r"] for c in slurm.calls("squeue"))
    assert all(c[:6] == ["-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j"] for c in slurm.calls("sacct"))


@needs_fmnist
def test_slurm_stage2_sweep_points_wait_for_the_shared_stage1(tmp_path, slurm, capsys):
    """A sweep over a stage-2 key: each seed's first point trains stage 1; the other points are submitted with
    afterok on that job (one array per seed), and cancelled if it fails (--kill-on-invalid-dep)."""
    out = tmp_path / "sw"
    argv = ["sweep", *SMOKE, "--param", "classifier.epochs=1,2,3", "--seeds", "0,1", "--out", str(out),
            "--launcher", "slurm"]
    assert main(argv) == 0
    calls = slurm.calls("sbatch")
    assert len(calls) == 3  # the two stage-1 points (an array), then one array per seed after its job
    first = _script(slurm, 0)
    assert "#SBATCH --array=0-1%2" in first and not any("dependency" in line for line in first)
    deps = sorted(next(line for line in _script(slurm, i) if "dependency" in line) for i in (1, 2))
    assert deps == ["#SBATCH --dependency=afterok:1000_0", "#SBATCH --dependency=afterok:1000_1"]
    assert all("#SBATCH --kill-on-invalid-dep=yes" in _script(slurm, i) for i in (1, 2))
    spec = json.loads((out / "jobs" / "specs" / "classifier.epochs=2-seed1.json").read_text())
    assert spec["share_from"] == "classifier.epochs=1-seed1" and spec["val"] is True
    # the stage-1 job of seed 0 failed and SLURM cancelled its dependents: a rerun submits nothing for them until
    # the stage-1 run is resubmitted (here with --resubmit-failed: then they follow it again)
    slurm.set_state("1000_0", "FAILED", "1:0")
    (out / "runs" / "classifier.epochs=1-seed0").mkdir(parents=True)
    for jid in ("1001_0", "1001_1"):
        slurm.set_state(jid, "CANCELLED", "0:0")
    capsys.readouterr()
    assert main(argv) == 2
    printed = capsys.readouterr().out
    assert len(slurm.calls("sbatch")) == 3
    assert "waiting" in printed and "shares the stage 1 of classifier.epochs=1-seed0, which is failed" in printed
    assert main([*argv, "--resubmit-failed"]) == 0
    assert len(slurm.calls("sbatch")) == 5
    assert "#SBATCH --dependency=afterok:1003" in _script(slurm) and "#SBATCH --array=0-1%2" in _script(slurm)


@needs_fmnist
@pytest.mark.slow
def test_slurm_jobs_run_from_submitits_batch_script_and_are_collected(tmp_path, slurm, fixed_threads, monkeypatch,
                                                                      capsys):
    """The stand-in sbatch runs the array's batch script (srun -> submitit -> DsclTask -> dscl job) like SLURM:
    the table equals the sequential command's, and rerunning it submits nothing."""
    monkeypatch.setenv("FAKE_RUN", "1")
    seq, out = tmp_path / "seq", tmp_path / "slurm"
    args = ["compare", *SMOKE, "--methods", "scl,dscl", "--seeds", "0"]
    assert main([*args, "--out", str(seq)]) == 0
    assert main([*args, "--out", str(out), "--launcher", "slurm", "--wait", "--poll-seconds", "0.5"]) == 0
    assert _numbers(out) == _numbers(seq)
    assert json.loads((out / "jobs.json").read_text())["jobs"]["scl-seed0"]["job_id"] == "1000_0"
    log = (out / "jobs" / "logs" / "1000_1" / "1000_1_0_log.err").read_text()
    assert "stage 1: dscl on fmnist-lt" in log
    before = (out / "jobs.json").read_text()
    assert main([*args, "--out", str(out), "--launcher", "slurm"]) == 0
    assert len(slurm.calls("sbatch")) == 1 and (out / "jobs.json").read_text() == before


# ----------------------------------------------------------------------------------------------
# local processes


def _numbers(out: Path) -> dict:
    result = json.loads((out / "compare.json").read_text())
    return {k: v for k, v in result.items() if k not in ("command", "wall_seconds")}


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@needs_fmnist
def test_local_jobs_give_the_sequential_table_and_a_rerun_submits_nothing(tmp_path, fixed_threads, capsys):
    """The issue's acceptance command: `dscl compare --preset smoke --methods scl,dscl --seeds 0 --out DIR
    --launcher local --wait` writes the compare.json of the sequential command (fixed threads); rerunning it
    submits and trains nothing and gives the same table."""
    seq, out = tmp_path / "seq", tmp_path / "local"
    args = ["compare", *SMOKE, "--methods", "scl,dscl", "--seeds", "0"]
    assert main([*args, "--out", str(seq)]) == 0
    launched = [*args, "--out", str(out), "--launcher", "local", "--wait", "--poll-seconds", "0.5"]
    assert main(launched) == 0
    assert _numbers(out) == _numbers(seq)
    book = json.loads((out / "jobs.json").read_text())["jobs"]
    assert set(book) == {"scl-seed0", "dscl-seed0"} and all(r["launcher"] == "local" for r in book.values())
    logs = sorted(p.name for p in (out / "jobs" / "logs").iterdir())
    assert logs == sorted(r["job_id"] for r in book.values())  # one folder per job (no stray pattern folder)
    assert "stage 1: scl on fmnist-lt" in Path(book["scl-seed0"]["stderr"]).read_text()
    compare_json, jobs_json = (out / "compare.json").read_text(), (out / "jobs.json").read_text()
    report = (out / "runs" / "dscl-seed0" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(launched) == 0
    printed = capsys.readouterr().out
    assert "2 finished" in printed and "| scl |" in printed
    assert (out / "jobs.json").read_text() == jobs_json and (out / "compare.json").read_text() == compare_json
    assert (out / "runs" / "dscl-seed0" / "report.json").stat().st_mtime_ns == report
    assert sorted(p.name for p in (out / "jobs" / "logs").iterdir()) == logs
    # the trackers group the jobs' runs as they group the sequential command's (by the comparison's folder)
    from dscl.trackers import run_info

    info = run_info(out / "runs" / "dscl-seed0", load_config("smoke"))
    assert (info.group, info.variant) == ("local", "dscl")


@needs_fmnist
@pytest.mark.slow
def test_a_killed_local_job_is_resumed_by_the_rerun(tmp_path, fixed_threads, capsys):
    """kill -9 of a job mid-way through stage 1: the rerun lists it as interrupted, submits it again, and the new
    job continues from the checkpoint (a `resume` record in metrics.jsonl), to the sequential command's numbers."""
    seq, out = tmp_path / "seq", tmp_path / "local"
    args = ["compare", *SMOKE, "--methods", "scl", "--seeds", "0", "optim.epochs=3"]
    assert main([*args, "--out", str(seq)]) == 0
    launched = [*args, "--out", str(out), "--launcher", "local", "--poll-seconds", "0.2"]
    assert main(launched) == 0  # submitted; not waiting
    run = out / "runs" / "scl-seed0"
    job = json.loads((out / "jobs.json").read_text())["jobs"]["scl-seed0"]
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.json").is_file():
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    assert json.loads((run / "checkpoints" / "last.json").read_text())["epoch"] < 3  # mid-way
    for pid in _children(int(job["job_id"])):  # the dscl process the local controller started
        os.kill(pid, signal.SIGKILL)
    while launch.local_alive(job):
        assert time.time() < deadline
        time.sleep(0.05)
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--launcher", "local", "--wait", "--poll-seconds", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "interrupted" in printed and "continues it from its checkpoint" in printed
    book = json.loads((out / "jobs.json").read_text())["jobs"]["scl-seed0"]
    assert book["previous"] == [job["job_id"]]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "resume" for r in records)
    assert _numbers(out) == _numbers(seq)


@needs_fmnist
@pytest.mark.slow
def test_local_stage2_sweep_shares_stage1_after_it_finished(tmp_path, fixed_threads, capsys):
    """Local jobs of a stage-2 sweep: the later points start once the first point's stage 1 is finished and link
    it (one stage 1 trained); the sweep equals the sequential one."""
    seq, out = tmp_path / "seq", tmp_path / "local"
    args = ["sweep", *SMOKE, "--param", "classifier.epochs=1,2", "--seeds", "0"]
    assert main([*args, "--out", str(seq)]) == 0
    assert main([*args, "--out", str(out), "--launcher", "local", "--wait", "--max-parallel", "2",
                 "--poll-seconds", "0.3"]) == 0
    a, b = (json.loads(p.joinpath("sweep.json").read_text()) for p in (seq, out))
    for result in (a, b):
        result.pop("command"), result.pop("wall_seconds")
    assert a == b and b["stage1_shared"] is True
    first, second = (out / "runs" / f"classifier.epochs={v}-seed0" / "checkpoints" / "last.pt" for v in (1, 2))
    assert os.path.samefile(first, second)


@needs_fmnist
def test_a_failing_local_job_is_listed_and_resubmitted_only_on_request(tmp_path, capsys):
    """A job whose dscl exits 2 (its dataset folder does not exist) is failed: listed with its error and log;
    a rerun submits nothing; --resubmit-failed submits it again (once)."""
    out = tmp_path / "c"
    argv = ["compare", *SMOKE, "--methods", "scl", "--seeds", "0", "--out", str(out), "--launcher", "local",
            "--wait", "--poll-seconds", "0.2", f"data.data_root={tmp_path / 'nowhere'}"]
    assert main(argv) == 2
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "exited with code 2" in printed and "--resubmit-failed" in printed
    job = json.loads((out / "jobs.json").read_text())["jobs"]["scl-seed0"]
    assert "nowhere" in Path(job["stderr"]).read_text()
    assert main(argv) == 2
    assert json.loads((out / "jobs.json").read_text())["jobs"]["scl-seed0"]["job_id"] == job["job_id"]
    assert main([*argv, "--resubmit-failed"]) == 2
    again = json.loads((out / "jobs.json").read_text())["jobs"]["scl-seed0"]
    assert again["previous"] == [job["job_id"]] and again["job_id"] != job["job_id"]
    shutil.rmtree(out / "runs" / "scl-seed0", ignore_errors=True)


def test_a_job_file_that_is_not_one_is_refused(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"name": "a"}')
    assert main(["job", str(bad)]) == 2
    assert "is not a dscl job file" in capsys.readouterr().err
    assert main(["job", str(tmp_path / "missing.json")]) == 2


def test_resources_default_to_the_launchers(tmp_path):
    opts = launch.LaunchOptions("slurm", Resources())
    params = launch.Launcher(tmp_path, opts, "auto").slurm_parameters(None)
    assert params["nodes"] == 1 and params["ntasks_per_node"] == 1 and params["time"] == 1440
    assert "gpus_per_node" not in params and params["additional_parameters"] == {"signal": "USR1@120", "requeue": True}
    assert opts.poll() == 60 and launch.LaunchOptions("local").poll() == 5


def test_the_readmes_imagenet_lt_example_submits_one_array_of_twelve(tmp_path, slurm, monkeypatch, capsys):
    """README 'Compare and sweep as jobs': its command line, run against the stand-ins (nothing reads the data
    before the jobs run), submits the 4 x 3 runs as one array with the resources it names."""
    import re
    import shlex

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```bash\n(dscl compare --preset imagenet-lt .*?--launcher slurm.*?)\n# ->", text, re.S)
    assert block, "the README example moved"
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    assert argv[0] == "dscl"
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    assert "12 queued" in capsys.readouterr().out
    lines = _script(slurm)
    for line in ("#SBATCH --array=0-11%12", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --time=2880", "#SBATCH --partition=gpu", "#SBATCH --account=mylab", "#SBATCH --qos=normal",
                 "#SBATCH --constraint=a100", "#SBATCH --cpus-per-task=12", "source .venv/bin/activate"):
        assert line in lines, line
    book = json.loads((tmp_path / "runs" / "cmp-imagenet-lt" / "jobs.json").read_text())["jobs"]
    assert len(book) == 12 and book["dscl+pbsd-seed2"]["job_id"] == "1000_11"
    spec = json.loads((tmp_path / "runs" / "cmp-imagenet-lt" / "jobs" / "specs" / "ce-seed0.json").read_text())
    assert spec["config"]["data"]["list_dir"] == "/data/lists" and spec["config"]["loss"]["loss"] == "ce"


def test_the_readmes_resources_file_reads(tmp_path):
    import re

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"`--resources cluster.yaml`.*?```yaml\n(.*?)```", text, re.S)
    assert block, "the README example moved"
    path = tmp_path / "cluster.yaml"
    path.write_text(block.group(1))
    res = read_resources(path)
    assert (res.gpus_per_node, res.time, res.max_parallel, res.mem_gb) == (8, 2880, 6, 480.0)
    assert res.sbatch == {"mail-type": "END", "mail-user": "me@lab.org"} and res.setup == ["source .venv/bin/activate"]
    params = launch.Launcher(tmp_path, launch.LaunchOptions("slurm", res), "auto").slurm_parameters(None)
    assert params["array_parallelism"] == 6 and params["mem"] == "480G"
    assert params["additional_parameters"]["mail-user"] == "me@lab.org"
