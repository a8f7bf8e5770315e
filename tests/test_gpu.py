"""One-GPU checks (pytest marker ``cuda``; skipped without a CUDA GPU): the smoke pipeline in fp32, fp16
and bf16, losses on the GPU equal the CPU values, a deterministic run, a 1-process nccl group, and a
step that does not stall the GPU. Run them with ``pytest -m cuda`` on a GPU machine (about a minute)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (these run with `pytest -m cuda`)"),
]
HERE = Path(__file__).parent


@pytest.fixture
def restore_torch_flags():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


@needs_fmnist
@pytest.mark.parametrize("amp", ["none", "fp16", "bf16"])
def test_smoke_pipeline_on_one_gpu(tmp_path, amp, restore_torch_flags):
    from dscl.classify import classify
    from dscl.config import load_config
    from dscl.evaluation import evaluate
    from dscl.pretrain import pretrain
    from dscl.run import load_checkpoint
    from dscl.runtime import bf16_support

    if amp == "bf16" and not bf16_support(torch.device("cuda"))[0]:
        pytest.skip("this GPU has no native bf16 (compute capability < 8.0)")
    cfg = load_config("smoke", overrides=[f"optim.amp={amp}"])
    out = tmp_path / amp
    pretrain(cfg, out, device="cuda", progress=False)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["finished"] and (state["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    classify(out, cfg=cfg, device="cuda", progress=False)
    report = evaluate(out, cfg=cfg, device="cuda", progress=False)
    assert 0 <= report["top1"] <= 100
    assert json.loads((out / "report.json").read_text())["top1"] == report["top1"]


def test_losses_on_gpu_equal_cpu():
    from dscl.losses import dscl_loss, pbsd_loss, supcon_loss

    g = torch.Generator().manual_seed(0)
    b, k, d, n_patches = 32, 256, 128, 3

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    q, key, queue = unit(b, d), unit(b, d), unit(k, d)
    labels, queue_labels = torch.randint(0, 10, (b,), generator=g), torch.randint(0, 10, (k,), generator=g)
    teacher, student = unit(n_patches, b, d), unit(n_patches, b, d)
    cpu = [dscl_loss(q, key, labels, queue, queue_labels), supcon_loss(q, key, labels, queue, queue_labels),
           pbsd_loss(teacher, student, key, queue)]
    c = [t.cuda() for t in (q, key, labels, queue, queue_labels, teacher, student)]
    gpu = [dscl_loss(c[0], c[1], c[2], c[3], c[4]), supcon_loss(c[0], c[1], c[2], c[3], c[4]),
           pbsd_loss(c[5], c[6], c[1], c[3])]
    for a, bb in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(bb.cpu(), a, rtol=1e-5, atol=1e-5)


@needs_fmnist
def test_deterministic_run_is_reproducible_on_gpu(tmp_path, restore_torch_flags):
    """optim.deterministic is strict (use_deterministic_algorithms without warn_only): every op of the
    step must have a deterministic CUDA kernel, and two runs give the same weights."""
    from dscl.config import load_config
    from dscl.pretrain import pretrain
    from dscl.run import load_checkpoint

    cfg = load_config("smoke", overrides=["optim.epochs=1", "optim.deterministic=true"])
    for name in ("a", "b"):
        pretrain(cfg, tmp_path / name, device="cuda", progress=False)
    a, b = (load_checkpoint(tmp_path / n / "checkpoints" / "last.pt")["model"] for n in ("a", "b"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_one_process_nccl(tmp_path):
    """The nccl code path on one GPU: collectives forced on in a 1-process group (tests/gpu_worker.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(HERE / "gpu_worker.py"), str(tmp_path / "nccl.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "nccl.json").read_text())
    assert result["backend"] == "nccl" and result["finite"] and result["queue"] == 3 * 16
    assert result["gather_equal"] and result["skipped_inf_step"]


def test_hot_loop_pieces_do_not_synchronise():
    """Issue #15: the guard, the queue and the momentum update never wait for the GPU."""
    from dscl.backbones import build_backbone
    from dscl.model import DSCLModel, Encoder, momentum_update
    from dscl.pretrain import NonFiniteGuard

    dev = torch.device("cuda")
    model = DSCLModel(Encoder(build_backbone("convnet"), dim=16), queue_size=64).to(dev)
    guard = NonFiniteGuard(dev, tolerate=True)
    loss = torch.ones((), device=dev)
    keys, labels = torch.randn(8, 16, device=dev), torch.randint(0, 4, (8,), device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            guard.update(loss)
            model.queue.enqueue(keys, labels)
            momentum_update(model.online, model.momentum, 0.99)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.check(step=3) == 0 and len(model.queue) == 24
