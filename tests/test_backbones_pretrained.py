"""Pretrained weights: every file layout (timm, torchvision, open_clip, MoCo / official DSCL, dscl), hub
names resolved offline by timm's and open_clip's own code from a Hugging Face cache laid out as the hub
lays it out, errors that name the file, the keys and the layout, and the input settings weights bring."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dscl.backbones import BackboneSpec, build_backbone, build_backbone_from_spec, resolve_input_settings
from dscl.config import ConfigError
from dscl.model import DSCLModel, Encoder
from dscl.run import CheckpointError

timm = pytest.importorskip("timm", reason="the optional timm extra is not installed")
open_clip = pytest.importorskip("open_clip", reason="the optional open_clip extra is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch")

VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}
TOWER = {"width": 32, "layers": 2, "head_width": 16, "image_size": 64}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _vit(seed: int, **args):
    torch.manual_seed(seed)
    return build_backbone("timm:vit_tiny_patch16_224", args={**VIT, **args})


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def _native_vit_with_head(seed: int) -> nn.Module:
    """A timm ViT as timm saves it: classifier head included (10 classes)."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT)


def _write(layout: str, src, path: Path) -> None:
    native = src.model.state_dict()
    if layout == "timm-safetensors":
        state = {**native, "head.weight": torch.randn(10, 32), "head.bias": torch.randn(10)}
        safetensors_torch.save_file(state, str(path))
        return
    if layout == "timm-checkpoint":  # timm's train.py / DDP: {"state_dict": {"module.*"}}
        obj: object = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in native.items()}}
    elif layout == "dscl-encoder":  # dscl Encoder: backbone.model.* plus the projection head
        obj = Encoder(src, dim=8).state_dict()
    elif layout == "dscl-run":  # DSCLModel: online / momentum encoders and the queue, as last.pt holds them
        obj = {"version": 2, "model": DSCLModel(Encoder(src, dim=8), queue_size=4).state_dict()}
    else:  # `dscl export --format state-dict`
        obj = {"format": "dscl-state-dict", "backbone": src.state_dict(), "fc": {"weight": torch.zeros(3, 32)}}
    torch.save(obj, path)


@pytest.mark.parametrize("layout", ["timm-safetensors", "timm-checkpoint", "dscl-encoder", "dscl-run", "dscl-export"])
def test_timm_backbone_loads_every_layout(tmp_path, layout):
    src = _vit(1)
    path = tmp_path / ("w.safetensors" if layout == "timm-safetensors" else "w.pth")
    _write(layout, src, path)
    dst = _vit(2)
    loaded = build_backbone("timm:vit_tiny_patch16_224", args=VIT, pretrained=path)
    _same(loaded, src)
    assert not torch.equal(dst.model.pos_embed, src.model.pos_embed)


def test_moco_and_official_dscl_layout_into_timm_resnet(tmp_path):
    torch.manual_seed(1)
    src = build_backbone("timm:resnet18")
    q = {f"module.encoder_q.{k}": v for k, v in src.model.state_dict().items()}
    head = {"module.encoder_q.fc.0.weight": torch.randn(512, 512),  # MoCo v2's MLP head: not the backbone
            "module.encoder_q.fc.2.weight": torch.randn(128, 512)}
    k = {key.replace("encoder_q", "encoder_k"): torch.zeros_like(v) for key, v in q.items()}
    torch.save({"state_dict": {**q, **head, **k, "module.queue": torch.randn(128, 16)}}, tmp_path / "moco.pth.tar")
    _same(build_backbone("timm:resnet18", pretrained=tmp_path / "moco.pth.tar"), src)


def _tiny_clip(seed: int, image_size: int = 64):
    torch.manual_seed(seed)
    return open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=16,
        vision_cfg={"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg={"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1})


