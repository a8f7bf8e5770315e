"""timm backbones: the map is timm's own spatial output, prefix tokens and NHWC handled, dynamic image
size, class-token pooling, frozen head-only parameters, errors, and timm:resnet50 == the built-in resnet50."""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision

from dscl.backbones import BackboneSpec, build_backbone, build_backbone_from_spec
from dscl.config import ConfigError

timm = pytest.importorskip("timm", reason="the optional timm extra is not installed")

VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}
TOKEN_MODELS = {  # name -> prefix tokens (class, distillation, registers)
    "vit_tiny_patch16_224": 1,
    "deit_tiny_distilled_patch16_224": 2,
    "vit_base_patch16_reg4_gap_256": 4,
    "vit_small_patch14_reg4_dinov2": 5,
}


@pytest.mark.parametrize("name", sorted(TOKEN_MODELS))
@torch.no_grad()
def test_token_map_is_timms_own_spatial_output(name):
    torch.manual_seed(0)
    net = build_backbone(f"timm:{name}", args={**VIT, "patch_size": 16}).eval()
    assert net.num_prefix_tokens == TOKEN_MODELS[name]
    for px in (32, 64, 48):
        x = torch.randn(2, 3, px, px)
        want = net.model.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]
        got = net.forward_features(x)
        assert got.shape == (2, 32, px // 16, px // 16)
        torch.testing.assert_close(got, want)


@torch.no_grad()
def test_nhwc_models_are_permuted_to_nchw():
    net = build_backbone("timm:swin_tiny_patch4_window7_224",
                         args={"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": [1, 1, 1, 1]}).eval()
    assert net.nhwc
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net.forward_features(x), net.model.forward_features(x).permute(0, 3, 1, 2))


@torch.no_grad()
def test_dynamic_img_size_is_the_default_where_the_model_takes_it():
    vit = build_backbone("timm:vit_tiny_patch16_224", args=VIT)
    assert vit.model.dynamic_img_size
    fixed = build_backbone("timm:vit_tiny_patch16_224", args={**VIT, "dynamic_img_size": False}).eval()
    assert not fixed.model.dynamic_img_size
    fixed(torch.randn(1, 3, 64, 64))
    with pytest.raises(AssertionError, match="Input height"):  # what the default spares the patch crops
        fixed(torch.randn(1, 3, 32, 32))
    cnn = build_backbone("timm:resnet18")  # no dynamic_img_size argument: built without it
    assert cnn.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


@torch.no_grad()
def test_pool_cls_is_the_class_token_and_refused_without_one():
    torch.manual_seed(0)
    avg = build_backbone("timm:vit_tiny_patch16_224", args=VIT).eval()
    torch.manual_seed(0)
    cls = build_backbone("timm:vit_tiny_patch16_224", args=VIT, pool="cls").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(cls(x), cls.model.forward_features(x)[:, 0])
    torch.testing.assert_close(cls.forward_features(x), avg.forward_features(x))  # the map does not change
    pooled, _ = cls.forward_with_map(x)
    torch.testing.assert_close(pooled, cls(x))
    with pytest.raises(ConfigError, match="class token"):
        build_backbone("timm:vit_base_patch16_reg4_gap_256", args=VIT, pool="cls")
    with pytest.raises(ConfigError, match="class token"):
        build_backbone("timm:resnet18", pool="cls")
    with pytest.raises(ConfigError, match="class token"):
        build_backbone("resnet18", pool="cls")


def test_parameters_beyond_the_map_are_frozen():
    convnext = build_backbone("timm:convnext_atto", args={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]})
    assert convnext.unreached == ("model.head.norm.weight", "model.head.norm.bias")
    assert not convnext.model.head.norm.weight.requires_grad
    assert sum(p.requires_grad for p in convnext.parameters()) == len(list(convnext.parameters())) - 2
    vit = build_backbone("timm:vit_tiny_patch16_224", args=VIT)
    assert vit.unreached == () and all(p.requires_grad for p in vit.parameters())


def test_build_errors():
    with pytest.raises(ConfigError, match=r"timm:vit_tiny_patch16_22\b.*has no model.*similar: .*vit_tiny_patch16_224"):
        build_backbone("timm:vit_tiny_patch16_22")
    with pytest.raises(ConfigError, match=r"timm:resnet18 with model.backbone_args \{'bogus': 1\}.*bogus"):
        build_backbone("timm:resnet18", args={"bogus": 1})
    with pytest.raises(ConfigError, match="patch_drop_rate"):
        build_backbone("timm:vit_tiny_patch16_224", args={**VIT, "patch_drop_rate": 0.5})


def test_missing_timm_is_one_line_naming_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` sees when it is not installed
    with pytest.raises(ConfigError) as info:
        build_backbone("timm:resnet18")
    message = str(info.value)
    assert "\n" not in message
    assert "model.backbone=timm:resnet18" in message and "pip install 'dscl-lt[timm]'" in message


@torch.no_grad()
def test_timm_resnet50_given_torchvision_weights_is_the_builtin_resnet50(tmp_path):
    """Both paths are one network: torchvision's resnet50 weights in timm:resnet50 and in the built-in."""
    torch.manual_seed(3)
    tv = torchvision.models.resnet50(weights=None)
    for m in tv.modules():  # statistics and affine parameters that differ from any fresh model
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_(1, 0.1)
            m.bias.normal_(0, 0.1)
    path = tmp_path / "resnet50-torchvision.pth"
    torch.save(tv.state_dict(), path)  # torchvision's own layout, fc included
    builtin = build_backbone("resnet50", pretrained=path).eval()
    via_timm = build_backbone_from_spec(BackboneSpec("timm", "resnet50"), pretrained=path).eval()
    x = torch.randn(2, 3, 64, 64)
    want = builtin.forward_features(x)
    got = via_timm.forward_features(x)
    assert got.shape == want.shape == (2, 2048, 2, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(via_timm(x), builtin(x), rtol=1e-4, atol=1e-5)
    tv.fc = torch.nn.Identity()
    torch.testing.assert_close(builtin(x), tv.eval()(x), rtol=1e-4, atol=1e-5)
