"""CPU threading defaults that only take effect when set before ``import torch``.

OpenMP (GNU libgomp in the torch wheels, Intel libiomp in some other builds) reads its environment
once, when torch loads it. By default an OpenMP thread that runs out of work keeps spinning on its
core for a while (libgomp: up to 300,000 spins, milliseconds) hoping for the next parallel region.
On a quiet machine that saves a wake-up; beside a second multi-threaded job on the same cores both
jobs burn their time slices spinning while the other one's threads wait, and a training run falls to
a fraction of its fair share (measured on a 2-core machine: 27% of its quiet speed beside a 2-thread
torch job, where 50% is fair). A passive wait policy makes idle threads sleep at once.

This module imports nothing heavy so the CLI entry point can call :func:`set_openmp_defaults` before
any torch import. :func:`dscl.runtime.configure_threads` sizes torch's intra-op pool after import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

#: Set only where the user has not set them. OMP_WAIT_POLICY is read by libgomp (and libiomp);
#: KMP_BLOCKTIME=0 is libiomp's own spelling of the same (milliseconds an idle thread spins).
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}

#: ``DSCL_OPENMP_DEFAULTS=0`` keeps OpenMP's own defaults (e.g. a dedicated machine where the
#: spinning buys a few percent).
OPT_OUT = "DSCL_OPENMP_DEFAULTS"


def set_openmp_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put :data:`OPENMP_DEFAULTS` into the environment where unset; returns what was set.

    Does nothing once torch is imported (OpenMP has read its environment by then, and changing
    ``os.environ`` would only surprise the processes this one starts) or when ``DSCL_OPENMP_DEFAULTS=0``.
    """
    if environ is None and "torch" in sys.modules:
        return {}
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip() == "0":
        return {}
    added = {k: v for k, v in OPENMP_DEFAULTS.items() if k not in env}
    env.update(added)
    return added