@pytest.mark.parametrize("layout", ["clip", "tower", "dscl-encoder"])
def test_open_clip_backbone_loads_clip_tower_and_dscl_layouts(tmp_path, layout):
    clip = _tiny_clip(1)
    if layout == "clip":
        state = clip.state_dict()
        assert any(k.startswith("transformer.") for k in state) and "visual.proj" in state
    elif layout == "tower":
        state = {k: v for k, v in clip.visual.state_dict().items()}
    else:
        torch.manual_seed(1)
        state = Encoder(build_backbone("open_clip:ViT-B-16", args=TOWER), dim=8).state_dict()
    torch.save(state, tmp_path / "clip.bin")
    net = build_backbone("open_clip:ViT-B-16", args=TOWER, pretrained=tmp_path / "clip.bin")
    want = {k: v for k, v in (clip.visual.state_dict() if layout != "dscl-encoder" else
                              {k[len("backbone.model."):]: v for k, v in state.items()
                               if k.startswith("backbone.model.")}).items() if k != "proj"}
    got = net.model.state_dict()
    assert sorted(got) == sorted(want)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_position_embeddings_of_other_resolutions_are_resampled(tmp_path):
    small = _tiny_clip(1, image_size=32)  # a 2x2 grid of position embeddings
    torch.save(small.state_dict(), tmp_path / "clip32.pt")
    net = build_backbone("open_clip:ViT-B-16", args=TOWER, pretrained=tmp_path / "clip32.pt")
    assert net.model.positional_embedding.shape == (1 + 16, 32)
    torch.testing.assert_close(net.model.positional_embedding[0], small.visual.positional_embedding[0])
    # timm's own converter does the same for its ViTs
    torch.save(_vit(1, img_size=32).model.state_dict(), tmp_path / "vit32.pt")
    vit = build_backbone("timm:vit_tiny_patch16_224", args=VIT, pretrained=tmp_path / "vit32.pt")
    assert vit.model.pos_embed.shape == (1, 1 + 16, 32)


def test_first_convolution_adapts_to_in_chans(tmp_path):
    torch.manual_seed(1)
    rgb = build_backbone("timm:resnet18")
    torch.save(rgb.model.state_dict(), tmp_path / "rgb.pth")
    grey = build_backbone("timm:resnet18", args={"in_chans": 1}, pretrained=tmp_path / "rgb.pth")
    torch.testing.assert_close(grey.model.conv1.weight, rgb.model.conv1.weight.sum(dim=1, keepdim=True))
    assert grey.forward_features(torch.randn(1, 1, 64, 64)).shape == (1, 512, 2, 2)


def test_a_wrong_shape_is_refused_naming_the_key_and_the_file(tmp_path):
    state = _vit(1).model.state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(64, 32)
    safetensors_torch.save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors do not fit backbone timm:vit_tiny_patch16_224; "
                                              r"shape mismatches: blocks\.0\.mlp\.fc1\.weight \(64, 32\) vs model "
                                              r"\(128, 32\); the file looks like a timm ViT"):
        build_backbone("timm:vit_tiny_patch16_224", args=VIT, pretrained=tmp_path / "bad.safetensors")


