"""Command-line interface: the only package that reads argv or chooses exit codes.

``dscl pretrain | classify | evaluate | run | data | compare | sweep | job | analyze | presets``. Each
module of this package registers its commands' parsers (``add_parsers``) and handlers (``cmd_*``,
attached with ``set_defaults(handler=...)``); :func:`main` parses, dispatches and maps errors to
exit codes. ``section.key=value`` overrides may stand anywhere after the command, before or after
options (``main`` collects them in order).
``torchrun --nproc_per_node N -m dscl ...`` runs the training commands distributed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from dscl.cli.common import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    OVERRIDE,
    continue_command,
    resume_auto_argv,
)

if TYPE_CHECKING:  # runtime imports torch: only once a command runs
    from dscl.runtime import StopSignals

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PREEMPTED", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscl",
        description="Decoupled Contrastive Learning (DSCL + PBSD) for long-tailed recognition.",
        epilog="`dscl run` with no arguments trains and evaluates on the embedded Fashion-MNIST-LT default.",
    )
    from dscl import __version__

    parser.add_argument("--version", action="version", version=f"dscl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from dscl.cli import data, experiments, train, use

    train.add_parsers(sub)
    data.add_parsers(sub)
    experiments.add_parsers(sub)
    use.add_parsers(sub)
    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(handler=cmd_presets)
    return parser


def cmd_presets(args: argparse.Namespace) -> int:
    """Each preset's name and description, then (indented) the weights it starts from and an estimate of its
    stage-1 model state (dscl/presets_info.py)."""
    from dscl.presets_info import presets_listing

    print(presets_listing())
    return EXIT_OK


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args`` that also accepts ``section.key=value`` overrides after options.

    argparse gives the ``overrides`` positional only the first run of positionals; the overrides it
    leaves over (in command-line order, after that run) are appended, so they may stand anywhere and
    later ones win. Anything else left over is an error, as with ``parse_args``.
    """
    args, extras = parser.parse_known_args(resume_auto_argv(argv))
    if extras:
        command_parser = _command_parser(parser, args.command) if args.command else parser
        rest = [x for x in extras if not OVERRIDE.match(x)]
        if rest or not hasattr(args, "overrides"):
            hint = "" if hasattr(args, "overrides") else " (this command takes no section.key=value overrides)"
            command_parser.error(f"unrecognized arguments: {' '.join(rest or extras)}{hint}")
        args.overrides = list(args.overrides or []) + extras
    return args


def interrupt_message(args: argparse.Namespace) -> str:
    """What Ctrl-C left behind and the command that continues (stage 1 commands) or reruns."""
    out = getattr(args, "out", None)
    if args.command == "job" and out is not None:
        return (f"\ninterrupted: {out} keeps its last checkpoint; continue with: "
                f"{shlex.join(['dscl', *getattr(args, 'argv', [])])}")
    if args.command not in ("pretrain", "run") or out is None:
        return "\ninterrupted: files already written are complete (every write is atomic); rerun the command"
    ckpt = Path(out) / "checkpoints" / "last.pt"
    if ckpt.is_file():
        return (f"\ninterrupted: the checkpoint of the last completed epoch ({ckpt}) is intact; continue with: "
                f"dscl {args.command} --out {shlex.quote(str(out))} --resume")
    return (f"\ninterrupted before the first epoch ended: nothing was saved; run the same command again "
            f"(with --out {shlex.quote(str(out))} it replaces what this attempt left there)")


def preempted_state(args: argparse.Namespace) -> str:
    """What a stop left to continue from: stage 1's checkpoint, or nothing (a signal before the first one, or
    during a command that has nothing to save mid-way: it starts again from its beginning)."""
    out = getattr(args, "out", None)
    if args.command in ("pretrain", "run", "job") and out is not None \
            and (Path(out) / "checkpoints" / "last.pt").is_file():
        return "checkpoint saved"
    return "nothing was saved: the same line starts it again from the beginning"


def debugging(args: argparse.Namespace) -> bool:
    """``--debug`` (commands with runtime options) or ``DSCL_DEBUG=1`` (any command): let tracebacks through."""
    return bool(getattr(args, "debug", False)) or os.environ.get("DSCL_DEBUG", "") not in ("", "0")


