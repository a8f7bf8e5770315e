"""Stage 1: the step's gradient flow, EMA, exact resume, interrupts, no patch work without PBSD."""

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from dscl.backbones import build_backbone
from dscl.config import load_config
from dscl.model import DSCLModel, Encoder
from dscl.pretrain import Batch, ce_step, pretrain, pretrain_step
from dscl.run import MetricsLog, load_checkpoint, load_stage1, stage1_summary


def _batch(b=8, size=28, patches=2, psize=14, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0]]).repeat(b, patches, 1)
    return Batch(
        query=torch.randn(b, 3, size, size, generator=g),
        key=torch.randn(b, 3, size, size, generator=g),
        patches=torch.randn(b, patches, 3, psize, psize, generator=g),
        boxes=boxes,
        labels=torch.randint(0, classes, (b,), generator=g),
    )


def _model(queue=16):
    torch.manual_seed(0)
    return DSCLModel(Encoder(build_backbone("convnet"), dim=16), queue_size=queue)


@pytest.mark.parametrize("loss", ["dscl", "scl"])
def test_step_gradient_flow_and_enqueue(loss):
    model = _model()
    cfg = dataclasses.replace(load_config("smoke").loss, loss=loss)
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1, momentum=0.9)
    batch = _batch()
    for step in range(2):
        parts = pretrain_step(model, batch, opt, lr=0.1, m=0.9, loss_cfg=cfg)
        assert all(torch.isfinite(v) for v in parts.values())
        assert len(model.queue) == 8 * (step + 1)
    assert parts["loss_pbsd"] > 0
    for name, p in model.online.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for p in model.momentum.parameters():
        assert not p.requires_grad and p.grad is None
    feats, labels = model.queue.snapshot()
    assert torch.equal(labels[-8:], batch.labels)


def test_no_patch_work_without_pbsd(monkeypatch):
    model = _model()
    cfg = dataclasses.replace(load_config("smoke").loss, pbsd_weight=0.0)

    def boom(*a, **k):
        raise AssertionError("patch work done with pbsd_weight = 0")

    monkeypatch.setattr(model, "patch_student", boom)
    monkeypatch.setattr(model, "patch_teacher", boom)
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1)
    parts = pretrain_step(model, _batch(), opt, lr=0.1, m=0.99, loss_cfg=cfg)
    assert parts["loss_pbsd"] == 0


def test_momentum_encoder_moves_by_ema():
    model = _model()
    before = [p.clone() for p in model.momentum.parameters()]
    opt = torch.optim.SGD(model.online.parameters(), lr=0.5)
    online_before = [p.clone() for p in model.online.parameters()]
    pretrain_step(model, _batch(), opt, lr=0.5, m=0.9, loss_cfg=load_config("smoke").loss)
    # the EMA is applied before the forward: momentum = 0.9 * old momentum + 0.1 * old online
    for k_old, q_old, k_new in zip(before, online_before, model.momentum.parameters(), strict=True):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q_old)


