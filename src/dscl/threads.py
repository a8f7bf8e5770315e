"""CPU threading defaults that only take effect when set before ``import torch``.

OpenMP (GNU libgomp in the torch wheels, Intel libiomp in some other builds) reads its environment
once, when torch loads it. By default an OpenMP thread that runs out of work keeps spinning on its
core for a while (libgomp: up to 300,000 spins, milliseconds) hoping for the next parallel region.
On a quiet machine that saves a wake-up; beside a second multi-threaded job on the same cores both
jobs burn their time slices spinning while the other one's threads wait, and a training run falls to
a fraction of its fair share (measured on a 2-core machine: 27% of its quiet speed beside a 2-thread
torch job, where 50% is fair). We cap the spin at 10,000 iterations (``GOMP_SPINCOUNT``; libiomp:
``KMP_BLOCKTIME=0``): tens of microseconds, enough to bridge the gaps between the small parallel
regions of one training step, far too short to hold a core that another job needs. A fully passive
policy (``OMP_WAIT_POLICY=PASSIVE``) was measured too: it cost 17% of the quiet speed of the default
run (265 vs 320 img/s), the capped spin nothing (320); see benchmarks/README.md for both under load.

This module imports nothing heavy so the CLI entry point can call :func:`set_openmp_defaults` before
any torch import. :func:`dscl.runtime.configure_threads` sizes torch's intra-op pool after import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

#: Set only where the user has not set them (and GOMP_SPINCOUNT not when the user chose an
#: OMP_WAIT_POLICY). GOMP_SPINCOUNT is libgomp's spin budget (torch's Linux wheels); KMP_BLOCKTIME is
#: libiomp's (milliseconds an idle thread spins; 0 = sleep at once).
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0"}

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
    added = {k: v for k, v in OPENMP_DEFAULTS.items()
             if k not in env and not (k == "GOMP_SPINCOUNT" and "OMP_WAIT_POLICY" in env)}
    env.update(added)
    return added