def one_line(exc: BaseException) -> str:
    """An error's message on one line (an OS error without a message still names its type)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def internal_error_message(command: str, exc: BaseException) -> str:
    """What an exception that no check anticipated prints: short, says it is dscl's fault, and how to see more."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return (f"dscl {command}: internal error: {type(exc).__name__}: {one_line(exc)}{at}\n"
            f"This is a bug in dscl, not in your input. Rerun with --debug (or DSCL_DEBUG=1) for the traceback and "
            f"report it with the command line and `dscl --version` to the dscl issue tracker.")


#: ``DSCL_EXIT_FILE=PATH``: rank 0 also writes its exit code to PATH when a command ends (a launcher that hides
#: it: torchrun exits 1 whatever its processes returned; scripts/slurm/pretrain_torchrun.sbatch reads it)
EXIT_FILE_ENV = "DSCL_EXIT_FILE"


def main(argv: list[str] | None = None) -> int:
    """``dscl`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (:data:`EXIT_OK`,
    :data:`EXIT_ERROR`, :data:`EXIT_PREEMPTED` ...), also written to ``$DSCL_EXIT_FILE`` when that is set."""
    code = EXIT_INTERNAL
    try:
        code = _main(argv)
    except SystemExit as exc:  # argparse: a usage error (2), or --help / --version (0)
        code = exc.code if isinstance(exc.code, int) else EXIT_ERROR
        raise
    finally:
        write_exit_file(code)
    return code


def write_exit_file(code: int) -> None:
    """``code`` into ``$DSCL_EXIT_FILE`` (atomically) from rank 0 of the launch (torchrun's ``RANK``, else srun's
    ``SLURM_PROCID``); a file that cannot be written is a warning, the command's own result counts."""
    path = os.environ.get(EXIT_FILE_ENV)
    rank = (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0").strip()
    if not path or rank != "0":
        return
    from dscl.io import write_text

    try:
        write_text(path, f"{code}\n")
    except OSError as exc:
        print(f"dscl: warning: {EXIT_FILE_ENV}={path} cannot be written ({one_line(exc)})", file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    from dscl.threads import set_openmp_defaults

    set_openmp_defaults()  # before any torch import: OpenMP reads its environment once, when loaded
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(parser, argv)
    args.argv = argv
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\ndscl: name a command; `dscl run` trains and evaluates on the default dataset", file=sys.stderr)
        return EXIT_ERROR
    from dscl import dist
    from dscl.errors import DsclError
    from dscl.runtime import Preempted, StopSignals

    # SIGTERM / SIGUSR1 end any command with exit code 3; stage 1 handles them itself (it saves first). Once one
    # has come, the handlers stay until the process exits (hold): a scheduler repeats its signal (srun forwards
    # the one its tasks already got), and a repeat on the way out must not turn exit code 3 into SIGTERM's 143
    stop = StopSignals(immediate=True, hold=True).__enter__()
    try:
        return run_handler(args, stop)
    except Preempted as exc:
        if dist.is_main():
            print(f"\ndscl {args.command}: {exc}.\nContinue (a requeued job: the same line) with:\n"
                  f"  {continue_command(args)}\n(under torchrun / srun: the same launcher line with these "
                  f"arguments; exit code {EXIT_PREEMPTED} = preempted, {preempted_state(args)})", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        if dist.is_main():
            print(interrupt_message(args), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DsclError, OSError) as exc:
        # what the user gave (DsclError) or what the system refused (a full disk, a permission): one line
        if debugging(args):
            raise
        print(f"dscl {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if debugging(args):
            raise
        print(internal_error_message(args.command, exc), file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        from dscl.trackers import close_all

        close_all()  # log.trackers: flush and finish (W&B run, MLflow run, TensorBoard files)
        dist.shutdown()
        stop.__exit__()  # the handlers before main, unless a signal came: then they stay, ignoring the rest


def run_handler(args: argparse.Namespace, stop: StopSignals) -> int:
    """The command's handler; once it has returned or raised, a stop signal no longer interrupts anything
    (the way out: messages, closing the trackers) and changes no exit code."""
    try:
        return args.handler(args)
    finally:
        stop.settle()


if __name__ == "__main__":
    sys.exit(main())
