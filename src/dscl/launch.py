"""``dscl compare`` / ``dscl sweep`` as jobs: one submitit job per run, on SLURM or as local processes.

Every (method or value, seed) of a comparison or sweep becomes one job that runs ``dscl job SPEC``: the
same :func:`run_one` the sequential command runs, under dscl's command-line protocol (stop
signals save and exit 3, ``--resume auto`` semantics: a job that starts again continues its run). On SLURM
a job asks for dscl's warning signal (``--signal=USR1@120``) and ``--requeue``, and :class:`DsclTask` requeues
it after the warning like ``scripts/slurm/pretrain_srun.sbatch`` does; runs with the same resources go in
one job array.

The folder ``OUT/jobs.json`` records every submitted job (id, launcher, log files), so that rerunning the
same command *collects*: a run whose report exists is finished, a run whose job is queued or running is
left alone, a failed one is listed with its log (``--resubmit-failed`` submits it again), an interrupted
one (killed, preempted without requeue, timed out, node failure, cancelled: its checkpoint is intact) and
a run the user deleted are submitted again. Nothing is submitted for a run that is queued, running or
finished. ``OUT/jobs/specs/NAME.json`` is what each job runs, ``OUT/jobs/logs/JOBID/`` submitit's files
and the job's logs.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import getpass
import os
import pickle
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dscl.config import Config, config_from_dict
from dscl.errors import DsclError
from dscl.io import read_json, write_json

LAUNCHERS = ("local", "slurm")
JOBS_FILE = "jobs.json"
JOBS_DIR = "jobs"

#: What a SLURM job asks for on top of submitit's defaults: dscl's warning signal (every task, not "B:" the batch
#: shell only) and permission to requeue.
SLURM_ADDITIONAL = {"signal": "USR1@120", "requeue": True}
#: srun options: every task sees the node's CPUs and dscl shares them out itself (binding would shrink a task's
#: CPUs and dscl would divide them again); a task that exits 3 first does not get the others killed.
SRUN_ARGS = ["--cpu-bind=none", "--kill-on-bad-exit=0"]

# the states of a run, as the listing shows them
FINISHED, QUEUED, RUNNING, FAILED, INTERRUPTED, WAITING, NEW = (
    "finished", "queued", "running", "failed", "interrupted", "waiting", "new")
LIVE = (QUEUED, RUNNING)
#: SLURM job states (squeue / sacct) of a job that has not ended
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED",
                "RESV_DEL_HOLD", "SPECIAL_EXIT"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "STOPPED"}
#: SLURM states of an ended job that failed by its own doing (not an interruption): resubmitted only on request;
#: FAILED counts as failed unless the exit code is one of :data:`RESUMABLE_CODES`
SLURM_FAILED = {"FAILED", "OUT_OF_MEMORY"}
#: dscl exit codes of an interrupted run that continues from its checkpoint (preempted, Ctrl-C)
RESUMABLE_CODES = {3, 130}
#: a job the scheduler does not show (yet) right after its submission is taken as queued for this long
VISIBILITY_GRACE_S = 300


class LaunchError(DsclError, ValueError):
    """Bad launcher options, a scheduler that cannot be reached, or a submission that failed."""


# ----------------------------------------------------------------------------------------------
# what the jobs ask for


RESOURCE_KEYS = {
    "nodes": "nodes per job (SLURM; default 1)",
    "gpus_per_node": "GPUs per node, also the tasks per node, one per GPU (SLURM default 0; local: GPUs per job, "
                     "default the visible GPUs divided by max_parallel)",
    "cpus_per_task": "CPUs per task (SLURM)",
    "time": "time limit of one job: minutes, HH:MM:SS or D-HH:MM:SS (SLURM default 1 day; local: none)",
    "partition": "SLURM partition", "account": "SLURM account", "qos": "SLURM quality of service",
    "constraint": "SLURM node features, e.g. a100", "exclude": "SLURM nodes to leave out",
    "mem_gb": "memory per node in GB (SLURM)",
    "setup": "shell lines each job runs first, e.g. 'source .venv/bin/activate' (a list)",
    "sbatch": "any other sbatch options, e.g. {mail-type: END, mail-user: me@lab.org} (a mapping)",
    "max_parallel": "jobs running at once (local default 1; SLURM: the array's %N throttle)",
    "name": "job name (default dscl)",
}


@dataclass
class Resources:
    """What every job of a launch asks for (:data:`RESOURCE_KEYS`); None = the launcher's default."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: int | None = None  # minutes
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    mem_gb: float | None = None
    setup: list[str] = field(default_factory=list)
    sbatch: dict[str, str] = field(default_factory=dict)
    max_parallel: int | None = None
    name: str | None = None


