"""Devices, numeric precision, data loaders: the runtime choices every stage shares.

Nothing here knows about DSCL: stage 1 (:mod:`dscl.pretrain`), stage 2 (:mod:`dscl.classify`),
evaluation and inference all pick their device, autocast dtype and DataLoader the same way.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dscl import dist
from dscl.config import ConfigError
from dscl.threads import ADAPT_ENV, ThreadAdapter, adapt_enabled, affinity

#: ``DSCL_ALLOW_SLOW_BF16=1`` runs ``optim.amp=bf16`` on hardware without native bf16 (with a warning)
#: instead of refusing: for a CPU this check misjudges, or to reproduce a bf16 result exactly.
ALLOW_SLOW_BF16 = "DSCL_ALLOW_SLOW_BF16"
#: ``DSCL_NUM_THREADS=N`` fixes torch's intra-op threads of every dscl stage (see configure_threads).
THREADS_ENV = "DSCL_NUM_THREADS"
_TORCH_DEFAULT_THREADS = torch.get_num_threads()
_threads_set: int | None = None
_warned: set[str] = set()


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), for messages and benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_bf16_features() -> list[str]:
    found = []
    for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            found.append(name)
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            flags = []
        if "bf16" in flags:
            found.append("Arm BF16")
    return found


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs bfloat16 matmuls and convolutions natively, and a reason either way.

    Without native support, bf16 autocast is emulated and many times slower than float32 (on an
    AVX2-only CPU: 0.2 vs 74 GFLOP/s for a 2048^2 matmul, a 3x3 conv 20x slower). CPU: AVX512-BF16
    or AMX (x86), the BF16 extension (Arm). GPU: compute capability 8.0 (Ampere) or newer. Other
    device types are not checked (True). Tests monkeypatch this function to simulate hardware.
    """
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA GPU"
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return False, (f"{name} has compute capability {major}.{minor}; native bf16 needs 8.0 (Ampere) or "
                       f"newer, older GPUs emulate it slowly")
    if device.type == "cpu":
        found = _cpu_bf16_features()
        if found:
            return True, f"this CPU ({cpu_model()}) has {' and '.join(found)}"
        return False, (f"this CPU ({cpu_model()}) has neither AVX512-BF16 nor AMX (nor Arm's BF16): "
                       f"bf16 matmuls and convolutions are emulated, many times slower than float32")
    return True, f"bf16 support of {device.type} devices is not checked"


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse an ``optim.amp`` that ``device`` cannot run well, before any data or run directory work.

    fp16 needs CUDA (its gradient scaler is a CUDA-era tool; CPUs have no fast fp16 either). bf16
    needs native hardware support (:func:`bf16_support`) unless ``DSCL_ALLOW_SLOW_BF16=1``, which
    turns the refusal into a warning. Raises ConfigError naming the cause and what to use instead.
    """
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("optim.amp=fp16 needs a CUDA GPU (it trains with a gradient scaler); "
                          "use optim.amp=none (float32) on the CPU")
    if amp != "bf16":
        return
    ok, why = bf16_support(device)
    if ok:
        return
    instead = ("optim.amp=fp16 (with a gradient scaler) or optim.amp=none" if device.type == "cuda"
               else "optim.amp=none (float32)")
    if os.environ.get(ALLOW_SLOW_BF16, "").strip() == "1":
        if why not in _warned:
            _warned.add(why)
            say(f"WARNING: optim.amp=bf16 runs anyway ({ALLOW_SLOW_BF16}=1), but {why}; expect a much slower "
                f"run than with {instead}")
        return
    raise ConfigError(f"optim.amp=bf16 refused: {why}. Use {instead} on this machine, or set "
                      f"{ALLOW_SLOW_BF16}=1 to run bf16 anyway")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``optim.amp`` on ``device`` (None = float32), after :func:`check_amp`."""
    check_amp(amp, device)
    if amp == "none":
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16


