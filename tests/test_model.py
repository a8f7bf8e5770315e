"""Encoder / DSCLModel / momentum_update: shapes, gradient flow, EMA formula, batched patches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dscl.backbones import build_backbone
from dscl.model import DSCLModel, Encoder, momentum_update
from dscl.patches import pool_boxes


def make_model(name: str = "convnet", dim: int = 16, queue_size: int = 32) -> DSCLModel:
    torch.manual_seed(0)
    return DSCLModel(Encoder(build_backbone(name), dim=dim), queue_size)


def random_boxes(b: int, l: int, px: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, l, 2, generator=g) * (px / 2)
    wh = px / 4 + torch.rand(b, l, 2, generator=g) * (px / 4)
    return torch.cat([xy, xy + wh], dim=2)


def test_encoder_shapes_and_head():
    enc = Encoder(build_backbone("convnet"), dim=16)
    head = list(enc.head)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (256, 256, 16)
    x = torch.randn(3, 3, 28, 28)
    z, fmap = enc(x)
    assert z.shape == (3, 16) and fmap.shape == (3, 256, 4, 4)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(enc.project(fmap.mean(dim=(2, 3))), z)
    enc.eval()
    torch.testing.assert_close(enc.features(x), enc.backbone(x))
    assert enc.features(x).shape == (3, 256)


def test_dscl_model_structure():
    model = make_model(dim=8, queue_size=40)
    assert model.queue.size == 40 and model.queue.dim == 8 and len(model.queue) == 0
    online, momentum = dict(model.online.named_parameters()), dict(model.momentum.named_parameters())
    assert online.keys() == momentum.keys()
    for k, p in online.items():
        assert p.requires_grad and not momentum[k].requires_grad
        torch.testing.assert_close(momentum[k], p, rtol=0, atol=0)
        assert momentum[k].data_ptr() != p.data_ptr()  # a copy, not shared storage
    model.eval()
    assert not model.momentum.training
    model.train()
    assert model.momentum.training


@pytest.mark.parametrize(("name", "px", "patch_px"), [("convnet", 28, 14), ("resnet32", 16, 8)])
def test_gradient_flow(name, px, patch_px):
    model = make_model(name).train()
    b, l = 4, 3
    x_q, x_k = torch.randn(b, 3, px, px), torch.randn(b, 3, px, px)
    patches = torch.randn(b, l, 3, patch_px, patch_px)
    z, fmap = model.online(x_q)
    with torch.no_grad():
        k, _ = model.momentum(x_k)
    teacher = model.patch_teacher(fmap, random_boxes(b, l, px), px)
    student = model.patch_student(patches)
    assert teacher.shape == student.shape == (l, b, 16)
    logits = student.flatten(0, 1) @ teacher.flatten(0, 1).T  # (L*B, L*B)
    loss = -(z * k).sum() + F.cross_entropy(logits, torch.arange(l * b))
    loss.backward()
    for n, p in model.online.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    for n, p in model.momentum.named_parameters():
        assert not p.requires_grad and p.grad is None, n
    assert not k.requires_grad


def test_patch_teacher_has_no_graph_and_matches_manual():
    model = make_model()
    x = torch.randn(2, 3, 28, 28)
    z, fmap = model.online(x)
    assert fmap.requires_grad
    boxes = random_boxes(2, 3, 28)
    teacher = model.patch_teacher(fmap, boxes, 28)
    assert teacher.grad_fn is None and not teacher.requires_grad
    with torch.no_grad():
        want = model.online.project(pool_boxes(fmap, boxes, 28).flatten(0, 1)).view(3, 2, -1)
    torch.testing.assert_close(teacher, want)
    torch.testing.assert_close(teacher.norm(dim=-1), torch.ones(3, 2))


def test_patch_teacher_whole_image_box_equals_global_embedding():
    # resnet32 at 32 px gives an 8x8 map, on which a whole-image box pools exactly the global
    # average (see test_patches), so the teacher equals the query embedding z (METHOD.md G 14).
    model = make_model("resnet32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z, fmap = model.online(x)
    boxes = torch.tensor([0.0, 0.0, 32.0, 32.0]).expand(2, 2, 4)
    teacher = model.patch_teacher(fmap, boxes, 32)
    torch.testing.assert_close(teacher, z.expand(2, 2, -1), rtol=0, atol=1e-5)


def test_patch_student_equals_separate_forwards():
    model = make_model().eval()  # eval: BN uses running stats, so batching cannot change results
    b, l = 3, 2
    patches = torch.randn(b, l, 3, 14, 14)
    with torch.no_grad():
        out = model.patch_student(patches)
        assert out.shape == (l, b, 16)
        for j in range(l):
            for i in range(b):
                one, _ = model.online(patches[i, j][None])
                torch.testing.assert_close(out[j, i], one[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patches"):
        model.patch_student(patches[0])


def test_patch_student_is_one_batched_forward():
    model = make_model()
    calls = []
    model.online.backbone.stages[0].register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
    model.patch_student(torch.randn(2, 5, 3, 14, 14))
    assert calls == [torch.Size([10, 3, 14, 14])]


def test_momentum_update_formula():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    momentum = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    for p in momentum.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for p in online.parameters():
            p.normal_()
        online[1].running_mean.fill_(5.0)
    q = [p.detach().clone() for p in online.parameters()]
    k = [p.detach().clone() for p in momentum.parameters()]
    m = 0.9
    momentum_update(online, momentum, m)
    for pq, pk, new in zip(q, k, momentum.parameters(), strict=True):
        torch.testing.assert_close(new, m * pk + (1 - m) * pq, rtol=0, atol=1e-6)
    for pq, p in zip(q, online.parameters(), strict=True):  # the online side is untouched
        torch.testing.assert_close(p.detach(), pq, rtol=0, atol=0)
    assert torch.all(momentum[1].running_mean == 0)  # buffers are the momentum encoder's own

    before = [p.clone() for p in momentum.parameters()]
    momentum_update(online, momentum, 1.0)
    for a, b in zip(before, momentum.parameters(), strict=True):
        assert torch.equal(a, b)
    momentum_update(online, momentum, 0.0)
    for a, b in zip(online.parameters(), momentum.parameters(), strict=True):
        assert torch.equal(a.detach(), b)


def test_momentum_update_errors_and_no_graph():
    model = make_model()
    with pytest.raises(ValueError, match="m must be in"):
        momentum_update(model.online, model.momentum, 1.5)
    with pytest.raises(ValueError, match="parameter tensors"):
        momentum_update(model.online, nn.Linear(2, 2), 0.5)
    momentum_update(model.online, model.momentum, 0.999)
    assert all(p.grad_fn is None and not p.requires_grad for p in model.momentum.parameters())
