"""``dscl compare | sweep | analyze``: methods x seeds, one-parameter sweeps, the paper's analyses."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from dscl.cli.common import EXIT_ERROR, EXIT_OK, config_args, load_cfg, print_main, runtime_args
from dscl.errors import UsageError

#: the launcher options and their resource keys (dscl.launch.RESOURCE_KEYS)
RESOURCE_FLAGS = ("nodes", "gpus_per_node", "cpus_per_task", "time", "partition", "account", "qos", "constraint",
                  "exclude", "mem_gb", "setup", "max_parallel")


def launch_options(args: argparse.Namespace):
    """The ``--launcher`` options of compare / sweep as :class:`dscl.launch.LaunchOptions` (None: sequential)."""
    given = [f"--{k.replace('_', '-')}" for k in RESOURCE_FLAGS if getattr(args, k) not in (None, [])]
    given += [flag for flag, on in (("--wait", args.wait), ("--resubmit-failed", args.resubmit_failed),
                                    ("--resources", args.resources is not None),
                                    ("--poll-seconds", args.poll_seconds is not None)) if on]
    if args.launcher is None:
        if given:
            raise UsageError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with --launcher local|slurm "
                             f"(without it every run trains here, one after another)")
        return None
    from dscl.launch import LaunchOptions, Resources, read_resources, resources_from

    base = read_resources(args.resources) if args.resources else Resources()
    flags = {k: getattr(args, k) for k in RESOURCE_FLAGS if getattr(args, k) not in (None, [])}
    resources = resources_from(flags, "the command line", base)
    if args.poll_seconds is not None and args.poll_seconds <= 0:
        raise UsageError(f"--poll-seconds must be positive, got {args.poll_seconds}")
    if args.launcher == "local" and (resources.nodes or 1) > 1:
        raise UsageError(f"--nodes {resources.nodes}: the local launcher runs each job on this machine; use "
                         f"--launcher slurm for jobs on several nodes")
    return LaunchOptions(args.launcher, resources, wait=args.wait, resubmit_failed=args.resubmit_failed,
                         poll_seconds=args.poll_seconds)


def pending_exit(pending, what: str) -> int:
    """Print what a launched comparison / sweep still waits for; exit code 2 when a run failed, else 0."""
    from dscl.launch import FAILED

    lines = [pending.partial] if pending.partial else []
    lines.append(f"{what} not written yet: not every run has finished. Rerun the same command to collect "
                 f"(nothing is submitted twice), or add --wait to wait here.")
    if pending.failed:
        names = ", ".join(st.name for st in pending.states if st.state == FAILED)
        lines.append(f"failed: {names}; read the logs above, fix the cause, then rerun with --resubmit-failed")
    print_main("\n".join(lines))
    return EXIT_ERROR if pending.failed else EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from dscl.compare import compare, parse_methods, parse_seeds

    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    cfg = load_cfg(args)
    command = "dscl " + shlex.join(args.argv)
    launch = launch_options(args)
    result = compare(cfg, methods, seeds, args.out, command=command, device=args.device,
                     progress=not args.no_progress, launch=launch)
    from dscl.compare import Pending, format_markdown

    if isinstance(result, Pending):
        return pending_exit(result, f"{Path(args.out) / 'compare.json'}")

    print_main(format_markdown(result) + f"\nwrote {Path(args.out) / 'compare.json'} and compare.md")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from dscl.sweep import format_markdown, parse_param, sweep

    name, values = parse_param(args.param)
    cfg = load_cfg(args)
    from dscl.compare import parse_methods, parse_seeds

    methods = parse_methods(args.method)
    if len(methods) != 1:
        raise UsageError(f"--method {args.method!r}: a sweep trains one method; name exactly one")
    method = methods[0]
    launch = launch_options(args)
    result = sweep(cfg, name, values, method=method, seeds=parse_seeds(args.seeds), out=args.out,
                   val_fraction=args.val_fraction, command="dscl " + shlex.join(args.argv), device=args.device,
                   progress=not args.no_progress, launch=launch)
    from dscl.compare import Pending

    if isinstance(result, Pending):
        return pending_exit(result, f"{Path(args.out) / 'sweep.json'}")
    print_main(format_markdown(result) + f"\nwrote {Path(args.out) / 'sweep.json'}, sweep.md and sweep.png")
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    from dscl.io import read_json
    from dscl.launch import JobSpec, run_spec

    spec = JobSpec.from_dict(read_json(args.spec, what="it is written by dscl compare / sweep with --launcher"),
                             args.spec)
    args.out = str(spec.run)  # what an interrupt / preemption message names
    report = run_spec(spec, device=args.device, progress=not args.no_progress)
    print_main(f"{spec.name}: finished, top-1 {report['top1']:.2f}% ({spec.run / 'report.json'})")
    return EXIT_OK


def launcher_args(p: argparse.ArgumentParser) -> None:
    """--launcher and the jobs' resources (compare, sweep)."""
    g = p.add_argument_group("jobs (one per run; README 'Compare and sweep as jobs')")
    g.add_argument("--launcher", choices=("local", "slurm"), default=None,
                   help="run every (method / value, seed) as its own job: slurm (sbatch through submitit; "
                        "a job array, requeued on preemption) or local (processes on this machine). Rerun the "
                        "same command to collect: finished runs enter the table, queued / running / failed ones "
                        "are listed, nothing is submitted twice. Default: every run here, one after another")
    g.add_argument("--wait", action="store_true", help="wait (with progress) until every job has ended")
    g.add_argument("--resubmit-failed", action="store_true",
                   help="submit the runs whose job failed again (interrupted ones are always resubmitted)")
    g.add_argument("--poll-seconds", type=float, default=None, metavar="S",
                   help="how often --wait asks the scheduler (default 60 for slurm, 5 for local)")
    g.add_argument("--resources", default=None, metavar="FILE",
                   help="YAML with the options below by name (nodes, gpus_per_node, cpus_per_task, time, "
                        "partition, account, qos, constraint, exclude, mem_gb, setup, max_parallel, name, "
                        "sbatch: {option: value}); options given here win")
    g.add_argument("--nodes", type=int, default=None, metavar="N", help="nodes per job (slurm; default 1)")
    g.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                   help="GPUs per node, one task each (slurm; default 0); local: GPUs per job")
    g.add_argument("--cpus-per-task", type=int, default=None, metavar="N", help="CPUs per task (slurm)")
    g.add_argument("--time", default=None, metavar="LIMIT",
                   help="time limit of one job: minutes, HH:MM:SS or D-HH:MM:SS (slurm default 1 day; dscl saves "
                        "and requeues before it)")
    g.add_argument("--partition", default=None, metavar="NAME", help="SLURM partition")
    g.add_argument("--account", default=None, metavar="NAME", help="SLURM account")
    g.add_argument("--qos", default=None, metavar="NAME", help="SLURM quality of service")
    g.add_argument("--constraint", default=None, metavar="FEATURES", help="node features, e.g. a100 (slurm)")
    g.add_argument("--exclude", default=None, metavar="NODES", help="nodes to leave out (slurm)")
    g.add_argument("--mem-gb", type=float, default=None, metavar="GB", help="memory per node, GB (slurm)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line each job runs first, e.g. 'source .venv/bin/activate' (repeatable)")
    g.add_argument("--max-parallel", type=int, default=None, metavar="N",
                   help="jobs running at once (local default 1; slurm: the array's throttle)")


