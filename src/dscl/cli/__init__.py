"""Command-line interface: the only package that reads argv or chooses exit codes.

``dscl pretrain | classify | evaluate | run | data | compare | sweep | analyze | presets``. Each
module of this package registers its commands' parsers (``add_parsers``) and handlers (``cmd_*``,
attached with ``set_defaults(handler=...)``); :func:`main` parses, dispatches and maps errors to
exit codes.
``torchrun --nproc_per_node N -m dscl ...`` runs the training commands distributed.
"""

from __future__ import annotations

import argparse
import sys

from dscl.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from dscl.cli.data import cmd_presets

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscl",
        description="Decoupled Contrastive Learning (DSCL + PBSD) for long-tailed recognition.",
        epilog="`dscl run` with no arguments trains and evaluates on the embedded Fashion-MNIST-LT default.",
    )
    from dscl import __version__

    parser.add_argument("--version", action="version", version=f"dscl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from dscl.cli import data, experiments, train

    train.add_parsers(sub)
    data.add_parsers(sub)
    experiments.add_parsers(sub)
    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(handler=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\ndscl: name a command; `dscl run` trains and evaluates on the default dataset", file=sys.stderr)
        return EXIT_ERROR
    from dscl import dist
    from dscl.checkpoint import CheckpointError
    from dscl.config import ConfigError

    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch's checkpoint is intact; continue with --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"dscl {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