def parse_minutes(value: Any, where: str) -> int:
    """A time limit as SLURM spells it (minutes, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) -> whole minutes."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise LaunchError(f"{where}: {value!r} is not a time limit; give minutes (1440), HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    first, second, third = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        minutes = int(days) * 1440 + first * 60 + second + (third + 59) // 60
    elif c is not None:  # HH:MM:SS
        minutes = first * 60 + second + (third + 59) // 60
    else:  # MM, MM:SS
        minutes = first + (second + 59) // 60
    if minutes < 1:
        raise LaunchError(f"{where}: {value!r} is shorter than a minute")
    return minutes


def _positive(value: Any, key: str, where: str, *, zero: bool = False, kind: type = int) -> Any:
    try:
        number = kind(value)
        ok = (number >= 0 if zero else number > 0) and (kind is not int or float(value) == number)
    except (TypeError, ValueError):
        ok = False
    if isinstance(value, bool) or not ok:
        raise LaunchError(f"{where}: {key} must be a {'non-negative' if zero else 'positive'} "
                          f"{'whole number' if kind is int else 'number'}, got {value!r}")
    return number


def resources_from(mapping: dict[str, Any], where: str, base: Resources | None = None) -> Resources:
    """``base`` with the keys of ``mapping`` (a YAML file's, or the command line's options) applied and checked."""
    res = copy.deepcopy(base or Resources())
    unknown = sorted(set(mapping) - set(RESOURCE_KEYS))
    if unknown:
        raise LaunchError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"valid: {', '.join(RESOURCE_KEYS)}")
    for key, value in mapping.items():
        if value is None:
            continue
        if key in ("nodes", "cpus_per_task", "max_parallel"):
            value = _positive(value, key, where)
        elif key == "gpus_per_node":
            value = _positive(value, key, where, zero=True)
        elif key == "mem_gb":
            value = _positive(value, key, where, kind=float)
        elif key == "time":
            value = parse_minutes(value, f"{where}: time")
        elif key == "setup":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise LaunchError(f"{where}: setup must be a list of shell lines, got {value!r}")
            value = list(value)
        elif key == "sbatch":
            if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
                raise LaunchError(f"{where}: sbatch must be a mapping of sbatch options, e.g. {{mail-type: END}}, "
                                  f"got {value!r}")
            value = {k.lstrip("-"): (True if v is True else str(v)) for k, v in value.items()}
        else:
            if not isinstance(value, str | int) or not str(value).strip():
                raise LaunchError(f"{where}: {key} must be a non-empty name, got {value!r}")
            value = str(value).strip()
        setattr(res, key, value)
    return res


def read_resources(path: str | Path) -> Resources:
    """A YAML file of :data:`RESOURCE_KEYS` (``--resources FILE``)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LaunchError(f"--resources {path}: cannot read it ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise LaunchError(f"--resources {path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LaunchError(f"--resources {path}: must be a mapping of {', '.join(RESOURCE_KEYS)}")
    return resources_from(data, f"--resources {path}")


# ----------------------------------------------------------------------------------------------
# the job's side: what it runs


@dataclass
class JobSpec:
    """One run of a comparison or sweep, as a job runs it (``dscl job OUT/jobs/specs/NAME.json``)."""

    name: str  # the run's folder name under OUT/runs
    run: Path
    config: Config
    val: bool = False  # also evaluate on the validation split (sweeps)
    share_from: str | None = None  # the run (name) whose stage 1 this one shares: a job after that one's

    def finished(self) -> bool:
        return (self.run / "report.json").is_file() and (not self.val or (self.run / "val" / "report.json").is_file())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "run": str(self.run), "val": self.val, "share_from": self.share_from,
                "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> JobSpec:
        try:
            return cls(name=d["name"], run=Path(d["run"]), config=config_from_dict(d["config"], where),
                       val=bool(d.get("val", False)), share_from=d.get("share_from"))
        except (KeyError, TypeError) as exc:
            raise LaunchError(f"{where} is not a dscl job file (missing {exc}); it is written by dscl compare / "
                              f"dscl sweep with --launcher") from exc


def _finished(run: Path) -> bool:
    return (run / "report.json").is_file()


def run_one(cfg: Config, run: Path, *, device: str, progress: bool) -> dict[str, Any]:
    """Run (or continue) one method/seed and return its report."""
    from dscl.classify import classify
    from dscl.evaluation import evaluate
    from dscl.pretrain import pretrain
    from dscl.run import has_stage1, stage1_summary

    if _finished(run):
        return read_json(run / "report.json", what=f"rerun `dscl evaluate --run {run}`")
    if has_stage1(run):
        if not stage1_summary(run).finished:
            pretrain(cfg, run, resume=True, device=device, progress=progress)
    else:
        pretrain(cfg, run, overwrite=True, device=device, progress=progress)
    classify(run, cfg=cfg, device=device, progress=progress)
    return evaluate(run, cfg=cfg, device=device, progress=progress)


def share_stage1(src: Path, run: Path, cfg: Config) -> None:
    """Give ``run`` the finished stage 1 of ``src`` (hard link, or a copy across file systems) and its
    own ``config.yaml``; a run that already has a checkpoint is left alone. The checkpoint's summary
    (``last.json``) comes along, so reports do not read the checkpoint for it."""
    import shutil

    from dscl.config import dump_config
    from dscl.run import STAGE1_FILE, SUMMARY_FILE

    if (run / STAGE1_FILE).exists():
        return
    if not (src / STAGE1_FILE).is_file():
        raise LaunchError(f"cannot share stage 1: {src / STAGE1_FILE} does not exist")
    (run / STAGE1_FILE).parent.mkdir(parents=True, exist_ok=True)
    # the config, then the summary, then the checkpoint: a checkpoint is never without them. Every step is atomic
    # and writes the same, so the tasks of a multi-GPU job may all share at once (dscl job)
    dump_config(cfg, run / "config.yaml")
    for name in (SUMMARY_FILE, STAGE1_FILE):
        if (src / name).is_file():
            dest = run / name
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.share.tmp")
            try:
                os.link(src / name, tmp)
            except OSError:
                shutil.copy2(src / name, tmp)
            os.replace(tmp, dest)


def run_spec(spec: JobSpec, *, device: str, progress: bool) -> dict[str, Any]:
    """What a job does: share stage 1 (if the spec says so), :func:`~dscl.compare.run_one`, and the validation
    report of a sweep point; the same calls as the sequential commands."""
    from dscl.evaluation import evaluate
    from dscl.run import has_stage1

    cfg = spec.config
    if spec.share_from is not None and not has_stage1(spec.run):
        src = spec.run.parent / spec.share_from
        if not stage1_finished(src):
            raise LaunchError(f"{spec.name} shares the stage 1 of {src}, which is not finished; the job that trains "
                              f"it must end first (rerun the compare / sweep command: it submits them in order)")
        share_stage1(src, spec.run, cfg)
    report = run_one(cfg, spec.run, device=device, progress=progress)
    if spec.val and not (spec.run / "val" / "report.json").is_file():
        evaluate(spec.run, split="val", cfg=cfg, device=device, progress=progress)
    return report


def requeue_refusal(job: str, stop_signal: str | None) -> str | None:
    """Why job ``job``, whose dscl exited 3 (checkpoint saved) after ``stop_signal``, must not be requeued by
    us; None: requeue it. As the sbatch scripts: only after the time-limit warning (SIGUSR1; SIGTERM is
    ``scancel``, or a preemption SLURM requeues or cancels itself), and not when the job was cancelled,
    is back in the queue (restart count above ``SLURM_RESTART_COUNT``) or is being preempted from a
    partition with PreemptMode=REQUEUE."""
    if stop_signal != "SIGUSR1":
        return (f"it stopped on {stop_signal or 'a signal to another task'}, not on the time-limit warning (scancel, "
                f"or a preemption SLURM handles itself); submit again to continue")
    job_fields = _scontrol_fields("job", job)
    state = job_fields.get("JobState", "")
    if state.startswith("CANCELLED"):
        return "it was cancelled; submit again to continue"
    restarts, mine = job_fields.get("Restarts", "0"), os.environ.get("SLURM_RESTART_COUNT", "0")
    back = restarts.isdigit() and mine.isdigit() and int(restarts) > int(mine)
    if state == "PENDING" or state.startswith("REQUEUE") or back:
        return "SLURM has requeued it itself"
    if job_fields.get("PreemptTime", "None") != "None":
        mode = _scontrol_fields("partition", job_fields.get("Partition", "")).get("PreemptMode", "")
        if "REQUEUE" in mode:
            return "SLURM requeues it itself (preemption with PreemptMode=REQUEUE)"
    return None


def _scontrol_fields(*args: str) -> dict[str, str]:
    """``Key=value`` fields of ``scontrol show ...`` (empty when scontrol cannot answer)."""
    try:
        out = subprocess.run(["scontrol", "show", *args], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out))


class DsclTask:
    """One task of a job: ``dscl <argv>`` in this process (the process SLURM signals).

    Exit code 0 is the task's result; exit code 3 (preempted, checkpoint saved) requeues a SLURM job from
    rank 0 (unless :func:`requeue_refusal` says why not) and, like 130 (Ctrl-C), ends the task without a
    result (submitit writes none: the run is interrupted, not failed); any other code raises, and submitit
    records the job as failed.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        from dscl import cli, runtime

        rc = cli.main(list(self.argv))
        # a SLURM job (not a local job started inside a SLURM allocation: that allocation is not ours to requeue)
        slurm = "SLURM_JOB_ID" in os.environ and os.environ.get("SUBMITIT_EXECUTOR") != "local"
        if rc == cli.EXIT_PREEMPTED and slurm and os.environ.get("SLURM_PROCID", "0") == "0":
            job = os.environ["SLURM_JOB_ID"]
            why = requeue_refusal(job, runtime.first_stop_signal())
            if why is None:
                print(f"dscl exited {rc} (checkpoint saved): requeueing job {job}", file=sys.stderr, flush=True)
                subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
            else:
                print(f"dscl exited {rc} (checkpoint saved): job {job} not requeued: {why}", file=sys.stderr,
                      flush=True)
        if rc in RESUMABLE_CODES:
            raise SystemExit(rc)  # no result: the requeued job (or the next collect) continues and reports
        if rc != 0:
            raise RuntimeError(f"dscl {' '.join(self.argv)} exited with code {rc}")
        return rc


# ----------------------------------------------------------------------------------------------
# the record of submitted jobs


class JobBook:
    """``OUT/jobs.json``: the jobs submitted for each run (the latest, and the ids before it), written atomically
    after every submission."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / JOBS_FILE
        self.jobs: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            data = read_json(self.path, what=f"delete {self.path} only if no job of it is queued or running")
            self.jobs = dict(data.get("jobs") or {})

    def get(self, name: str) -> dict[str, Any] | None:
        return self.jobs.get(name)

    def add(self, name: str, record: dict[str, Any]) -> None:
        old = self.jobs.get(name)
        if old is not None:
            record["previous"] = [*old.get("previous", []), old["job_id"]]
        self.jobs[name] = record
        write_json(self.path, {"jobs": self.jobs})


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """One collect-and-submit at a time per folder (a second command waits): no run is submitted twice by two
    commands started together. ``fcntl.flock``, where the platform has it."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    (out / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / JOBS_DIR / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# the schedulers


def _run(argv: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None


def _expand_ids(text: str) -> list[str]:
    """``123``, ``123_4``, ``123_[0-3,7%2]`` -> the job ids (array elements) they stand for."""
    m = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", text)
    if not m:
        return [text]
    ids = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def slurm_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, exit code)}`` from ``squeue`` (jobs that have not ended) and ``sacct`` (the others, where
    accounting answers). Ids neither knows are absent.

    Raises:
        LaunchError: ``squeue`` cannot be run or fails (not on a SLURM login node).
    """
    if not job_ids:
        return {}
    wanted = set(job_ids)
    user = os.environ.get("USER") or getpass.getuser()
    res = _run(["squeue", "-h", "-r", "-u", user, "-o", "%i|%T"])
    if res is None or res.returncode != 0:
        why = "not found" if res is None else (" ".join(res.stderr.split()) or f"exit code {res.returncode}")
        raise LaunchError(f"cannot ask SLURM for the jobs' states: squeue failed ({why}); run this command where "
                          f"squeue works (a login node of the cluster the jobs were submitted to)")
    states: dict[str, tuple[str, str]] = {}
    for line in res.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        for one in _expand_ids(jid):
            if one in wanted:
                states[one] = (state.split()[0] if state else "UNKNOWN", "")
    rest = sorted(wanted - set(states))
    if rest:
        mains = sorted({j.split("_")[0] for j in rest})
        res = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(mains)])
        if res is not None and res.returncode == 0:
            for line in res.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) < 3:
                    continue
                for one in _expand_ids(parts[0]):
                    if one in wanted and one not in states:
                        states[one] = (parts[1].split()[0] if parts[1] else "UNKNOWN", parts[2])
    return states


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (``/proc``; None where it does not exist or is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def local_alive(record: dict[str, Any]) -> bool:
    """Whether the local job's controller process (its id is the job id) still runs (and is the same process)."""
    pid = int(record["job_id"])
    job = _LOCAL_CHILDREN.get(record["job_id"])
    if job is not None and job.state != "RUNNING":  # ours: submitit polls (reaps) it, else it lingers as a zombie
        return False
    if Path("/proc").is_dir():
        start = _proc_start(pid)
        return start is not None and start == record.get("start", start)
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


#: the local jobs this process started (job id -> submitit LocalJob), so that their processes can be reaped
_LOCAL_CHILDREN: dict[str, Any] = {}


def job_result(record: dict[str, Any]) -> tuple[str | None, str]:
    """What submitit recorded for the job's first task: ("success", "") / ("error", last line of the traceback) /
    (None, "") where it wrote nothing (the job was killed, preempted or interrupted)."""
    path = Path(record["folder"]) / f"{record['job_id']}_0_result.pkl"
    try:
        with path.open("rb") as fh:
            outcome, value = pickle.load(fh)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError):
        return None, ""
    if outcome == "error":
        lines = [line for line in str(value).splitlines() if line.strip()]
        return "error", lines[-1].strip() if lines else ""
    return str(outcome), ""


