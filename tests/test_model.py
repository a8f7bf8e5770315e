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


# ------------------------------------------------------------------------------------------------
# per-slot patch BatchNorm (issue #20): one batched forward == L separate forwards, one per slot


def _bn_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _slot_model(name: str, bn_momentum: float | None = 0.1, track: bool = True) -> DSCLModel:
    model = make_model(name, dim=8).double()
    for bn in _bn_layers(model):
        bn.momentum = bn_momentum
        if not track:  # what BatchNorm2d(track_running_stats=False) builds
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    g = torch.Generator().manual_seed(1)
    for bn in _bn_layers(model.online):  # non-trivial affine parameters and running statistics
        bn.weight.data.uniform_(0.5, 1.5, generator=g)
        bn.bias.data.normal_(0.0, 0.2, generator=g)
        if track:
            bn.running_mean.normal_(0.0, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.num_batches_tracked.fill_(7)
    return model


def _student_and_grads(model: DSCLModel, patches: torch.Tensor, weights: torch.Tensor, separate: bool):
    model.online.zero_grad(set_to_none=True)
    if separate:  # the paper's step 3: one online-encoder forward per slot j
        out = torch.stack([model.online(patches[:, j])[0] for j in range(patches.shape[1])])
    else:
        out = model.patch_student(patches)
    (out * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.online.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize(
    ("name", "px", "bn_momentum", "track", "train", "channels_last"),
    [
        ("convnet", 14, 0.1, True, True, False),
        ("convnet", 14, 0.3, True, True, False),  # momentum != 0.1: the sequential update is not linear in L
        ("convnet", 14, None, True, True, False),  # momentum=None: cumulative average over num_batches_tracked
        ("resnet32", 8, 0.1, False, True, False),  # track_running_stats=False: batch statistics in eval too
        ("resnet32", 8, 0.1, True, False, False),  # eval mode: running statistics, nothing updated
        ("convnet", 14, 0.1, True, True, True),  # channels_last
        ("resnet18", 32, 0.2, True, True, True),  # torchvision layout, 1x1 layer4 map per patch
    ],
)
def test_per_slot_patch_bn_equals_one_forward_per_slot(name, px, bn_momentum, track, train, channels_last):
    """Outputs, every parameter gradient and the BN buffers after the step (running mean / var after L
    sequential momentum updates, num_batches_tracked + L) equal L separate forwards, in float64."""
    b, slots = 4, 3
    batched, separate = _slot_model(name, bn_momentum, track), _slot_model(name, bn_momentum, track)
    assert batched.patch_bn == "per-slot"
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(b, slots, 3, px, px, generator=g, dtype=torch.float64) * 2 + 0.5
    weights = torch.randn(slots, b, 8, generator=g, dtype=torch.float64)
    for model in (batched, separate):
        model.train(train)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    if channels_last:
        patches = patches.permute(1, 0, 3, 4, 2).contiguous().permute(1, 0, 4, 2, 3)  # as pretrain stores them
    out_b, grads_b = _student_and_grads(batched, patches, weights, separate=False)
    out_s, grads_s = _student_and_grads(separate, patches, weights, separate=True)
    torch.testing.assert_close(out_b, out_s, rtol=1e-10, atol=1e-12)
    for k in grads_s:
        torch.testing.assert_close(grads_b[k], grads_s[k], rtol=1e-9, atol=1e-12, msg=f"gradient of {k}")
    buffers_b, buffers_s = dict(batched.online.named_buffers()), dict(separate.online.named_buffers())
    assert buffers_b.keys() == buffers_s.keys()
    for k in buffers_s:
        torch.testing.assert_close(buffers_b[k], buffers_s[k], rtol=1e-12, atol=1e-14, msg=f"buffer {k}")
    if track:
        n = _bn_layers(batched.online)[0].num_batches_tracked
        assert int(n) == 7 + (slots if train else 0)


def test_joint_patch_bn_is_not_per_slot():
    """The control: the joint forward (one set of statistics over all L*B crops, one update) gives other
    outputs and running statistics, so the test above can fail."""
    b, slots = 4, 3
    joint, separate = _slot_model("convnet"), _slot_model("convnet")
    joint.patch_bn = "joint"
    patches = torch.randn(b, slots, 3, 14, 14, dtype=torch.float64)
    patches[:, 1] += 3.0  # slots with different statistics
    weights = torch.randn(slots, b, 8, dtype=torch.float64)
    out_j, _ = _student_and_grads(joint, patches, weights, separate=False)
    out_s, _ = _student_and_grads(separate, patches, weights, separate=True)
    assert (out_j - out_s).abs().max() > 1e-2
    bn_j, bn_s = _bn_layers(joint.online)[0], _bn_layers(separate.online)[0]
    assert (bn_j.running_mean - bn_s.running_mean).abs().max() > 1e-2
    assert int(bn_j.num_batches_tracked) == 8 and int(bn_s.num_batches_tracked) == 10


def test_per_slot_batchnorm_leaves_the_layers_untouched():
    from dscl.model import per_slot_batchnorm

    model = make_model()
    keys = list(model.state_dict())
    with per_slot_batchnorm(model.online, 2):
        assert all("forward" in vars(bn) for bn in _bn_layers(model.online))
        assert not any("forward" in vars(bn) for bn in _bn_layers(model.momentum))
        with pytest.raises(ValueError, match="do not split into 2 equal slots"):
            model.online(torch.randn(3, 3, 14, 14))
    assert not any("forward" in vars(bn) for bn in _bn_layers(model))
    assert list(model.state_dict()) == keys and all(type(bn) is nn.BatchNorm2d for bn in _bn_layers(model))
    with pytest.raises(RuntimeError, match="boom"), per_slot_batchnorm(model.online, 2):
        raise RuntimeError("boom")
    assert not any("forward" in vars(bn) for bn in _bn_layers(model))  # restored on errors too
    with pytest.raises(ValueError, match="slots"), per_slot_batchnorm(model.online, 0):
        pass
    with pytest.raises(ValueError, match="patch_bn"):
        DSCLModel(Encoder(build_backbone("convnet"), dim=8), 8, patch_bn="per-patch")


def test_patch_teacher_follows_the_model_roi_convention():
    model = make_model().eval()
    fmap = torch.randn(2, 256, 4, 4)
    boxes = random_boxes(2, 3, 28)
    model.roi_aligned = False
    own = model.patch_teacher(fmap, boxes, 28)
    torch.testing.assert_close(own, model.patch_teacher(fmap, boxes, 28, aligned=False))
    assert not torch.allclose(own, model.patch_teacher(fmap, boxes, 28, aligned=True))


# ---------------------------------------------------------------------------------------- the backbone spec


def test_a_builtin_runs_spec_is_todays_input_conversion():
    """Every run before backbone specs: the dataset's mean / std, bilinear, whole-image resize below 128 px and
    the ImageNet 256 -> 224 crop from 128 px up; a grey dataset's images replicated to RGB."""
    from dscl.config import load_config
    from dscl.model import backbone_spec

    small = backbone_spec(load_config("smoke"), (0.3,) * 3, (0.4,) * 3)
    assert (small.family, small.name, small.args, small.pool) == ("builtin", "convnet", {}, "avg")
    assert (small.image_size, small.mean, small.std, small.interpolation, small.crop_pct, small.grey_to_rgb,
            small.input_source) == (28, (0.3,) * 3, (0.4,) * 3, "bilinear", 1.0, True, "dataset")
    big = backbone_spec(load_config("imagenet-lt", overrides=["model.zero_init_residual=false"]), (0.5,) * 3,
                        (0.2,) * 3)
    assert big.crop_pct == 224 / 256 and big.resize_short == 256 and not big.grey_to_rgb
    assert big.args == {"zero_init_residual": False}  # the one constructor argument of the built-ins


def test_a_vit_refuses_image_sides_its_patch_grid_would_cut_short():
    pytest.importorskip("timm", reason="the optional timm extra is not installed")
    from dscl.config import ConfigError, load_config
    from dscl.model import build_encoder

    vit = ["model.backbone=timm:vit_tiny_patch16_224", "model.backbone_args={depth: 1, embed_dim: 32, num_heads: 2}"]
    with pytest.raises(ConfigError, match=r"data.image_size=60 is not a multiple of the 16 px patches of "
                                          r"timm:vit_tiny_patch16_224; use 48 or 64"):
        build_encoder(load_config("smoke", overrides=[*vit, "data.image_size=60", "views.patch_size=32"]))
    with pytest.raises(ConfigError, match=r"views.patch_size=24 is not a multiple of the 16 px patches"):
        build_encoder(load_config("smoke", overrides=[*vit, "data.image_size=64", "views.patch_size=24"]))
    # no patches cut (views.num_patches=0): the patch size does not matter
    build_encoder(load_config("smoke", overrides=[*vit, "data.image_size=64", "views.patch_size=24",
                                                  "views.num_patches=0"]))


def test_pool_cls_projects_the_class_token_and_keeps_the_patch_map():
    """model.pool=cls: the head sees the class token; the map (the PBSD teacher's input) is still the patch grid."""
    pytest.importorskip("timm", reason="the optional timm extra is not installed")
    torch.manual_seed(0)
    args = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    cls_enc = Encoder(build_backbone("timm:vit_tiny_patch16_224", args=args, pool="cls"), dim=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z, fmap = cls_enc(x)
        tokens = cls_enc.backbone.model.forward_features(x)
        torch.testing.assert_close(z, cls_enc.project(tokens[:, 0]))
        torch.testing.assert_close(fmap, tokens[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
        assert not torch.allclose(z, cls_enc.project(fmap.mean(dim=(2, 3))))