@pytest.fixture
def restore_determinism():
    """optim.deterministic switches torch's process-wide flags on; give the next tests a clean process."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_num_threads())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.set_num_threads(saved[2])


@needs_fmnist
def test_resume_is_exact(tmp_path, restore_determinism):
    cfg = load_config("smoke", overrides=["optim.epochs=2", "optim.deterministic=true"])
    pretrain(cfg, tmp_path / "straight", progress=False)
    pretrain(cfg, tmp_path / "split", progress=False, max_epochs=1)
    first = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert first["epoch"] == 1 and not first["finished"]
    pretrain(cfg, tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["finished"] and b["finished"] and a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    # issue #11 item 7: deterministic means strict (an op without a deterministic kernel raises)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"


def test_bf16_autocast_step_is_finite():
    model = _model()
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1)
    parts = pretrain_step(model, _batch(), opt, lr=0.1, m=0.99, loss_cfg=load_config("smoke").loss,
                          dtype=torch.bfloat16)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in parts.values())


def test_ce_baseline_step_trains_only_backbone_and_head():
    model = _model(queue=0)
    head = torch.nn.Linear(model.online.backbone.num_features, 3)
    opt = torch.optim.SGD(list(model.online.parameters()) + list(head.parameters()), lr=0.1)
    cfg = dataclasses.replace(load_config("smoke").loss, loss="ce")
    momentum_before = {k: v.clone() for k, v in model.momentum.state_dict().items()}
    parts = ce_step(model, head, _batch(), opt, lr=0.1)
    assert parts["loss_pbsd"] == 0 and torch.isfinite(parts["loss"]) and torch.equal(parts["loss"], parts["loss_con"])
    assert head.weight.grad is not None and all(p.grad is not None for p in model.online.backbone.parameters())
    assert all(p.grad is None for p in model.online.head.parameters())  # the projection head is not used
    assert len(model.queue) == 0
    assert all(torch.equal(v, momentum_before[k]) for k, v in model.momentum.state_dict().items())
    with pytest.raises(ValueError, match="ce_step"):  # the contrastive step refuses the CE baseline
        pretrain_step(model, _batch(), opt, lr=0.1, m=0.99, loss_cfg=cfg)


@needs_fmnist
def test_interrupt_keeps_last_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    """Ctrl-C in the middle of epoch 2 leaves epoch 1's checkpoint intact; --resume completes the run."""
    import dscl.pretrain as train_mod

    cfg = load_config("smoke", overrides=["optim.epochs=2"])
    real_step, calls = train_mod.pretrain_step, {"n": 0}

    def interrupting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # 7 steps per epoch: this is inside epoch 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "pretrain_step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and not state["finished"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.json", "last.pt"]
    monkeypatch.setattr(train_mod, "pretrain_step", real_step)
    pretrain(cfg, tmp_path / "run", resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["finished"]


@needs_fmnist
def test_no_patches_are_cut_without_pbsd(tmp_path, monkeypatch):
    import dscl.pretrain as train_mod

    seen = []
    real = train_mod.DSCLTransform

    def spy(image_size, views, mean, std):
        seen.append(views.num_patches)
        return real(image_size, views, mean, std)

    monkeypatch.setattr(train_mod, "DSCLTransform", spy)
    # the per-sample path (the batched one: tests/test_batched_views.py::test_no_patches_without_pbsd_batched)
    cfg = load_config("smoke", overrides=["optim.epochs=1", "optim.warmup_epochs=5", "loss.pbsd_weight=0",
                                          "views.augment_on=loader"])
    pretrain(cfg, tmp_path / "run", progress=False)
    assert seen == [0]


# ---------------------------------------------------------------------------------------------
# issue #11 item 1 (fp16 policy) and issue #15 (a step that never stalls a GPU)


def test_fp16_nonfinite_loss_is_skipped_not_fatal():
    """An fp16 overflow is the scaler's business: the step is skipped, the scale lowered, no exception."""
    model = _model()
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    batch = _batch()
    batch.query[0, 0, 0, 0] = float("inf")  # what an fp16 overflow in the forward pass looks like
    before = [p.detach().clone() for p in model.online.parameters()]
    parts = pretrain_step(model, batch, opt, lr=0.1, m=0.99, loss_cfg=load_config("smoke").loss, scaler=scaler)
    assert not torch.isfinite(parts["loss"])
    assert all(torch.equal(a, p) for a, p in zip(before, model.online.parameters(), strict=True))
    assert scaler.get_scale() == 65536.0 / 2
    parts = pretrain_step(model, _batch(seed=1), opt, lr=0.1, m=0.99, loss_cfg=load_config("smoke").loss,
                          scaler=scaler)
    assert torch.isfinite(parts["loss"]) and all(torch.isfinite(p).all() for p in model.online.parameters())
    assert not all(torch.equal(a, p) for a, p in zip(before, model.online.parameters(), strict=True))


def test_step_reads_nothing_back_from_the_device(monkeypatch):
    """No .item(), bool() or float() of a tensor inside the fp32 step: each one stalls a GPU for the host."""
    model = _model()
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1, momentum=0.9)
    losses = []

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside the training step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for seed in range(2):
        parts = pretrain_step(model, _batch(seed=seed), opt, lr=0.1, m=0.99, loss_cfg=load_config("smoke").loss)
        losses.append(parts["loss"])
    monkeypatch.undo()
    # torch.unique / bincount wait for a GPU too (their output size depends on the data): with the class
    # count known (what pretrain() passes) the losses use neither. (On a CPU the losses range-check the
    # labels with a cheap host read, which is why this half does not patch __int__.)
    monkeypatch.setattr(torch, "unique", host_read)
    monkeypatch.setattr(torch, "bincount", host_read)
    for seed in range(2, 4):
        parts = pretrain_step(model, _batch(seed=seed), opt, lr=0.1, m=0.99, loss_cfg=load_config("smoke").loss,
                              num_classes=3)
        losses.append(parts["loss"])
    monkeypatch.undo()
    assert all(torch.isfinite(v) for v in losses) and len(model.queue) == 16  # queue size 16: full


