"""open_clip image towers: the map is open_clip's own patch-token output, other sizes through the
position-embedding interpolation, the CLIP projection removed, refusals and the missing extra."""

from __future__ import annotations

import sys

import pytest
import torch

from dscl.backbones import build_backbone, resample_position_embedding
from dscl.config import ConfigError

open_clip = pytest.importorskip("open_clip", reason="the optional open_clip extra is not installed")

TINY = {"width": 32, "layers": 2, "head_width": 16, "image_size": 64}


@torch.no_grad()
def test_map_and_class_token_are_open_clips_own_at_the_native_size():
    torch.manual_seed(0)
    net = build_backbone("open_clip:ViT-B-16", args=TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    theirs = net.model.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=True)
    torch.testing.assert_close(net.forward_features(x), theirs["image_intermediates"][-1])
    torch.manual_seed(0)
    cls = build_backbone("open_clip:ViT-B-16", args=TINY, pool="cls").eval()
    torch.testing.assert_close(cls(x), cls.model(x))  # open_clip's pooled token (its projection removed)
    assert net.num_features == 32 and net.stride == 16


@torch.no_grad()
def test_other_sizes_interpolate_the_position_embedding():
    torch.manual_seed(0)
    net = build_backbone("open_clip:ViT-B-16", args=TINY).eval()
    assert net.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 32, 2, 2)
    assert net.forward_features(torch.randn(1, 3, 96, 128)).shape == (1, 32, 6, 8)
    # a constant grid stays constant (bicubic, antialiased or not, preserves constants); prefix untouched
    pos = torch.cat([torch.full((1, 8), -3.0), torch.full((16, 8), 0.25)])
    for grid in ((2, 2), (8, 8), (3, 5)):
        out = resample_position_embedding(pos, grid, (4, 4), num_prefix=1)
        assert out.shape == (1 + grid[0] * grid[1], 8)
        torch.testing.assert_close(out[0], pos[0])
        torch.testing.assert_close(out[1:], torch.full_like(out[1:], 0.25))
    assert resample_position_embedding(pos, (4, 4), (4, 4), num_prefix=1) is pos
    batched = resample_position_embedding(torch.randn(1, 1 + 16, 8), (2, 2), (4, 4), num_prefix=1)
    assert batched.shape == (1, 5, 8)


def test_projection_is_removed_and_every_parameter_is_trainable():
    net = build_backbone("open_clip:ViT-B-16", args=TINY)
    assert net.model.proj is None and "model.proj" not in net.state_dict()
    assert all(p.requires_grad for p in net.parameters())


def test_refusals():
    with pytest.raises(ConfigError, match="ResNet tower"):
        build_backbone("open_clip:RN50")
    with pytest.raises(ConfigError, match=r"timm trunk.*model.backbone=timm:"):
        build_backbone("open_clip:ViT-B-16-SigLIP")
    with pytest.raises(ConfigError, match=r"no architecture 'ViT-Q-99'"):
        build_backbone("open_clip:ViT-Q-99")
    with pytest.raises(ConfigError, match=r"unknown argument 'depth'.*vision_cfg fields"):
        build_backbone("open_clip:ViT-B-16", args={"depth": 2})
    with pytest.raises(ConfigError, match="patch_dropout"):
        build_backbone("open_clip:ViT-B-16", args={**TINY, "patch_dropout": 0.5})


def test_missing_open_clip_is_one_line_naming_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ConfigError) as info:
        build_backbone("open_clip:ViT-B-16", args=TINY)
    message = str(info.value)
    assert "\n" not in message and "pip install 'dscl-lt[open_clip]'" in message


def test_a_pretrained_tag_must_match_the_towers_activation(monkeypatch):
    """open_clip's 'openai' weights were trained with QuickGELU: a tower built with GELU is refused before anything
    is downloaded (its features would silently differ), and the one built with quick_gelu goes on to the download."""
    import open_clip.pretrained

    calls = []
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained",
                        lambda cfg, *a, **k: calls.append(cfg) or (_ for _ in ()).throw(OSError("offline")))
    gelu = build_backbone("open_clip:ViT-B-16", args=TINY)
    with pytest.raises(ConfigError, match=r"trained with QuickGELU, but the tower was built with GELU .*"
                                          r"model\.backbone_args=\{quick_gelu: true\}"):
        gelu.named_weights("openai")
    assert calls == []
    quick = build_backbone("open_clip:ViT-B-16", args={**TINY, "quick_gelu": True})
    with pytest.raises(ConfigError, match="could not load it from the hub or its cache"):
        quick.named_weights("openai")
    assert len(calls) == 1
