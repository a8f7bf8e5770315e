"""The backbone contract, run over every built-in and a list of timm / open_clip architectures.

One parametrised list (DESIGN.md style 14), tiny sizes and random weights: the map is ``(B, C, H, W)``
with ``C == num_features``; ``forward`` is the mean of the map; one set of weights takes a 32 px patch
crop and a 64 px view; per-slot patch BatchNorm changes nothing on a model without BatchNorm;
TorchScript tracing (every backbone) and scripting (where torch can: the built-ins and the open_clip
tower; timm's ViTs are not scriptable) reproduce the backbone; one DSCL + PBSD step reaches every
trainable parameter and nothing else. Through the pipeline: the spec stored in a run's checkpoint rebuilds
the same network (``features.frozen_backbone``), and the TorchScript and ONNX exports of a run agree with
its Predictor.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dscl.backbones import BACKBONES, Backbone, build_backbone, build_backbone_from_spec
from dscl.config import load_config
from dscl.model import DSCLModel, Encoder
from dscl.pretrain import Batch, pretrain_step

pytest.importorskip("timm", reason="the optional timm extra is not installed")
pytest.importorskip("open_clip", reason="the optional open_clip extra is not installed")

VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}
# id -> (model.backbone, args, scriptable)
CASES: dict[str, tuple[str, dict, bool]] = {
    **{name: (name, {}, True) for name in BACKBONES},
    "timm-resnet": ("timm:resnet18", {}, False),
    "timm-convnext": ("timm:convnext_atto", {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}, False),
    "timm-vit": ("timm:vit_tiny_patch16_224", VIT, False),
    "timm-deit-distilled": ("timm:deit_tiny_distilled_patch16_224", VIT, False),
    "timm-vit-registers": ("timm:vit_base_patch16_reg4_gap_256", VIT, False),
    "timm-swin-nhwc": ("timm:swin_tiny_patch4_window7_224", {"depths": [1, 1, 1, 1], "embed_dim": 16,
                                                             "num_heads": [1, 1, 1, 1], "drop_path_rate": 0.0}, False),
    "open_clip-vit": ("open_clip:ViT-B-16", {"width": 32, "layers": 2, "head_width": 16, "image_size": 64}, True),
}
SLOW = {"resnet50", "resnet152", "resnext50_32x4d"}  # the big torchvision models: seconds each to build and step
PARAMS = [pytest.param(k, id=k, marks=[pytest.mark.slow] if k in SLOW else []) for k in CASES]
# exports compile (TorchScript) or trace (ONNX) the whole run; in the fast suite only the cases under ~3 s each
# (TorchScript of resnet32 / resnet18 / timm's resnet and swin: 7-12 s here; ONNX: 3-30 s each)
FAST_TORCHSCRIPT = {"convnet", "timm-convnext", "timm-vit", "timm-deit-distilled", "timm-vit-registers",
                    "open_clip-vit"}
FAST_ONNX = {"convnet", "timm-vit", "open_clip-vit"}


def _params(fast: set[str]) -> list:
    return [pytest.param(k, id=k, marks=[] if k in fast else [pytest.mark.slow]) for k in CASES]


def _build(case: str) -> Backbone:
    name, args, _ = CASES[case]
    torch.manual_seed(0)
    return build_backbone(name, args=args)


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.mark.parametrize("case", PARAMS)
@torch.no_grad()
def test_map_rank_channels_and_pooled_is_the_mean_of_the_map(case):
    net = _build(case).eval()
    assert isinstance(net.num_features, int) and isinstance(net.stride, int) and net.stride > 0
    for px in (32, 64):  # a patch crop and a view, one set of weights
        x = torch.randn(2, 3, px, px)
        fmap = net.forward_features(x)
        assert fmap.dim() == 4 and fmap.shape[:2] == (2, net.num_features), (px, fmap.shape)
        assert fmap.shape[2] >= 1 and fmap.shape[3] >= 1
        pooled, fmap2 = net.forward_with_map(x)
        torch.testing.assert_close(fmap2, fmap)
        torch.testing.assert_close(net(x), fmap.mean(dim=(2, 3)))
        torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    # the larger view gives the larger (or equal) grid: the map follows the input, it is not resized
    assert net.forward_features(torch.randn(1, 3, 64, 64)).shape[-1] >= net.forward_features(
        torch.randn(1, 3, 32, 32)).shape[-1]


@pytest.mark.parametrize("case", PARAMS)
def test_per_slot_patch_bn(case):
    """Per-slot BatchNorm equals one forward per slot; on a model without BatchNorm it equals joint."""
    enc = Encoder(_build(case), dim=16)
    per_slot = DSCLModel(copy.deepcopy(enc), queue_size=8, patch_bn="per-slot").train()
    joint = DSCLModel(copy.deepcopy(enc), queue_size=8, patch_bn="joint").train()
    separate = copy.deepcopy(enc).train()
    patches = torch.randn(2, 3, 3, 32, 32)
    a = per_slot.patch_student(patches)
    b = joint.patch_student(patches)
    want = torch.stack([separate(patches[:, j])[0] for j in range(3)])
    torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-5)
    if not _has_batchnorm(enc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", PARAMS)
@torch.no_grad()  # nn.MultiheadAttention (open_clip) takes its fused path without grad: trace in that mode
def test_torchscript(case):
    net = _build(case).eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about python ints from shapes: the size is fixed
        traced = torch.jit.trace(net, x)
    torch.testing.assert_close(traced(x), net(x), rtol=1e-4, atol=1e-5)
    if CASES[case][2]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted.forward_features(x), net.forward_features(x), rtol=1e-4, atol=1e-5)
        y = torch.randn(2, 3, 32, 32)  # scripting keeps the size logic, so other sizes work too
        torch.testing.assert_close(scripted(y), net(y), rtol=1e-4, atol=1e-5)


def _batch(b=2, size=64, patches=2, psize=32, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        query=torch.randn(b, 3, size, size, generator=g),
        key=torch.randn(b, 3, size, size, generator=g),
        patches=torch.randn(b, patches, 3, psize, psize, generator=g),
        boxes=torch.tensor([[4.0, 2.0, 40.0, 50.0], [20.0, 16.0, 60.0, 64.0]]).expand(b, patches, 4).clone(),
        labels=torch.tensor([0, 1] * (b // 2)),
    )


@pytest.mark.parametrize("case", PARAMS)
def test_one_dscl_pbsd_step_reaches_every_trainable_parameter(case):
    backbone = _build(case)
    model = DSCLModel(Encoder(backbone, dim=16), queue_size=16)
    model.queue.enqueue(torch.nn.functional.normalize(torch.randn(4, 16), dim=1), torch.tensor([0, 1, 0, 1]))
    loss_cfg = dataclasses.replace(load_config("smoke").loss, loss="dscl", pbsd_weight=1.0)
    opt = torch.optim.SGD([p for p in model.online.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    parts = pretrain_step(model, _batch(), opt, lr=0.1, m=0.99, loss_cfg=loss_cfg)
    assert all(torch.isfinite(v) for v in parts.values())
    assert parts["loss_pbsd"] > 0 and parts["loss_con"] > 0
    frozen = {f"backbone.{n}" for n in getattr(backbone, "unreached", ())}
    for name, p in model.online.named_parameters():
        if name in frozen:  # beyond the feature map (timm's pooled-head norms): frozen at build time
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
    for p in model.momentum.parameters():
        assert not p.requires_grad and p.grad is None


# ----------------------------------------------------------------------------------------------------------
# through the pipeline: the spec stored in a run rebuilds the network; exports agree with the Predictor


def _tiny_run(case: str, tmp_path) -> tuple[Path, Backbone]:
    """A classified run made in-process, as stage 2 stores one: the case's backbone (random weights, BatchNorm
    statistics made non-trivial), a random linear layer over 3 classes, the spec in ``classifier.pt``.
    No training and no dataset: the run's class names and normalisation are in the checkpoint."""
    from dscl.config import dump_config
    from dscl.model import backbone_spec
    from dscl.run import ClassifierState, DataMeta, save_classifier

    name, args, _ = CASES[case]
    cfg = load_config("smoke", overrides=[f"model.backbone={name}", f"model.backbone_args={json.dumps(args)}",
                                          "data.image_size=64", "views.patch_size=32"])
    spec = backbone_spec(cfg, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    net = build_backbone_from_spec(spec)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    dump_config(cfg, run_dir / "config.yaml")
    data = DataMeta.of(["a", "b", "c"], [5, 3, 1], (0.5,) * 3, (0.25,) * 3)
    save_classifier(run_dir, ClassifierState(
        protocol="cached", backbone_name=spec.qualified_name, num_classes=3, spec=spec, data=data,
        backbone=net.state_dict(), fc=nn.Linear(net.num_features, 3).state_dict()))
    return run_dir, net.eval()


@pytest.mark.parametrize("case", PARAMS)
@torch.no_grad()
def test_frozen_backbone_from_the_stored_spec_gives_the_same_features(case, tmp_path):
    from dscl.features import frozen_backbone
    from dscl.run import load_classifier

    run_dir, net = _tiny_run(case, tmp_path)
    state = load_classifier(run_dir)  # torch.load(weights_only=True): the spec is plain containers
    assert state.spec is not None and state.spec.qualified_name == CASES[case][0]
    torch.manual_seed(1)  # another initialisation: every weight comes from the checkpoint
    again = frozen_backbone(state.spec, state.backbone, run_dir / "checkpoints" / "classifier.pt").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)
    torch.testing.assert_close(again.forward_features(x), net.forward_features(x), rtol=0, atol=0)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 50, 37, 3), dtype=torch.uint8, generator=g),  # colour, another size
            torch.randint(0, 256, (2, 64, 64, 1), dtype=torch.uint8, generator=g),  # grey, the run's size
            torch.rand(2, 3, 40, 70, generator=g)]  # float in [0, 1]