def test_nonfinite_guard_policy():
    from dscl.pretrain import NonFiniteGuard

    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    strict = NonFiniteGuard(torch.device("cpu"), tolerate=False)
    strict.update(one)
    assert strict.check(step=1) == 0
    strict.update(one)
    strict.update(nan)  # fp32/bf16: one NaN is fatal, at the next check
    with pytest.raises(FloatingPointError, match=r"1 of the 2 steps up to step 3"):
        strict.check(step=3)
    fp16 = NonFiniteGuard(torch.device("cpu"), tolerate=True, max_streak=5)
    for _ in range(3):
        fp16.update(nan)
    fp16.update(one)
    assert fp16.check(step=4) == 3  # overflows the scaler skipped: counted, not fatal
    for _ in range(3):
        fp16.update(nan)
    assert fp16.check(step=7) == 3
    for _ in range(2):  # the streak carries over a check: 5 in a row
        fp16.update(nan)
    with pytest.raises(FloatingPointError, match="5 steps in a row"):
        fp16.check(step=9)


@needs_fmnist
def test_nan_loss_stops_the_run_before_saving(tmp_path, monkeypatch):
    """fp32: a NaN loss stops the run at the next check, and last.pt keeps the last finite epoch."""
    import dscl.pretrain as train_mod

    cfg = load_config("smoke", overrides=["optim.epochs=2", "optim.log_every=100"])
    real_loss, calls = train_mod.dscl_loss, {"n": 0}

    def nan_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 9 else loss  # 7 steps per epoch

    monkeypatch.setattr(train_mod, "dscl_loss", nan_in_epoch_2)
    with pytest.raises(FloatingPointError, match="up to step 14"):
        pretrain(cfg, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_an_overflowing_key_never_reaches_the_queue():
    """Issue #22 item 3: one non-finite key (fp16 overflow in the momentum encoder) makes that step's loss
    non-finite (the scaler skips it) but stays out of the queue, so the next steps train normally."""
    model = _model(queue=32)
    cfg = load_config("smoke").loss
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1, momentum=0.9)
    pretrain_step(model, _batch(seed=1), opt, lr=0.1, m=0.9, loss_cfg=cfg)

    def overflow(module, args, out):
        out = out.clone()
        out[2] = float("inf")
        return out

    hook = model.momentum.head.register_forward_hook(overflow)
    before = {k: v.clone() for k, v in model.online.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu")
    parts = pretrain_step(model, _batch(seed=2), opt, lr=0.1, m=0.9, loss_cfg=cfg, scaler=scaler)
    hook.remove()
    assert not torch.isfinite(parts["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.online.state_dict().items() if "running" not in k
               and "num_batches" not in k)  # the scaler skipped the step
    assert torch.isfinite(model.queue.features).all() and int(model.queue.rejected) == 1
    parts = pretrain_step(model, _batch(seed=3), opt, lr=0.1, m=0.9, loss_cfg=cfg, scaler=scaler)
    assert all(torch.isfinite(v) for v in parts.values())


def test_scaler_skips_with_a_finite_loss_are_counted():
    """Issue #22 item 4: the usual fp16 case is a finite loss with inf gradients; the scaler skips that step
    and the step reports it (on the device), so skipped_steps counts it."""
    from dscl.pretrain import NonFiniteGuard

    model = _model()
    opt = torch.optim.SGD(model.online.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    guard = NonFiniteGuard(torch.device("cpu"), tolerate=True)
    cfg = load_config("smoke").loss
    hook = model.online.head[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    parts = pretrain_step(model, _batch(), opt, lr=0.1, m=0.99, loss_cfg=cfg, scaler=scaler)
    hook.remove()
    assert torch.isfinite(parts["loss"]) and bool(parts["scaler_skipped"])
    guard.update(parts["loss"], parts["scaler_skipped"])
    parts = pretrain_step(model, _batch(seed=1), opt, lr=0.1, m=0.99, loss_cfg=cfg, scaler=scaler)
    assert not bool(parts["scaler_skipped"])
    guard.update(parts["loss"], parts["scaler_skipped"])
    assert guard.check(2) == 1
    assert "scaler_skipped" not in pretrain_step(model, _batch(seed=2), opt, lr=0.1, m=0.99, loss_cfg=cfg)


# ----------------------------------------------------------------------------------------------
# preemption (issue #24): a real signal to a real `dscl` process, then --resume auto, bit-exact

PREEMPT = Path(__file__).parent / "preempt_worker.py"
#: one compute thread, no thread adapter: the CPU computes the same floats in every process
EXACT_ENV = {"DSCL_NUM_THREADS": "1", "DSCL_ADAPT_THREADS": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: 3 epochs x 7 steps of the smoke preset, a metrics line per step
SMOKE = ["--preset", "smoke", "--no-progress", "--device", "cpu", "optim.log_every=1", "optim.epochs=3",
         "classifier.epochs=2"]
TIMING = ("img_per_s", "wall_seconds")


def _dscl(*args: str, launcher: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, str(PREEMPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **EXACT_ENV, "PREEMPT_AT_STEP": "0", **env})


def _continue_line(stderr: str) -> list[str]:
    """The continue command dscl printed, as arguments for preempt_worker.py (without `dscl`)."""
    lines = stderr.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("Continue"))
    cmd = shlex.split(lines[i + 1])
    assert cmd[0] == "dscl" and cmd[-2:] == ["--resume", "auto"] and "--overwrite" not in cmd
    return cmd[1:]


def _trace(run: Path) -> tuple[dict, list[dict]]:
    """The final stage-1 tensors and every logged stage-1 value but timings."""
    state = load_stage1(run)
    log = MetricsLog(run / "metrics.jsonl")
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in log.read()
               if r["stage"] in ("pretrain", "pretrain_epoch")]
    tensors = {**{f"model.{k}": v for k, v in state.model.items()}, "view_rng": state.view_rng}
    tensors.update({f"opt.{i}.{k}": v for i, s in state.optimizer["state"].items() for k, v in s.items()})
    return tensors, records


def _assert_same_run(got: Path, ref: Path) -> None:
    (a, log_a), (b, log_b) = _trace(got), _trace(ref)
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is b[k], k
        elif isinstance(a[k], list):
            assert all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k
        else:
            assert torch.equal(a[k], b[k]), k  # bit-identical weights, queue, momentum buffers
    assert log_a == log_b  # the same losses, lr, queue fill at every step, the same epoch means


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preempt") / "ref"
    res = _dscl("run", "--out", str(out), *SMOKE)
    assert res.returncode == 0, res.stderr
    return out


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("sig, step", [("SIGTERM", 1), ("SIGUSR1", 4), ("SIGTERM", 7), ("SIGUSR1", 12)],
                         ids=["first-step", "mid-epoch", "last-step-of-epoch-1", "mid-epoch-2"])
def test_a_preempted_stage1_continues_bit_exactly(uninterrupted, tmp_path, sig, step):
    run = tmp_path / "run"
    res = _dscl("pretrain", "--out", str(run), *SMOKE, PREEMPT_SIGNAL=sig, PREEMPT_AT_STEP=str(step))
    assert res.returncode == 3, res.stderr  # EXIT_PREEMPTED: checkpoint saved, requeue
    assert f"{sig} received" in res.stderr and "Traceback" not in res.stderr
    saved = stage1_summary(run)
    assert (saved.epoch, saved.position) == divmod(step, 7) and not saved.finished
    res = _dscl(*_continue_line(res.stderr))  # the printed command, as a requeued job would run it
    assert res.returncode == 0, res.stderr
    assert f"resuming {run} at " in res.stderr
    _assert_same_run(run, uninterrupted)


@needs_fmnist
@pytest.mark.slow
def test_a_run_preempted_in_stage2_reruns_stage2_to_the_same_report(uninterrupted, tmp_path):
    import json

    run = tmp_path / "run"
    res = _dscl("run", "--out", str(run), *SMOKE, PREEMPT_SIGNAL="SIGTERM", PREEMPT_STAGE="2")
    assert res.returncode == 3 and "stage 2" in res.stderr, res.stderr
    assert stage1_summary(run).finished and not (run / "checkpoints" / "classifier.pt").exists()
    res = _dscl(*_continue_line(res.stderr))
    assert res.returncode == 0, res.stderr
    _assert_same_run(run, uninterrupted)
    a, b = (json.loads((r / "report.json").read_text()) for r in (run, uninterrupted))
    for key in ("top1", "top5", "many", "medium", "few", "per_class", "variants", "selection"):
        assert a[key] == b[key], key


@pytest.mark.slow
@needs_fmnist
def test_resume_auto_starts_a_run_that_has_no_checkpoint(tmp_path):
    from dscl.cli import main

    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), "--preset", "smoke", "--no-progress", "--device", "cpu", "optim.epochs=1"]
    assert main([*args, "--resume", "auto"]) == 0  # nothing there: starts
    assert stage1_summary(run).finished
    assert main([*args, "optim.epochs=2", "--resume=auto"]) == 0  # a checkpoint there: continues it
    assert [r["epoch"] for r in MetricsLog(run / "metrics.jsonl").read("pretrain_epoch")] == [1, 2]


@pytest.mark.slow
@needs_fmnist
def test_checkpoint_every_minutes_saves_inside_the_epoch(tmp_path):
    cfg = load_config("smoke", overrides=["optim.epochs=1", "optim.checkpoint_every_minutes=0.000001"])
    saves = []
    import dscl.pretrain as pre

    real = pre.save_stage1

    def record(out, state):
        saves.append((state.epoch, state.position))
        return real(out, state)

    try:
        pre.save_stage1 = record
        pretrain(cfg, tmp_path / "run", device="cpu", progress=False)
    finally:
        pre.save_stage1 = real
    assert saves == [(0, k) for k in range(1, 7)] + [(1, 0)]  # after every step, then the epoch's end
    assert stage1_summary(tmp_path / "run").finished


@needs_fmnist
@pytest.mark.slow
def test_a_preempted_2_process_run_stops_on_every_rank_and_continues_exactly(tmp_path):
    """Only rank 1 receives the signal: both ranks save after the same step and stop; the resume under
    torchrun ends bit-identical to an uninterrupted 2-process run."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    args = ["pretrain", *SMOKE, "optim.epochs=2"]
    ref = _dscl(*args, "--out", str(tmp_path / "ref"), launcher=torchrun)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    res = _dscl(*args, "--out", str(run), launcher=torchrun, PREEMPT_RANK="1", PREEMPT_AT_STEP="4")
    assert res.returncode != 0 and res.stderr.count("SIGTERM received") == 1, res.stderr
    assert "Continue" in res.stderr  # rank 0 says how, although only rank 1 got the signal
    saved = stage1_summary(run)
    assert (saved.epoch, saved.position) == (0, 4) and len(load_stage1(run).rng) == 2
    res = _dscl(*args, "--out", str(run), "--resume", "auto", launcher=torchrun)
    assert res.returncode == 0, res.stderr
    _assert_same_run(run, tmp_path / "ref")


@needs_fmnist
@pytest.mark.slow
def test_a_preempted_stage1_with_loader_side_views_continues_bit_exactly(tmp_path):
    """Views made per sample from the global random streams (not the batched views' generator): the
    streams are restored after the continued epoch's data iterator exists (making it draws a seed)."""
    args = ["pretrain", *SMOKE, "optim.epochs=2", "views.augment_on=loader"]
    ref = _dscl(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    res = _dscl(*args, "--out", str(tmp_path / "run"), PREEMPT_SIGNAL="SIGTERM", PREEMPT_AT_STEP="9")
    assert res.returncode == 3, res.stderr
    res = _dscl(*_continue_line(res.stderr))
    assert res.returncode == 0, res.stderr
    _assert_same_run(tmp_path / "run", tmp_path / "ref")