def cmd_analyze(args: argparse.Namespace) -> int:
    from dscl.run import RunDirError, out_path_problem

    problem = args.out is not None and out_path_problem(Path(args.out), folder=True)
    if problem:  # before the measurement, which may take minutes
        raise RunDirError(problem)
    progress = not args.no_progress
    if args.analysis == "gradient-ratio":
        from dscl.analysis.gradient import format_summary, gradient_ratio

        result = gradient_ratio(args.run, batches=args.batches, out=args.out, device=args.device, progress=progress)
        print_main(format_summary(result))
    elif args.analysis == "retrieval":
        from dscl.analysis.retrieval import format_retrieval, retrieval

        result = retrieval(args.run, compare_run=args.compare_run, classes=args.classes, k=args.k,
                           queries_per_class=args.queries_per_class, out=args.out, device=args.device,
                           progress=progress)
        print_main(format_retrieval(result))
    else:
        from dscl.analysis.retrieval import format_patch_retrieval, patch_retrieval

        result = patch_retrieval(args.run, query=args.query, box=args.box, k=args.k, out=args.out,
                                 device=args.device, progress=progress)
        print_main(format_patch_retrieval(result))
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register compare, sweep and analyze."""
    p = sub.add_parser("compare", help="several methods x seeds on one preset -> compare.json / compare.md")
    p.add_argument("--methods", default="ce,scl,dscl,dscl+pbsd",
                   help="comma-separated, from ce, scl, dscl, scl+pbsd, dscl+pbsd (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="comparison folder; rerunning the same command continues a killed comparison")
    config_args(p)
    runtime_args(p)
    launcher_args(p)
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("sweep", help="one hyperparameter over several values, chosen on a validation split")
    p.add_argument("--param", required=True, metavar="NAME=V1,V2,...",
                   help="alpha, lambda, patches, patch_scale, queue or any section.key, with its values, "
                        "e.g. alpha=0.05,0.1,0.2 or patch_scale=[0.05,0.3],[0.1,0.6]")
    p.add_argument("--method", default="dscl+pbsd",
                   help="the method every point trains (default: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="carve this fraction of each training class for choosing (default: the dataset's "
                        "own validation split — fmnist-lt / cifar*-lt hold one out of their unused training "
                        "images — else 0.1)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="sweep folder; rerunning the same command continues a killed sweep")
    config_args(p)
    runtime_args(p)
    launcher_args(p)
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("job", help="one run of a compare / sweep started with --launcher (what each job runs; "
                                   "run it by hand to debug a job)")
    p.add_argument("spec", metavar="SPEC", help="OUT/jobs/specs/NAME.json, written by compare / sweep --launcher")
    runtime_args(p)
    p.set_defaults(handler=cmd_job)

    p = sub.add_parser("analyze", help="the paper's analyses for a finished run (PNG + JSON in RUN/analysis)")
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    a = asub.add_parser("gradient-ratio",
                        help="pull on the own augmented view / pull on other positives, SCL vs DSCL (Fig. 2)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--batches", type=int, default=4, help="training batches to measure (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    runtime_args(a)
    a = asub.add_parser("retrieval", help="top-k nearest training images of test queries, head vs tail (Fig. 1)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--compare-run", default=None, metavar="DIR2", help="a second run drawn side by side")
    a.add_argument("--classes", default=None,
                   help="query classes: names, indices, or head/medium/tail/all (default: head,tail, or the "
                        "run's most and least frequent non-empty shot groups when it lacks one of them)")
    a.add_argument("--k", type=int, default=5, help="neighbours per query (default: %(default)s)")
    a.add_argument("--queries-per-class", type=int, default=1,
                   help="query images drawn per class in the picture (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    runtime_args(a)
    a = asub.add_parser("patch-retrieval",
                        help="training images whose patch features best match a query box, with response maps (Fig. 4)")
    a.add_argument("--run", required=True, metavar="DIR", help="a run directory with a finished stage 1")
    a.add_argument("--query", type=int, default=None, metavar="INDEX",
                   help="test-set index of the query image (default: the first test image of the rarest class)")
    a.add_argument("--box", default=None, metavar="X1,Y1,X2,Y2",
                   help="query box in pixels of the evaluation-size image (default: the central half)")
    a.add_argument("--k", type=int, default=5, help="retrieved training images (default: %(default)s)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/analysis)")
    runtime_args(a)
    p.set_defaults(handler=cmd_analyze)