# ----------------------------------------------------------------------------------------------
# the state of each run


@dataclass
class RunStatus:
    """One run of a launch: its state (:data:`FINISHED`, :data:`QUEUED` ...), the job behind it and why."""

    name: str
    state: str
    job_id: str | None = None
    scheduler: str = ""  # the scheduler's word (PENDING, RUNNING, FAILED, CANCELLED ...)
    log: str | None = None
    detail: str = ""

    def line(self, width: int) -> str:
        parts = [f"{self.name:<{width}}", f"{self.state:<11}"]
        if self.job_id:
            parts.append(f"job {self.job_id:<12}")
        if self.scheduler:
            parts.append(f"{self.scheduler:<12}")
        if self.log:
            parts.append(f"log {self.log}")
        text = "  ".join(parts).rstrip()
        return text + (f"\n{'':<{width}}  {self.detail}" if self.detail else "")


def _age_s(record: dict[str, Any]) -> float:
    try:
        then = datetime.datetime.fromisoformat(record["submitted"])
    except (KeyError, ValueError):
        return float("inf")
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def run_state(spec: JobSpec, record: dict[str, Any] | None, scheduler: tuple[str, str] | None) -> RunStatus:
    """The state of ``spec``'s run from its folder, its job record and the scheduler's answer for that job
    (``(state, exit code)``; None: the scheduler does not show it; local jobs: ``("RUNNING", "")`` or None)."""
    if spec.finished():
        return RunStatus(spec.name, FINISHED, record["job_id"] if record else None)
    if record is None:
        return RunStatus(spec.name, NEW, detail="not submitted yet" if not spec.run.exists() else
                         "started outside a job; a job continues it")
    log = record.get("stdout")
    job, (state, exit_code) = record["job_id"], scheduler or ("", "")
    if state in SLURM_QUEUED:
        return RunStatus(spec.name, QUEUED, job, state, log)
    if state in SLURM_RUNNING:
        return RunStatus(spec.name, RUNNING, job, state, log)
    if not state and record.get("launcher") == "slurm" and _age_s(record) < VISIBILITY_GRACE_S \
            and not spec.run.exists():
        return RunStatus(spec.name, QUEUED, job, "SUBMITTED", log, "just submitted; squeue does not show it yet")
    # the job has ended without a finished run: failed (by its own doing: resubmitted on request only), or
    # interrupted / deleted by the user (submitted again)
    outcome, error = job_result(record)
    first = exit_code.split(":")[0]
    code = int(first) if first.isdigit() else None  # sacct's "exit:signal"; None where unknown
    word = state or "ENDED"
    failed_code = code is not None and code not in (0, *RESUMABLE_CODES)
    if outcome == "error" or failed_code or (state in SLURM_FAILED and code not in RESUMABLE_CODES):
        where = f" (see {record.get('stderr')})" if record.get("stderr") else ""
        return RunStatus(spec.name, FAILED, job, f"{word} {exit_code}".strip(), log,
                         (error or "the job failed") + where)
    if not spec.run.exists():
        return RunStatus(spec.name, NEW, job, state, log, f"{spec.run} is gone (deleted?): it is trained again")
    if outcome == "success":  # the job ended well but the report is gone: deleted by the user
        return RunStatus(spec.name, NEW, job, word, log, "its report is gone (deleted?): the run is completed again")
    return RunStatus(spec.name, INTERRUPTED, job, f"{word} {exit_code}".strip(), log,
                     "stopped before the end (killed, preempted, timed out or cancelled); a new job continues it "
                     "from its checkpoint")