@pytest.mark.parametrize("case", _params(FAST_TORCHSCRIPT))
def test_torchscript_export_agrees_with_the_predictor(case, tmp_path):
    from dscl import load_run
    from dscl.interop import export_run

    run_dir, _ = _tiny_run(case, tmp_path)
    p = load_run(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        module = torch.jit.load(str(export_run(p, "torchscript", tmp_path / "model.pt")))
    with torch.no_grad():
        for batch in _images():
            torch.testing.assert_close(module(batch), p.logits(batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", _params(FAST_ONNX))
def test_onnx_export_agrees_with_the_predictor(case, tmp_path):
    """The ONNX recipe: the evaluation view (resized / cropped, grey on 3 channels) as pixels / 255 in, the
    Predictor's logits of the images the view was cut from out."""
    ort = pytest.importorskip("onnxruntime", reason="the optional export extra is not installed")
    pytest.importorskip("onnxscript")
    from dscl import load_run
    from dscl.interop import export_run

    run_dir, _ = _tiny_run(case, tmp_path)
    p = load_run(run_dir)
    session = ort.InferenceSession(str(export_run(p, "onnx", tmp_path / "model.onnx")),
                                   providers=["CPUExecutionProvider"])
    pre = p.transform.preprocess
    for batch in _images()[:2]:
        view = pre._resize(pre._channels(batch.permute(0, 3, 1, 2))).float() / 255  # what the recipe says
        (out,) = session.run(["logits"], {"images": view.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), p.logits(batch), rtol=1e-4, atol=1e-4)
