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
import sys
from collections.abc import Sequence
from typing import Any

from dscl.cli.common import RESUME_AUTO, resume_auto_argv

# the job's task, its requeue rule and the job's SLURM options are the library's (dscl compare / sweep
# --launcher slurm submit the same tasks)
from dscl.launch import SLURM_ADDITIONAL, SRUN_ARGS, DsclTask, requeue_refusal  # noqa: F401


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