# ----------------------------------------------------------------------------------------------
# submitting


@dataclass
class LaunchOptions:
    """How ``dscl compare`` / ``dscl sweep`` run their runs as jobs (the command line's launcher options)."""

    launcher: str
    resources: Resources = field(default_factory=Resources)
    wait: bool = False
    resubmit_failed: bool = False
    poll_seconds: float | None = None

    def poll(self) -> float:
        return self.poll_seconds if self.poll_seconds is not None else (5.0 if self.launcher == "local" else 60.0)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _submitit() -> Any:
    try:
        import submitit
    except ImportError as exc:
        raise LaunchError("--launcher needs submitit: pip install 'dscl-lt[slurm]'") from exc
    return submitit


class Launcher:
    """Submits :class:`JobSpec` runs as submitit jobs and answers their states."""

    def __init__(self, out: Path, options: LaunchOptions, device: str) -> None:
        self.out, self.options, self.device = out, options, device
        self.kind = options.launcher
        self.logs = out / JOBS_DIR / "logs"
        self.specs_dir = out / JOBS_DIR / "specs"

    # -- what a job runs
    def task(self, spec: JobSpec) -> DsclTask:
        path = self.specs_dir / f"{spec.name}.json"
        # absolute: a job may start elsewhere (a --setup line that changes directory, sbatch --chdir)
        write_json(path, {**spec.to_dict(), "run": str(spec.run.resolve())})
        return DsclTask(["job", str(path.resolve()), "--device", self.device, "--no-progress"])

    def record(self, job: Any) -> dict[str, Any]:
        paths = job.paths
        rec: dict[str, Any] = {"job_id": str(job.job_id), "launcher": self.kind, "submitted": _now(),
                               "folder": str(paths.folder), "stdout": str(paths.stdout), "stderr": str(paths.stderr)}
        if self.kind == "local":
            rec["start"] = _proc_start(int(job.job_id))
        return rec

    # -- submitting
    def submit(self, specs: Sequence[JobSpec], dependency: str | None = None) -> list[dict[str, Any]]:
        if not specs:
            return []
        if self.kind == "slurm":
            return self._submit_slurm(specs, dependency)
        return [self._submit_local(spec) for spec in specs]

    def local_gpus(self) -> list[int]:
        if self.device == "cpu":
            return []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [int(x) for x in visible.split(",") if x.strip().isdigit()]
            if ids or not visible.strip():
                return ids
        import torch

        return list(range(torch.cuda.device_count()))

    def max_parallel(self) -> int:
        return self.options.resources.max_parallel or 1

    def _submit_local(self, spec: JobSpec) -> dict[str, Any]:
        submitit = _submitit()
        res = self.options.resources
        gpus = self.local_gpus()
        per_job = res.gpus_per_node if res.gpus_per_node is not None else len(gpus) // self.max_parallel()
        if per_job > len(gpus):
            raise LaunchError(f"--gpus-per-node {per_job}: this machine shows {len(gpus)} GPU(s) to the local "
                              f"launcher")
        if gpus and per_job == 0 and res.gpus_per_node is None:
            raise LaunchError(f"--max-parallel {self.max_parallel()} local jobs on {len(gpus)} GPU(s) would leave each "
                              f"job none; lower --max-parallel, or give --gpus-per-node (0: the jobs run on the CPU; "
                              f"1 with more jobs than GPUs: they share them)")
        taken = {g for rec in self._live_local_slots() for g in rec}
        free = [g for g in gpus if g not in taken]
        visible = tuple(free[:per_job]) if len(free) >= per_job else tuple(gpus[:per_job])
        executor = submitit.LocalExecutor(folder=self.logs / "%j")
        executor.update_parameters(timeout_min=res.time or 60 * 24 * 365, tasks_per_node=1, gpus_per_node=per_job,
                                   visible_gpus=visible, signal_delay_s=120, setup=list(res.setup))
        # the controller's time-limit warning is dscl's (it saves and exits 3); Ctrl-C and a closed terminal do not
        # reach the job (it runs on like a scheduler's; `kill PID` stops it: dscl saves, a rerun continues it)
        # and SLURM's variables of an allocation this command may run in do not make the job a SLURM task
        with _environ(SUBMITIT_PREEMPT_SIGNAL="USR1", DSCL_SLURM="0"), _detached():
            job = executor.submit(self.task(spec))
        _LOCAL_CHILDREN[str(job.job_id)] = job
        rec = self.record(job)
        rec["gpus"] = list(visible)
        return rec

    def _live_local_slots(self) -> list[list[int]]:
        book = JobBook(self.out)
        return [rec.get("gpus", []) for rec in book.jobs.values()
                if rec.get("launcher") == "local" and local_alive(rec)]

    def slurm_parameters(self, dependency: str | None) -> dict[str, Any]:
        res = self.options.resources
        gpus = res.gpus_per_node or 0
        params: dict[str, Any] = {
            "job_name": res.name or "dscl", "nodes": res.nodes or 1, "ntasks_per_node": max(1, gpus),
            "time": res.time or 24 * 60, "srun_args": list(SRUN_ARGS),
            "additional_parameters": {**SLURM_ADDITIONAL, **res.sbatch},
        }
        optional = {"gpus_per_node": gpus or None, "cpus_per_task": res.cpus_per_task, "partition": res.partition,
                    "account": res.account, "qos": res.qos, "constraint": res.constraint, "exclude": res.exclude,
                    "mem": None if res.mem_gb is None else _mem(res.mem_gb), "setup": list(res.setup) or None,
                    "array_parallelism": res.max_parallel}
        params.update({k: v for k, v in optional.items() if v is not None})
        if dependency:
            params["dependency"] = f"afterok:{dependency}"
            params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
        return params

    def _submit_slurm(self, specs: Sequence[JobSpec], dependency: str | None) -> list[dict[str, Any]]:
        submitit = _submitit()
        try:
            executor = submitit.SlurmExecutor(folder=self.logs / "%j")
        except RuntimeError as exc:
            raise LaunchError("--launcher slurm: no `srun` on PATH; run the command on a login node of the cluster "
                              "(or use --launcher local)") from exc
        executor.update_parameters(**self.slurm_parameters(dependency))
        tasks = [self.task(spec) for spec in specs]
        try:
            if len(tasks) == 1:
                jobs = [executor.submit(tasks[0])]
            else:
                with executor.batch():  # a job array: the same resources for every run
                    jobs = [executor.submit(t) for t in tasks]
        except Exception as exc:  # submitit's FailedJobError / FailedSubmissionError: sbatch refused
            raise LaunchError(f"sbatch refused the job{'s' if len(tasks) > 1 else ''}: "
                              f"{' '.join(str(exc).split())[:2000]}") from exc
        return [self.record(job) for job in jobs]


