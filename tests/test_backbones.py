"""Backbones: shapes, feature counts, zero-init of residual BNs, local pretrained loading."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from dscl.backbones import BACKBONES, BasicBlock, build_backbone

SMALL = ("convnet", "resnet32", "resnet18")
BIG = ("resnet50", "resnet152", "resnext50_32x4d")

# (name, input px) -> expected map side
SIDES = {
    ("convnet", 14): 2, ("convnet", 16): 2, ("convnet", 28): 4, ("convnet", 32): 4, ("convnet", 224): 28,
    ("resnet32", 28): 7, ("resnet32", 32): 8, ("resnet32", 224): 56,
    ("resnet18", 28): 1, ("resnet18", 32): 1, ("resnet18", 224): 7,
}
FEATURES = {"convnet": 256, "resnet32": 64, "resnet18": 512, "resnet50": 2048, "resnet152": 2048,
            "resnext50_32x4d": 2048}
STRIDES = {"convnet": 8, "resnet32": 4, "resnet18": 32, "resnet50": 32, "resnet152": 32,
           "resnext50_32x4d": 32}


def test_names_are_the_public_tuple():
    assert BACKBONES == ("convnet", "resnet32", "resnet18", "resnet50", "resnet152", "resnext50_32x4d")
    assert set(FEATURES) == set(BACKBONES)


@pytest.mark.parametrize(("name", "px"), sorted(SIDES))
@torch.no_grad()
def test_small_backbone_shapes(name, px):
    torch.manual_seed(0)
    net = build_backbone(name).eval()
    x = torch.randn(2 if px <= 32 else 1, 3, px, px)
    fmap = net.forward_features(x)
    side = SIDES[(name, px)]
    assert fmap.shape == (x.shape[0], FEATURES[name], side, side)
    assert net.num_features == FEATURES[name]
    assert net.stride == STRIDES[name]
    torch.testing.assert_close(net(x), fmap.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", BIG)
@torch.no_grad()
def test_big_backbone_shapes_at_64px(name):
    net = build_backbone(name).eval()
    fmap = net.forward_features(torch.randn(1, 3, 64, 64))
    assert fmap.shape == (1, 2048, 2, 2)
    assert net.num_features == 2048 and net.stride == 32
    assert not hasattr(net, "fc") and not hasattr(net, "avgpool")


@torch.no_grad()
def test_convnet_odd_and_rectangular_inputs():
    net = build_backbone("convnet").eval()
    assert net.forward_features(torch.randn(1, 3, 15, 15)).shape[-2:] == (2, 2)
    assert net.forward_features(torch.randn(1, 3, 1, 1)).shape[-2:] == (1, 1)
    assert net.forward_features(torch.randn(1, 3, 28, 64)).shape[-2:] == (4, 8)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnext50_32x4d") as info:
        build_backbone("vit_b_16")
    assert "vit_b_16" in str(info.value) and "convnet" in str(info.value)


def _last_bns(net: nn.Module) -> list[torch.Tensor]:
    gammas = []
    for m in net.modules():
        if isinstance(m, (BasicBlock, torchvision.models.resnet.BasicBlock)):
            gammas.append(m.bn2.weight)
        elif isinstance(m, torchvision.models.resnet.Bottleneck):
            gammas.append(m.bn3.weight)
    return gammas


@pytest.mark.parametrize(("name", "blocks"), [("resnet32", 15), ("resnet18", 8), ("resnet50", 16)])
def test_zero_init_residual(name, blocks):
    gammas = _last_bns(build_backbone(name, zero_init_residual=True))
    assert len(gammas) == blocks
    assert all(torch.count_nonzero(g) == 0 for g in gammas)
    gammas = _last_bns(build_backbone(name, zero_init_residual=False))
    assert all(torch.all(g == 1) for g in gammas)


@pytest.mark.parametrize("name", ["convnet", "resnet32", "resnet18"])
def test_pretrained_round_trip(tmp_path, name):
    torch.manual_seed(1)
    src = build_backbone(name)
    with torch.no_grad():  # make BN statistics differ from a fresh model too
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.weight.normal_()
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.fc.weight"] = torch.randn(10, src.num_features)
    state["module.fc.bias"] = torch.randn(10)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    torch.manual_seed(2)
    dst = build_backbone(name, pretrained=str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_pretrained_variants_backbone_prefix_model_key_no_bn_counters(tmp_path):
    src = build_backbone("resnet32")
    state = {f"backbone.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "w.pt"
    torch.save({"model": state}, path)
    dst = build_backbone("resnet32", pretrained=str(path))
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight, rtol=0, atol=0)
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)
    build_backbone("resnet32", pretrained=str(plain))


def test_pretrained_errors(tmp_path):
    src = build_backbone("convnet").state_dict()
    missing = dict(src)
    del missing["stages.0.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing\.pt.*missing keys: stages\.0\.weight"):
        build_backbone("convnet", pretrained=str(tmp_path / "missing.pt"))

    extra = dict(src, **{"head.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"extra\.pt.*unexpected keys: head\.weight"):
        build_backbone("convnet", pretrained=str(tmp_path / "extra.pt"))

    shaped = dict(src, **{"stages.0.weight": torch.zeros(32, 1, 3, 3)})
    torch.save(shaped, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape\.pt.*shape mismatches: stages\.0\.weight \(32, 1, 3, 3\)"):
        build_backbone("convnet", pretrained=str(tmp_path / "shape.pt"))

    torch.save(build_backbone("resnet32").state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt"):
        build_backbone("convnet", pretrained=str(tmp_path / "other.pt"))

    with pytest.raises(ValueError, match=r"not found: .*nowhere\.pt"):
        build_backbone("convnet", pretrained=str(tmp_path / "nowhere.pt"))

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        build_backbone("convnet", pretrained=str(tmp_path / "junk.pt"))


def test_the_backbones_package_imports_nothing_above_it():
    """Downward-only imports: backbones sit below the run, the model and the data (dscl.run imports them for
    the spec it stores; a backbones module importing dscl.run back made the order of imports matter)."""
    import subprocess
    import sys

    code = ("import sys, dscl.backbones\n"
            "above = [m for m in ('dscl.run', 'dscl.model', 'dscl.data', 'dscl.inference', 'dscl.features') "
            "if m in sys.modules]\n"
            "print(above)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
