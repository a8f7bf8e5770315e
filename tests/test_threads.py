"""dscl.threads: OpenMP defaults set before torch loads, and fewer compute threads while other
processes use this process's CPUs (issue #15)."""

import os
import subprocess
import sys

import pytest

from dscl import threads
from dscl.threads import CpuUsage, ThreadAdapter, adapt_enabled, affinity, read_cpu_busy, set_openmp_defaults

# ---------------------------------------------------------------------------------------------
# OpenMP's environment, before torch is imported


def test_openmp_defaults_only_where_unset():
    import torch  # noqa: F401 - the last check is about a process that has loaded torch

    from dscl.threads import set_openmp_defaults

    env = {"KMP_BLOCKTIME": "5"}
    assert set_openmp_defaults(env) == {"GOMP_SPINCOUNT": "10000"}
    assert env == {"KMP_BLOCKTIME": "5", "GOMP_SPINCOUNT": "10000"}
    # a wait policy the user chose is theirs: no spin budget is added on top of it
    assert set_openmp_defaults({"OMP_WAIT_POLICY": "ACTIVE"}) == {"KMP_BLOCKTIME": "0"}
    assert set_openmp_defaults({"DSCL_OPENMP_DEFAULTS": "0"}) == {}
    assert set_openmp_defaults() == {}  # torch is imported in this process: too late, leave os.environ


