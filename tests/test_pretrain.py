"""Stage 1: the step's gradient flow, EMA, exact resume, interrupts, no patch work without PBSD."""

import dataclasses

import pytest
import torch

from conftest import needs_fmnist
from dscl.backbones import build_backbone
from dscl.checkpoint import load_checkpoint
from dscl.config import load_config
from dscl.model import DSCLModel, Encoder
from dscl.pretrain import Batch, pretrain, pretrain_step


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


@needs_fmnist
def test_resume_is_exact(tmp_path):
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
    parts = pretrain_step(model, _batch(), opt, lr=0.1, m=0.99, loss_cfg=cfg, ce_head=head)
    assert parts["loss_pbsd"] == 0 and torch.isfinite(parts["loss"])
    assert head.weight.grad is not None and all(p.grad is not None for p in model.online.backbone.parameters())
    assert len(model.queue) == 0


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
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.pt"]
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
    cfg = load_config("smoke", overrides=["optim.epochs=1", "optim.warmup_epochs=5", "loss.pbsd_weight=0"])
    pretrain(cfg, tmp_path / "run", progress=False)
    assert seen == [0]
