"""The SLURM launch examples in scripts/slurm/: valid bash, the dscl (and torchrun) command lines they run
parse with dscl's (and torchrun's) own parsers, and their requeue logic, run by bash against stand-ins
for `srun` and `scontrol` (no cluster here). How dscl reads SLURM's variables is tested in test_dist.py."""

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
SCRIPTS = ("pretrain_srun.sbatch", "pretrain_torchrun.sbatch")
JOB = "4242"

# Stand-ins: `srun` records its arguments (NUL-separated) and its pid, then exits with FAKE_EXIT or, with
# FAKE_WAIT set, waits for SIGUSR1 / SIGTERM (recorded) and exits with FAKE_WAIT after one; `scontrol`
# logs its arguments and answers `show hostnames` with the hosts of the job's node list gpu[07-08].
FAKE_SRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE_DIR/srun.args"
echo $$ > "$FAKE_DIR/srun.pid"
if [ -z "${FAKE_WAIT:-}" ]; then exit "${FAKE_EXIT:-0}"; fi
got=""
trap 'got=USR1' USR1
trap 'got=TERM' TERM
touch "$FAKE_DIR/srun.ready"
for _ in $(seq 600); do
    [ -n "$got" ] && break
    sleep 0.05
done
echo "$got" >> "$FAKE_DIR/srun.signals"
[ -n "$got" ] && exit "$FAKE_WAIT"
exit 99
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.log"
if [ "$1 $2 $3" = "show hostnames gpu[07-08]" ]; then
    printf 'gpu07\ngpu08\n'
fi
"""


@pytest.fixture
def cluster(tmp_path) -> dict:
    """A bin folder with the stand-ins and the environment of a 2-node batch job that uses it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_DIR=str(tmp_path),
               SLURM_JOB_ID=JOB, SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_NODELIST="gpu[07-08]", SLURM_SUBMIT_DIR=str(tmp_path), RUN=str(tmp_path / "run"),
               DATA="/data/imagenet", LISTS="/data/lists")
    return {"dir": tmp_path, "env": env}


def _run(cluster: dict, script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script)], env={**cluster["env"], **env}, capture_output=True,
                          text=True, timeout=60, cwd=cluster["dir"])


def _srun_args(cluster: dict) -> list[str]:
    return (cluster["dir"] / "srun.args").read_text().split("\0")[:-1]


def _scontrol(cluster: dict) -> list[str]:
    log = cluster["dir"] / "scontrol.log"
    return log.read_text().splitlines() if log.is_file() else []