def test_cli_sets_openmp_defaults_before_torch_loads(tmp_path):
    """What OpenMP sees is the environment at the moment torch is first imported: record it there."""
    code = (
        "import os, sys\n"
        "seen = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            print('AT_TORCH_IMPORT', os.environ.get('GOMP_SPINCOUNT'), os.environ.get('KMP_BLOCKTIME'))\n"
        "            sys.stdout.flush()\n"
        "            os._exit(0)\n"  # the check is done; spare loading torch
        "sys.meta_path.insert(0, Spy())\n"
        "from dscl.cli import main\n"
        "main(['run', '--preset', 'smoke', '--out', 'never-created'])\n"
        "print('TORCH NEVER IMPORTED')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                          "DSCL_OPENMP_DEFAULTS")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "AT_TORCH_IMPORT 10000 0"


# ---------------------------------------------------------------------------------------------
# fewer compute threads while other processes use the cores


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _adapter(readings, max_threads=2):
    from dscl.threads import ThreadAdapter

    clock, applied, told = _Clock(), [], []
    feed = iter([None] + readings)  # the constructor takes the baseline sample

    ad = ThreadAdapter(max_threads, apply=applied.append, measure=lambda: next(feed),
                       notify=lambda old, new, others: told.append((old, new, round(others, 1))),
                       interval=4.0, clock=clock)
    return ad, clock, applied, told


def test_thread_adapter_follows_other_processes_with_hysteresis():
    ad, clock, applied, told = _adapter([0.1, 1.2, 1.4, 0.5, 0.05, 0.5])
    assert ad.tick() == 2 and applied == []            # before the first interval: no measurement
    clock.t = 4.0
    assert ad.tick() == 2 and applied == []            # quiet (0.1 core used by others): keep 2
    clock.t = 5.0
    assert ad.tick() == 2                              # inside the interval: nothing is read
    clock.t = 8.0
    assert ad.tick() == 1 and applied == [1]           # a competitor takes 1.2 cores: 1 thread
    assert told == [(2, 1, 1.2)]
    clock.t = 12.0
    assert ad.tick() == 1 and applied == [1]           # it takes more while we use 1: stay
    clock.t = 16.0
    assert ad.tick() == 1                              # 0.5 core: within the slack, no flip-flop
    clock.t = 20.0
    assert ad.tick() == 2 and applied == [1, 2]        # it left: back to 2
    clock.t = 24.0
    assert ad.tick() == 2 and ad.changes == 2          # 0.5 core at 2 threads: within the slack too


def test_thread_adapter_stays_within_bounds_and_survives_unreadable_proc():
    ad, clock, applied, _ = _adapter([7.5, None, 0.0], max_threads=8)
    clock.t = 4.0
    assert ad.tick() == 1 and applied == [1]           # never below one thread
    clock.t = 8.0
    assert ad.tick() == 1                              # a failed reading changes nothing
    clock.t = 12.0
    assert ad.tick() == 8 and applied == [1, 8]        # never above the configured count


def test_read_cpu_busy_counts_only_our_cpus_and_busy_fields():
    from dscl.threads import read_cpu_busy

    tick = os.sysconf("SC_CLK_TCK")
    stat = ("cpu  900 900 900 900 900 900 900 900 0 0\n"
            "cpu0 10 1 2 1000 50 3 4 5 0 0\n"       # busy = 10+1+2+3+4+5 = 25 (idle, iowait not)
            "cpu1 100 0 0 0 0 0 0 0 0 0\n"
            "cpu2 1 0 0 0 0 0 0 0 0 0\n"
            "intr 1 2 3\n")
    assert read_cpu_busy({0}, stat) == pytest.approx(25 / tick)
    assert read_cpu_busy({0, 2}, stat) == pytest.approx(26 / tick)
    assert read_cpu_busy({0, 5}, stat) is None          # a CPU /proc/stat does not list: no guess


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_children_cpu_finds_a_busy_child_process():
    """DataLoader workers are child processes: their CPU time is ours, not a competitor's."""
    import subprocess
    import sys

    from dscl.threads import _children_cpu

    code = ("import time\nwhile time.process_time() < 0.5: pass\nprint('done', flush=True)\ntime.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        cpu = _children_cpu(os.getpid())
        assert child.pid in cpu and 0.45 <= cpu[child.pid] < 30
    finally:
        child.kill()
        child.wait()


def test_adapt_switch():
    from dscl.threads import adapt_enabled

    assert adapt_enabled({"DSCL_ADAPT_THREADS": "0"}) is False


def test_openmp_opt_out_and_values():
    assert threads.OPENMP_DEFAULTS == {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0"}
    env = {"DSCL_OPENMP_DEFAULTS": " 0 "}  # spaces around the switch are ignored
    assert set_openmp_defaults(env) == {} and env == {"DSCL_OPENMP_DEFAULTS": " 0 "}
    env = {"DSCL_OPENMP_DEFAULTS": "1", "GOMP_SPINCOUNT": "5"}  # any other value keeps the defaults on
    assert set_openmp_defaults(env) == {"KMP_BLOCKTIME": "0"} and env["GOMP_SPINCOUNT"] == "5"
    assert set_openmp_defaults({"GOMP_SPINCOUNT": "1", "KMP_BLOCKTIME": "1"}) == {}  # the user's values win


def test_thread_adapter_slack_grows_with_the_core_count():
    """Hysteresis: a change needs |free - threads| above max(slack, 10% of the cores)."""
    ad, clock, applied, _ = _adapter([1.5, 2.0], max_threads=16)
    clock.t = 4.0
    assert ad.tick() == 16 and applied == []           # 1.5 cores busy: within 1.6 (10% of 16)
    clock.t = 8.0
    assert ad.tick() == 14 and applied == [14]         # 2 cores busy: 14 free
    ad, clock, applied, _ = _adapter([1.0], max_threads=4)
    clock.t = 4.0
    assert ad.tick() == 3 and applied == [3]           # 4 cores: the fixed slack (0.7) applies


def test_thread_adapter_without_notify_and_its_baseline_sample():
    readings = iter([None, 1.6])
    taken = []

    def measure():
        taken.append(1)
        return next(readings)

    clock = _Clock()
    applied = []
    ad = ThreadAdapter(2, apply=applied.append, measure=measure, interval=4.0, clock=clock)
    assert len(taken) == 1  # the constructor takes the baseline of the first interval
    assert ad.tick() == 2 and len(taken) == 1
    clock.t = 4.0
    assert ad.tick() == 1 and applied == [1] and ad.changes == 1 and len(taken) == 2


def _usage(monkeypatch, samples):
    """A CpuUsage whose /proc readings come from ``samples``: (wall, busy, own cpu, {child: cpu})."""
    feed = iter(samples)
    current = {}

    def busy(cpus):
        current.update(zip(("wall", "busy", "own", "kids"), next(feed), strict=True))
        return current["busy"]

    monkeypatch.setattr(threads, "read_cpu_busy", busy)
    monkeypatch.setattr(threads.time, "monotonic", lambda: current["wall"])
    monkeypatch.setattr(threads.time, "process_time", lambda: current["own"])
    monkeypatch.setattr(threads, "_children_cpu", lambda pid: dict(current["kids"]))
    return CpuUsage({0, 1})


def test_cpu_usage_counts_others_not_this_process_or_its_workers(monkeypatch):
    usage = _usage(monkeypatch, [
        (10.0, 100.0, 5.0, {11: 1.0}),
        (12.0, 103.0, 5.5, {11: 1.5, 12: 9.0}),   # child 12 is new: its past CPU time is not this interval's
        (14.0, 103.5, 6.5, {11: 1.5}),            # we used more than the CPUs' busy time: clamp at 0
        (14.0, 105.0, 6.5, {}),                   # no wall time passed: no answer
    ])
    assert usage.others() is None                 # the first call is the baseline
    assert usage.others() == pytest.approx((3.0 - 0.5 - 0.5) / 2.0)  # 1 core used by others
    assert usage.others() == 0.0
    assert usage.others() is None


def test_cpu_usage_without_proc_stat(monkeypatch):
    readings = iter([100.0, None, 102.0, 104.0])
    monkeypatch.setattr(threads, "read_cpu_busy", lambda cpus: next(readings))
    monkeypatch.setattr(threads, "_children_cpu", lambda pid: {})
    usage = CpuUsage({0})
    assert usage.others() is None                 # baseline
    assert usage.others() is None                 # unreadable
    assert usage.others() is None                 # a new baseline after the gap
    assert usage.others() is not None


def test_read_cpu_busy_pads_short_lines():
    tick = os.sysconf("SC_CLK_TCK")
    stat = "cpu0 4 1 2 9\ncpu1 1 1 1 1 1 1 1 1 50 50\n"  # an old kernel: no irq/softirq/steal fields
    assert read_cpu_busy({0}, stat) == pytest.approx(7 / tick)
    assert read_cpu_busy({1}, stat) == pytest.approx(6 / tick)  # guest fields are not added again


def test_affinity_and_adapt_enabled(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        assert affinity() == set(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "read_cpu_busy", lambda cpus, stat_text=None: None)
    assert adapt_enabled({}) is False  # no readable /proc/stat
    monkeypatch.setattr(threads, "read_cpu_busy", lambda cpus, stat_text=None: 1.0)
    monkeypatch.setattr(threads.sys, "platform", "linux")
    assert adapt_enabled({}) is True and adapt_enabled({"DSCL_ADAPT_THREADS": "1"}) is True
    assert adapt_enabled({"DSCL_ADAPT_THREADS": " 0"}) is False
    monkeypatch.setattr(threads.sys, "platform", "darwin")
    assert adapt_enabled({}) is False  # Linux only
