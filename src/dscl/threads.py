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
import time
from collections.abc import Callable, MutableMapping

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


# ---------------------------------------------------------------------------------------------
# Fewer compute threads while other processes use this process's CPUs.
#
# Even with the spin capped, two OpenMP jobs whose threads outnumber the cores lose more than the
# fair share: a parallel region ends only when its slowest thread does, and beside a competitor one
# of our threads has always just lost its core (measured on 2 cores, benchmarks/contention.py: with 2
# threads 0.38 of the quiet speed beside a 2-thread torch job, with 1 thread 0.48). So stage 1 watches,
# every few seconds, how much of its CPUs *other* processes used (the CPUs' busy time from
# /proc/stat minus this process's and its DataLoader workers' own CPU time) and trains on the cores
# left free, going back up when they leave. Linux only; elsewhere nothing changes.

#: ``DSCL_ADAPT_THREADS=0`` keeps the thread count fixed whatever else runs.
ADAPT_ENV = "DSCL_ADAPT_THREADS"


def read_cpu_busy(cpus: set[int], stat_text: str | None = None) -> float | None:
    """Seconds the given CPUs spent not idle since boot (``/proc/stat``), or None when unreadable.

    Busy = user + nice + system + irq + softirq + steal (``guest`` is already inside ``user``; time a
    hypervisor gave to another machine, steal, is as unavailable to us as a competitor's).
    """
    if stat_text is None:
        try:
            with open("/proc/stat") as f:
                stat_text = f.read()
        except OSError:
            return None
    ticks, found = 0, 0
    for line in stat_text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in fields[:8]] + [0] * max(0, 8 - len(fields))
        ticks += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        found += 1
    if found < len(cpus):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def _children_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each direct child of ``pid`` (DataLoader workers)."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # the name may contain spaces
                out[kid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, IndexError, ValueError):
                continue
    return out


class CpuUsage:
    """Cores' worth of CPU that *other* processes used on this process's CPUs between two calls."""

    def __init__(self, cpus: set[int]):
        self.cpus = set(cpus)
        self._last: tuple[float, float, float, dict[int, float]] | None = None

    def _sample(self) -> tuple[float, float, float, dict[int, float]] | None:
        busy = read_cpu_busy(self.cpus)
        if busy is None:
            return None
        return time.monotonic(), busy, time.process_time(), _children_cpu(os.getpid())

    def others(self) -> float | None:
        """Cores used by others since the previous call; None on the first call or where /proc is
        unreadable."""
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None:
            return None
        wall = now[0] - last[0]
        if wall <= 0:
            return None
        kids = sum(v - last[3][pid] for pid, v in now[3].items() if pid in last[3])
        own = (now[2] - last[2]) + kids
        return max(0.0, (now[1] - last[1] - own) / wall)


class ThreadAdapter:
    """Trains on the cores other processes leave free: call :meth:`tick` once per step.

    Every ``interval`` seconds it measures the cores others used (:class:`CpuUsage`, or ``measure``
    in tests) and, when the free cores (``max_threads``, the cores this process was sized for, less
    what others used) differ from the threads in use by more than ``slack`` (so
    that load hovering at a boundary does not flip the count back and forth), sets the thread count
    to the free cores, rounded, within 1..``max_threads``. ``apply`` sets threads (``torch.set_num_threads``);
    ``notify`` hears each change (a status line). :attr:`threads` is the count in use.
    """

    def __init__(self, max_threads: int, *, apply: Callable[[int], None],
                 measure: Callable[[], float | None] | None = None,
                 notify: Callable[[int, int, float], None] | None = None,
                 interval: float = 4.0, slack: float = 0.7, clock: Callable[[], float] = time.monotonic):
        self.max_threads = self.threads = max_threads
        self.apply, self.notify, self.interval, self.slack, self.clock = apply, notify, interval, slack, clock
        self.measure = measure if measure is not None else CpuUsage(affinity()).others
        self.changes = 0
        self._next = clock() + interval
        self.measure()  # the baseline of the first interval

    def tick(self) -> int:
        now = self.clock()
        if now < self._next:
            return self.threads
        self._next = now + self.interval
        others = self.measure()
        if others is None:
            return self.threads
        free = self.max_threads - others  # the cores this process was sized for, less others' use
        if abs(free - self.threads) > max(self.slack, 0.1 * self.max_threads):
            want = max(1, min(self.max_threads, round(free)))
            if want != self.threads:
                if self.notify is not None:
                    self.notify(self.threads, want, others)
                self.apply(want)
                self.threads = want
                self.changes += 1
        return self.threads


def affinity() -> set[int]:
    """The CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def adapt_enabled(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether load-adaptive threads may run: Linux with a readable /proc/stat, not switched off."""
    env = os.environ if environ is None else environ
    if env.get(ADAPT_ENV, "1").strip() == "0":
        return False
    return sys.platform.startswith("linux") and read_cpu_busy(affinity()) is not None