def test_foreign_files_name_their_layout(tmp_path):
    torch.save(_vit(1).model.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match=r"vit\.pth do not fit backbone timm:convnext_atto; missing keys: "
                                              r"stem\.0\.weight.*unexpected keys: .*looks like a timm ViT"):
        build_backbone("timm:convnext_atto", args={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
                       pretrained=tmp_path / "vit.pth")
    torch.save(_tiny_clip(1).state_dict(), tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match=r"clip\.pt do not fit backbone resnet18; .*looks like an open_clip "
                                              r"CLIP model"):
        build_backbone("resnet18", pretrained=tmp_path / "clip.pt")


def test_unreadable_unsafe_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"not found: .*nowhere\.safetensors"):
        build_backbone("timm:resnet18", pretrained=tmp_path / "nowhere.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"cannot read pretrained weights .*junk\.safetensors"):
        build_backbone("timm:resnet18", pretrained=tmp_path / "junk.safetensors")
    # weights_only=True: a file that needs arbitrary unpickling is refused, never executed
    torch.save({"state_dict": _vit(1).model.state_dict(), "extra": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"cannot read pretrained weights .*pickled\.pth"):
        build_backbone("timm:vit_tiny_patch16_224", args=VIT, pretrained=tmp_path / "pickled.pth")
    with pytest.raises(ConfigError, match="hub names like hf-hub:ORG/NAME work with timm: and open_clip:"):
        build_backbone("resnet18", pretrained="hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(ConfigError, match=r"neither a file nor a pretrained tag of open_clip ViT-B-16 "
                                          r"\(tags: .*openai"):
        build_backbone("open_clip:ViT-B-16", args=TOWER, pretrained="no_such_tag")


# ------------------------------------------------------------------------------------------------
# hub names, offline, through timm's and open_clip's own loading code


def _hub_cache(tmp_path: Path, monkeypatch, repo: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache holding ``repo`` at one commit, laid out as huggingface_hub lays it out:
    ``models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}``; offline mode."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf" / "hub"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / COMMIT).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (root / "snapshots" / COMMIT / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read the variables when it was imported; the running process sees these
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_timm_hub_name_offline(tmp_path, monkeypatch):
    model = _native_vit_with_head(7)
    export = tmp_path / "export"
    timm.models.save_for_hf(model, str(export), safe_serialization=True,
                            data_config={"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear",
                                         "crop_pct": 0.95})
    files = {name: (export / name).read_bytes() for name in ("model.safetensors", "config.json")}
    assert json.loads(files["config.json"])["pretrained_cfg"]["mean"] == [0.1, 0.2, 0.3]
    _hub_cache(tmp_path, monkeypatch, "timm/dscl-tiny-vit", files)

    spec = BackboneSpec("timm", "vit_tiny_patch16_224", VIT)
    net = build_backbone_from_spec(spec, pretrained="hf-hub:timm/dscl-tiny-vit")
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert sorted(net.model.state_dict()) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(net.model.state_dict()[k], v, rtol=0, atol=0, msg=k)

    settings = resolve_input_settings(spec, pretrained="hf-hub:timm/dscl-tiny-vit", image_size=64,
                                      mean=(0.7,) * 3, std=(0.2,) * 3, grey=True)
    assert settings.input_source == "pretrained" and settings.image_size == 64 and settings.grey_to_rgb
    assert settings.mean == (0.1, 0.2, 0.3) and settings.std == (0.4, 0.5, 0.6)
    assert settings.interpolation == "bilinear" and settings.crop_pct == 0.95

    with pytest.raises(ConfigError, match=r"hf-hub:timm/not-cached: timm could not load it .*copy that cache"):
        build_backbone_from_spec(spec, pretrained="hf-hub:timm/not-cached")


def test_open_clip_hub_name_offline(tmp_path, monkeypatch):
    clip = _tiny_clip(5)
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": {}, "text_cfg": {}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}}
    safetensors_torch.save_file(clip.state_dict(), str(tmp_path / "w.safetensors"))
    _hub_cache(tmp_path, monkeypatch, "someone/tiny-clip", {
        "open_clip_model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
        "open_clip_config.json": json.dumps(config).encode()})
    spec = BackboneSpec("open_clip", "ViT-B-16", TOWER)
    net = build_backbone_from_spec(spec, pretrained="hf-hub:someone/tiny-clip")
    torch.testing.assert_close(net.model.conv1.weight, clip.visual.conv1.weight, rtol=0, atol=0)
    settings = resolve_input_settings(spec, pretrained="hf-hub:someone/tiny-clip", image_size=64, mean=(0.0,) * 3,
                                      std=(1.0,) * 3, grey=False)
    assert (settings.mean, settings.std, settings.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bilinear")


def test_input_settings_from_pretrained_configs_else_the_dataset(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # settings never read the weights themselves
    data = {"image_size": 64, "mean": (0.3, 0.3, 0.3), "std": (0.2, 0.2, 0.2), "grey": True}
    none = resolve_input_settings(BackboneSpec("timm", "vit_tiny_patch16_224"), pretrained=None, **data)
    assert (none.input_source, none.mean, none.interpolation, none.crop_pct) == ("dataset", (0.3,) * 3, "bilinear", 1.0)
    builtin = resolve_input_settings(BackboneSpec("builtin", "resnet50"), pretrained=weights, **data)
    assert builtin.input_source == "dataset" and builtin.mean == (0.3,) * 3  # the built-ins: as before
    clip_timm = resolve_input_settings(BackboneSpec("timm", "vit_base_patch16_clip_224.openai"), pretrained=weights,
                                       **data)
    assert clip_timm.input_source == "pretrained" and clip_timm.interpolation == "bicubic"
    assert clip_timm.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and clip_timm.crop_pct == 0.9
    clip = resolve_input_settings(BackboneSpec("open_clip", "ViT-B-16"), pretrained=weights, **data)
    assert (clip.mean, clip.std) == (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    assert (clip.interpolation, clip.crop_pct, clip.grey_to_rgb) == ("bicubic", 1.0, True)
    # a copied hub snapshot keeps its config next to the weights: its settings win over the name's
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {"mean": [0.5] * 3,
                                                                                   "std": [0.5] * 3}}))
    assert resolve_input_settings(BackboneSpec("open_clip", "ViT-B-16"), pretrained=weights, **data).mean == (0.5,) * 3
    timm.models.save_for_hf(_native_vit_with_head(1), str(tmp_path / "snap"), data_config={"mean": (0.1, 0.1, 0.1),
                                                                                          "std": (0.9, 0.9, 0.9)})
    for source in (tmp_path / "snap" / "pytorch_model.bin", tmp_path / "snap"):  # the file, or its folder
        snap = resolve_input_settings(BackboneSpec("timm", "vit_tiny_patch16_224", VIT), pretrained=source, **data)
        assert (snap.mean, snap.std) == ((0.1,) * 3, (0.9,) * 3)
        build_backbone("timm:vit_tiny_patch16_224", args=VIT, pretrained=source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"folder .*empty holds none of model\.safetensors"):
        build_backbone("timm:vit_tiny_patch16_224", args=VIT, pretrained=tmp_path / "empty")
