"""Submit ``dscl pretrain`` (or ``dscl run``) to SLURM from Python with submitit, requeued when preempted.

    pip install 'dscl-lt[slurm]'        # submitit
    python scripts/slurm/submit.py --nodes 2 --gpus-per-node 8 --cpus-per-task 12 --time-min 1440 \\
        --partition gpu -- --preset imagenet-lt --out runs/imagenet-lt --data-root /data/ILSVRC2012 \\
        data.list_dir=/data/lists

Everything after ``--`` is the dscl command line; ``--resume auto`` is added (a plain ``--resume``
becomes it), so the first job starts the run and every requeued one continues it. submitit writes the
sbatch file and starts one task per GPU with ``srun``; each task runs dscl in its own Python process
(:class:`DsclTask`), which reads SLURM's variables like ``srun python -m dscl``
(scripts/slurm/pretrain_srun.sbatch is the same job as a plain sbatch script).

Preemption and the time limit use dscl's protocol, not submitit's checkpointing: the job asks for
``--signal=USR1@120`` (replacing submitit's ``USR2@90``) and ``--requeue``; every task receives
SIGUSR1, finishes the step, rank 0 writes a mid-epoch checkpoint and dscl returns exit code 3. Rank 0
then runs ``scontrol requeue`` (what submitit does for its own checkpoints) and every task ends without
a result, so ``job.result()`` waits for the requeued job, which loads the same pickled task and
continues. The rules of the sbatch scripts apply (:func:`requeue_refusal`): ``scancel`` (SIGTERM) saves
and stops for good, and a job SLURM requeues itself (PreemptMode=REQUEUE) is not requeued again.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from dscl.cli.common import RESUME_AUTO, resume_auto_argv

#: What the job asks SLURM for on top of submitit's defaults: dscl's warning signal (every task, not
#: "B:" the batch shell only) and permission to requeue.
SLURM_ADDITIONAL = {"signal": "USR1@120", "requeue": True}
#: srun options: every task sees the node's CPUs and dscl shares them out itself (binding would shrink a
#: task's CPUs and dscl would divide them again); a task that exits 3 first does not get the others killed.
SRUN_ARGS = ["--cpu-bind=none", "--kill-on-bad-exit=0"]


def dscl_argv(command: str, dscl_args: Sequence[str]) -> list[str]:
    """The dscl command line every task runs: ``command`` and ``dscl_args`` with ``--resume auto``.

    Raises:
        ValueError: no ``--out`` (a requeued job must find its run) or ``--overwrite`` (a requeued job
            would start the run again).
    """
    args = [a for a in resume_auto_argv(list(dscl_args)) if a not in ("--resume", RESUME_AUTO)]
    if "--overwrite" in args:
        raise ValueError("--overwrite: a requeued job would start the run again; leave it out (--resume auto "
                         "starts a run whose --out holds no checkpoint)")
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        raise ValueError("--out DIR is needed: the requeued job continues the run it finds there")
    return [command, *args, "--resume", "auto"]


def _scontrol_fields(*args: str) -> dict[str, str]:
    """``Key=value`` fields of ``scontrol show ...`` (empty when scontrol cannot answer)."""
    try:
        out = subprocess.run(["scontrol", "show", *args], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", out))


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


class DsclTask:
    """One task of the job: ``dscl <argv>`` in this process (the process SLURM signals).

    Exit code 0 is the task's result; exit code 3 (preempted, checkpoint saved) requeues the job from
    rank 0 (unless :func:`requeue_refusal` says why not) and ends the task without a result; any other
    code raises, and submitit reports the job failed.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        from dscl import cli, runtime

        rc = cli.main(list(self.argv))
        if rc == cli.EXIT_PREEMPTED:  # stopped on SIGTERM / SIGUSR1 after saving a checkpoint
            if os.environ.get("SLURM_PROCID", "0") == "0":
                job = os.environ["SLURM_JOB_ID"]
                why = requeue_refusal(job, runtime.first_stop_signal())
                if why is None:
                    print(f"dscl exited {rc} (checkpoint saved): requeueing job {job}", file=sys.stderr, flush=True)
                    subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
                else:
                    print(f"dscl exited {rc} (checkpoint saved): job {job} not requeued: {why}", file=sys.stderr,
                          flush=True)
            raise SystemExit(rc)  # no result: the requeued job continues and reports
        if rc != 0:
            raise RuntimeError(f"dscl {' '.join(self.argv)} exited with code {rc}")
        return rc


def configure(executor: Any, args: argparse.Namespace) -> None:
    """Give a ``submitit.AutoExecutor`` the job's shape: nodes, one task per GPU, dscl's signal, requeue."""
    params: dict[str, Any] = {
        "name": args.name, "nodes": args.nodes, "tasks_per_node": args.gpus_per_node,
        "gpus_per_node": args.gpus_per_node, "cpus_per_task": args.cpus_per_task, "timeout_min": args.time_min,
        "slurm_additional_parameters": dict(SLURM_ADDITIONAL), "slurm_srun_args": list(SRUN_ARGS),
    }
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.setup:
        params["slurm_setup"] = list(args.setup)
    executor.update_parameters(**params)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] -- DSCL ARGUMENTS (e.g. --preset P --out DIR ...)")
    p.add_argument("--command", choices=("pretrain", "run"), default="pretrain")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="also the tasks per node (one per GPU)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--time-min", type=int, default=24 * 60, help="time limit of one job, minutes")
    p.add_argument("--partition", default=None)
    p.add_argument("--name", default="dscl")
    p.add_argument("--folder", default="slurm-logs/%j", help="submitit's folder for the job's pickles and logs")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)")
    return p.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    args, dscl_args = parse_args(sys.argv[1:] if argv is None else argv)
    task = DsclTask(dscl_argv(args.command, dscl_args))
    import submitit

    executor = submitit.AutoExecutor(folder=args.folder)
    configure(executor, args)
    job = executor.submit(task)
    print(f"submitted job {job.job_id}: dscl {' '.join(task.argv)}\nlogs: {args.folder.replace('%j', job.job_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