def frozen_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the frozen backbone of stage 2 on ``device`` (None = float32).

    Chosen for the device stage 2 runs on, never refused because of how stage 1 was trained: a run
    trained with fp16 or bf16 on a GPU is classified in float32 on a CPU (no check_amp error). On CUDA
    the run's precision is kept where the GPU can run it. Evaluation, prediction and ensembles always
    run float32 (``extract_features`` with no dtype), so their numbers agree with each other.
    """
    if amp == "none" or device.type != "cuda":
        return None
    if amp == "bf16" and not bf16_support(device)[0]:
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def configure_backends(device: torch.device, *, deterministic: bool) -> None:
    """Deterministic algorithms or cuDNN autotuning for a fixed-shape training stage.

    Call before the first CUDA kernel. ``deterministic``: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` where
    unset (cuBLAS reads it when it creates its handle; without it matmuls may be non-deterministic
    and torch refuses them), cuDNN autotuning off, and ``torch.use_deterministic_algorithms(True)``:
    an op with no deterministic implementation raises instead of silently varying. Otherwise, on CUDA,
    ``cudnn.benchmark`` picks the fastest convolution for the fixed input shapes once.
    """
    if deterministic:
        if (device.type == "cuda" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
                and torch.cuda.is_available() and torch.cuda.is_initialized()):
            # cuBLAS read the variable when this process first used it; setting it now changes nothing and
            # the first deterministic matmul would fail deep inside torch
            raise ConfigError(
                "optim.deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before the "
                "process first uses CUDA, and this process already has; set it when starting Python "
                "(CUBLAS_WORKSPACE_CONFIG=:4096:8 python ...) or run dscl before any other GPU work")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def processes_per_node() -> int:
    """dscl processes sharing this machine: torchrun's ``LOCAL_WORLD_SIZE``, else the world size."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(local) if local.isdigit() and int(local) > 0 else max(1, dist.world_size())


def cpus_per_process() -> int:
    """This process's share of the CPUs it may run on (its affinity mask over the processes per node)."""
    return max(1, len(affinity()) // processes_per_node())


def num_workers(requested: int) -> int:
    """DataLoader workers: ``requested`` if >= 0, else one per CPU of this process's share but one
    (kept for the training loop), at most 8. Multi-node runs count the processes of *this* node."""
    if requested >= 0:
        return requested
    return max(0, min(8, cpus_per_process() - 1))


def configure_threads(workers: int) -> int:
    """Size torch's intra-op thread pool to this process's CPUs minus its DataLoader workers (>= 1).

    More busy threads than cores makes OpenMP threads wait on each other's time slices; beside a
    second job that costs far more than the lost parallelism. While training, :func:`thread_adapter`
    lowers the count further when other processes use these CPUs. Left alone when the user chose:
    ``OMP_NUM_THREADS`` set, or ``torch.set_num_threads`` called by the caller. ``DSCL_NUM_THREADS=N``
    forces N. Returns the thread count in use.
    """
    global _threads_set
    forced = os.environ.get(THREADS_ENV, "").strip()
    current = torch.get_num_threads()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ConfigError(f"{THREADS_ENV}={forced!r} must be a positive integer (threads per process)")
        n = int(forced)
    elif os.environ.get("OMP_NUM_THREADS") or current not in (_TORCH_DEFAULT_THREADS, _threads_set):
        return current
    else:
        n = max(1, cpus_per_process() - workers)
    if n != current:
        torch.set_num_threads(n)
    _threads_set = n
    return n


def _set_threads(n: int) -> None:
    global _threads_set
    torch.set_num_threads(n)
    _threads_set = n


def thread_adapter(device: torch.device, *, deterministic: bool) -> ThreadAdapter | None:
    """A :class:`dscl.threads.ThreadAdapter` for a CPU training stage, or None where the thread count
    must stay put: a GPU run, ``optim.deterministic`` (reductions split by thread count), several
    dscl processes on this machine (they share the cores by design), a count the user chose
    (``DSCL_NUM_THREADS``, ``OMP_NUM_THREADS``, their own ``torch.set_num_threads``), one thread
    already, ``DSCL_ADAPT_THREADS=0``, or no readable ``/proc/stat``. Call after the stage's loader
    exists (:func:`configure_threads` has sized the pool by then)."""
    current = torch.get_num_threads()
    if (device.type != "cpu" or deterministic or processes_per_node() > 1 or current < 2
            or os.environ.get(THREADS_ENV, "").strip() or os.environ.get("OMP_NUM_THREADS")
            or current != _threads_set or not adapt_enabled()):
        return None

    def notify(old: int, new: int, others: float) -> None:
        say(f"threads: {old} -> {new} (other processes are using {others:.1f} of this process's "
            f"{current} CPUs; {ADAPT_ENV}=0 keeps {current})")

    return ThreadAdapter(current, apply=_set_threads, notify=notify)


def make_loader(dataset: Any, batch: int, *, sampler: Any, workers: int, device: torch.device,
            drop_last: bool) -> DataLoader:
    """A DataLoader with ``workers`` processes; also sizes this process's threads around them
    (:func:`configure_threads`), so every stage that reads data gets the same thread policy."""
    configure_threads(workers)
    return DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker ignores SIGTERM / SIGUSR1: a scheduler signals every process of a job, and
    the main process, which handles them (:class:`StopSignals`), ends its workers itself."""
    for name in PREEMPT_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x



def say(msg: str) -> None:
    """A status line on stderr from rank 0 only (tqdm-safe: does not break a progress bar)."""
    if dist.is_main():
        tqdm.write(msg, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# preemption: SIGTERM / SIGUSR1

#: The signals that ask a stage to stop with a checkpoint: SIGTERM (a scheduler's preemption, `kill`,
#: SLURM at the time limit) and SIGUSR1 (SLURM's ``--signal=USR1@120`` warning before the limit).
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")


_first_stop: str | None = None


def first_stop_signal() -> str | None:
    """The name of the first SIGTERM / SIGUSR1 a :class:`StopSignals` of this process received, or None. After
    exit code 3 it tells the time-limit warning (SIGUSR1: requeue) from ``scancel`` (SIGTERM: stop for good)."""
    return _first_stop


class Preempted(Exception):
    """A stage stopped on SIGTERM / SIGUSR1 after saving what continues it (``--resume auto``)."""


class StopSignals:
    """While active, SIGTERM and SIGUSR1 set :attr:`requested` (the signal's name) instead of killing
    the process; the training loop polls it after each step, saves and raises :class:`Preempted`.
    With ``immediate=True`` the handler raises :class:`Preempted` itself (a stage with nothing to save
    mid-way: it reruns from its start). Only the first signal acts: a scheduler repeats its signal (srun
    forwards the one its tasks already got), and a repeat must not interrupt the save or the way out.
    Installs nothing outside the main thread. On exit the previous handlers come back, and a
    StopSignals block around this one learns of a signal this one received (it then raises nothing
    more); with ``hold=True`` (dscl's ``main``) a signal received keeps the handlers installed, ignoring
    every later one, until the process exits. :meth:`settle`: from then on signals are only noted.
    """

    def __init__(self, *, immediate: bool = False, what: str = "", hold: bool = False) -> None:
        self.immediate, self.what, self.hold = immediate, what, hold
        self.requested: str | None = None
        self.settled = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPT_SIGNALS:
                sig = getattr(signal, name, None)  # SIGUSR1 does not exist on Windows
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.hold and self.requested is not None:
            self.settled = True  # the process is on its way out: later signals change nothing
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
            outer = getattr(old, "__self__", None)
            if isinstance(outer, StopSignals) and self.requested is not None:
                outer.requested = outer.requested or self.requested
        self._old.clear()

    def settle(self) -> None:
        """The command has ended (or is ending): a signal from now on is noted, nothing more."""
        self.settled = True

    def _handle(self, signum: int, frame: Any) -> None:
        global _first_stop
        name = signal.Signals(signum).name
        _first_stop = _first_stop or name
        first = self.requested is None
        self.requested = self.requested or name
        if not first or self.settled:
            return
        if self.immediate:
            raise Preempted(f"{name} received {self.what}".rstrip())
        print(f"\n{name} received: finishing the current step, then saving a checkpoint {self.what}".rstrip(),
              file=sys.stderr, flush=True)
