"""BackboneSpec: names, validation, plain-container round trip through a weights_only checkpoint."""

from __future__ import annotations

import pytest
import torch

from dscl.backbones import BackboneSpec, build_backbone_from_spec, parse_backbone_name
from dscl.config import ConfigError


def test_parse_backbone_name():
    assert parse_backbone_name("resnet50") == ("builtin", "resnet50")
    assert parse_backbone_name("builtin:convnet") == ("builtin", "convnet")
    assert parse_backbone_name("timm:vit_tiny_patch16_224") == ("timm", "vit_tiny_patch16_224")
    assert parse_backbone_name("timm:vit_base_patch16_clip_224.openai") == ("timm", "vit_base_patch16_clip_224.openai")
    assert parse_backbone_name("open_clip:ViT-B-16") == ("open_clip", "ViT-B-16")
    assert parse_backbone_name("timm:hf-hub:timm/x") == ("timm", "hf-hub:timm/x")
    with pytest.raises(ConfigError, match=r"model.backbone='torchhub:x'.*unknown backbone family 'torchhub'"):
        parse_backbone_name("torchhub:x")
    with pytest.raises(ConfigError, match="name is empty.*timm:NAME"):
        parse_backbone_name("timm:")


def test_spec_normalises_and_names():
    spec = BackboneSpec("timm", "convnext_atto", {"depths": (1, 1, 1, 1), "in_chans": 1, "nested": {"a": (2,)}},
                        mean=[0.5], std=[0.25], image_size=64)
    assert spec.args == {"depths": [1, 1, 1, 1], "in_chans": 1, "nested": {"a": [2]}}
    assert spec.mean == (0.5,) and spec.std == (0.25,) and spec.in_chans == 1
    assert spec.qualified_name == "timm:convnext_atto"
    assert BackboneSpec("builtin", "resnet50").qualified_name == "resnet50"
    assert BackboneSpec("open_clip", "ViT-B-16").in_chans == 3
    assert BackboneSpec.from_name("open_clip:ViT-B-16", args={"layers": 2}) == BackboneSpec(
        "open_clip", "ViT-B-16", {"layers": 2})
    a = BackboneSpec("timm", "resnet18", {"drop_rate": 0.1}, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    b = BackboneSpec("timm", "resnet18", {"drop_rate": 0.1}, image_size=64)
    assert a.same_network(b) and a != b
    assert not a.same_network(BackboneSpec("timm", "resnet18", {"drop_rate": 0.2}))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"family": "keras"}, "family must be one of builtin, timm, open_clip"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"pool": "max"}, "pool must be one of avg, cls"),
    ({"interpolation": "lanczos"}, "interpolation must be one of bilinear, bicubic, nearest"),
    ({"input_source": "web"}, "input_source must be one of dataset, pretrained"),
    ({"image_size": 0}, "image_size must be a positive"),
    ({"image_size": True}, "image_size must be a positive"),
    ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
    ({"mean": (0.5, 0.5, 0.5)}, "mean and std need one value per channel"),
    ({"mean": (0.5, 0.5), "std": (1.0, 1.0, 1.0)}, "mean and std need one value per channel"),
    ({"mean": (0.5,), "std": (0.0,)}, "std must be positive"),
    ({"mean": ("x",), "std": (1.0,)}, "mean must be a list of numbers"),
    ({"args": {"act": object()}}, "argument args.act: object is not a plain value"),
    ({"args": [1]}, "args must be a mapping"),
])
def test_spec_validation(kwargs, match):
    fields = {"family": "timm", "name": "resnet18", **kwargs}
    with pytest.raises(ConfigError, match=match):
        BackboneSpec(**fields)


def test_to_dict_is_plain_and_survives_a_weights_only_checkpoint(tmp_path):
    spec = BackboneSpec("timm", "vit_tiny_patch16_224", {"depth": 2, "img_size": [64, 64]}, pool="cls",
                        image_size=64, mean=(0.48, 0.45, 0.40), std=(0.26, 0.26, 0.27), interpolation="bicubic",
                        crop_pct=0.9, grey_to_rgb=True, input_source="pretrained")
    d = spec.to_dict()

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))

    assert plain(d)
    torch.save({"backbone_spec": d, "weights": torch.zeros(2)}, tmp_path / "ckpt.pt")
    back = torch.load(tmp_path / "ckpt.pt", weights_only=True)["backbone_spec"]
    assert BackboneSpec.from_dict(back) == spec
    assert BackboneSpec.from_dict({"family": "builtin", "name": "convnet"}) == BackboneSpec("builtin", "convnet")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) adapter"):
        BackboneSpec.from_dict({**d, "adapter": "lora"})
    with pytest.raises(ConfigError, match=r"missing field\(s\) family"):
        BackboneSpec.from_dict({"name": "convnet"})


def test_the_spec_alone_rebuilds_the_same_network():
    spec = BackboneSpec("builtin", "resnet32", {"zero_init_residual": False})
    torch.manual_seed(5)
    a = build_backbone_from_spec(spec)
    torch.manual_seed(5)
    b = build_backbone_from_spec(BackboneSpec.from_dict(spec.to_dict()))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) depth; the built-in backbones take: zero_init"):
        build_backbone_from_spec(BackboneSpec("builtin", "resnet32", {"depth": 3}))
