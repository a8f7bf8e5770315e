"""Runtime choices: bf16 refusal, deterministic mode, DataLoader workers per node, thread sizing."""

import os

import pytest
import torch

from dscl import dist, runtime
from dscl.config import ConfigError


@pytest.fixture
def restore_torch_flags():
    """Undo what configure_backends/configure_threads change in this (shared) test process."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_num_threads(),
             getattr(runtime, "_threads_set", None), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
    torch.set_num_threads(saved[4])
    runtime._threads_set = saved[5]
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


# ---------------------------------------------------------------------------------------------
# issue #11 item 6: bf16 without native support


def test_bf16_refused_without_native_support(monkeypatch):
    monkeypatch.delenv(runtime.ALLOW_SLOW_BF16, raising=False)
    monkeypatch.setattr(runtime, "bf16_support", lambda device: (False, "this CPU (Test) has no AVX512-BF16"))
    with pytest.raises(ConfigError, match=r"bf16 refused: this CPU \(Test\) has no AVX512-BF16.*optim.amp=none"
                                          r".*DSCL_ALLOW_SLOW_BF16=1"):
        runtime.amp_dtype("bf16", torch.device("cpu"))
    assert runtime.amp_dtype("none", torch.device("cpu")) is None  # only bf16 is checked


def test_bf16_accepted_with_native_support_or_escape_hatch(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "bf16_support", lambda device: (True, "has AMX"))
    assert runtime.amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(runtime, "bf16_support", lambda device: (False, "no bf16 on the test CPU"))
    monkeypatch.setenv(runtime.ALLOW_SLOW_BF16, "1")
    assert runtime.amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert "WARNING" in capsys.readouterr().err


def test_fp16_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        runtime.amp_dtype("fp16", torch.device("cpu"))


def test_bf16_support_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    ok, why = runtime.bf16_support(torch.device("cpu"))
    assert not ok and "neither AVX512-BF16 nor AMX" in why
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    ok, why = runtime.bf16_support(torch.device("cpu"))
    assert ok and "AMX" in why


def test_bf16_support_on_old_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    ok, why = runtime.bf16_support(torch.device("cuda"))
    assert not ok and "7.0" in why and "Ampere" in why
    with pytest.raises(ConfigError, match="fp16"):  # on a GPU the advice is fp16
        runtime.check_amp("bf16", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert runtime.bf16_support(torch.device("cuda"))[0]


def test_cli_refuses_bf16_before_any_work(tmp_path, monkeypatch, capsys):
    """`dscl run --preset smoke optim.amp=bf16` on hardware without bf16: exit 2 at once, nothing written."""
    import dscl.pretrain as pretrain_mod
    from dscl.cli import main

    class TouchedData(Exception):
        pass

    def no_data(*args, **kwargs):
        raise TouchedData("the dataset was built before the precision check")

    monkeypatch.delenv("DSCL_ALLOW_SLOW_BF16", raising=False)
    monkeypatch.setattr(runtime, "bf16_support", lambda device: (False, "this CPU (Test) has no AVX512-BF16"),
                        raising=False)
    monkeypatch.setattr(pretrain_mod, "build_datasets", no_data)
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "optim.amp=bf16", "--out", str(out), "--no-progress"]) == 2
    assert "bf16 refused" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# issue #11 item 7: deterministic mode; issue #15: cudnn.benchmark for fixed shapes


def test_deterministic_mode_is_strict(restore_torch_flags, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    runtime.configure_backends(torch.device("cuda"), deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic


def test_deterministic_mode_refuses_a_cuda_process_started_without_the_cublas_setting(restore_torch_flags,
                                                                                     monkeypatch):
    """Issue #22 item 2: once CUDA is initialised, setting CUBLAS_WORKSPACE_CONFIG is too late; say so."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    torch.use_deterministic_algorithms(False)  # whatever earlier tests left (the fixture restores it)
    with pytest.raises(ConfigError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before"):
        runtime.configure_backends(torch.device("cuda"), deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # set before CUDA started: fine
    runtime.configure_backends(torch.device("cuda"), deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()


def test_the_test_process_sets_the_cublas_setting_early():
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")  # tests/conftest.py, before any CUDA use


def test_deterministic_mode_keeps_a_users_cublas_setting(restore_torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    runtime.configure_backends(torch.device("cuda"), deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_cudnn_benchmark_only_on_cuda_without_determinism(restore_torch_flags):
    torch.backends.cudnn.benchmark = False
    runtime.configure_backends(torch.device("cpu"), deterministic=False)
    assert not torch.backends.cudnn.benchmark
    runtime.configure_backends(torch.device("cuda"), deterministic=False)
    assert torch.backends.cudnn.benchmark


# ---------------------------------------------------------------------------------------------
# issue #11 item 4: DataLoader workers per node, not per world


@pytest.mark.parametrize(("cores", "local", "world", "expected"), [
    (64, 8, 16, 7),  # 2 nodes x 8 GPUs on 64-core machines (was 3)
    (32, 8, 32, 3),  # 4 x 8 on 32 cores (was 0)
    (64, 8, 8, 7),
    (2, 1, 1, 1),
])
def test_workers_use_processes_per_node(monkeypatch, cores, local, world, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    monkeypatch.setattr(dist, "world_size", lambda: world)
    assert runtime.num_workers(-1) == expected
    assert runtime.num_workers(3) == 3


def test_workers_without_torchrun_fall_back_to_world_size(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    assert runtime.num_workers(-1) == 3


# ---------------------------------------------------------------------------------------------
# issue #15: thread thrashing


def test_threads_are_cores_minus_workers(restore_torch_flags, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    torch.set_num_threads(runtime._TORCH_DEFAULT_THREADS)
    assert runtime.configure_threads(workers=1) == 3 == torch.get_num_threads()
    assert runtime.configure_threads(workers=8) == 1 == torch.get_num_threads()  # at least one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.configure_threads(workers=0) == 2 == torch.get_num_threads()


def test_threads_respect_the_users_choice(restore_torch_flags, monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert runtime.configure_threads(workers=3) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(3)  # the caller's own torch.set_num_threads is kept too
    runtime._threads_set = None
    if runtime._TORCH_DEFAULT_THREADS != 3:
        assert runtime.configure_threads(workers=3) == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "2")  # the override wins over everything
    assert runtime.configure_threads(workers=3) == 2 == torch.get_num_threads()
    monkeypatch.setenv(runtime.THREADS_ENV, "two")
    with pytest.raises(ConfigError, match="DSCL_NUM_THREADS"):
        runtime.configure_threads(workers=0)


# ---------------------------------------------------------------------------------------------
# issue #15: fewer compute threads while other processes use the cores


def test_thread_adapter_only_where_the_count_is_ours(restore_torch_flags, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("DSCL_ADAPT_THREADS", raising=False)
    monkeypatch.setattr(runtime, "adapt_enabled", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    torch.set_num_threads(runtime._TORCH_DEFAULT_THREADS)
    runtime._threads_set = None
    cpu = torch.device("cpu")
    runtime.configure_threads(workers=0)                 # 4 threads, chosen by dscl
    ad = runtime.thread_adapter(cpu, deterministic=False)
    assert ad is not None and ad.max_threads == 4
    ad.apply(1)                                          # what a change does: torch and our record
    assert torch.get_num_threads() == 1 and runtime._threads_set == 1
    assert runtime.configure_threads(workers=0) == 4     # the next stage starts from the full count
    assert runtime.thread_adapter(cpu, deterministic=True) is None
    assert runtime.thread_adapter(torch.device("cuda"), deterministic=False) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.thread_adapter(cpu, deterministic=False) is None
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv(runtime.THREADS_ENV, "4")
    assert runtime.thread_adapter(cpu, deterministic=False) is None
    monkeypatch.delenv(runtime.THREADS_ENV)
    torch.set_num_threads(3)                             # the caller's own choice
    assert runtime.thread_adapter(cpu, deterministic=False) is None




# ----------------------------------------------------------------------------------------------
# preemption signals


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with runtime.StopSignals() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, handled between bytecodes
        assert stop.requested == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGUSR1"  # the first one is kept
    assert {s: signal.getsignal(s) for s in before} == before


def test_immediate_stop_signals_raise_preempted():
    import signal

    with pytest.raises(runtime.Preempted, match="SIGTERM received in stage 2"), \
            runtime.StopSignals(immediate=True, what="in stage 2"):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at the next bytecode boundary
            pass


# ----------------------------------------------------------------------------------------------
# issue 28 item 5: a scheduler repeats its stop signal (srun forwards the one its tasks already got)

#: A dscl process whose command does what stage 1 does on a signal (notes it, "saves", raises Preempted)
#: or simply finishes; its exit path (close_all: W&B's finish takes seconds) then gets the signal again.
REPEATED_SIGNAL = r"""
import os, signal, sys, time
import dscl.cli as cli
import dscl.trackers as trackers
from dscl.runtime import Preempted, StopSignals

def kill():
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(200):  # a Python handler runs between bytecodes: give it some
        time.sleep(0.001)

def stage(args):
    if os.environ["CASE"] == "finished":
        return 0
    with StopSignals(what="in the test") as signals:
        kill()
        assert signals.requested == "SIGTERM"
    kill()  # while Preempted is on its way to main
    raise Preempted("stage 1 stopped on SIGTERM after saving the checkpoint")

def close_all():
    kill()
    time.sleep(0.3)
    kill()

cli.cmd_presets = stage
trackers.close_all = close_all
sys.exit(cli.main(["presets"]))
"""


@pytest.mark.parametrize(("case", "code"), [("preempted", 3), ("finished", 0)])
def test_stop_signals_after_the_stop_or_the_end_keep_the_exit_code(tmp_path, case, code):
    """Every signal after the first (or after the command's end) is ignored until the process exits: exit
    code 3 stays 3 (scripts requeue on it), a finished command stays 0; neither dies of SIGTERM (143).
    With DSCL_EXIT_FILE, the code is also written there (torchrun exits 1 whatever its processes returned)."""
    import subprocess
    import sys

    exit_file = tmp_path / "exit"
    res = subprocess.run([sys.executable, "-c", REPEATED_SIGNAL], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CASE": case, "DSCL_EXIT_FILE": str(exit_file)})
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    if case == "preempted":
        assert "stage 1 stopped on SIGTERM after saving the checkpoint" in res.stderr  # the stage's own message
    assert exit_file.read_text().strip() == str(code)


def test_main_restores_the_handlers_when_no_signal_came():
    import signal

    from dscl.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    assert main(["presets"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