def _mem(gb: float) -> str:
    return f"{int(gb)}G" if gb == int(gb) else f"{int(gb * 1024)}M"


@contextlib.contextmanager
def _detached() -> Iterator[None]:
    """SIGINT and SIGHUP ignored while a local job's controller starts: it and its tasks inherit that (Python keeps
    an inherited SIG_IGN for SIGINT), so Ctrl-C in the terminal of ``--wait`` stops the waiting, not the jobs."""
    import signal

    sigs = [s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGHUP", None)) if s is not None]
    try:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    except ValueError:  # not the main thread: leave the signals alone
        old = {}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` while the block runs (what a local job's processes inherit)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------
# one pass: collect, then submit what is due


def job_states(records: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """``{run name: (state, exit code)}`` for the recorded jobs the scheduler still shows (SLURM: squeue, then sacct)
    or that still run (local), whichever launcher each record names."""
    out: dict[str, tuple[str, str]] = {}
    slurm = {name: rec["job_id"] for name, rec in records.items() if rec.get("launcher") == "slurm"}
    if slurm:
        known = slurm_states(sorted(set(slurm.values())))
        out.update({name: known[jid] for name, jid in slurm.items() if jid in known})
    for name, rec in records.items():
        if rec.get("launcher") == "local" and local_alive(rec):
            out[name] = ("RUNNING", "")
    return out


def statuses(specs: Sequence[JobSpec], book: JobBook) -> list[RunStatus]:
    """Every run's state now (:func:`run_state`), asking the schedulers about the recorded jobs of unfinished runs."""
    records = {s.name: rec for s in specs if (rec := book.get(s.name)) is not None and not s.finished()}
    answer = job_states(records)
    return [run_state(s, book.get(s.name), answer.get(s.name)) for s in specs]


def stage1_finished(run: Path) -> bool:
    """Whether ``run`` holds a finished stage 1 (what a point that shares it waits for)."""
    from dscl.run import has_stage1, stage1_summary

    return has_stage1(run) and stage1_summary(run).finished


def _stage1_ready(spec: JobSpec, by_name: dict[str, JobSpec]) -> bool:
    from dscl.run import has_stage1

    if spec.share_from is None or has_stage1(spec.run):
        return True
    return stage1_finished(by_name[spec.share_from].run)


def submit_due(specs: Sequence[JobSpec], launcher: Launcher, *, resubmit_failed: bool,
               already: dict[str, int] | None = None) -> list[RunStatus]:
    """Collect every run's state and submit the runs that are due: new ones, interrupted ones, and (with
    ``resubmit_failed``) failed ones, never one that is queued, running or finished. A run that shares another's
    stage 1 waits for it: on SLURM it is submitted with ``afterok`` on that run's job, locally once that stage 1
    is finished. Local jobs start while fewer than ``max_parallel`` run. Returns the states after submitting.

    ``already`` counts the submissions of each run in this command (an interrupted run is resubmitted at most
    3 times per command, a failed one once)."""
    already = already if already is not None else {}
    by_name = {s.name: s for s in specs}
    with contextlib.suppress(OSError):  # submitit's local controller creates the folder pattern itself, empty
        (launcher.logs / "%j").rmdir()
    with folder_lock(launcher.out):
        book = JobBook(launcher.out)
        now = {st.name: st for st in statuses(specs, book)}
        due = []
        for spec in specs:
            st = now[spec.name]
            limit = 1 if st.state == FAILED else 3
            wanted = st.state in (NEW, INTERRUPTED) or (st.state == FAILED and resubmit_failed)
            if wanted and already.get(spec.name, 0) < limit:
                due.append(spec)
            elif wanted:
                st.detail = (st.detail + "; " if st.detail else "") + "not resubmitted again by this command"
        running = sum(st.state in LIVE for st in now.values())
        # groups with the same dependency go in one array (SLURM); local: one job each, up to max_parallel
        groups: dict[str | None, list[JobSpec]] = {}
        for spec in due:
            if _stage1_ready(spec, by_name):
                groups.setdefault(None, []).append(spec)
                continue
            src = now[spec.share_from]  # type: ignore[index]
            if launcher.kind == "slurm" and src.state in LIVE and src.job_id:
                groups.setdefault(src.job_id, []).append(spec)
            elif launcher.kind == "slurm" and any(d.name == spec.share_from for d in due):
                groups.setdefault(f"@{spec.share_from}", []).append(spec)
            else:
                why = "is not finished" if src.state in (*LIVE, NEW) else f"is {src.state}"
                now[spec.name] = RunStatus(spec.name, WAITING, detail=f"shares the stage 1 of {spec.share_from}, "
                                           f"which {why}")
        order = sorted(groups, key=lambda k: (k is not None, k or ""))  # independent ones first
        for dep in order:
            group = groups[dep]
            if launcher.kind == "local":
                free = launcher.max_parallel() - running
                held, group = group[max(free, 0):], group[:max(free, 0)]
                for spec in held:
                    now[spec.name] = RunStatus(spec.name, WAITING, detail=f"--max-parallel {launcher.max_parallel()}: "
                                               "starts when a running job ends (--wait, or rerun the command)")
            if dep is not None and dep.startswith("@"):
                dep = book.jobs[dep[1:]]["job_id"]  # submitted just before, in this pass
            records = launcher.submit(group, dependency=dep)
            for spec, rec in zip(group, records, strict=True):
                book.add(spec.name, rec)
                already[spec.name] = already.get(spec.name, 0) + 1
                after = f" after job {dep}" if dep else ""
                before = now[spec.name]
                why = f" (it was {before.state}: {before.detail})" if before.state != NEW or before.job_id else ""
                now[spec.name] = RunStatus(spec.name, QUEUED, rec["job_id"], "SUBMITTED", rec["stdout"],
                                           f"submitted{after}{why}")
                running += 1
    return [now[s.name] for s in specs]


def counts(states: Sequence[RunStatus]) -> dict[str, int]:
    return dict(Counter(st.state for st in states))


def format_states(states: Sequence[RunStatus], out: Path, launcher: str) -> str:
    c = counts(states)
    order = (FINISHED, RUNNING, QUEUED, WAITING, INTERRUPTED, FAILED, NEW)
    head = ", ".join(f"{c[k]} {k}" for k in order if c.get(k))
    width = max(len(s.name) for s in states) if states else 10
    lines = [f"jobs ({launcher}; recorded in {out / JOBS_FILE}): {head}"]
    lines += ["  " + st.line(width) for st in states if st.state != FINISHED]
    return "\n".join(lines)


def launch(specs: Sequence[JobSpec], out: Path, options: LaunchOptions, *, device: str,
           progress: bool = True) -> list[RunStatus]:
    """Submit what is due and, with ``options.wait``, keep collecting (and submitting what becomes due: runs
    waiting for a stage 1 or for a free local slot, interrupted ones) until no run is queued, running or waiting.
    Returns the final states. Ctrl-C while waiting stops the waiting, not the jobs."""
    try:
        return _launch(specs, out, options, device=device, progress=progress)
    finally:
        # submitit's job objects go now, not at interpreter exit (their __del__ fails there); a job of ours that ends
        # later is a zombie until this process exits, which local_alive reads as ended
        _LOCAL_CHILDREN.clear()


def _launch(specs: Sequence[JobSpec], out: Path, options: LaunchOptions, *, device: str,
            progress: bool) -> list[RunStatus]:
    launcher = Launcher(out, options, device)
    already: dict[str, int] = {}
    states = [submit_due(specs, launcher, resubmit_failed=options.resubmit_failed, already=already)]
    print(format_states(states[-1], out, options.launcher), flush=True)
    if not options.wait:
        return states[-1]
    from tqdm import tqdm

    bar = tqdm(total=len(specs), desc="runs finished", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        _wait(specs, launcher, states, already, bar, progress=progress, poll=options.poll())
    except KeyboardInterrupt:
        bar.close()
        live = [st.job_id or "" for st in states[-1] if st.state in LIVE]
        how = (": local jobs are processes; `kill JOBID` stops one (it saves, and a rerun continues it)"
               if live and options.launcher == "local" else "")
        print(f"\nstopped waiting; {len(live)} job(s) go on ({', '.join(live) or 'none'}){how}. Rerun the same "
              f"command to collect.", flush=True)
        raise
    bar.close()
    print(format_states(states[-1], out, options.launcher), flush=True)
    return states[-1]


def _wait(specs: Sequence[JobSpec], launcher: Launcher, states: list[list[RunStatus]], already: dict[str, int],
          bar: Any, *, progress: bool, poll: float) -> None:
    """Poll until nothing is queued, running, waiting or due; each pass's states appended to ``states``."""
    last: dict[str, int] | None = None
    while True:
        c = counts(states[-1])
        bar.n = c.get(FINISHED, 0)
        bar.set_postfix_str(", ".join(f"{v} {k}" for k, v in c.items() if k != FINISHED), refresh=True)
        if not progress and c != last:
            print(f"[{time.strftime('%H:%M:%S')}] " + ", ".join(f"{v} {k}" for k, v in c.items()), flush=True)
        last = c
        if not any(st.state in (*LIVE, WAITING) or (st.state in (NEW, INTERRUPTED) and already.get(st.name, 0) < 3)
                   for st in states[-1]):
            return
        time.sleep(poll)
        states.append(submit_due(specs, launcher, resubmit_failed=False, already=already))


def live_jobs(specs: Sequence[JobSpec], out: Path) -> list[RunStatus]:
    """The runs of ``out`` whose recorded job is queued or running (what a sequential command must not touch)."""
    book = JobBook(out)
    if not book.jobs:
        return []
    try:
        return [st for st in statuses(specs, book) if st.state in LIVE]
    except LaunchError as exc:
        raise LaunchError(f"{out} holds runs submitted as jobs ({book.path}) and {exc}; if none of those jobs runs any "
                          f"more, delete {book.path} to train the rest here") from exc
