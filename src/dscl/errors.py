"""The one base of every error meant for a user.

Every error that says "your input is wrong" (a config key, a data file, a run folder, a checkpoint, …)
derives from :class:`DsclError`; the CLI prints those as one line and exits 1. Anything else that
escapes a command is a bug in dscl and is reported as an internal error (``--debug`` shows the
traceback). The domain classes keep ``ValueError`` as a second base so library callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DivergedError", "DsclError", "LaunchError", "UsageError", "listed"]


class DsclError(Exception):
    """An error in what the user gave dscl; the message says what, where and how to fix it."""


class UsageError(DsclError, ValueError):
    """A bad argument or combination of arguments that no narrower class describes."""


class LaunchError(DsclError, ValueError, RuntimeError):
    """A launch that cannot work as set up: the process-group environment (torchrun / SLURM variables) or a device
    that is not there."""


class DivergedError(DsclError, FloatingPointError):
    """Training whose loss or weights stopped being finite (the message says what to lower)."""


class CheckpointError(DsclError, ValueError):
    """A checkpoint that is missing, unreadable, or from an incompatible run (also :mod:`dscl.run`'s name)."""


def listed(names: list[str], shown: int) -> str:
    """``a, b, c (+4 more)``: the first ``shown`` of ``names`` (keys, files) for a one-line message."""
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