def _dscl_args(argv: list[str]):
    """A dscl command line as `python -m dscl` parses it (in this process; nothing runs)."""
    from dscl.cli import build_parser, parse

    return parse(build_parser(), argv)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash_with_the_requeue_options(script):
    path = SLURM / script
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    options = [line.split(None, 1)[1] for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
    assert all(" " not in o for o in options), options  # sbatch reads no comment after an option
    assert "--requeue" in options and "--open-mode=append" in options
    # torchrun: the batch shell gets the signal and forwards it; srun: SLURM signals the dscl tasks directly
    assert ("--signal=B:USR1@120" if "torchrun" in script else "--signal=USR1@120") in options


def test_srun_script_runs_dscl_with_resume_auto_and_requeues_on_exit_3(cluster):
    res = _run(cluster, "pretrain_srun.sbatch", FAKE_EXIT="0")
    assert res.returncode == 0, res.stderr
    argv = _srun_args(cluster)
    assert argv[:2] == ["--kill-on-bad-exit=0", "--cpu-bind=none"]
    assert argv[2:5] == ["python", "-m", "dscl"]
    args = _dscl_args(argv[5:])
    assert (args.command, args.preset, args.out, args.resume, args.no_progress) == (
        "pretrain", "imagenet-lt", str(cluster["dir"] / "run"), "auto", True)
    assert args.data_root == "/data/imagenet" and args.overrides == ["data.list_dir=/data/lists"]
    assert _scontrol(cluster) == []  # finished: not requeued

    res = _run(cluster, "pretrain_srun.sbatch", FAKE_EXIT="3")
    assert res.returncode == 3 and _scontrol(cluster) == [f"requeue {JOB}"], res.stderr
    assert "dscl exited 3 (checkpoint saved): requeueing job 4242" in res.stderr

    (cluster["dir"] / "scontrol.log").unlink()
    res = _run(cluster, "pretrain_srun.sbatch", FAKE_EXIT="2")
    assert res.returncode == 2 and _scontrol(cluster) == []  # an error is not requeued


def _start(cluster: dict, script: str, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", str(SLURM / script)], env={**cluster["env"], **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cluster["dir"])
    deadline = time.monotonic() + 30
    while not (cluster["dir"] / "srun.ready").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    return proc


def test_srun_script_survives_a_preemption_sigterm_and_requeues(cluster):
    """Preemption signals the batch shell too: it must outlive the step to requeue after exit code 3."""
    proc = _start(cluster, "pretrain_srun.sbatch", FAKE_WAIT="3")
    proc.send_signal(signal.SIGTERM)  # the batch shell
    time.sleep(0.2)
    assert proc.poll() is None
    os.kill(int((cluster["dir"] / "srun.pid").read_text()), signal.SIGTERM)  # the step's tasks
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert (cluster["dir"] / "srun.signals").read_text().split() == ["TERM"]
    assert _scontrol(cluster) == [f"requeue {JOB}"]


def test_torchrun_script_command_line(cluster):
    """The torchrun arguments parse with the installed torchrun's parser, the rendezvous is the first node at
    dscl's port for the job, and the dscl command line is the srun script's."""
    from torch.distributed.run import get_args_parser

    from dscl.dist import slurm_port

    res = _run(cluster, "pretrain_torchrun.sbatch", FAKE_EXIT="0")
    assert res.returncode == 0, res.stderr
    argv = _srun_args(cluster)
    assert argv[:2] == ["--kill-on-bad-exit=0", "torchrun"]
    tr = get_args_parser().parse_args(argv[2:])
    assert (tr.nnodes, tr.nproc_per_node, tr.rdzv_backend, tr.rdzv_id) == ("2", "gpu", "c10d", JOB)
    assert tr.rdzv_endpoint == f"gpu07:{slurm_port(int(JOB))}"
    assert "SIGUSR1" in tr.signals_to_handle.split(",") and "SIGTERM" in tr.signals_to_handle.split(",")
    assert int(tr.shutdown_timeout) < 120  # torchrun kills its processes before SLURM does
    assert tr.module and tr.training_script == "dscl"
    _run(cluster, "pretrain_srun.sbatch", FAKE_EXIT="0")
    assert tr.training_script_args == _srun_args(cluster)[5:]  # the same dscl command line in both scripts
    assert _scontrol(cluster) == ["show hostnames gpu[07-08]"]  # no requeue


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_torchrun_script_forwards_the_signal_and_requeues(cluster, sig):
    """`--signal=B:USR1@120` (or a preemption's SIGTERM) reaches only the batch shell: it passes the signal to
    the step and, when the step ends non-zero (torchrun exits 1 after its processes exit 3), requeues."""
    proc = _start(cluster, "pretrain_torchrun.sbatch", FAKE_WAIT="1")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert (cluster["dir"] / "srun.signals").read_text().split() == [sig.name[3:]]  # forwarded once
    assert _scontrol(cluster)[-1] == f"requeue {JOB}"


def test_torchrun_script_does_not_requeue_a_failure_without_a_signal(cluster):
    res = _run(cluster, "pretrain_torchrun.sbatch", FAKE_EXIT="1")
    assert res.returncode == 1 and not any(c.startswith("requeue") for c in _scontrol(cluster))


# ----------------------------------------------------------------------------------------------
# scripts/slurm/submit.py (submitit)


@pytest.fixture(scope="module")
def submit():
    spec = importlib.util.spec_from_file_location("dscl_slurm_submit", SLURM / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_builds_a_requeueable_dscl_command(submit):
    argv = submit.dscl_argv("pretrain", ["--preset", "imagenet-lt", "--out", "runs/x", "--resume", "auto",
                                         "optim.epochs=90"])
    assert argv == ["pretrain", "--preset", "imagenet-lt", "--out", "runs/x", "optim.epochs=90", "--resume", "auto"]
    args = _dscl_args(argv)
    assert (args.command, args.out, args.resume, args.overrides) == ("pretrain", "runs/x", "auto", ["optim.epochs=90"])
    assert submit.dscl_argv("run", ["--out=runs/y", "--resume"]) == ["run", "--out=runs/y", "--resume", "auto"]
    with pytest.raises(ValueError, match="--out DIR is needed"):
        submit.dscl_argv("pretrain", ["--preset", "smoke"])
    with pytest.raises(ValueError, match="--overwrite: a requeued job would start the run again"):
        submit.dscl_argv("pretrain", ["--out", "x", "--overwrite"])
    opts, rest = submit.parse_args(["--nodes", "2", "--", "--preset", "smoke", "--out", "x"])
    assert opts.nodes == 2 and rest == ["--preset", "smoke", "--out", "x"]


def test_submit_task_requeues_from_rank_0_on_exit_3(submit, cluster, monkeypatch):
    from dscl import cli

    for name, value in cluster["env"].items():
        monkeypatch.setenv(name, value)
    codes = iter([0, 3, 3, 2])
    monkeypatch.setattr(cli, "main", lambda argv: next(codes))
    task = submit.DsclTask(["pretrain", "--out", "x", "--resume", "auto"])
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert task() == 0 and _scontrol(cluster) == []
    with pytest.raises(SystemExit) as exc:
        task()
    assert exc.value.code == 3 and _scontrol(cluster) == [f"requeue {JOB}"]
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(SystemExit):
        task()
    assert _scontrol(cluster) == [f"requeue {JOB}"]  # only rank 0 asks
    with pytest.raises(RuntimeError, match="exited with code 2"):
        task()


def test_submitit_writes_the_signal_requeue_and_srun_options(submit, cluster, monkeypatch):
    """The sbatch file the installed submitit would submit (nothing is submitted; `srun` is the stand-in)."""
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", cluster["env"]["PATH"])
    executor = submitit.AutoExecutor(folder=cluster["dir"] / "logs", cluster="slurm")
    opts, _ = submit.parse_args(["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6", "--time-min", "60",
                                 "--partition", "gpu", "--setup", "source .venv/bin/activate"])
    submit.configure(executor, opts)
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    lines = text.splitlines()
    for line in ("#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=6", "#SBATCH --time=60",
                 "#SBATCH --partition=gpu", "source .venv/bin/activate"):
        assert line in lines, text
    assert not any(line.startswith("#SBATCH --signal=USR2") for line in lines)  # submitit's own signal replaced
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--cpu-bind=none" in srun and "--kill-on-bad-exit=0" in srun
